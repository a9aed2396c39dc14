"""What a checkpoint holds, in the spirit of ``checkpointctl inspect``; and what it must not.

Kinds recognised (:func:`inspect_path`):

* ``migsgx-checkpoint``: a directory made by ``migsgx checkpoint``: CRIU's
  images, ``migsgx.json`` and per enclave its image, sealed key and sealed
  state (``docs/spec/checkpoint.md``);
* ``migration-images``: what a migration dumped and kept (``--keep-images``)
  for the ``pid``, ``runc`` or ``containerd`` driver, or for ``podman`` (its
  export archive inside);
* ``podman-archive``: ``podman container checkpoint --export`` (uncompressed
  or gzip);
* ``containerd-checkpoint``: a containerd checkpoint image as an OCI layout
  archive (``ctr``'s, or the one a destination writes).

The scan is the project's canary check as a command: every byte of every
file (gzip members opened) is searched for the ``canaries`` given, and each
enclave's sealed state is checked frame by frame: well formed, and no frame
of a few KiB or more that compresses (ciphertext does not; plaintext memory
usually does).  Nothing is written anywhere.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import cbor2
from google.protobuf import any_pb2

from .._records import hex_text
from ..criu.images import command_of, process_tree
from ..errors import ImageError, InspectError, MigSGXError
from ..sgx.image import EnclaveImage
from .sources import Bundle, Member, open_bundle

__all__ = ["inspect_path"]

FRAME: Final = struct.Struct(">IB")  # docs/spec/checkpoint.md, section 1
FRAME_FINAL: Final = 0x01
SEAL_HEADER: Final = struct.Struct("<8sHH16s")  # docs/spec/sealing.md, section 2
KEY_POLICIES: Final = {1: "MRENCLAVE", 2: "MRSIGNER"}
COMPRESSIBLE: Final = 0.9  # a frame compressing below this share of its size is suspect
CHECK_FRAME_BYTES: Final = 4096
MAX_GUNZIP: Final = 1 << 30
CRIU_DIR_NAMES: Final = ("inventory.img", "pstree.img")


def inspect_path(
    path: Path, *, canaries: Sequence[bytes] = (), state: Path | None = None
) -> dict[str, Any]:
    """The report for the checkpoint at ``path`` (see the module docstring)."""

    with open_bundle(Path(path)) as bundle:
        report = _describe(bundle, state)
        report["path"] = str(path)
        report["scan"] = _scan(bundle, report, canaries)
    return report


# --- kinds -----------------------------------------------------------------------------------
def _describe(bundle: Bundle, state: Path | None) -> dict[str, Any]:
    names = bundle.members
    if "migsgx.json" in names or any(n.startswith("enclave-") for n in names):
        report: dict[str, Any] = {"kind": "migsgx-checkpoint", "engine": "process"}
        report.update(_criu(bundle, ""))
        report.update(_enclaves(bundle, state))
        return report
    if "config.dump" in names and "spec.dump" in names:
        return _podman(bundle)
    if "index.json" in names and "oci-layout" in names:
        return _containerd_image(bundle)
    report = {"kind": "migration-images", "enclaves": [], "committed": None}
    if "migsgx-podman-export.tar" in names:
        inner = bundle.nested(names["migsgx-podman-export.tar"])
        report.update(_podman(inner), kind="migration-images")
        return report
    if "migsgx-containerd.json" in names:
        record = _json(names["migsgx-containerd.json"])
        report["engine"] = "containerd"
        report["container"] = {"image": record.get("image"), "runtime": record.get("runtime")}
    elif "migsgx-runc-config.json" in names:
        report["engine"] = "runc"
        config = _json(names["migsgx-runc-config.json"])
        report["container"] = {"args": (config.get("process") or {}).get("args")}
    elif all(n in names for n in CRIU_DIR_NAMES):
        report["engine"] = "process"
    else:
        raise InspectError(
            f"{bundle.where}: not a checkpoint migsgx knows (no CRIU images, no migsgx.json, "
            "not a podman or containerd checkpoint archive)"
        )
    report.update(_criu(bundle, ""))
    return report


def _podman(bundle: Bundle) -> dict[str, Any]:
    config = _json(bundle.members["config.dump"])
    spec: dict[str, Any] = config["spec"] if isinstance(config.get("spec"), dict) else {}
    report: dict[str, Any] = {
        "kind": "podman-archive",
        "engine": "podman",
        "container": {
            "name": config.get("name"),
            "id": config.get("id"),
            "image": config.get("rootfsImageName") or config.get("rootfsImageID"),
            "args": (spec.get("process") or {}).get("args"),
        },
        "enclaves": [],
        "committed": None,
    }
    report.update(_criu(bundle, "checkpoint"))
    return report


def _containerd_image(bundle: Bundle) -> dict[str, Any]:
    from ..containers.layout import CHECKPOINT_CRIU, CHECKPOINT_SPEC, INDEX

    top = _json(bundle.members["index.json"])
    index: dict[str, Any] | None = None
    for desc in top.get("manifests") or []:
        if isinstance(desc, dict) and desc.get("mediaType") == INDEX:
            index = _json(_blob(bundle, desc))
            name = (desc.get("annotations") or {}).get("io.containerd.image.name")
            break
    if index is None:
        raise InspectError(f"{bundle.where}: an OCI archive, but no checkpoint index in it")
    found = {d.get("mediaType"): d for d in index.get("manifests") or [] if isinstance(d, dict)}
    if CHECKPOINT_CRIU not in found:
        raise InspectError(f"{bundle.where}: an OCI index without CRIU images (not a checkpoint)")
    container: dict[str, Any] = {
        "checkpoint": name,
        "image": (index.get("annotations") or {}).get("org.opencontainers.image.ref.name"),
        "runtime": (index.get("annotations") or {}).get("io.containerd.checkpoint.runtime"),
    }
    if CHECKPOINT_SPEC in found:
        message = any_pb2.Any()
        try:
            message.ParseFromString(_blob(bundle, found[CHECKPOINT_SPEC]).read())
            spec = json.loads(message.value)
        except Exception as exc:  # protobuf's DecodeError, JSON's ValueError
            raise InspectError(f"{bundle.where}: the checkpoint's spec is unreadable") from exc
        container["args"] = (spec.get("process") or {}).get("args")
    report: dict[str, Any] = {
        "kind": "containerd-checkpoint",
        "engine": "containerd",
        "container": container,
        "enclaves": [],
        "committed": None,
    }
    report.update(_criu(bundle.nested(_blob(bundle, found[CHECKPOINT_CRIU])), ""))
    return report


def _blob(bundle: Bundle, desc: Mapping[str, Any]) -> Member:
    digest = str(desc.get("digest") or "")
    algo, _, hexpart = digest.partition(":")
    member = bundle.get(f"blobs/{algo}/{hexpart}")
    if member is None or not hexpart:
        raise InspectError(f"{bundle.where}: blob {digest or '(none)'} is missing")
    return member


def _json(member: Member) -> dict[str, Any]:
    try:
        value = json.loads(member.read())
    except (ValueError, RecursionError) as exc:  # (a forged file may nest too deep)
        raise InspectError(f"{member.name}: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InspectError(f"{member.name}: not a JSON object")
    return value


# --- CRIU's part -------------------------------------------------------------------------------
def _criu(bundle: Bundle, prefix: str) -> dict[str, Any]:
    files = bundle.under(prefix)
    if "pstree.img" not in files:
        raise InspectError(f"{bundle.where}: no CRIU process tree (pstree.img) in {prefix or '.'}")
    tree = process_tree(files["pstree.img"].read())
    for proc in tree:
        core = files.get(f"core-{proc['pid']}.img")
        proc["command"] = command_of(core.read(), core.name) if core is not None else None
    images = [m for n, m in files.items() if n.endswith(".img")]
    return {
        "processes": tree,
        "criu": {
            "images": len(images),
            "image_bytes": sum(m.size for m in images),
            "memory_bytes": sum(m.size for n, m in files.items() if n.startswith("pages-")),
        },
    }


# --- enclaves ----------------------------------------------------------------------------------
def _enclaves(bundle: Bundle, state: Path | None) -> dict[str, Any]:
    names = bundle.members
    meta = _json(names["migsgx.json"]) if "migsgx.json" in names else None
    count = sum(1 for n in names if n.startswith("enclave-") and n.endswith(".json"))
    if meta is not None and meta.get("enclaves") != count:
        raise InspectError(
            f"{bundle.where}: migsgx.json names {meta.get('enclaves')} enclaves, {count} are here"
        )
    claims = _claims(state) if state is not None else None
    out = []
    for i in range(count):
        out.append(_enclave(bundle, i, committed=meta is not None, claims=claims, state=state))
    return {"enclaves": out, "committed": meta is not None}


def _enclave(
    bundle: Bundle, index: int, *, committed: bool, claims: set[bytes] | None, state: Path | None
) -> dict[str, Any]:
    names = bundle.members
    parts = {k: names.get(f"enclave-{index}.{k}") for k in ("image", "key", "state", "json")}
    missing = [k for k, m in parts.items() if m is None]
    if missing:
        raise InspectError(f"{bundle.where}: enclave {index} lacks its {', '.join(missing)} file")
    facts = _json(parts["json"])  # type: ignore[arg-type]
    try:
        files = cbor2.loads(parts["image"].read())  # type: ignore[union-attr]
        if not isinstance(files, dict):
            raise ValueError("not a map")
        image = EnclaveImage.from_files(files)
    except (ValueError, cbor2.CBORDecodeError, ImageError) as exc:
        raise InspectError(f"enclave-{index}.image: not an enclave image: {exc}") from exc
    m = image.manifest
    try:
        mr_signer: str | None = image.sigstruct.mr_signer.hex()
    except MigSGXError:
        mr_signer = None
    key = parts["key"].read(1 << 20)  # type: ignore[union-attr]
    if len(key) < SEAL_HEADER.size or key[:8] != b"MSXSEAL1":
        raise InspectError(f"enclave-{index}.key: not a sealed blob")
    _, policy, key_svn, _cpu_svn = SEAL_HEADER.unpack_from(key)
    ckpt_id = str(facts.get("checkpoint_id") or "")
    if not hex_text(ckpt_id):
        raise InspectError(f"enclave-{index}.json: its checkpoint id is not hex")
    if claims is None:
        status = "restorable once, on the host that sealed it" if committed else "not committed"
    elif any(c.endswith(b"/" + bytes.fromhex(ckpt_id)) for c in claims if ckpt_id):
        status = f"spent (restored on {state})"
    elif ckpt_id and ("!ckpt-" + ckpt_id).encode() not in claims:
        # Its gate (docs/spec/checkpoint.md) is gone from the host's record store.
        status = f"spent (its gate on {state} is gone: restored, or aborted)"
    else:
        status = "restorable" if committed else "not committed"
    return {
        "index": index,
        "name": m.name,
        "mrenclave": image.measure().hex(),
        "mrsigner": mr_signer,
        "isv_prod_id": m.product_id,
        "isv_svn": m.svn,
        "debug": m.debug,
        "memory_size": m.memory_size,
        "migration_policy": m.migration_policy,
        "checkpoint_id": ckpt_id,
        "sealed": {
            "key_policy": KEY_POLICIES.get(policy, f"unknown ({policy})"),
            "key_svn": key_svn,
            "to": "this host only (platform seal key)",
            "key_bytes": parts["key"].size,  # type: ignore[union-attr]
            "state_bytes": parts["state"].size,  # type: ignore[union-attr]
            "memory_bytes": facts.get("memory_bytes"),
        },
        "status": status,
    }


def _claims(state: Path) -> set[bytes]:
    """Claimed ids (owner/id) of the host, and the names of its checkpoint gates."""

    found: set[bytes] = set()
    legacy = Path(state) / "migrations.cbor"
    path = Path(state) / "counters.cbor"
    try:
        data = cbor2.loads(path.read_bytes())
        old = cbor2.loads(legacy.read_bytes()) if legacy.exists() else {}
    except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
        raise InspectError(f"{path}: no readable record store: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(old, dict):
        raise InspectError(f"{path}: not a record store")
    for claims in (data.get("claims", []), old.get("claims", [])):
        if isinstance(claims, list):
            found |= {bytes(c) for c in claims if isinstance(c, bytes)}
    records = data.get("records", {})
    if isinstance(records, dict):
        found |= {k.split("/", 1)[1].encode() for k in records if isinstance(k, str) and "/!" in k}
    return found


# --- the scan ----------------------------------------------------------------------------------
def _scan(bundle: Bundle, report: Mapping[str, Any], canaries: Sequence[bytes]) -> dict[str, Any]:
    hits: dict[str, list[str]] = {c.decode("utf-8", "replace"): [] for c in canaries}
    if canaries:
        for where, chunks in _all_streams(bundle):
            for needle in _find(chunks, canaries):
                hits[needle.decode("utf-8", "replace")].append(where)
    suspects: list[str] = []
    frames = 0
    for enclave in report.get("enclaves") or []:
        member = bundle.members[f"enclave-{enclave['index']}.state"]
        n, bad = _check_frames(member)
        frames += n
        suspects += bad
    found = any(hits.values()) or bool(suspects)
    return {
        "canaries": hits,
        "sealed_frames": frames,
        "plaintext_suspects": suspects,
        "clean": not found,
    }


def _all_streams(bundle: Bundle) -> Iterator[tuple[str, Iterable[bytes]]]:
    for name, member in sorted(bundle.members.items()):
        yield f"{bundle.where}:{name}", member.chunks()
        if _is_gzip(member):
            yield f"{bundle.where}:{name} (gunzipped)", _gunzip(member)


def _is_gzip(member: Member) -> bool:
    if member.size < 18:
        return False
    with member.opener() as f:
        return f.read(2) == b"\x1f\x8b"


def _gunzip(member: Member) -> Iterator[bytes]:
    inflater = zlib.decompressobj(wbits=47)
    total = 0
    try:
        for chunk in member.chunks(1 << 20):
            out = inflater.decompress(chunk)
            total += len(out)
            if total > MAX_GUNZIP:
                raise InspectError(f"{member.name}: more than {MAX_GUNZIP} bytes once gunzipped")
            yield out
    except zlib.error as exc:
        raise InspectError(f"{member.name}: broken gzip data: {exc}") from exc


def _find(chunks: Iterable[bytes], needles: Sequence[bytes]) -> set[bytes]:
    keep = max(len(n) for n in needles) - 1
    found: set[bytes] = set()
    tail = b""
    for chunk in chunks:
        data = tail + chunk
        found.update(n for n in needles if n in data)
        tail = data[-keep:] if keep else b""
    return found


def _check_frames(member: Member) -> tuple[int, list[str]]:
    """(frames, suspects) of a sealed state file; a malformed file is an InspectError."""

    buf = b""
    count = 0
    final = False
    suspects: list[str] = []
    for chunk in member.chunks():
        buf += chunk
        while len(buf) >= FRAME.size:
            length, flags = FRAME.unpack_from(buf)
            if len(buf) < FRAME.size + length:
                break
            if final:
                raise InspectError(f"{member.name}: bytes after the final frame")
            payload = buf[FRAME.size : FRAME.size + length]
            if (
                length >= CHECK_FRAME_BYTES
                and len(zlib.compress(payload, 1)) < COMPRESSIBLE * length
            ):
                suspects.append(f"{member.name}: frame {count} compresses (plaintext?)")
            final = bool(flags & FRAME_FINAL)
            count += 1
            buf = buf[FRAME.size + length :]
    if buf or not final:
        raise InspectError(f"{member.name}: truncated (no final frame)")
    return count, suspects
