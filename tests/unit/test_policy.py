"""The migration policy on its own."""

from __future__ import annotations

import hashlib

import pytest

from migsgx.core import EnclaveIdentity, MigrationPolicy, PolicyMode
from migsgx.errors import MigrationError, PolicyError
from migsgx.sgx.structs import FLAG_DEBUG, FLAG_INIT, Attributes, ReportBody

MR_A = hashlib.sha256(b"a").digest()
MR_B = hashlib.sha256(b"b").digest()
SIGNER = hashlib.sha256(b"signer").digest()
OTHER = hashlib.sha256(b"other signer").digest()
SAME_SIGNER = MigrationPolicy(PolicyMode.SAME_SIGNER)


def ident(
    mr: bytes = MR_A, signer: bytes = SIGNER, prod: int = 1, svn: int = 2, debug: bool = False
) -> EnclaveIdentity:
    return EnclaveIdentity(mr, signer, prod, svn, debug)


def refusal(policy: MigrationPolicy, src: EnclaveIdentity, dst: EnclaveIdentity) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        policy.check(src, dst)
    assert isinstance(info.value, MigrationError)
    return info.value


def test_default_is_same_mrenclave() -> None:
    policy = MigrationPolicy()
    assert policy.mode is PolicyMode.SAME_ENCLAVE and not policy.allow_debug
    policy.check(ident(), ident())
    policy.check(ident(svn=2), ident(svn=9, signer=OTHER))  # same code, any signer or SVN
    err = refusal(policy, ident(), ident(mr=MR_B))
    assert err.context["check"] == "mr_enclave"
    assert MR_B.hex() in err.message and MR_A.hex() in err.message


@pytest.mark.parametrize(
    ("dst", "check"),
    [
        (ident(mr=MR_B, signer=OTHER), "mr_signer"),
        (ident(mr=MR_B, prod=2), "isv_prod_id"),
        (ident(mr=MR_B, svn=1), "isv_svn"),
    ],
)
def test_same_signer_refusals_name_what_differed(dst: EnclaveIdentity, check: str) -> None:
    err = refusal(SAME_SIGNER, ident(), dst)
    assert err.context["check"] == check
    assert err.code == "policy"


def test_same_signer_accepts_equal_and_newer_svn() -> None:
    SAME_SIGNER.check(ident(svn=2), ident(mr=MR_B, svn=2))
    SAME_SIGNER.check(ident(svn=2), ident(mr=MR_B, svn=3))


@pytest.mark.parametrize("role", ["source", "destination"])
def test_debug_refused_on_either_side(role: str) -> None:
    src, dst = ident(debug=role == "source"), ident(debug=role == "destination")
    for policy in (MigrationPolicy(), SAME_SIGNER):
        err = refusal(policy, src, dst)
        assert err.context == {"check": "debug", "role": role}
    MigrationPolicy(allow_debug=True).check(src, dst)


def test_identity_from_report_and_packing() -> None:
    body = ReportBody(MR_A, SIGNER, Attributes(FLAG_INIT | FLAG_DEBUG), 513, 258)
    ident_ = EnclaveIdentity.from_report(body)
    assert ident_ == EnclaveIdentity(MR_A, SIGNER, 513, 258, debug=True)
    packed = ident_.pack()
    assert len(packed) == 68 and packed[64:] == b"\x02\x01\x01\x02"
    assert EnclaveIdentity.unpack(packed) == EnclaveIdentity(MR_A, SIGNER, 513, 258)
    assert "DEBUG" in ident_.describe()
    with pytest.raises(ValueError):
        EnclaveIdentity(MR_A[:31], SIGNER, 0, 0)
    with pytest.raises(ValueError):
        EnclaveIdentity(MR_A, SIGNER, 0, 1 << 16)


def test_policy_error_survives_pickling() -> None:
    import pickle

    err = refusal(MigrationPolicy(), ident(), ident(mr=MR_B))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is PolicyError and back.context == err.context
