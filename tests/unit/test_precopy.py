"""Pre-copy rounds with both enclave ends in one process (``docs/spec/precopy.md``).

Real enclave memory, the kernel's dirty tracking, real shared-memory rings and
stream channels; only the processes and TCP are left out.  A relay between two
rings records what the untrusted side moved, so that rounds can be replayed,
dropped or reordered.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from migsgx.core.policy import EnclaveIdentity
from migsgx.core.rounds import (
    GROUP,
    MAX_ROUNDS,
    SEGMENT,
    SegmentTags,
    StopRules,
    digest_body_size,
    digest_key,
    full_digest_body,
    parse_digest_body,
    round_label,
)
from migsgx.core.stream_channel import StreamChannel
from migsgx.datapath.ring import ShmRing
from migsgx.enclave.dirty import FAULT_ENV
from migsgx.enclave.memory import PAGE_SIZE, EnclaveMemory
from migsgx.enclave.precopy import SourceRounds, final_dump, repair_dump
from migsgx.enclave.precopy_in import DestinationRounds, final_load, repair_load
from migsgx.errors import LiveMigrationError, MemoryDigestError, ProtocolError, StreamError

pytestmark = pytest.mark.timeout(60)

SRC = EnclaveIdentity(hashlib.sha256(b"mr").digest(), hashlib.sha256(b"signer").digest(), 7, 3)
DST = EnclaveIdentity(SRC.mr_enclave, SRC.mr_signer, 7, 3)
MID = bytes(range(16))
SECRET = hashlib.sha256(b"pre-copy secret").digest()
KEY = digest_key(SECRET, MID)
CHUNK = 64 << 10
SIZE = 4 << 20
USED = 2 << 20


class Pair:
    """A source and a destination enclave memory joined by stream channels and rings."""

    def __init__(self) -> None:
        self.src = EnclaveMemory(SIZE)
        self.dst = EnclaveMemory(SIZE)
        self.src.allocate("heap", USED)
        common: dict[str, Any] = {"migration_id": MID, "source": SRC, "destination": DST}
        self.tx = StreamChannel(SECRET, sending=True, **common)
        self.rx = StreamChannel(SECRET, sending=False, **common)
        self.out = SourceRounds.arm(self.src, self.tx, KEY)
        self.into = DestinationRounds(self.dst, self.rx, digest_key=KEY)
        self.recorded: list[list[tuple[bytes, bool]]] = []

    def write(self, pages: list[int], tag: int) -> None:
        view = self.src.view()
        for p in pages:
            view[p * PAGE_SIZE : p * PAGE_SIZE + 8] = bytes([tag]) * 8
        view.release()

    def move(
        self,
        send: Callable[[SourceRounds], Any],
        receive: Callable[[DestinationRounds], Any] | None,
        *,
        replace: list[tuple[bytes, bool]] | None = None,
    ) -> Any:
        """One transfer: source -> ring -> relay (records, may replace) -> ring -> destination."""

        a_prod, a_cons = ShmRing.pair(2, CHUNK + 16)
        b_prod, b_cons = ShmRing.pair(2, CHUNK + 16)
        self.out.ring, self.into.ring = a_prod, b_cons
        record: list[tuple[bytes, bool]] = []
        errors: list[BaseException] = []

        def source() -> None:
            try:
                send(self.out)
            except BaseException as exc:
                errors.append(exc)
                a_prod.close()

        def relay() -> None:
            try:
                while True:
                    index, view, final = a_cons.next(10)
                    record.append((bytes(view), final))
                    a_cons.release(index)
                    if final:
                        break
                for data, final in replace if replace is not None else record:
                    index, slot = b_prod.acquire(10)
                    slot[: len(data)] = data
                    b_prod.publish(index, len(data), final)
            except BaseException as exc:
                errors.append(exc)
                b_prod.close()

        threads = [threading.Thread(target=source), threading.Thread(target=relay)]
        for t in threads:
            t.start()
        try:
            if receive is None:  # the relay drops the transfer
                for t in threads:
                    t.join(10)
                assert not errors, errors
                return None
            received = receive(self.into)
            # The source returns once its ring drained: let it, before the rings close.
            for t in threads:
                t.join(10)
            return received
        finally:
            for ring in (a_cons, b_prod, a_prod, b_cons):
                ring.close()
            for t in threads:
                t.join(10)
            self.recorded.append(record)

    def round(self, **kw: Any) -> Any:
        return self.move(lambda s: s.round(CHUNK), lambda d: d.load_round(), **kw)

    def final(self, used: int = USED) -> dict[str, Any]:
        result: dict[str, Any] = {}

        def send(s: SourceRounds) -> None:
            result["source"] = final_dump(s, b"small state", b"", CHUNK)

        def receive(d: DestinationRounds) -> Any:
            return final_load(d, KEY, 1 << 20, 1 << 20, used_length=lambda _: used)

        state, persistent, figures = self.move(send, receive)
        assert (state, persistent) == (b"small state", b"")
        return {**result, "destination": figures}

    def final_and_repair(self, ask: Callable[[list[int]], list[int]] = list) -> dict[str, Any]:
        """The final transfer with repair allowed; ``ask`` is what the untrusted side relays."""

        def send(s: SourceRounds) -> None:
            final_dump(s, b"small state", b"", CHUNK)

        def receive(d: DestinationRounds) -> Any:
            return final_load(d, KEY, 1 << 20, 1 << 20, used_length=lambda _: USED, repair=True)

        _state, _persistent, figures = self.move(send, receive)
        if "repair" not in figures:
            return {"final": figures}
        segments = ask(figures["repair"])
        again = self.move(lambda s: repair_dump(s, segments, CHUNK), lambda d: repair_load(d, KEY))
        return {"final": figures, "repair": again}

    def same(self) -> bool:
        return bytes(self.src.view(0, USED)) == bytes(self.dst.view(0, USED))

    def close(self) -> None:
        self.out.close()


@pytest.fixture
def pair() -> Any:
    p = Pair()
    yield p
    p.close()


def test_rounds_then_final_make_the_same_memory_and_latest_copy_wins(pair: Pair) -> None:
    pair.write([0, 5, 100], 1)
    first = pair.round()
    assert first == {**first, "round": 0, "pages": USED // PAGE_SIZE}
    pair.write([5, 6, 300], 2)  # page 5 travels again
    second = pair.round()
    # pages 0, 5, 100 were written after the tracker was armed: they travel again too
    assert second["pages"] == 5 and second["round"] == 1
    pair.write([5, 7], 3)
    figures = pair.final()
    assert figures["source"]["final_pages"] == 2
    assert figures["destination"]["rounds"] == 2
    assert bytes(pair.dst.view(5 * PAGE_SIZE, 8)) == b"\x03" * 8
    assert pair.same()


def test_destination_digest_without_cached_tags_agrees(pair: Pair) -> None:
    pair.into.digest_key = None  # nothing hashed between rounds: all at the end
    pair.write([0, 70, 200], 1)
    pair.round()
    pair.write([70, 71], 2)
    pair.round()
    pair.write([300], 3)
    figures = pair.final()
    assert figures["source"]["final_pages"] == 1
    assert pair.same()


def test_a_round_with_nothing_written_is_empty(pair: Pair) -> None:
    pair.round()
    assert pair.round()["pages"] == 0
    pair.final()
    assert pair.same()


def test_final_without_rounds_carries_everything(pair: Pair) -> None:
    pair.write([1, 2], 9)
    figures = pair.final()
    assert figures["source"]["final_pages"] == USED // PAGE_SIZE
    assert pair.same()


def test_hidden_write_is_caught_by_the_digest(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair.out.close()
    monkeypatch.setenv(FAULT_ENV, "hide=9")
    pair.out = SourceRounds.arm(pair.src, pair.tx, KEY)
    pair.round()
    pair.write([8, 9], 4)  # the tracker reports 8 only
    with pytest.raises(MemoryDigestError):
        pair.final()


def test_source_rehashes_only_segments_its_write_log_names(pair: Pair) -> None:
    pair.round()
    pair.write([0, 20], 1)
    pair.round()
    pair.write([100], 2)  # one segment written after the last round
    figures = pair.final()
    assert figures["source"]["verify_bytes"] == SEGMENT
    assert pair.same()


def test_hidden_write_in_a_middle_round_is_caught(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair.out.close()
    monkeypatch.setenv(FAULT_ENV, "hide=40")
    pair.out = SourceRounds.arm(pair.src, pair.tx, KEY)
    pair.round()
    pair.write([40], 5)  # hidden from the report, seen by the write log
    assert pair.round()["pages"] == 0
    pair.round()  # the source's tag of page 40's segment is recomputed here
    with pytest.raises(MemoryDigestError):
        pair.final()
    # Page 40's segment differs; the group tag names every segment of its group.
    assert 40 * PAGE_SIZE // SEGMENT in pair.into.differing
    assert pair.into.differing == list(range(GROUP))


def hide(pair: Pair, monkeypatch: pytest.MonkeyPatch, page: int) -> None:
    pair.out.close()
    monkeypatch.setenv(FAULT_ENV, f"hide={page}")
    pair.out = SourceRounds.arm(pair.src, pair.tx, KEY)


def test_repair_resends_the_differing_segments_once(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide(pair, monkeypatch, 9)
    pair.round()
    pair.write([8, 9, 200], 4)  # the tracker reports 8 and 200
    figures = pair.final_and_repair()
    assert figures["final"]["repair"] == list(range(GROUP))  # page 9's group
    assert figures["repair"]["segments"] == GROUP
    assert figures["repair"]["pages"] == GROUP * SEGMENT // PAGE_SIZE
    assert pair.same()
    with pytest.raises(ProtocolError):  # one repair round, on both sides
        repair_dump(pair.out, [1], CHUNK)
    with pytest.raises(ProtocolError):
        repair_load(pair.into, KEY)


def test_repair_that_leaves_a_difference_is_refused(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide(pair, monkeypatch, 9)
    pair.round()
    pair.write([9], 4)
    pair.round()  # page 9 hidden from this round's report
    pair.out.tracker._hide = 300  # the OS hides another page now
    pair.write([300], 5)
    # Two groups differ; the untrusted side relays only the first one's segments.
    with pytest.raises(MemoryDigestError):
        pair.final_and_repair(ask=lambda named: named[:GROUP])
    group = 300 * PAGE_SIZE // SEGMENT // GROUP
    assert pair.into.differing == list(range(group * GROUP, (group + 1) * GROUP))


def test_repair_with_pages_of_segments_not_named_is_refused(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide(pair, monkeypatch, 9)
    pair.round()
    pair.write([9], 4)
    with pytest.raises(StreamError):
        pair.final_and_repair(ask=lambda named: [named[-1] + 1])


@pytest.mark.parametrize("segments", [[], [2, 1], [1, 1], [-1], [USED // SEGMENT], [True]])
def test_source_refuses_a_malformed_repair_list(pair: Pair, segments: list[Any]) -> None:
    pair.round()
    pair.final()
    with pytest.raises(ProtocolError):
        repair_dump(pair.out, segments, CHUNK)


def test_kept_tags_give_the_digest_of_the_final_memory() -> None:
    """Whatever the order of writes, scans and refreshes: the body of the memory now."""

    memory = EnclaveMemory(SIZE)
    memory.allocate("heap", USED)
    tags = SegmentTags(KEY, SIZE)
    view = memory.view()
    try:
        for step, pages in enumerate(([1, 2], [9, 30, 31], [], [511], [2])):
            tags.refresh(view, USED)
            for p in pages:
                view[p * PAGE_SIZE] = step + 1
            tags.forget_pages(pages)  # what the write log names at the next scan
        body = tags.body(view, USED)
        assert body == full_digest_body(KEY, view[:USED])
        assert parse_digest_body(body)[0] == USED
    finally:
        view.release()
        memory.wipe()


def test_the_digest_section_is_one_tag_per_group_and_kept_groups_are_not_recomputed() -> None:
    assert digest_body_size(4 << 30) == 16 + 16 * (4 << 30) // (GROUP * SEGMENT)  # 128 KiB
    memory = EnclaveMemory(SIZE)
    memory.allocate("heap", USED)
    tags = SegmentTags(KEY, SIZE)
    view = memory.view()
    try:
        first = tags.body(view, USED)
        read = tags.hashed_bytes
        view[300 * PAGE_SIZE] = 9
        tags.forget_pages([300])
        second = tags.body(view, USED)
        assert tags.hashed_bytes - read == SEGMENT  # one segment read again
        theirs = parse_digest_body(first)[1]
        assert parse_digest_body(second)[1] != theirs
        group = 300 * PAGE_SIZE // SEGMENT // GROUP
        # Only the written page's group differs, and it names all of its segments.
        assert tags.differing(view, USED, theirs) == list(range(group * GROUP, (group + 1) * GROUP))
        assert second == full_digest_body(KEY, view[:USED])
    finally:
        view.release()
        memory.wipe()


def test_digest_over_another_length_is_refused(pair: Pair) -> None:
    pair.round()
    with pytest.raises(MemoryDigestError):
        pair.final(used=USED - PAGE_SIZE)  # the state declares less than the source covered


def test_replayed_round_is_refused(pair: Pair) -> None:
    pair.round()
    pair.write([3], 1)
    pair.round()
    pair.write([4], 2)
    # The untrusted side delivers round 1 again in place of round 2.
    with pytest.raises(StreamError):
        pair.round(replace=pair.recorded[1])


def test_dropped_round_is_refused(pair: Pair) -> None:
    pair.round()
    pair.write([3], 1)
    pair.move(lambda s: s.round(CHUNK), None, replace=[])  # round 1 never reaches the enclave
    assert pair.out.number == 2
    pair.write([4], 2)
    with pytest.raises(StreamError):
        pair.round()


def test_final_offered_as_a_round_is_refused(pair: Pair) -> None:
    pair.round()

    def send(s: SourceRounds) -> None:
        final_dump(s, b"x", b"", CHUNK)

    with pytest.raises(StreamError):
        pair.move(send, lambda d: d.load_round())


def test_no_round_after_the_final_began(pair: Pair) -> None:
    pair.round()
    pair.final()
    with pytest.raises(ProtocolError):
        pair.out.round(CHUNK)


def test_round_limit(pair: Pair) -> None:
    pair.out.number = MAX_ROUNDS
    with pytest.raises(LiveMigrationError):
        pair.out.round(CHUNK)


def test_round_labels_are_numbered() -> None:
    assert [round_label(n) for n in (0, 1, 12)] == [
        "round-0/memory",
        "round-1/memory",
        "round-12/memory",
    ]


# --- stop rules ---------------------------------------------------------------------------
def r(pages: int, seconds: float = 0.1) -> dict[str, Any]:
    return {"pages": pages, "bytes": pages * 4096, "seconds": seconds}


def test_stop_rules_each_named() -> None:
    rules = StopRules(downtime_target=0.01, max_rounds=10, stall_rounds=2, max_seconds=5)
    big = r(10_000, 0.5)  # 80 MiB/s
    assert rules.decide([], 0, 1 << 30) is None
    assert rules.decide([big], 0, 1 << 30) is None
    assert rules.decide([big, r(100, 0.3)], 0, 1 << 30) == "converged"  # 5 ms at 80 MiB/s
    assert rules.decide([big, r(900), r(950), r(990)], 0, 1 << 30) == "no-convergence"
    assert rules.decide([big, r(900), r(800)], 6.0, 1 << 30) == "max-seconds"
    assert rules.decide([big] + [r(900 - i) for i in range(9)], 0, 1 << 30) == "max-rounds"
    assert rules.decide([big, r(900)], 0, 20_000_000) == "max-bytes"
    assert rules.decide([big, r(900), r(800)], 0, 1 << 30) is None


def test_converged_waits_until_the_rounds_settle() -> None:
    rules = StopRules(downtime_target=0.01, settle=0.6)
    big = r(10_000, 0.5)
    # Under the target, but the last round was much shorter than the one before:
    # another round shrinks what the final transfer carries.
    assert rules.decide([big, r(100, 0.1)], 0, 1 << 30) is None
    assert rules.decide([big, r(100, 0.1), r(40, 0.05)], 0, 1 << 30) is None
    assert rules.decide([big, r(100, 0.1), r(40, 0.05), r(35, 0.04)], 0, 1 << 30) == "converged"
    # Nothing written: nothing to wait for.
    assert rules.decide([big, r(0, 0.001)], 0, 1 << 30) == "converged"
    # settle=0: the first round under the target stops.
    assert StopRules(downtime_target=0.01, settle=0).decide([big, r(100, 0.1)], 0, 1 << 30) == (
        "converged"
    )


def test_stop_rules_estimate_uses_the_measured_bandwidth() -> None:
    rounds = [r(25_600, 1.0), r(256)]  # 100 MiB in 1 s, then 1 MiB
    assert StopRules.estimate(rounds) == pytest.approx(0.01)


def test_stop_rules_estimate_counts_the_digest_check_after_the_freeze() -> None:
    tagged = {"tagged_bytes": 1 << 30, "tag_seconds": 0.5}  # 2 GiB/s
    rounds = [{**r(25_600, 1.0), **tagged}, r(256)]  # then 256 pages: up to 256 segments
    assert StopRules.estimate(rounds) == pytest.approx(0.01 + 256 * SEGMENT / (2 << 30))
    # Never more than a pass over the memory round 0 sent.
    rounds = [{**r(25_600, 1.0), **tagged}, r(25_600)]
    assert StopRules.estimate(rounds) == pytest.approx(1.0 + 25_600 * 4096 / (2 << 30))


@pytest.mark.parametrize(
    "bad",
    [
        {"max_rounds": 0},
        {"max_rounds": MAX_ROUNDS + 1},
        {"stall_rounds": 0},
        {"max_seconds": 0},
        {"settle": 1.5},
    ],
)
def test_stop_rules_refuse_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StopRules(**bad)
