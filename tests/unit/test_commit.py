"""Handshake, stream and commit end to end in memory, and attacks on the hand-over."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from migsgx.core import (
    MANIFEST_LABEL,
    CommitError,
    CommitState,
    Committed,
    DestinationCommit,
    InMemorySeenIds,
    LoadConfirmed,
    LocalProtocolError,
    Manifest,
    PeerAborted,
    Section,
    SessionKeys,
    SourceCommit,
)
from migsgx.core.commit import (
    DESTINATION_TO_SOURCE,
    SOURCE_TO_DESTINATION,
    Refused,
    open_control,
    seal_control,
)
from migsgx.errors import FrameError, ProtocolError, ReplayError, StreamError
from migsgx.wire import encode


def _platform_helpers() -> ModuleType:
    """The platform test double lives with the handshake tests; load it by path."""

    name = "_migsgx_handshake_test_helpers"
    if name not in sys.modules:
        path = Path(__file__).with_name("test_handshake.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _platform_helpers()
CHUNK = 256


def session(platform: object | None = None, seen: InMemorySeenIds | None = None):  # type: ignore[no-untyped-def]
    pair = H.make_pair(platform=platform or H.QuotingPlatform(), seen=seen)
    ks: SessionKeys
    kd: SessionKeys
    ks, kd = H.run(pair)
    return ks, kd


STATE = b"counter=41;" * 7
MEMORY = bytes(range(256)) * 9 + b"partial page"


def send_transfer(keys: SessionKeys) -> list[tuple[bytes, bytes]]:
    """The source dumps: manifest, then the sections; returns (header, chunks) per stream."""

    manifest = Manifest((Section.dense("state", len(STATE)), Section.dense("memory", len(MEMORY))))
    out = []
    sealer = keys.streams.sealer(MANIFEST_LABEL, CHUNK)
    out.append((sealer.header_bytes, sealer.seal(manifest.encode())))
    for section, data in zip(manifest.sections, (STATE, MEMORY), strict=True):
        sealer = keys.streams.sealer(section, CHUNK)
        out.append((sealer.header_bytes, sealer.seal(data)))
    return out


def load_transfer(keys: SessionKeys, wire: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    (mh, mblob), *rest = wire
    manifest = Manifest.decode(keys.streams.opener(mh, expect=MANIFEST_LABEL).open(mblob))
    loaded = {}
    for section, (header, blob) in zip(manifest.sections, rest, strict=True):
        loaded[section.label] = keys.streams.opener(header, expect=section).open(blob)
    return loaded


def migrate_until_loaded(seen: InMemorySeenIds | None = None):  # type: ignore[no-untyped-def]
    seen = seen if seen is not None else InMemorySeenIds()
    ks, kd = session(seen=seen)
    assert load_transfer(kd, send_transfer(ks)) == {"state": STATE, "memory": MEMORY}
    src = SourceCommit(ks)
    dst = DestinationCommit(kd, seen=seen)
    return ks, kd, src, dst, seen


# --- the whole migration ----------------------------------------------------------------------
def test_handshake_stream_commit_end_to_end() -> None:
    _, _, src, dst, seen = migrate_until_loaded()
    loaded = dst.loaded()
    assert dst.state is CommitState.AWAIT_COMMIT
    ev = src.receive(loaded)
    assert ev == LoadConfirmed(3, ev.digest) and src.state is CommitState.LOAD_CONFIRMED
    token = src.commit()
    assert src.state is CommitState.COMMITTED and src.token == token
    assert dst.receive(token) == Committed(dst.migration_id)
    assert dst.state is CommitState.ACTIVE and seen.migration_claimed(dst.migration_id)


def test_token_is_delivered_again_after_a_drop() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    src.receive(dst.loaded())
    token = src.commit()
    # The connection drops; the untrusted side stored the token and delivers it later.
    stored = bytes(token)
    assert isinstance(dst.receive(stored), Committed)
    with pytest.raises(ReplayError):
        dst.receive(stored)
    assert dst.state is CommitState.ACTIVE


# --- forged, stale and replayed control messages ------------------------------------------------
def test_forged_loaded_changes_nothing() -> None:
    ks, _, src, dst, _ = migrate_until_loaded()
    forged = seal_control(
        bytes(32),
        DESTINATION_TO_SOURCE,
        ks.migration_id,
        ks.transcript_hash,
        {"t": "loaded", "mid": ks.migration_id, "streams": 3, "digest": ks.streams.digest()},
        bytes(12),
    )
    with pytest.raises(CommitError, match="authentication"):
        src.receive(forged)
    with pytest.raises(FrameError):
        src.receive(b"\x00\x00\x00\x02ab")
    with pytest.raises(FrameError):
        src.receive(encode({"t": "control", "n": b"short", "c": b""}))
    assert src.state is CommitState.AWAIT_LOADED
    assert isinstance(src.receive(dst.loaded()), LoadConfirmed)


def test_an_abort_carried_by_anyone_is_judged_by_the_waiting_destination() -> None:
    """The ABORT an enclave returned travels through the untrusted side (the guardian,
    the journal, ``migsgx recover``, the agents): a destination that sent LOADED
    ends only on the authentic one, never on a damaged, forged or stale frame."""

    _, _, old_src, _, _ = migrate_until_loaded()
    stale = old_src.abort()  # another migration's, authentic under its own keys
    ks, _, src, dst, _ = migrate_until_loaded()
    src.receive(dst.loaded())
    abort = src.abort()
    damaged = abort[:-1] + bytes([abort[-1] ^ 1])
    forged = seal_control(
        bytes(32), SOURCE_TO_DESTINATION, ks.migration_id, ks.transcript_hash,
        {"t": "abort", "mid": ks.migration_id, "code": "aborted", "message": ""}, bytes(12),
    )  # fmt: skip
    for frame in (damaged, forged, stale):
        with pytest.raises(CommitError, match="authentication"):
            dst.receive(frame)
        assert dst.state is CommitState.AWAIT_COMMIT
    assert isinstance(dst.receive(abort), PeerAborted)
    assert dst.state is CommitState.ABORTED


def test_loaded_replayed_from_an_earlier_migration() -> None:
    _, _, old_src, old_dst, _ = migrate_until_loaded()
    stale = old_dst.loaded()
    _, _, src, _, _ = migrate_until_loaded()
    with pytest.raises(CommitError, match="authentication"):
        src.receive(stale)
    assert src.state is CommitState.AWAIT_LOADED
    del old_src


def test_loaded_for_fewer_streams_fails_the_source_which_goes_on() -> None:
    seen = InMemorySeenIds()
    ks, kd = session(seen=seen)
    wire = send_transfer(ks)
    (mh, mblob), state, _memory_dropped = wire
    kd.streams.opener(mh, expect=MANIFEST_LABEL).open(mblob)
    kd.streams.opener(state[0], expect="state").open(state[1])
    dst = DestinationCommit(kd, seen=seen)
    src = SourceCommit(ks)
    with pytest.raises(CommitError, match="other streams") as info:
        src.receive(dst.loaded())
    assert info.value.context == {"loaded_streams": 2, "sent_streams": 3}
    assert src.state is CommitState.FAILED
    with pytest.raises(LocalProtocolError):
        src.commit()
    # The source keeps its state, and tells the destination to drop its copy.
    ev = dst.receive(src.abort("load-mismatch"))
    assert isinstance(ev, PeerAborted) and dst.state is CommitState.ABORTED


def test_forged_commit_then_the_genuine_token() -> None:
    ks, kd, src, dst, _ = migrate_until_loaded()
    src.receive(dst.loaded())
    forged = seal_control(
        bytes(32),
        "s2d",
        kd.migration_id,
        kd.transcript_hash,
        {"t": "commit", "mid": kd.migration_id, "streams": 3, "digest": kd.streams.digest()},
        bytes(12),
    )
    with pytest.raises(CommitError):
        dst.receive(forged)
    with pytest.raises(CommitError):
        dst.receive(dst.loaded_frame or b"")  # its own LOADED reflected back
    assert dst.state is CommitState.AWAIT_COMMIT, "forged input cannot end the wait"
    assert isinstance(dst.receive(src.commit()), Committed)
    del ks


def test_commit_token_for_another_migration() -> None:
    seen = InMemorySeenIds()
    _, _, src_a, dst_a, _ = migrate_until_loaded(seen)
    _, _, src_b, dst_b, _ = migrate_until_loaded(seen)
    src_a.receive(dst_a.loaded())
    src_b.receive(dst_b.loaded())
    token_a = src_a.commit()
    with pytest.raises(CommitError):
        dst_b.receive(token_a)
    assert dst_b.state is CommitState.AWAIT_COMMIT
    assert isinstance(dst_b.receive(src_b.commit()), Committed)
    assert isinstance(dst_a.receive(token_a), Committed)


def test_commit_before_loaded_is_refused_and_changes_nothing() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    with pytest.raises(LocalProtocolError):
        src.commit()  # no LOADED yet
    assert src.state is CommitState.AWAIT_LOADED and dst.state is CommitState.LOADING


def test_duplicate_loaded_is_ignored_after_confirmation() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    loaded = dst.loaded()
    src.receive(loaded)
    with pytest.raises(ProtocolError, match="not expected"):
        src.receive(loaded)
    assert src.state is CommitState.LOAD_CONFIRMED
    src.commit()
    with pytest.raises(ProtocolError):
        src.receive(loaded)
    assert src.state is CommitState.COMMITTED


# --- aborts: the source goes on ---------------------------------------------------------------
def test_source_timeout_abort_before_loaded() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    abort = src.abort("timeout", "no LOADED within 30 s")
    assert src.state is CommitState.ABORTED
    loaded = dst.loaded()
    with pytest.raises(ProtocolError):
        src.receive(loaded)  # too late: the source decided
    with pytest.raises(LocalProtocolError):
        src.commit()
    assert dst.receive(abort) == PeerAborted("timeout", "no LOADED within 30 s")
    assert dst.state is CommitState.ABORTED


def test_source_abort_after_load_confirmed() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    src.receive(dst.loaded())
    abort = src.abort()
    with pytest.raises(LocalProtocolError):
        src.commit()
    assert isinstance(dst.receive(abort), PeerAborted)


def test_destination_abort_only_before_loaded() -> None:
    _, _, src, dst, _ = migrate_until_loaded()
    ev = src.receive(dst.abort("disk-full"))
    assert isinstance(ev, PeerAborted) and src.state is CommitState.ABORTED
    _, _, _, dst2, _ = migrate_until_loaded()
    dst2.loaded()
    with pytest.raises(LocalProtocolError):
        dst2.abort()  # in doubt: only the source decides now


def test_loaded_refused_while_a_stream_is_incomplete() -> None:
    seen = InMemorySeenIds()
    ks, kd = session(seen=seen)
    sealer = ks.streams.sealer("state", 64)
    chunk = sealer.seal_chunk(b"x" * 64, final=False)
    opener = kd.streams.opener(sealer.header_bytes, expect="state")
    opener.open_chunk(chunk)
    dst = DestinationCommit(kd, seen=seen)
    with pytest.raises(StreamError, match="final chunk"):
        dst.loaded()
    assert dst.state is CommitState.LOADING
    # And the source refuses LOADED while it is still sealing.
    src = SourceCommit(ks)
    loaded = seal_control(
        kd.control_destination_key,
        DESTINATION_TO_SOURCE,
        kd.migration_id,
        kd.transcript_hash,
        {"t": "loaded", "mid": kd.migration_id, "streams": 0, "digest": kd.streams.digest()},
        bytes(12),
    )
    with pytest.raises(CommitError, match="still being sealed"):
        src.receive(loaded)


def test_nothing_loaded_nothing_to_confirm() -> None:
    ks, kd = session()
    with pytest.raises(LocalProtocolError):
        DestinationCommit(kd, seen=InMemorySeenIds()).loaded()
    with pytest.raises(ValueError):
        DestinationCommit(ks, seen=InMemorySeenIds())
    with pytest.raises(ValueError):
        SourceCommit(kd)


# --- stream attacks in the full flow: the load fails, the source goes on -------------------------
@pytest.mark.parametrize("attack", ["tamper", "reorder", "drop", "truncate", "append", "replay"])
def test_stream_attacks_leave_the_source_running(attack: str) -> None:
    seen = InMemorySeenIds()
    ks, kd = session(seen=seen)
    wire = send_transfer(ks)
    header, blob = wire[2]  # the memory section
    size = CHUNK + 16
    chunks = [blob[i : i + size] for i in range(0, len(blob), size)]
    if attack == "tamper":
        chunks[1] = chunks[1][:5] + bytes([chunks[1][5] ^ 0x80]) + chunks[1][6:]
    elif attack == "reorder":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif attack == "drop":
        del chunks[2]
    elif attack == "truncate":
        del chunks[-1]
    elif attack == "append":
        chunks.append(chunks[-1])
    elif attack == "replay":
        other_s, _ = session()
        chunks = [send_transfer(other_s)[2][1]]
    wire[2] = (header, b"".join(chunks))
    dst = DestinationCommit(kd, seen=seen)
    with pytest.raises(StreamError):
        load_transfer(kd, wire)
    # The destination gives up (it never sent LOADED); the source resumes its enclave.
    src = SourceCommit(ks)
    ev = src.receive(dst.abort("stream", "the state stream did not verify"))
    assert isinstance(ev, PeerAborted) and src.state is CommitState.ABORTED
    assert src.token is None


def test_second_load_of_the_same_migration_id() -> None:
    _, _, src, dst, seen = migrate_until_loaded()
    src.receive(dst.loaded())
    dst.receive(src.commit())
    # The same migration id again, at a destination host that accepted it already.
    platform = H.QuotingPlatform()
    pair = H.make_pair(platform=platform, seen=seen, migration_id=dst.migration_id)
    pair.source.start()
    with pytest.raises(ReplayError):
        H.deliver(pair.destination, pair.source.data_to_send())


def test_control_frames_follow_the_spec() -> None:
    ks, kd, src, dst, _ = migrate_until_loaded()
    loaded = dst.loaded()
    msg = open_control(
        ks.control_destination_key,
        DESTINATION_TO_SOURCE,
        ks.migration_id,
        ks.transcript_hash,
        loaded,
    )
    assert msg == {
        "t": "loaded",
        "mid": ks.migration_id,
        "streams": 3,
        "digest": ks.streams.digest(),
    }
    # A frame sealed for another transcript does not open.
    with pytest.raises(CommitError):
        open_control(
            ks.control_destination_key,
            DESTINATION_TO_SOURCE,
            ks.migration_id,
            bytes(64),
            loaded,
        )
    del kd, src


def test_authentic_message_of_the_wrong_direction_type_changes_nothing() -> None:
    ks, kd, src, dst, _ = migrate_until_loaded()
    src.receive(dst.loaded())
    # A "commit" sealed with the destination's key (only a broken destination could).
    odd = seal_control(
        kd.control_destination_key,
        DESTINATION_TO_SOURCE,
        kd.migration_id,
        kd.transcript_hash,
        {"t": "commit", "mid": kd.migration_id, "streams": 3, "digest": kd.streams.digest()},
        bytes(12),
    )
    with pytest.raises(ProtocolError, match="not expected"):
        src.receive(odd)
    assert src.state is CommitState.LOAD_CONFIRMED and src.token is None
    odd_loaded = seal_control(
        ks.control_source_key,
        "s2d",
        ks.migration_id,
        ks.transcript_hash,
        {"t": "loaded", "mid": ks.migration_id, "streams": 3, "digest": ks.streams.digest()},
        bytes(12),
    )
    with pytest.raises(ProtocolError, match="not expected"):
        dst.receive(odd_loaded)
    assert dst.state is CommitState.AWAIT_COMMIT


# --- REFUSED: the destination host's proof that it never runs this id (commit.md, 2.2) --------
def _refusal_session():  # type: ignore[no-untyped-def]
    """A re-delivery session: a source that committed before, a fresh destination."""

    ks, kd = session()
    return SourceCommit(ks, after_commit=True), DestinationCommit(kd, seen=InMemorySeenIds()), kd


def test_a_refused_is_made_only_after_the_refusal_was_recorded() -> None:
    src, dst, kd = _refusal_session()
    recorded: list[bool] = []
    frame = dst.refuse(lambda: recorded.append(True))
    assert recorded == [True] and dst.state is CommitState.REFUSED
    msg = open_control(
        kd.control_destination_key, DESTINATION_TO_SOURCE, kd.migration_id,
        kd.transcript_hash, frame,
    )  # fmt: skip
    assert msg == {"t": "refused", "mid": kd.migration_id}
    events: list[bool] = []
    assert src.refused(frame, lambda: events.append(True)) == Refused(kd.migration_id)
    assert events == [True] and src.state is CommitState.REVOKED
    # A store that cannot refuse (the id was claimed) gets no frame.
    _, dst2, _ = _refusal_session()

    def claimed() -> None:
        raise ReplayError("claimed")

    with pytest.raises(ReplayError):
        dst2.refuse(claimed)
    assert dst2.state is CommitState.LOADING


def test_a_refused_is_judged_like_every_control_frame() -> None:
    src, dst, kd = _refusal_session()
    frame = dst.refuse(lambda: None)
    b = bytearray(frame)
    b[-3] ^= 1
    with pytest.raises(CommitError):
        src.refused(bytes(b))
    other_src, other_dst, _ = _refusal_session()
    with pytest.raises(CommitError):
        src.refused(other_dst.refuse(lambda: None))  # another session's
    # One that names another migration, sealed with this session's key (a broken peer).
    odd = seal_control(
        kd.control_destination_key, DESTINATION_TO_SOURCE, kd.migration_id,
        kd.transcript_hash, {"t": "refused", "mid": bytes(16)}, bytes(12),
    )  # fmt: skip
    with pytest.raises(CommitError, match="another migration"):
        src.refused(odd)
    assert src.state is CommitState.FAILED
    del other_src


def test_a_refused_is_taken_only_after_a_commit_and_before_loaded() -> None:
    ks, kd = session()
    first = SourceCommit(ks)  # a first session: nothing was given up
    dst = DestinationCommit(kd, seen=InMemorySeenIds())
    frame = dst.refuse(lambda: None)
    with pytest.raises(ProtocolError):
        first.refused(frame)
    with pytest.raises(ProtocolError):
        first.receive(frame)  # (never taken as a LOADED or an ABORT either)
    assert first.state is CommitState.AWAIT_LOADED
    # A record that fails leaves the source as it was: the REFUSED may come again.
    src, dst2, _ = _refusal_session()
    frame2 = dst2.refuse(lambda: None)

    def fails() -> None:
        raise OSError("store gone")

    with pytest.raises(OSError):
        src.refused(frame2, fails)
    assert src.state is CommitState.AWAIT_LOADED
    src.refused(frame2)
    assert src.state is CommitState.REVOKED


def test_a_destination_that_sent_loaded_does_not_refuse() -> None:
    _, _, _, dst, _ = migrate_until_loaded()
    dst.loaded()
    with pytest.raises(LocalProtocolError):
        dst.refuse(lambda: None)
    assert dst.state is CommitState.AWAIT_COMMIT
