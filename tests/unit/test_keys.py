"""EGETKEY and EREPORT: per-host keys, policies, SVN rules, and only one's own keys."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from platform_fixtures import World, make_image, shared_world

from migsgx.errors import KeyRequestError, ReportMacError
from migsgx.sgx.keys import KEY_SIZE, KeyDeriver
from migsgx.sgx.structs import (
    FLAG_DEBUG,
    KEYNAME_EINITTOKEN,
    KEYNAME_PROVISION,
    KEYNAME_PROVISION_SEAL,
    KEYNAME_REPORT,
    KEYNAME_SEAL,
    KEYPOLICY_MRENCLAVE,
    KEYPOLICY_MRSIGNER,
    KEYPOLICY_NOISVPRODID,
    Attributes,
    KeyRequest,
    Report,
    ReportBody,
)
from migsgx.sgx.trusted import target_info_of, verify_report_locally


@pytest.fixture(scope="module")
def bodies(world: World) -> dict[str, ReportBody]:
    """Identities of enclaves as EINIT on host a gives them."""

    key, other = world.author, world.other_author
    images = {
        "a": make_image(key),
        "a_v2": make_image(key, name="v2"),  # another enclave of the same author
        "a_svn2": make_image(key, svn=2),
        "a_prod8": make_image(key, product_id=8),
        "a_debug": make_image(key, debug=True),
        "other": make_image(other, name="theirs"),  # another author's enclave
        "resigned": make_image(other),  # a's code and manifest, signed by another author
    }
    return {name: world.host_a.einit(img)[0] for name, img in images.items()}


def _seal_request(policy: int, body: ReportBody, **kw: object) -> KeyRequest:
    fields: dict[str, object] = {
        "key_policy": policy,
        "isv_svn": body.isv_svn,
        "cpu_svn": body.cpu_svn,
        "key_id": bytes([7]) * 32,
    }
    fields.update(kw)
    return KeyRequest(KEYNAME_SEAL, **fields)  # type: ignore[arg-type]


POLICIES = [KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER, KEYPOLICY_MRSIGNER | KEYPOLICY_NOISVPRODID]


# --- per host -------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_two_hosts_never_derive_the_same_seal_key(
    world: World, bodies: dict[str, ReportBody], policy: int
) -> None:
    body = bodies["a"]
    req = _seal_request(policy, body)
    key_a = world.host_a.egetkey(body, req)
    key_b = world.host_b.egetkey(body, req)
    assert len(key_a) == len(key_b) == KEY_SIZE
    assert key_a != key_b
    assert world.host_a.egetkey(body, req) == key_a  # deterministic


def test_two_hosts_never_derive_the_same_report_key(
    world: World, bodies: dict[str, ReportBody]
) -> None:
    body = bodies["a"]
    req = KeyRequest(KEYNAME_REPORT, key_id=bytes(32))
    assert world.host_a.egetkey(body, req) != world.host_b.egetkey(body, req)


# --- policies -------------------------------------------------------------------------
def test_mrenclave_policy_separates_enclaves_of_one_signer(
    world: World, bodies: dict[str, ReportBody]
) -> None:
    a, a2 = bodies["a"], bodies["a_v2"]
    assert a.mr_signer == a2.mr_signer and a.mr_enclave != a2.mr_enclave
    enc = _seal_request(KEYPOLICY_MRENCLAVE, a)
    sig = _seal_request(KEYPOLICY_MRSIGNER, a)
    assert world.host_a.egetkey(a, enc) != world.host_a.egetkey(a2, enc)
    assert world.host_a.egetkey(a, sig) == world.host_a.egetkey(a2, sig)
    assert world.host_a.egetkey(a, enc) != world.host_a.egetkey(a, sig)


def test_mrsigner_policy_separates_signers(world: World, bodies: dict[str, ReportBody]) -> None:
    req = _seal_request(KEYPOLICY_MRSIGNER, bodies["a"])
    assert world.host_a.egetkey(bodies["a"], req) != world.host_a.egetkey(bodies["other"], req)


def test_same_code_resigned_keeps_mrenclave_keys_only(
    world: World, bodies: dict[str, ReportBody]
) -> None:
    """As on SGX: MRENCLAVE-bound keys follow the measurement, not the signer (the code
    is the same), while MRSIGNER-bound keys stay with the author."""

    a, resigned = bodies["a"], bodies["resigned"]
    assert a.mr_enclave == resigned.mr_enclave and a.mr_signer != resigned.mr_signer
    enc = _seal_request(KEYPOLICY_MRENCLAVE, a)
    sig = _seal_request(KEYPOLICY_MRSIGNER, a)
    assert world.host_a.egetkey(a, enc) == world.host_a.egetkey(resigned, enc)
    assert world.host_a.egetkey(a, sig) != world.host_a.egetkey(resigned, sig)


def test_product_id_matters_unless_noisvprodid(world: World, bodies: dict[str, ReportBody]) -> None:
    a, a8 = bodies["a"], bodies["a_prod8"]
    with_prod = _seal_request(KEYPOLICY_MRSIGNER, a)
    assert world.host_a.egetkey(a, with_prod) != world.host_a.egetkey(a8, with_prod)
    without = _seal_request(KEYPOLICY_MRSIGNER | KEYPOLICY_NOISVPRODID, a)
    assert world.host_a.egetkey(a, without) == world.host_a.egetkey(a8, without)


def test_debug_bit_is_always_in_the_key(world: World, bodies: dict[str, ReportBody]) -> None:
    a, dbg = bodies["a"], bodies["a_debug"]
    assert dbg.attributes.flags & FLAG_DEBUG and not a.attributes.flags & FLAG_DEBUG
    # Even a request that masks every attribute out keeps INIT and DEBUG in.
    req = _seal_request(KEYPOLICY_MRSIGNER, a, attribute_mask=Attributes(0, 0))
    assert world.host_a.egetkey(a, req) != world.host_a.egetkey(dbg, req)


@pytest.mark.parametrize(
    "change",
    [
        {"key_id": bytes([8]) * 32},
        {"attribute_mask": Attributes(0x3, 0)},
        {"misc_mask": 0},
        {"key_policy": KEYPOLICY_MRENCLAVE | KEYPOLICY_MRSIGNER},
        {"isv_svn": 0},
        {"cpu_svn": bytes(16)},
    ],
)
def test_every_request_field_changes_the_key(
    world: World, bodies: dict[str, ReportBody], change: dict[str, Any]
) -> None:
    a = replace(bodies["a"], misc_select=1)
    base = _seal_request(KEYPOLICY_MRSIGNER, a)
    assert world.host_a.egetkey(a, base) != world.host_a.egetkey(a, replace(base, **change))


# --- SVNs -------------------------------------------------------------------------------
def test_higher_isvsvn_refused_lower_allowed(world: World, bodies: dict[str, ReportBody]) -> None:
    v1, v2 = bodies["a"], bodies["a_svn2"]
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(v1, _seal_request(KEYPOLICY_MRSIGNER, v1, isv_svn=2))
    old = _seal_request(KEYPOLICY_MRSIGNER, v1, isv_svn=1)
    # SVN 2 reaches the key SVN 1 had; nothing reaches SVN 2's from SVN 1.
    assert world.host_a.egetkey(v2, old) == world.host_a.egetkey(v1, old)
    assert world.host_a.egetkey(v2, _seal_request(KEYPOLICY_MRSIGNER, v2)) != (
        world.host_a.egetkey(v1, old)
    )


def test_higher_cpusvn_refused_lower_allowed(world: World, bodies: dict[str, ReportBody]) -> None:
    a = bodies["a"]
    cpu = world.host_a.info.cpu_svn
    higher = bytes([cpu[0] + 1]) + cpu[1:]
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(a, _seal_request(KEYPOLICY_MRSIGNER, a, cpu_svn=higher))
    # Component-wise: one lower component does not buy a higher one.
    mixed = bytes([cpu[0] - 1, cpu[1] + 1]) + cpu[2:]
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(a, _seal_request(KEYPOLICY_MRSIGNER, a, cpu_svn=mixed))
    lower = bytes([cpu[0] - 1]) + cpu[1:]
    key = world.host_a.egetkey(a, _seal_request(KEYPOLICY_MRSIGNER, a, cpu_svn=lower))
    assert key != world.host_a.egetkey(a, _seal_request(KEYPOLICY_MRSIGNER, a))


def test_higher_configsvn_refused(world: World, bodies: dict[str, ReportBody]) -> None:
    a = bodies["a"]
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(a, _seal_request(KEYPOLICY_MRSIGNER, a, config_svn=1))


@pytest.mark.parametrize("policy", [1 << 3, 1 << 8, 0xFFFF])
def test_unknown_policy_bits_refused(
    world: World, bodies: dict[str, ReportBody], policy: int
) -> None:
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(bodies["a"], _seal_request(KEYPOLICY_MRSIGNER | policy, bodies["a"]))


@pytest.mark.parametrize(
    "name", [KEYNAME_EINITTOKEN, KEYNAME_PROVISION, KEYNAME_PROVISION_SEAL, 5, 0xFFFF]
)
def test_other_key_names_refused(world: World, bodies: dict[str, ReportBody], name: int) -> None:
    with pytest.raises(KeyRequestError):
        world.host_a.egetkey(bodies["a"], KeyRequest(name))


# --- only one's own keys ------------------------------------------------------------------
def test_services_bind_the_measured_identity(world: World, bodies: dict[str, ReportBody]) -> None:
    a, other = bodies["a"], bodies["other"]
    svc = world.host_a.services_for(a)
    assert svc.identity == a
    for policy in POLICIES:
        req = _seal_request(policy, a)
        assert svc.get_key(req) == world.host_a.egetkey(a, req)
        assert svc.get_key(req) != world.host_a.egetkey(other, req)


# Keys enclave a must not reach: every key of the others except the MRSIGNER keys of
# its sibling (same author and product), which are shared by design.
_victims = [
    (name, policy)
    for name in ("a_v2", "a_prod8", "a_debug", "other")
    for policy in (KEYPOLICY_MRENCLAVE, KEYPOLICY_MRSIGNER)
    if (name, policy) != ("a_v2", KEYPOLICY_MRSIGNER)
]


def _victim_keys(world: World, bodies: dict[str, ReportBody]) -> set[bytes]:
    keys = set()
    for name, policy in _victims:
        victim = bodies[name]
        for key_id in (bytes(32), bytes([7]) * 32):
            keys.add(world.host_a.egetkey(victim, _seal_request(policy, victim, key_id=key_id)))
        keys.add(world.host_a.egetkey(victim, KeyRequest(KEYNAME_REPORT, key_id=bytes(32))))
    return keys


def test_no_request_reaches_another_enclaves_keys(
    world: World, bodies: dict[str, ReportBody]
) -> None:
    """Enclave a, asking in every way its request can be shaped, gets none of the seal or
    report keys of the others (another enclave of its author, another product, its debug
    build, another author)."""

    victims = _victim_keys(world, bodies)
    svc = world.host_a.services_for(bodies["a"])
    masks = [Attributes(0, 0), Attributes(0xFFFFFFFFFFFFFFFF, 0), Attributes(0x3, 0x3)]
    tried = 0
    for policy, key_id, mask, misc_mask, cpu_svn, name in itertools.product(
        range(8),
        (bytes(32), bytes([7]) * 32),
        masks,
        (0, 0xFFFFFFFF),
        (bytes(16), world.host_a.info.cpu_svn),
        (KEYNAME_SEAL, KEYNAME_REPORT),
    ):
        req = KeyRequest(name, policy, 1, cpu_svn, mask, key_id, misc_mask)
        assert svc.get_key(req) not in victims
        tried += 1
    assert tried == 384
    # The check can fail: the sibling's MRSIGNER key is reachable, as it should be.
    sibling = world.host_a.egetkey(
        bodies["a_v2"], _seal_request(KEYPOLICY_MRSIGNER, bodies["a_v2"], key_id=bytes(32))
    )
    assert svc.get_key(_seal_request(KEYPOLICY_MRSIGNER, bodies["a"], key_id=bytes(32))) == sibling


@settings(max_examples=150, deadline=None)
@given(
    policy=st.integers(0, 7),
    svn=st.integers(0, 1),
    cpu=st.binary(min_size=16, max_size=16).map(lambda b: bytes(min(x, 2) for x in b)),
    flags=st.integers(0, (1 << 64) - 1),
    xfrm=st.integers(0, (1 << 64) - 1),
    key_id=st.sampled_from([bytes(32), bytes([7]) * 32]),
    misc_mask=st.integers(0, 0xFFFFFFFF),
)
def test_fuzzed_requests_never_reach_another_enclaves_keys(
    policy: int, svn: int, cpu: bytes, flags: int, xfrm: int, key_id: bytes, misc_mask: int
) -> None:
    world = shared_world()
    bodies = _bodies_cache(world)
    victims = _victim_keys_cache(world, bodies)
    svc = world.host_a.services_for(bodies["a"])
    req = KeyRequest(KEYNAME_SEAL, policy, svn, cpu, Attributes(flags, xfrm), key_id, misc_mask)
    assert svc.get_key(req) not in victims


_CACHE: dict[str, object] = {}


def _bodies_cache(world: World) -> dict[str, ReportBody]:
    if "bodies" not in _CACHE:
        _CACHE["bodies"] = {
            "a": world.host_a.einit(make_image(world.author))[0],
            "a_v2": world.host_a.einit(make_image(world.author, name="v2"))[0],
            "a_prod8": world.host_a.einit(make_image(world.author, product_id=8))[0],
            "a_debug": world.host_a.einit(make_image(world.author, debug=True))[0],
            "other": world.host_a.einit(make_image(world.other_author, name="theirs"))[0],
        }
    return _CACHE["bodies"]  # type: ignore[return-value]


def _victim_keys_cache(world: World, bodies: dict[str, ReportBody]) -> set[bytes]:
    if "victims" not in _CACHE:
        _CACHE["victims"] = _victim_keys(world, bodies)
    return _CACHE["victims"]  # type: ignore[return-value]


# --- reports ------------------------------------------------------------------------------
def test_report_verifies_only_in_its_target(world: World, bodies: dict[str, ReportBody]) -> None:
    a, x, y = bodies["a"], bodies["a_v2"], bodies["other"]
    data = bytes(range(64))
    report = world.host_a.ereport(a, target_info_of(x), data)
    assert report.body.mr_enclave == a.mr_enclave and report.body.report_data == data
    assert report.body.cpu_svn == world.host_a.info.cpu_svn
    assert verify_report_locally(world.host_a.services_for(x), report) == report.body
    with pytest.raises(ReportMacError):
        verify_report_locally(world.host_a.services_for(y), report)
    with pytest.raises(ReportMacError):
        verify_report_locally(world.host_a.services_for(a), report)
    # The same target enclave on another host cannot verify it either.
    with pytest.raises(ReportMacError):
        verify_report_locally(world.host_b.services_for(x), report)


def test_report_target_attributes_matter(world: World, bodies: dict[str, ReportBody]) -> None:
    a, x = bodies["a"], bodies["a_v2"]
    debug_target = replace(
        target_info_of(x), attributes=Attributes(x.attributes.flags | FLAG_DEBUG)
    )
    report = world.host_a.ereport(a, debug_target, bytes(64))
    with pytest.raises(ReportMacError):
        verify_report_locally(world.host_a.services_for(x), report)


def test_every_flipped_bit_of_a_report_fails(world: World, bodies: dict[str, ReportBody]) -> None:
    a, x = bodies["a"], bodies["a_v2"]
    svc = world.host_a.services_for(x)
    raw = world.host_a.ereport(a, target_info_of(x), bytes(range(64))).pack()
    assert verify_report_locally(svc, Report.unpack(raw))
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ReportMacError):
            verify_report_locally(svc, Report.unpack(bytes(flipped)))


def test_report_keys_are_fresh(world: World, bodies: dict[str, ReportBody]) -> None:
    a, x = bodies["a"], bodies["a_v2"]
    r1 = world.host_a.ereport(a, target_info_of(x), bytes(64))
    r2 = world.host_a.ereport(a, target_info_of(x), bytes(64))
    assert r1.key_id != r2.key_id and r1.mac != r2.mac


def test_report_data_must_be_64_bytes(world: World, bodies: dict[str, ReportBody]) -> None:
    for n in (0, 63, 65):
        with pytest.raises(ValueError):
            world.host_a.ereport(bodies["a"], target_info_of(bodies["a"]), bytes(n))


def test_quoting_enclave_refuses_a_report_not_targeted_at_it(
    world: World, bodies: dict[str, ReportBody]
) -> None:
    a, x = bodies["a"], bodies["a_v2"]
    wrong = world.host_a.ereport(a, target_info_of(x), bytes(64))
    with pytest.raises(ReportMacError):
        world.host_a.quote_report(wrong)
    # A report for the QE made on another host does not pass either.
    foreign = world.host_b.ereport(a, world.host_b.qe_target_info, bytes(64))
    with pytest.raises(ReportMacError):
        world.host_a.quote_report(foreign)
    right = world.host_a.ereport(a, world.host_a.qe_target_info, bytes(64))
    assert world.host_a.quote_report(right)


def test_root_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        KeyDeriver(bytes(31))
    with pytest.raises(ValueError):
        KeyDeriver(bytes(32), cpu_svn=bytes(15))
