"""Sealing: bound to the host, to the enclave or its author, to the AAD, and to every byte."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Any

import pytest
from platform_fixtures import World, make_image

from migsgx.enclave.sealing import (
    POLICY_MRENCLAVE,
    POLICY_MRSIGNER,
    seal,
    sealed_aad,
    unseal,
)
from migsgx.errors import SealError
from migsgx.sgx.keys import KeyDeriver
from migsgx.sgx.platform import EmulatedPlatform, LocalServices
from migsgx.sgx.structs import KeyRequest, ReportBody

SECRET = b"the model weights, say" * 3


def _svc(world: World, host: EmulatedPlatform | None = None, **manifest: Any) -> LocalServices:
    platform = host or world.host_a
    author = manifest.pop("author", world.author)
    return platform.services_for(platform.einit(make_image(author, **manifest))[0])


@pytest.fixture(scope="module")
def enclave(world: World) -> LocalServices:
    return _svc(world)


@pytest.mark.parametrize("policy", [POLICY_MRENCLAVE, POLICY_MRSIGNER])
def test_roundtrip(enclave: LocalServices, policy: int) -> None:
    blob = seal(enclave, SECRET, policy=policy)
    assert SECRET not in blob
    assert unseal(enclave, blob) == SECRET
    assert seal(enclave, SECRET, policy=policy) != blob  # fresh key id and nonce
    assert unseal(enclave, seal(enclave, b"", policy=policy)) == b""


@pytest.mark.parametrize("policy", [POLICY_MRENCLAVE, POLICY_MRSIGNER])
def test_sealed_on_one_host_does_not_open_on_another(world: World, policy: int) -> None:
    blob = seal(_svc(world, world.host_a), SECRET, policy=policy)
    with pytest.raises(SealError):
        unseal(_svc(world, world.host_b), blob)


def test_mrenclave_sealed_does_not_open_in_another_enclave_of_the_signer(
    world: World, enclave: LocalServices
) -> None:
    blob = seal(enclave, SECRET, policy=POLICY_MRENCLAVE)
    sibling = _svc(world, name="sibling")
    assert sibling.identity.mr_signer == enclave.identity.mr_signer
    with pytest.raises(SealError):
        unseal(sibling, blob)


def test_mrsigner_sealed_opens_in_another_enclave_of_the_signer(
    world: World, enclave: LocalServices
) -> None:
    blob = seal(enclave, SECRET, policy=POLICY_MRSIGNER)
    assert unseal(_svc(world, name="sibling"), blob) == SECRET


@pytest.mark.parametrize(
    "stranger",
    [
        {"author": "other"},  # another author, same code
        {"product_id": 8},  # another product of the author
        {"debug": True},  # the author's debug build
    ],
)
def test_mrsigner_sealed_does_not_open_elsewhere(
    world: World, enclave: LocalServices, stranger: dict[str, Any]
) -> None:
    blob = seal(enclave, SECRET, policy=POLICY_MRSIGNER)
    if stranger.get("author") == "other":
        stranger = {"author": world.other_author}
    with pytest.raises(SealError):
        unseal(_svc(world, **stranger), blob)


def test_svn_upgrade_opens_old_data_not_the_reverse(world: World) -> None:
    v1 = _svc(world, svn=1)
    v2 = _svc(world, svn=2)
    assert unseal(v2, seal(v1, SECRET, policy=POLICY_MRSIGNER)) == SECRET
    with pytest.raises(SealError):
        unseal(v1, seal(v2, SECRET, policy=POLICY_MRSIGNER))


class _DeriverServices:
    """Just enough TrustedServices for sealing, over a bare KeyDeriver."""

    def __init__(self, deriver: KeyDeriver, identity: ReportBody) -> None:
        self._deriver = deriver
        self.identity = replace(identity, cpu_svn=deriver.cpu_svn)

    def get_key(self, request: KeyRequest) -> bytes:
        return self._deriver.egetkey(self.identity, request)


def test_cpusvn_upgrade_opens_old_data_not_the_reverse(enclave: LocalServices) -> None:
    root = os.urandom(32)
    old = _DeriverServices(KeyDeriver(root, bytes([1] * 16)), enclave.identity)
    new = _DeriverServices(KeyDeriver(root, bytes([2] * 16)), enclave.identity)
    assert unseal(new, seal(old, SECRET)) == SECRET  # type: ignore[arg-type]
    with pytest.raises(SealError):
        unseal(old, seal(new, SECRET))  # type: ignore[arg-type]


def test_aad_binding(enclave: LocalServices) -> None:
    blob = seal(enclave, SECRET, aad=b"key:alice")
    assert sealed_aad(blob) == b"key:alice"
    assert unseal(enclave, blob, aad=b"key:alice") == SECRET
    assert unseal(enclave, blob) == SECRET  # no expectation given
    for wrong in (b"key:bob", b"", b"key:alic", b"key:alice\0"):
        with pytest.raises(SealError):
            unseal(enclave, blob, aad=wrong)
    # Swapping in another AAD (same length) breaks the tag.
    forged = blob.replace(b"key:alice", b"key:bobby")
    with pytest.raises(SealError):
        unseal(enclave, forged, aad=b"key:bobby")


def test_every_tampered_byte_fails(enclave: LocalServices) -> None:
    for policy in (POLICY_MRENCLAVE, POLICY_MRSIGNER):
        blob = seal(enclave, b"0123456789abcdef", aad=b"aad", policy=policy)
        for pos in range(len(blob)):
            for bit in (0, 5):
                tampered = bytearray(blob)
                tampered[pos] ^= 1 << bit
                with pytest.raises(SealError):
                    unseal(enclave, bytes(tampered))


def test_truncated_and_extended_blobs_fail(enclave: LocalServices) -> None:
    blob = seal(enclave, SECRET, aad=b"aad")
    for n in range(len(blob)):
        with pytest.raises(SealError):
            unseal(enclave, blob[:n])
    for extra in (b"\0", b"more data"):
        with pytest.raises(SealError):
            unseal(enclave, blob + extra)


def test_header_fields_cannot_be_rewritten(world: World, enclave: LocalServices) -> None:
    """Rewriting the policy or SVN in the header asks for another key, never the right one."""

    blob = bytearray(seal(enclave, SECRET, policy=POLICY_MRENCLAVE))
    blob[8:10] = struct.pack("<H", POLICY_MRSIGNER)
    with pytest.raises(SealError):
        unseal(enclave, bytes(blob))
    for svn in (0, 2, 0xFFFF):
        blob = bytearray(seal(enclave, SECRET))
        blob[10:12] = struct.pack("<H", svn)
        with pytest.raises(SealError):
            unseal(enclave, bytes(blob))


def test_bad_policy_refused(enclave: LocalServices) -> None:
    for policy in (0, 3, 4):
        with pytest.raises(ValueError):
            seal(enclave, SECRET, policy=policy)
