"""SGX's own data structures, byte for byte.

Layouts follow the Intel SDM (Vol. 3D, "SGX data structures") and the DCAP
headers (``sgx_report.h``, ``sgx_key.h``): REPORT body 384 bytes, REPORT 432,
TARGETINFO 512, KEYREQUEST 512.  Everything the emulated platform produces uses
these, so the parsing and policy code is the code a hardware back end would use.
All integers are little-endian, as on the CPU.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

# ATTRIBUTES.FLAGS bits (SDM 38.7.1)
FLAG_INIT = 1 << 0
FLAG_DEBUG = 1 << 1
FLAG_MODE64BIT = 1 << 2
FLAG_PROVISIONKEY = 1 << 4
FLAG_EINITTOKEN_KEY = 1 << 5
XFRM_LEGACY = 0x3

# KEYREQUEST.KEYNAME
KEYNAME_EINITTOKEN = 0
KEYNAME_PROVISION = 1
KEYNAME_PROVISION_SEAL = 2
KEYNAME_REPORT = 3
KEYNAME_SEAL = 4

# KEYREQUEST.KEYPOLICY bits
KEYPOLICY_MRENCLAVE = 1 << 0
KEYPOLICY_MRSIGNER = 1 << 1
KEYPOLICY_NOISVPRODID = 1 << 2

REPORT_BODY_SIZE = 384
REPORT_SIZE = 432
TARGETINFO_SIZE = 512
KEYREQUEST_SIZE = 512
REPORT_DATA_SIZE = 64


@dataclass(frozen=True)
class Attributes:
    flags: int = FLAG_INIT | FLAG_MODE64BIT
    xfrm: int = XFRM_LEGACY

    _S = struct.Struct("<QQ")

    @property
    def debug(self) -> bool:
        return bool(self.flags & FLAG_DEBUG)

    def pack(self) -> bytes:
        return self._S.pack(self.flags, self.xfrm)

    @classmethod
    def unpack(cls, data: bytes) -> Attributes:
        flags, xfrm = cls._S.unpack(data)
        return cls(flags, xfrm)


def _fixed(name: str, value: bytes, size: int) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")
    return bytes(value)


@dataclass(frozen=True)
class ReportBody:
    """sgx_report_body_t (384 bytes): who an enclave is, plus 64 bytes it chose."""

    mr_enclave: bytes
    mr_signer: bytes
    attributes: Attributes = field(default_factory=Attributes)
    isv_prod_id: int = 0
    isv_svn: int = 0
    report_data: bytes = bytes(REPORT_DATA_SIZE)
    cpu_svn: bytes = bytes(16)
    misc_select: int = 0
    isv_ext_prod_id: bytes = bytes(16)
    config_id: bytes = bytes(64)
    config_svn: int = 0
    isv_family_id: bytes = bytes(16)
    # Reserved ranges are kept as they came, so that unpack -> pack gives the same
    # bytes: MACs and signatures over a body then cover every byte of it.
    reserved1: bytes = field(default=bytes(12), repr=False)
    reserved2: bytes = field(default=bytes(32), repr=False)
    reserved3: bytes = field(default=bytes(32), repr=False)
    reserved4: bytes = field(default=bytes(42), repr=False)

    # cpu_svn, misc_select, reserved1, isv_ext_prod_id, attributes, mr_enclave,
    # reserved2, mr_signer, reserved3, config_id, isv_prod_id, isv_svn,
    # config_svn, reserved4, isv_family_id, report_data
    _S = struct.Struct("<16sI12s16s16s32s32s32s32s64sHHH42s16s64s")

    def __post_init__(self) -> None:
        for fname, size in (
            ("mr_enclave", 32),
            ("mr_signer", 32),
            ("report_data", REPORT_DATA_SIZE),
            ("cpu_svn", 16),
            ("isv_ext_prod_id", 16),
            ("config_id", 64),
            ("isv_family_id", 16),
            ("reserved1", 12),
            ("reserved2", 32),
            ("reserved3", 32),
            ("reserved4", 42),
        ):
            _fixed(fname, getattr(self, fname), size)
        if not 0 <= self.misc_select <= 0xFFFFFFFF:
            raise ValueError("misc_select out of range")
        for name, value in (
            ("isv_prod_id", self.isv_prod_id),
            ("isv_svn", self.isv_svn),
            ("config_svn", self.config_svn),
        ):
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"{name} out of range")

    def pack(self) -> bytes:
        return self._S.pack(
            self.cpu_svn,
            self.misc_select,
            self.reserved1,
            self.isv_ext_prod_id,
            self.attributes.pack(),
            self.mr_enclave,
            self.reserved2,
            self.mr_signer,
            self.reserved3,
            self.config_id,
            self.isv_prod_id,
            self.isv_svn,
            self.config_svn,
            self.reserved4,
            self.isv_family_id,
            self.report_data,
        )

    @classmethod
    def unpack(cls, data: bytes) -> ReportBody:
        if len(data) != REPORT_BODY_SIZE:
            raise ValueError(f"report body must be {REPORT_BODY_SIZE} bytes, got {len(data)}")
        (
            cpu_svn,
            misc_select,
            r1,
            ext_prod,
            attrs,
            mr_enclave,
            r2,
            mr_signer,
            r3,
            config_id,
            prod_id,
            svn,
            config_svn,
            r4,
            family,
            report_data,
        ) = cls._S.unpack(data)
        return cls(
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            attributes=Attributes.unpack(attrs),
            isv_prod_id=prod_id,
            isv_svn=svn,
            report_data=report_data,
            cpu_svn=cpu_svn,
            misc_select=misc_select,
            isv_ext_prod_id=ext_prod,
            config_id=config_id,
            config_svn=config_svn,
            isv_family_id=family,
            reserved1=r1,
            reserved2=r2,
            reserved3=r3,
            reserved4=r4,
        )

    def with_report_data(self, report_data: bytes) -> ReportBody:
        return replace(self, report_data=report_data)


assert ReportBody._S.size == REPORT_BODY_SIZE


@dataclass(frozen=True)
class Report:
    """sgx_report_t (432 bytes): body, the KEYID used for the MAC, and the MAC."""

    body: ReportBody
    key_id: bytes
    mac: bytes

    def pack(self) -> bytes:
        return self.body.pack() + _fixed("key_id", self.key_id, 32) + _fixed("mac", self.mac, 16)

    @classmethod
    def unpack(cls, data: bytes) -> Report:
        if len(data) != REPORT_SIZE:
            raise ValueError(f"report must be {REPORT_SIZE} bytes, got {len(data)}")
        return cls(ReportBody.unpack(data[:384]), data[384:416], data[416:432])


@dataclass(frozen=True)
class TargetInfo:
    """sgx_target_info_t (512 bytes): the enclave a REPORT is MACed for."""

    mr_enclave: bytes
    attributes: Attributes = field(default_factory=Attributes)
    config_svn: int = 0
    misc_select: int = 0
    config_id: bytes = bytes(64)

    # mr_enclave, attributes, reserved1(2), config_svn, misc_select,
    # reserved2(8), config_id, reserved3(384)
    _S = struct.Struct("<32s16s2sHI8s64s384s")

    def pack(self) -> bytes:
        return self._S.pack(
            _fixed("mr_enclave", self.mr_enclave, 32),
            self.attributes.pack(),
            bytes(2),
            self.config_svn,
            self.misc_select,
            bytes(8),
            self.config_id,
            bytes(384),
        )

    @classmethod
    def unpack(cls, data: bytes) -> TargetInfo:
        if len(data) != TARGETINFO_SIZE:
            raise ValueError(f"target info must be {TARGETINFO_SIZE} bytes, got {len(data)}")
        mr, attrs, _r1, config_svn, misc, _r2, config_id, _r3 = cls._S.unpack(data)
        return cls(mr, Attributes.unpack(attrs), config_svn, misc, config_id)


assert TargetInfo._S.size == TARGETINFO_SIZE


@dataclass(frozen=True)
class KeyRequest:
    """sgx_key_request_t (512 bytes): what EGETKEY is asked for."""

    key_name: int
    key_policy: int = KEYPOLICY_MRSIGNER
    isv_svn: int = 0
    cpu_svn: bytes = bytes(16)
    attribute_mask: Attributes = field(
        default_factory=lambda: Attributes(0xFFFFFFFFFFFFFFFF & ~0, 0)
    )
    key_id: bytes = bytes(32)
    misc_mask: int = 0xFFFFFFFF
    config_svn: int = 0

    # key_name, key_policy, isv_svn, reserved1(2), cpu_svn, attribute_mask,
    # key_id, misc_mask, config_svn, reserved2(434)
    _S = struct.Struct("<HHH2s16s16s32sIH434s")

    def pack(self) -> bytes:
        return self._S.pack(
            self.key_name,
            self.key_policy,
            self.isv_svn,
            bytes(2),
            _fixed("cpu_svn", self.cpu_svn, 16),
            self.attribute_mask.pack(),
            _fixed("key_id", self.key_id, 32),
            self.misc_mask,
            self.config_svn,
            bytes(434),
        )

    @classmethod
    def unpack(cls, data: bytes) -> KeyRequest:
        if len(data) != KEYREQUEST_SIZE:
            raise ValueError(f"key request must be {KEYREQUEST_SIZE} bytes, got {len(data)}")
        name, policy, svn, _r1, cpu_svn, mask, key_id, misc_mask, config_svn, _r2 = cls._S.unpack(
            data
        )
        return cls(
            name, policy, svn, cpu_svn, Attributes.unpack(mask), key_id, misc_mask, config_svn
        )


assert KeyRequest._S.size == KEYREQUEST_SIZE
