"""The handshake, both ends back to back in memory.

``QuotingPlatform`` below stands in for the *platform* (the thing that signs quotes),
not for the code under test: it signs a real ECDSA P-256 signature over a real SGX
REPORT body, and its verifier checks it.  Any object with ``quote(report_data)`` /
``verify(quote)`` plugs in instead (the emulated platform, or hardware DCAP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from migsgx.core import (
    NEED_DATA,
    Handshake,
    HandshakeComplete,
    HandshakeState,
    InMemorySeenIds,
    KeyConfirmationError,
    LocalProtocolError,
    MigrationPolicy,
    PeerAborted,
    PolicyMode,
    ReportDataError,
    Role,
    SessionKeys,
)
from migsgx.core.handshake import SCHEMA
from migsgx.core.transcript import transcript_item
from migsgx.errors import (
    FrameError,
    PolicyError,
    ProtocolError,
    QuoteFormatError,
    QuoteSignatureError,
    ReplayError,
)
from migsgx.sgx.structs import FLAG_DEBUG, FLAG_INIT, FLAG_MODE64BIT, Attributes, ReportBody
from migsgx.wire import HEADER, decode_body, encode

QUOTE_MAGIC = b"TQ01"
MR_APP = hashlib.sha256(b"enclave: key-value store v1").digest()
MR_OTHER = hashlib.sha256(b"enclave: something else").digest()
SIGNER = hashlib.sha256(b"author key").digest()
OTHER_SIGNER = hashlib.sha256(b"another author").digest()


# --- the platform test double ---------------------------------------------------------------
def report(
    mr_enclave: bytes = MR_APP,
    mr_signer: bytes = SIGNER,
    prod_id: int = 7,
    svn: int = 3,
    debug: bool = False,
) -> ReportBody:
    flags = FLAG_INIT | FLAG_MODE64BIT | (FLAG_DEBUG if debug else 0)
    return ReportBody(mr_enclave, mr_signer, Attributes(flags), prod_id, svn)


class QuotingPlatform:
    """One host's quoting key; quotes are ``magic || REPORT body || DER ECDSA signature``."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def attester(self, body: ReportBody | None = None) -> PlatformAttester:
        return PlatformAttester(self, body or report())

    def sign(self, body: ReportBody) -> bytes:
        packed = body.pack()
        return QUOTE_MAGIC + packed + self._key.sign(packed, ec.ECDSA(hashes.SHA256()))


@dataclass
class PlatformAttester:
    platform: QuotingPlatform
    body: ReportBody
    calls: int = 0

    def quote(self, report_data: bytes) -> bytes:
        assert len(report_data) == 64
        self.calls += 1
        return self.platform.sign(self.body.with_report_data(report_data))


