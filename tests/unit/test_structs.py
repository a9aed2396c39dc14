"""SGX structures byte for byte: sizes, Intel's field offsets, exact roundtrips."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migsgx.sgx.structs import (
    FLAG_DEBUG,
    FLAG_INIT,
    FLAG_MODE64BIT,
    KEYNAME_SEAL,
    KEYPOLICY_MRENCLAVE,
    KEYREQUEST_SIZE,
    REPORT_BODY_SIZE,
    REPORT_SIZE,
    TARGETINFO_SIZE,
    Attributes,
    KeyRequest,
    Report,
    ReportBody,
    TargetInfo,
)


def _distinct_body() -> ReportBody:
    """Every field a different, recognisable value."""

    return ReportBody(
        mr_enclave=bytes([0xE1]) * 32,
        mr_signer=bytes([0x51]) * 32,
        attributes=Attributes(FLAG_INIT | FLAG_DEBUG | FLAG_MODE64BIT, 0x1F),
        isv_prod_id=0x1234,
        isv_svn=0xABCD,
        report_data=bytes(range(64)),
        cpu_svn=bytes([0xC5]) * 16,
        misc_select=0xDEADBEEF,
        isv_ext_prod_id=bytes([0xEE]) * 16,
        config_id=bytes([0xCF]) * 64,
        config_svn=0x0F0F,
        isv_family_id=bytes([0xFA]) * 16,
    )


def test_sizes() -> None:
    assert len(_distinct_body().pack()) == REPORT_BODY_SIZE == 384
    report = Report(_distinct_body(), bytes(32), bytes(16))
    assert len(report.pack()) == REPORT_SIZE == 432
    assert len(TargetInfo(bytes(32)).pack()) == TARGETINFO_SIZE == 512
    assert len(KeyRequest(KEYNAME_SEAL).pack()) == KEYREQUEST_SIZE == 512


# Offsets from Intel's sgx_report_body_t (sgx_report.h).
@pytest.mark.parametrize(
    ("offset", "raw"),
    [
        (0, bytes([0xC5]) * 16),  # cpu_svn
        (16, (0xDEADBEEF).to_bytes(4, "little")),  # misc_select
        (20, bytes(12)),  # reserved1
        (32, bytes([0xEE]) * 16),  # isv_ext_prod_id
        (48, (FLAG_INIT | FLAG_DEBUG | FLAG_MODE64BIT).to_bytes(8, "little")),  # flags
        (56, (0x1F).to_bytes(8, "little")),  # xfrm
        (64, bytes([0xE1]) * 32),  # mr_enclave
        (96, bytes(32)),  # reserved2
        (128, bytes([0x51]) * 32),  # mr_signer
        (160, bytes(32)),  # reserved3
        (192, bytes([0xCF]) * 64),  # config_id
        (256, (0x1234).to_bytes(2, "little")),  # isv_prod_id
        (258, (0xABCD).to_bytes(2, "little")),  # isv_svn
        (260, (0x0F0F).to_bytes(2, "little")),  # config_svn
        (262, bytes(42)),  # reserved4
        (304, bytes([0xFA]) * 16),  # isv_family_id
        (320, bytes(range(64))),  # report_data
    ],
)
def test_report_body_offsets(offset: int, raw: bytes) -> None:
    packed = _distinct_body().pack()
    assert packed[offset : offset + len(raw)] == raw


def test_report_layout() -> None:
    body = _distinct_body()
    packed = Report(body, bytes([0x4B]) * 32, bytes([0x3A]) * 16).pack()
    assert packed[:384] == body.pack()
    assert packed[384:416] == bytes([0x4B]) * 32  # key_id
    assert packed[416:432] == bytes([0x3A]) * 16  # mac


def test_target_info_offsets() -> None:
    ti = TargetInfo(
        mr_enclave=bytes([0xE1]) * 32,
        attributes=Attributes(FLAG_INIT | FLAG_DEBUG, 3),
        config_svn=0x0102,
        misc_select=0x0A0B0C0D,
        config_id=bytes([0xCF]) * 64,
    )
    packed = ti.pack()
    assert packed[0:32] == bytes([0xE1]) * 32
    assert packed[32:48] == Attributes(FLAG_INIT | FLAG_DEBUG, 3).pack()
    assert packed[50:52] == (0x0102).to_bytes(2, "little")
    assert packed[52:56] == (0x0A0B0C0D).to_bytes(4, "little")
    assert packed[64:128] == bytes([0xCF]) * 64
    assert TargetInfo.unpack(packed) == ti


def test_key_request_offsets() -> None:
    req = KeyRequest(
        KEYNAME_SEAL,
        key_policy=KEYPOLICY_MRENCLAVE,
        isv_svn=0x0304,
        cpu_svn=bytes([0xC5]) * 16,
        attribute_mask=Attributes(0x11, 0x22),
        key_id=bytes([0x1D]) * 32,
        misc_mask=0x55667788,
        config_svn=0x0909,
    )
    packed = req.pack()
    assert packed[0:2] == KEYNAME_SEAL.to_bytes(2, "little")
    assert packed[2:4] == KEYPOLICY_MRENCLAVE.to_bytes(2, "little")
    assert packed[4:6] == (0x0304).to_bytes(2, "little")
    assert packed[8:24] == bytes([0xC5]) * 16
    assert packed[24:40] == Attributes(0x11, 0x22).pack()
    assert packed[40:72] == bytes([0x1D]) * 32
    assert packed[72:76] == (0x55667788).to_bytes(4, "little")
    assert packed[76:78] == (0x0909).to_bytes(2, "little")
    assert packed[78:] == bytes(434)
    assert KeyRequest.unpack(packed) == req


def test_debug_attribute() -> None:
    assert Attributes(FLAG_INIT | FLAG_DEBUG).debug
    assert not Attributes().debug


def test_report_body_roundtrip() -> None:
    body = _distinct_body()
    assert ReportBody.unpack(body.pack()) == body
    assert body.with_report_data(bytes(64)).report_data == bytes(64)


@pytest.mark.parametrize(
    "field",
    [
        "mr_enclave",
        "mr_signer",
        "report_data",
        "cpu_svn",
        "isv_ext_prod_id",
        "config_id",
        "isv_family_id",
    ],
)
def test_report_body_refuses_wrong_sizes(field: str) -> None:
    good = _distinct_body()
    with pytest.raises(ValueError):
        ReportBody(**{**good.__dict__, field: getattr(good, field) + b"\x00"})
    with pytest.raises(ValueError):
        ReportBody(**{**good.__dict__, field: getattr(good, field)[:-1]})


@pytest.mark.parametrize("field", ["isv_prod_id", "isv_svn", "config_svn"])
def test_report_body_refuses_out_of_range(field: str) -> None:
    good = _distinct_body()
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError):
            ReportBody(**{**good.__dict__, field: bad})


@pytest.mark.parametrize(
    ("cls", "size"),
    [(ReportBody, 384), (Report, 432), (TargetInfo, 512), (KeyRequest, 512)],
)
def test_unpack_refuses_wrong_lengths(cls: Any, size: int) -> None:
    for n in (0, size - 1, size + 1):
        with pytest.raises(ValueError):
            cls.unpack(bytes(n))


# Every byte of a REPORT body or REPORT survives unpack -> pack, reserved ranges too:
# otherwise a MAC or signature over the repacked body would not cover those bytes.
@given(st.binary(min_size=REPORT_BODY_SIZE, max_size=REPORT_BODY_SIZE))
def test_report_body_bytes_roundtrip_exactly(raw: bytes) -> None:
    assert ReportBody.unpack(raw).pack() == raw


@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE))
def test_report_bytes_roundtrip_exactly(raw: bytes) -> None:
    assert Report.unpack(raw).pack() == raw


def test_reserved_bytes_are_part_of_the_identity() -> None:
    raw = bytearray(_distinct_body().pack())
    raw[100] ^= 1  # inside reserved2
    assert ReportBody.unpack(bytes(raw)) != _distinct_body()


_u16 = st.integers(0, 0xFFFF)
_u64 = st.integers(0, (1 << 64) - 1)


@given(
    mr_enclave=st.binary(min_size=32, max_size=32),
    mr_signer=st.binary(min_size=32, max_size=32),
    flags=_u64,
    xfrm=_u64,
    prod=_u16,
    svn=_u16,
    config_svn=_u16,
    misc=st.integers(0, 0xFFFFFFFF),
    data=st.binary(min_size=64, max_size=64),
    cpu_svn=st.binary(min_size=16, max_size=16),
)
def test_report_body_fields_roundtrip(
    mr_enclave: bytes,
    mr_signer: bytes,
    flags: int,
    xfrm: int,
    prod: int,
    svn: int,
    config_svn: int,
    misc: int,
    data: bytes,
    cpu_svn: bytes,
) -> None:
    body = ReportBody(
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        attributes=Attributes(flags, xfrm),
        isv_prod_id=prod,
        isv_svn=svn,
        report_data=data,
        cpu_svn=cpu_svn,
        misc_select=misc,
        config_svn=config_svn,
    )
    again = ReportBody.unpack(body.pack())
    assert again == body
    assert again.attributes.debug == bool(flags & FLAG_DEBUG)


@given(
    mr_enclave=st.binary(min_size=32, max_size=32),
    flags=_u64,
    xfrm=_u64,
    config_svn=_u16,
    misc=st.integers(0, 0xFFFFFFFF),
    config_id=st.binary(min_size=64, max_size=64),
)
def test_target_info_roundtrip(
    mr_enclave: bytes, flags: int, xfrm: int, config_svn: int, misc: int, config_id: bytes
) -> None:
    ti = TargetInfo(mr_enclave, Attributes(flags, xfrm), config_svn, misc, config_id)
    assert TargetInfo.unpack(ti.pack()) == ti


@given(
    name=_u16,
    policy=_u16,
    svn=_u16,
    cpu_svn=st.binary(min_size=16, max_size=16),
    mask_flags=_u64,
    mask_xfrm=_u64,
    key_id=st.binary(min_size=32, max_size=32),
    misc_mask=st.integers(0, 0xFFFFFFFF),
    config_svn=_u16,
)
def test_key_request_roundtrip(
    name: int,
    policy: int,
    svn: int,
    cpu_svn: bytes,
    mask_flags: int,
    mask_xfrm: int,
    key_id: bytes,
    misc_mask: int,
    config_svn: int,
) -> None:
    req = KeyRequest(
        name,
        policy,
        svn,
        cpu_svn,
        Attributes(mask_flags, mask_xfrm),
        key_id,
        misc_mask,
        config_svn,
    )
    assert KeyRequest.unpack(req.pack()) == req
