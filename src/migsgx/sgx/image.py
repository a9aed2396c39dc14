"""Enclave images: manifest, canonical measurement (MRENCLAVE), author signature.

An image is a directory holding the enclave's Python code and ``manifest.toml``.
Its measurement is SHA-256 over a canonical encoding of every manifest field
and every file (sorted by path; path, size and content hash of each), so it is
independent of directory order and timestamps and changes with any byte.
``enclave.sig`` (the SIGSTRUCT) is the only file not measured: it carries the
author's RSA-3072 signature (public exponent 3, PKCS#1 v1.5 / SHA-256, as SGX
requires) over the measurement and the enclave's attributes, product id and
SVN.  MRSIGNER is SHA-256 of the author's modulus, little-endian, as in SGX.
The byte layout is in ``docs/spec/image.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import stat
import struct
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .._fs import write_private
from ..errors import (
    ImageError,
    ImageMeasurementError,
    ImageSignatureError,
    ImageUnsignedError,
)
from .structs import FLAG_DEBUG, Attributes
from .tcb_status import ACCEPTABLE_STATUSES

MANIFEST = "manifest.toml"
SIGNATURE = "enclave.sig"
PAGE_SIZE = 4096
MAX_IMAGE_BYTES = 16 << 20
MAX_FILES = 512
_MEASURE_LABEL = b"migsgx-mrenclave-v1\x00"
_SIG_MAGIC = b"MSXSIG01"
# magic, vendor, date, mrenclave, attributes, attribute mask, isv_prod_id, isv_svn
_SIG_HEADER = struct.Struct("<8sII32s16s16sHH")
_RSA_BYTES = 384
SIGSTRUCT_SIZE = _SIG_HEADER.size + _RSA_BYTES + 4 + _RSA_BYTES

_SIZE_RE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_ENTRY_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# The name becomes part of file names on the host (the enclave's log).
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def parse_size(value: int | str) -> int:
    """``4096``, ``"64MiB"``, ``"1 GiB"`` -> bytes."""

    if isinstance(value, bool):
        raise ValueError("size must be a number of bytes")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError("size must be a number of bytes or a string such as '64MiB'")
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (use bytes or KiB/MiB/GiB)")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Manifest:
    name: str
    entry: str
    memory_size: int
    thread_slots: int = 4
    product_id: int = 0
    svn: int = 0
    debug: bool = False
    # Who may receive this enclave's state: "same-enclave" or "same-signer".
    # Measured like every field, so the untrusted side cannot weaken it.
    migration_policy: str = "same-enclave"
    # TCB statuses besides UpToDate that a peer platform may have (never Revoked).
    # Measured, and only when non-empty, so images without it keep their MRENCLAVE.
    accept_tcb: tuple[str, ...] = ()

    _FIELDS = (
        "name",
        "entry",
        "memory_size",
        "thread_slots",
        "product_id",
        "svn",
        "debug",
        "migration_policy",
        "accept_tcb",
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Manifest:
        section = data.get("enclave")
        if not isinstance(section, dict):
            raise ImageError("manifest has no [enclave] table")
        unknown = set(section) - set(cls._FIELDS)
        if unknown or set(data) - {"enclave"}:
            raise ImageError(
                f"manifest has unknown fields: {sorted(unknown | (set(data) - {'enclave'}))}"
            )
        try:
            m = cls(
                name=_typed(section, "name", str),
                entry=_typed(section, "entry", str),
                memory_size=parse_size(section["memory_size"]),
                thread_slots=_typed(section, "thread_slots", int, 4),
                product_id=_typed(section, "product_id", int, 0),
                svn=_typed(section, "svn", int, 0),
                debug=_typed(section, "debug", bool, False),
                migration_policy=_typed(section, "migration_policy", str, "same-enclave"),
                accept_tcb=_statuses(section),
            )
        except KeyError as exc:
            raise ImageError(f"manifest lacks required field {exc.args[0]!r}") from exc
        except ValueError as exc:
            raise ImageError(f"manifest: {exc}") from exc
        m.check()
        return m

    def check(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ImageError(
                "manifest name must be 1-64 characters of A-Z a-z 0-9 _ . - "
                "and must not start with . or -"
            )
        if not _ENTRY_RE.fullmatch(self.entry):
            raise ImageError(f"manifest entry {self.entry!r} is not 'module:Class'")
        if self.memory_size <= 0 or self.memory_size % PAGE_SIZE:
            raise ImageError(f"memory_size must be a positive multiple of {PAGE_SIZE}")
        if not 1 <= self.thread_slots <= 256:
            raise ImageError("thread_slots must be 1-256")
        if self.migration_policy not in ("same-enclave", "same-signer"):
            raise ImageError("migration_policy must be 'same-enclave' or 'same-signer'")
        bad = [s for s in self.accept_tcb if s not in ACCEPTABLE_STATUSES]
        if bad:
            raise ImageError(
                f"accept_tcb may list only {', '.join(ACCEPTABLE_STATUSES)}; not {bad}"
            )
        for field in ("product_id", "svn"):
            if not 0 <= getattr(self, field) <= 0xFFFF:
                raise ImageError(f"{field} must be 0-65535")

    def canonical(self) -> bytes:
        fields = {f: getattr(self, f) for f in self._FIELDS}
        if not self.accept_tcb:
            del fields["accept_tcb"]
        else:
            fields["accept_tcb"] = sorted(self.accept_tcb)
        return cbor2.dumps(fields, canonical=True)

    @property
    def attributes(self) -> Attributes:
        base = Attributes()
        return Attributes(base.flags | (FLAG_DEBUG if self.debug else 0), base.xfrm)


def _statuses(section: Mapping[str, Any]) -> tuple[str, ...]:
    value = section.get("accept_tcb", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("accept_tcb must be a list of TCB status names")
    return tuple(value)


def _typed(section: Mapping[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in section:
        if default is ...:
            raise KeyError(key)
        return default
    value = section[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} must be of type {kind.__name__}")
    return value


@dataclass(frozen=True)
class SigStruct:
    vendor: int
    date: int
    mr_enclave: bytes
    attributes: Attributes
    attribute_mask: Attributes
    isv_prod_id: int
    isv_svn: int
    modulus: bytes  # little-endian, 384 bytes
    exponent: int
    signature: bytes  # little-endian, 384 bytes

    def signed_part(self) -> bytes:
        return _SIG_HEADER.pack(
            _SIG_MAGIC,
            self.vendor,
            self.date,
            self.mr_enclave,
            self.attributes.pack(),
            self.attribute_mask.pack(),
            self.isv_prod_id,
            self.isv_svn,
        )

    def pack(self) -> bytes:
        return self.signed_part() + self.modulus + struct.pack("<I", self.exponent) + self.signature

    @classmethod
    def unpack(cls, data: bytes) -> SigStruct:
        if len(data) != SIGSTRUCT_SIZE:
            raise ImageSignatureError(f"{SIGNATURE} has the wrong size ({len(data)} bytes)")
        magic, vendor, date, mr, attrs, mask, prod, svn = _SIG_HEADER.unpack_from(data)
        if magic != _SIG_MAGIC:
            raise ImageSignatureError(f"{SIGNATURE} is not a migsgx SIGSTRUCT")
        off = _SIG_HEADER.size
        modulus = data[off : off + _RSA_BYTES]
        (exponent,) = struct.unpack_from("<I", data, off + _RSA_BYTES)
        signature = data[off + _RSA_BYTES + 4 :]
        return cls(
            vendor,
            date,
            mr,
            Attributes.unpack(attrs),
            Attributes.unpack(mask),
            prod,
            svn,
            modulus,
            exponent,
            signature,
        )

    @property
    def mr_signer(self) -> bytes:
        return hashlib.sha256(self.modulus).digest()

    def verify(self) -> None:
        if self.exponent != 3:
            raise ImageSignatureError("SIGSTRUCT exponent must be 3")
        n = int.from_bytes(self.modulus, "little")
        if n.bit_length() != 3072:
            raise ImageSignatureError("SIGSTRUCT modulus is not 3072 bits")
        key = rsa.RSAPublicNumbers(self.exponent, n).public_key()
        try:
            key.verify(
                int.from_bytes(self.signature, "little").to_bytes(_RSA_BYTES, "big"),
                self.signed_part(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as exc:
            raise ImageSignatureError("the enclave's signature does not verify") from exc


@dataclass(frozen=True)
class EnclaveImage:
    """An enclave image held in memory: its files and its parsed manifest."""

    files: Mapping[str, bytes]
    manifest: Manifest

    @classmethod
    def load(cls, path: Path) -> EnclaveImage:
        root = Path(path)
        if not root.is_dir():
            raise ImageError(f"{root} is not an enclave image directory")
        files: dict[str, bytes] = {}
        total = 0
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{rel}: enclave images may hold only regular files")
            data = p.read_bytes()
            total += len(data)
            if total > MAX_IMAGE_BYTES or len(files) >= MAX_FILES:
                raise ImageError(
                    f"image is larger than {MAX_IMAGE_BYTES} bytes or {MAX_FILES} files"
                )
            files[rel] = data
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> EnclaveImage:
        for name, data in files.items():
            if not isinstance(name, str):  # (a checkpoint's CBOR may hold any key)
                raise ImageError(f"bad file name in image: {name!r}")
            pp = PurePosixPath(name)
            if pp.is_absolute() or ".." in pp.parts or not name or name != pp.as_posix():
                raise ImageError(f"bad file name in image: {name!r}")
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ImageError(f"file name in image is not UTF-8: {name!r}") from None
            if not isinstance(data, bytes):
                raise ImageError(f"{name}: file content must be bytes")
        if sum(len(d) for d in files.values()) > MAX_IMAGE_BYTES or len(files) > MAX_FILES:
            raise ImageError("image is too large")
        if MANIFEST not in files:
            raise ImageError(f"image has no {MANIFEST}")
        try:
            raw = tomllib.loads(files[MANIFEST].decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ImageError(f"{MANIFEST} is not valid TOML: {exc}") from exc
        return cls(dict(files), Manifest.from_mapping(raw))

    def measure(self) -> bytes:
        h = hashlib.sha256(_MEASURE_LABEL)
        canon = self.manifest.canonical()
        h.update(struct.pack("<Q", len(canon)) + canon)
        names = sorted(n for n in self.files if n != SIGNATURE)
        h.update(struct.pack("<I", len(names)))
        for name in names:
            enc = name.encode("utf-8")
            data = self.files[name]
            h.update(struct.pack("<I", len(enc)) + enc)
            h.update(struct.pack("<Q", len(data)) + hashlib.sha256(data).digest())
        return h.digest()

    @property
    def sigstruct(self) -> SigStruct:
        raw = self.files.get(SIGNATURE)
        if raw is None:
            raise ImageUnsignedError(f"enclave image {self.manifest.name!r} is not signed")
        return SigStruct.unpack(raw)

    def verify(self) -> SigStruct:
        """What EINIT checks: the signature, and that the image is what was signed."""

        sig = self.sigstruct
        sig.verify()
        if sig.mr_enclave != self.measure():
            raise ImageMeasurementError(
                f"enclave image {self.manifest.name!r} does not match the measurement "
                "its author signed (changed after signing?)"
            )
        m = self.manifest
        if (
            sig.attributes != m.attributes
            or sig.isv_prod_id != m.product_id
            or sig.isv_svn != m.svn
        ):
            raise ImageMeasurementError(
                "SIGSTRUCT attributes, product id or SVN differ from the manifest"
            )
        return sig

    def source_files(self) -> dict[str, bytes]:
        return {n: d for n, d in self.files.items() if n.endswith(".py")}


def generate_author_key(path: Path) -> rsa.RSAPrivateKey:
    """A new RSA-3072 author key with exponent 3, written with mode 0600."""

    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    write_private(
        Path(path),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return key


def mr_signer_of(key: rsa.RSAPrivateKey) -> bytes:
    """MRSIGNER of images signed with ``key``: SHA-256 of the little-endian modulus."""

    return hashlib.sha256(
        key.public_key().public_numbers().n.to_bytes(_RSA_BYTES, "little")
    ).digest()


def load_author_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read the author key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 3072:
        raise ImageError(f"{path} is not an RSA-3072 key")
    if key.public_key().public_numbers().e != 3:
        raise ImageError(f"{path}: SGX requires public exponent 3")
    return key


def sign_image(image: EnclaveImage, key: rsa.RSAPrivateKey, *, vendor: int = 0) -> SigStruct:
    pub = key.public_key().public_numbers()
    if key.key_size != 3072 or pub.e != 3:
        raise ImageError("SGX signs enclaves with RSA-3072, public exponent 3")
    m = image.manifest
    today = _dt.date.today()
    unsigned = SigStruct(
        vendor=vendor,
        date=int(today.strftime("%Y%m%d"), 16),  # BCD yyyymmdd, as SIGSTRUCT.DATE
        mr_enclave=image.measure(),
        attributes=m.attributes,
        attribute_mask=Attributes(0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
        isv_prod_id=m.product_id,
        isv_svn=m.svn,
        modulus=pub.n.to_bytes(_RSA_BYTES, "little"),
        exponent=pub.e,
        signature=bytes(_RSA_BYTES),
    )
    sig = key.sign(unsigned.signed_part(), padding.PKCS1v15(), hashes.SHA256())
    return SigStruct(
        **{
            **unsigned.__dict__,
            "signature": int.from_bytes(sig, "big").to_bytes(_RSA_BYTES, "little"),
        }
    )


def sign_image_dir(path: Path, key: rsa.RSAPrivateKey) -> SigStruct:
    image = EnclaveImage.load(path)
    sig = sign_image(image, key)
    (Path(path) / SIGNATURE).write_bytes(sig.pack())
    return sig