class PlatformVerifier:
    """Trusts the quoting keys of the given platforms (as hosts trust a provisioning CA)."""

    def __init__(self, *platforms: QuotingPlatform) -> None:
        self._keys = [p.public_key for p in platforms]

    def verify(self, quote: bytes) -> ReportBody:
        if len(quote) < 4 + 384 + 8 or quote[:4] != QUOTE_MAGIC:
            raise QuoteFormatError("not a test quote")
        body, sig = quote[4:388], quote[388:]
        for key in self._keys:
            try:
                key.verify(sig, body, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return ReportBody.unpack(body)
        raise QuoteSignatureError("quote signature does not verify")


def counter_rng(seed: bytes) -> Callable[[int], bytes]:
    """Deterministic bytes (SHA-256 in counter mode) for reproducible runs."""

    state = {"n": 0}

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(seed + state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return rng


@dataclass
class Pair:
    source: Handshake
    destination: Handshake


def make_pair(
    *,
    source_body: ReportBody | None = None,
    destination_body: ReportBody | None = None,
    source_policy: MigrationPolicy | None = None,
    destination_policy: MigrationPolicy | None = None,
    seen: InMemorySeenIds | None = None,
    platform: QuotingPlatform | None = None,
    migration_id: bytes | None = None,
) -> Pair:
    platform = platform or QuotingPlatform()
    verifier = PlatformVerifier(platform)
    return Pair(
        Handshake(
            Role.SOURCE,
            attester=platform.attester(source_body),
            verifier=verifier,
            policy=source_policy,
            migration_id=migration_id,
        ),
        Handshake(
            Role.DESTINATION,
            attester=platform.attester(destination_body),
            verifier=verifier,
            policy=destination_policy,
            seen=seen,
        ),
    )


def deliver(to: Handshake, data: bytes) -> object:
    to.receive_data(data)
    return to.next_event()


def run(pair: Pair) -> tuple[SessionKeys, SessionKeys]:
    """The three messages, in memory; returns (source keys, destination keys)."""

    pair.source.start()
    assert deliver(pair.destination, pair.source.data_to_send()) is NEED_DATA
    ev_s = deliver(pair.source, pair.destination.data_to_send())
    ev_d = deliver(pair.destination, pair.source.data_to_send())
    assert isinstance(ev_s, HandshakeComplete) and isinstance(ev_d, HandshakeComplete)
    return ev_s.keys, ev_d.keys


def frames(data: bytes) -> list[dict[str, object]]:
    out = []
    while data:
        (n,) = HEADER.unpack_from(data)
        out.append(decode_body(data[4 : 4 + n], SCHEMA))
        data = data[4 + n :]
    return out


class PermissivePolicy(MigrationPolicy):
    """A destination that does not check anything: a malicious or broken peer."""

    def check(self, source: object, destination: object) -> None:  # type: ignore[override]
        return None


# --- tests ---------------------------------------------------------------------------------------
def test_both_ends_agree_on_everything() -> None:
    pair = make_pair()
    ks, kd = run(pair)
    assert ks.migration_id == kd.migration_id and len(ks.migration_id) == 16
    assert ks.transcript_hash == kd.transcript_hash and len(ks.transcript_hash) == 64
    assert ks.stream_secret == kd.stream_secret
    assert ks.control_source_key == kd.control_source_key
    assert ks.control_destination_key == kd.control_destination_key
    secrets_ = {ks.stream_secret, ks.control_source_key, ks.control_destination_key}
    assert len(secrets_) == 3, "keys are separated by purpose and direction"
    assert ks.source == kd.source and ks.destination == kd.destination
    assert ks.peer == kd.destination and kd.peer == ks.source
    assert pair.source.state is pair.destination.state is HandshakeState.COMPLETE
    assert "stream_secret" not in repr(ks)


def test_each_run_has_fresh_keys_and_id() -> None:
    platform = QuotingPlatform()
    a, _ = run(make_pair(platform=platform))
    b, _ = run(make_pair(platform=platform))
    assert a.migration_id != b.migration_id
    assert a.stream_secret != b.stream_secret


def test_deterministic_with_injected_randomness() -> None:
    platform = QuotingPlatform()
    verifier = PlatformVerifier(platform)

    def once() -> SessionKeys:
        src = Handshake(
            Role.SOURCE,
            attester=platform.attester(),
            verifier=verifier,
            rng=counter_rng(b"s"),
        )
        dst = Handshake(
            Role.DESTINATION,
            attester=platform.attester(),
            verifier=verifier,
            rng=counter_rng(b"d"),
        )
        return run(Pair(src, dst))[0]

    # ECDSA quotes are randomized, so TH differs; the migration id does not.
    assert once().migration_id == once().migration_id


def test_source_quote_binds_its_share_and_the_id() -> None:
    pair = make_pair()
    pair.source.start()
    (hello,) = frames(pair.source.data_to_send())
    rd = hashlib.sha512(
        transcript_item("protocol", b"migsgx/v1 handshake")
        + transcript_item("migration-id", hello["mid"])  # type: ignore[arg-type]
        + transcript_item("source-share", hello["share"])  # type: ignore[arg-type]
    ).digest()
    quote = hello["quote"]
    assert isinstance(quote, bytes)
    assert ReportBody.unpack(quote[4:388]).report_data == rd


def test_trailing_data_is_left_for_the_next_layer() -> None:
    pair = make_pair()
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    deliver(pair.source, pair.destination.data_to_send())
    pair.destination.receive_data(pair.source.data_to_send() + b"stream bytes")
    assert isinstance(pair.destination.next_event(), HandshakeComplete)
    assert pair.destination.trailing_data() == b"stream bytes"


def test_byte_at_a_time_delivery() -> None:
    pair = make_pair()
    pair.source.start()
    for b in pair.source.data_to_send():
        pair.destination.receive_data(bytes([b]))
        assert pair.destination.next_event() is NEED_DATA
    ev = deliver(pair.source, pair.destination.data_to_send())
    assert isinstance(ev, HandshakeComplete)


# -- policy, inside both enclaves --
def test_destination_refuses_a_source_with_another_mrenclave() -> None:
    pair = make_pair(source_body=report(mr_enclave=MR_OTHER))
    pair.source.start()
    with pytest.raises(PolicyError) as info:
        deliver(pair.destination, pair.source.data_to_send())
    assert info.value.context["check"] == "mr_enclave"
    assert pair.destination.state is HandshakeState.FAILED


def test_source_refuses_a_destination_with_another_mrenclave() -> None:
    pair = make_pair(
        destination_body=report(mr_enclave=MR_OTHER), destination_policy=PermissivePolicy()
    )
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    with pytest.raises(PolicyError, match="MRENCLAVE differs") as info:
        deliver(pair.source, pair.destination.data_to_send())
    assert info.value.context["check"] == "mr_enclave"
    assert pair.source.state is HandshakeState.FAILED
    assert pair.source.data_to_send() == b"", "no source-finished after a refusal"


def test_source_refuses_a_lower_svn() -> None:
    same_signer = MigrationPolicy(PolicyMode.SAME_SIGNER)
    pair = make_pair(
        source_body=report(svn=5),
        destination_body=report(mr_enclave=MR_OTHER, svn=4),
        source_policy=same_signer,
        destination_policy=PermissivePolicy(),
    )
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    with pytest.raises(PolicyError) as info:
        deliver(pair.source, pair.destination.data_to_send())
    assert info.value.context["check"] == "isv_svn"


def test_same_signer_upgrade_is_accepted_by_both() -> None:
    same_signer = MigrationPolicy(PolicyMode.SAME_SIGNER)
    pair = make_pair(
        source_body=report(svn=5),
        destination_body=report(mr_enclave=MR_OTHER, svn=6),
        source_policy=same_signer,
        destination_policy=same_signer,
    )
    ks, kd = run(pair)
    assert ks.destination.isv_svn == 6 and kd.source.isv_svn == 5


def test_source_refuses_a_debug_destination() -> None:
    pair = make_pair(destination_body=report(debug=True), destination_policy=PermissivePolicy())
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    with pytest.raises(PolicyError, match="debug") as info:
        deliver(pair.source, pair.destination.data_to_send())
    assert info.value.context == {"check": "debug", "role": "destination"}


def test_debug_allowed_when_the_policy_says_so() -> None:
    dev = MigrationPolicy(allow_debug=True)
    pair = make_pair(
        source_body=report(debug=True),
        destination_body=report(debug=True),
        source_policy=dev,
        destination_policy=dev,
    )
    ks, _ = run(pair)
    assert ks.source.debug and ks.destination.debug


# -- attestation failures --
def test_quote_from_an_untrusted_platform_is_refused() -> None:
    trusted, rogue = QuotingPlatform(), QuotingPlatform()
    src = Handshake(Role.SOURCE, attester=rogue.attester(), verifier=PlatformVerifier(rogue))
    dst = Handshake(
        Role.DESTINATION, attester=trusted.attester(), verifier=PlatformVerifier(trusted)
    )
    src.start()
    with pytest.raises(QuoteSignatureError):
        deliver(dst, src.data_to_send())
    assert dst.state is HandshakeState.FAILED


def test_malformed_quote_is_refused() -> None:
    pair = make_pair()
    pair.source.start()
    (hello,) = frames(pair.source.data_to_send())
    hello["quote"] = b"junk"
    with pytest.raises(QuoteFormatError):
        deliver(pair.destination, encode(hello))


# -- man in the middle --
def test_mitm_replacing_the_source_share_is_caught_by_the_destination() -> None:
    pair = make_pair()
    pair.source.start()
    (hello,) = frames(pair.source.data_to_send())
    hello["share"] = bytes(range(32))
    with pytest.raises(ReportDataError):
        deliver(pair.destination, encode(hello))
    assert pair.destination.state is HandshakeState.FAILED


def test_mitm_replacing_the_destination_share_is_caught_by_the_source() -> None:
    pair = make_pair()
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    (dhello,) = frames(pair.destination.data_to_send())
    dhello["share"] = bytes(range(32))
    with pytest.raises(ReportDataError):
        deliver(pair.source, encode(dhello))
    assert pair.source.state is HandshakeState.FAILED


def test_mitm_with_its_own_valid_quote_toward_the_destination() -> None:
    platform = QuotingPlatform()
    pair = make_pair(platform=platform)
    pair.source.start()
    (hello,) = frames(pair.source.data_to_send())
    # The attacker runs a genuine enclave of another identity and re-does the hello.
    mitm = Handshake(
        Role.SOURCE,
        attester=platform.attester(report(mr_enclave=MR_OTHER)),
        verifier=PlatformVerifier(platform),
        migration_id=hello["mid"],
    )
    mitm.start()
    with pytest.raises(PolicyError) as info:
        deliver(pair.destination, mitm.data_to_send())
    assert info.value.context["check"] == "mr_enclave"


def test_mitm_with_its_own_valid_quote_toward_the_source() -> None:
    platform = QuotingPlatform()
    pair = make_pair(platform=platform)
    pair.source.start()
    hello = pair.source.data_to_send()
    mitm = Handshake(
        Role.DESTINATION,
        attester=platform.attester(report(mr_enclave=MR_OTHER)),
        verifier=PlatformVerifier(platform),
        policy=PermissivePolicy(),
    )
    deliver(mitm, hello)
    with pytest.raises(PolicyError):
        deliver(pair.source, mitm.data_to_send())


def test_mitm_splicing_a_genuine_destination_quote_fails() -> None:
    # The attacker keeps the genuine destination's quote but swaps the share and
    # recomputes nothing it cannot: the quote binds the original share.
    platform = QuotingPlatform()
    pair = make_pair(platform=platform)
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    (dhello,) = frames(pair.destination.data_to_send())
    other = make_pair(platform=platform)
    other.source.start()
    deliver(other.destination, other.source.data_to_send())
    (foreign,) = frames(other.destination.data_to_send())
    dhello["quote"] = foreign["quote"]
    with pytest.raises(ReportDataError):
        deliver(pair.source, encode(dhello))


def test_destination_hello_replayed_to_another_source_fails() -> None:
    platform = QuotingPlatform()
    first = make_pair(platform=platform)
    first.source.start()
    deliver(first.destination, first.source.data_to_send())
    old = first.destination.data_to_send()
    second = make_pair(platform=platform)
    second.source.start()
    with pytest.raises(ReportDataError):
        deliver(second.source, old)


def test_tampered_destination_confirmation() -> None:
    pair = make_pair()
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    (dhello,) = frames(pair.destination.data_to_send())
    dhello["confirm"] = bytes(32)
    with pytest.raises(KeyConfirmationError):
        deliver(pair.source, encode(dhello))
    with pytest.raises(LocalProtocolError):
        _ = pair.source.keys


def test_source_finished_from_another_session_is_refused() -> None:
    platform = QuotingPlatform()
    old = make_pair(platform=platform)
    run(old)
    stale = encode({"t": "source-finished", "confirm": bytes(32)})
    pair = make_pair(platform=platform)
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    with pytest.raises(KeyConfirmationError):
        deliver(pair.destination, stale)
    assert pair.destination.state is HandshakeState.FAILED


def test_low_order_share_is_refused() -> None:
    platform = QuotingPlatform()
    pair = make_pair(platform=platform)
    mid, share = bytes(16), bytes(32)
    t1 = (
        transcript_item("protocol", b"migsgx/v1 handshake")
        + transcript_item("migration-id", mid)
        + transcript_item("source-share", share)
    )
    quote = platform.attester().quote(hashlib.sha512(t1).digest())
    hello = encode({"t": "source-hello", "v": 1, "mid": mid, "share": share, "quote": quote})
    with pytest.raises(ProtocolError, match="key share is invalid"):
        deliver(pair.destination, hello)


# -- the state machine --
def test_messages_out_of_order_are_protocol_errors() -> None:
    pair = make_pair()
    pair.source.start()
    with pytest.raises(ProtocolError):
        deliver(pair.source, pair.source.data_to_send())  # its own hello reflected
    assert pair.source.state is HandshakeState.FAILED
    with pytest.raises(LocalProtocolError):
        pair.source.next_event()
    with pytest.raises(LocalProtocolError):
        pair.source.receive_data(b"x")


def test_local_misuse() -> None:
    pair = make_pair()
    with pytest.raises(LocalProtocolError):
        pair.destination.start()
    pair.source.start()
    with pytest.raises(LocalProtocolError):
        pair.source.start()
    with pytest.raises(LocalProtocolError):
        _ = pair.source.keys
    with pytest.raises(ValueError):
        Handshake(
            Role.DESTINATION,
            attester=QuotingPlatform().attester(),
            verifier=PlatformVerifier(),
            migration_id=bytes(16),
        )


def test_unsupported_version() -> None:
    pair = make_pair()
    pair.source.start()
    (hello,) = frames(pair.source.data_to_send())
    hello["v"] = 2
    with pytest.raises(ProtocolError, match="version"):
        deliver(pair.destination, encode(hello))


def test_garbage_and_oversize_frames() -> None:
    pair = make_pair()
    with pytest.raises(FrameError):
        deliver(pair.destination, HEADER.pack(3) + b"\xff\xff\xff")
    assert pair.destination.state is HandshakeState.FAILED
    other = make_pair()
    with pytest.raises(ProtocolError, match="exceeds"):
        deliver(other.destination, HEADER.pack(1 << 20))
    extra = make_pair()
    extra.source.start()
    (hello,) = frames(extra.source.data_to_send())
    hello["extra"] = b"smuggled"
    with pytest.raises(FrameError):
        deliver(extra.destination, encode(hello))


def test_abort_is_reported_to_the_peer() -> None:
    pair = make_pair()
    pair.source.start()
    deliver(pair.destination, pair.source.data_to_send())
    pair.destination.data_to_send()  # the destination hello is lost on the way
    pair.destination.abort("timeout", "gave up waiting")
    ev = deliver(pair.source, pair.destination.data_to_send())
    assert ev == PeerAborted("timeout", "gave up waiting")
    assert pair.source.state is HandshakeState.ABORTED
    assert pair.destination.state is HandshakeState.ABORTED


def test_a_failed_end_can_still_say_why() -> None:
    pair = make_pair(source_body=report(mr_enclave=MR_OTHER))
    pair.source.start()
    with pytest.raises(PolicyError) as info:
        deliver(pair.destination, pair.source.data_to_send())
    pair.destination.abort(info.value.code, info.value.message)
    assert pair.destination.state is HandshakeState.FAILED
    ev = deliver(pair.source, pair.destination.data_to_send())
    assert isinstance(ev, PeerAborted) and ev.code == "policy"


def test_second_load_of_the_same_migration_id_is_refused() -> None:
    seen = InMemorySeenIds()
    mid = bytes(range(16))
    assert seen.claim_migration(mid)
    pair = make_pair(seen=seen, migration_id=mid)
    pair.source.start()
    with pytest.raises(ReplayError):
        deliver(pair.destination, pair.source.data_to_send())


def test_attester_that_ignores_report_data_is_a_platform_error() -> None:
    from migsgx.errors import PlatformError

    platform = QuotingPlatform()

    class Broken(PlatformAttester):
        def quote(self, report_data: bytes) -> bytes:
            return super().quote(bytes(64))

    src = Handshake(
        Role.SOURCE,
        attester=Broken(platform, report()),
        verifier=PlatformVerifier(platform),
    )
    with pytest.raises(PlatformError):
        src.start()
    assert src.state is HandshakeState.FAILED


def test_report_helper_roundtrip() -> None:
    body = replace(report(), isv_svn=9)
    assert ReportBody.unpack(body.pack()) == body
