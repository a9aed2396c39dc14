"""The state stream: chunk AEAD, headers, channels, manifests (``docs/spec/stream.md``)."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from migsgx.core import stream as stream_mod
from migsgx.core.manifest import MANIFEST_LABEL, Manifest, Section
from migsgx.core.policy import EnclaveIdentity
from migsgx.core.stream import (
    COUNTER_LIMIT,
    StreamHeader,
    StreamOpener,
    StreamSealer,
    streams_digest,
)
from migsgx.core.stream_channel import StreamChannel
from migsgx.errors import StreamError

SRC = EnclaveIdentity(hashlib.sha256(b"mr").digest(), hashlib.sha256(b"signer").digest(), 7, 3)
DST = EnclaveIdentity(SRC.mr_enclave, SRC.mr_signer, 7, 4)
MID = bytes(range(16))
SECRET = hashlib.sha256(b"stream secret").digest()


def rng_from(seed: bytes):  # type: ignore[no-untyped-def]
    counter = itertools.count()

    def rng(n: int) -> bytes:
        return hashlib.sha256(seed + next(counter).to_bytes(8, "big")).digest()[:n]

    return rng


def channels(
    secret: bytes = SECRET, mid: bytes = MID, seed: bytes = b"salt"
) -> tuple[StreamChannel, StreamChannel]:
    common = {"migration_id": mid, "source": SRC, "destination": DST}
    tx = StreamChannel(secret, sending=True, rng=rng_from(seed), **common)  # type: ignore[arg-type]
    rx = StreamChannel(secret, sending=False, **common)  # type: ignore[arg-type]
    return tx, rx


def split_chunks(sealer: StreamSealer, payload: bytes) -> list[bytes]:
    size = sealer.header.chunk_size
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [sealer.seal_chunk(p, final=i == len(parts) - 1) for i, p in enumerate(parts)]


def sealed(payload: bytes, chunk: int = 64, label: str = "memory") -> tuple[bytes, list[bytes]]:
    tx, _ = channels()
    sealer = tx.sealer(label, chunk)
    return sealer.header_bytes, split_chunks(sealer, payload)


def opener_for(header: bytes, label: str = "memory") -> StreamOpener:
    _, rx = channels()
    return rx.opener(header, expect=label)


def open_chunks(header: bytes, chunks: list[bytes], label: str = "memory") -> bytes:
    opener = opener_for(header, label)
    out = b"".join(opener.open_chunk(c) for c in chunks)
    opener.summary()
    return out


PAYLOAD = bytes(range(256)) * 2 + b"tail"  # 516 bytes: 8 full chunks of 64 and 4 bytes


# --- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 128, 516])
def test_roundtrip_lengths(length: int) -> None:
    header, chunks = sealed(PAYLOAD[:length])
    assert len(chunks) == max(1, -(-length // 64))
    assert all(len(c) == 80 for c in chunks[:-1])
    assert open_chunks(header, chunks) == PAYLOAD[:length]


def test_whole_stream_seal_and_open() -> None:
    tx, rx = channels()
    sealer = tx.sealer("state", 64)
    blob = sealer.seal(PAYLOAD)
    assert len(blob) == len(PAYLOAD) + 9 * 16
    opener = rx.opener(sealer.header_bytes, expect="state")
    assert opener.open(blob) == PAYLOAD
    assert sealer.summary() == opener.summary()
    assert tx.digest() == rx.digest() == streams_digest([sealer.summary()])


def test_into_buffers_and_offsets() -> None:
    tx, rx = channels()
    section = Section.dense("memory", len(PAYLOAD))
    sealer = tx.sealer(section, 128)
    opener = rx.opener(sealer.header_bytes, expect=section)
    memory = bytearray(len(PAYLOAD))
    slot = bytearray(128 + 16)
    src = memoryview(PAYLOAD)
    for i in range(section.chunk_count(128)):
        off, n = section.chunk_extent(i, 128)
        last = i == section.chunk_count(128) - 1
        size = sealer.seal_into(src[off : off + n], slot, final=last)
        assert opener.position == i
        off2, n2 = section.chunk_extent(opener.position, 128)
        assert opener.open_into(memoryview(slot)[:size], memoryview(memory)[off2 : off2 + n2]) == n
    assert memory == PAYLOAD and opener.done


def test_fallback_without_into_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    header, chunks = sealed(PAYLOAD)
    monkeypatch.setattr(stream_mod, "HAVE_INTO", False)
    header2, chunks2 = sealed(PAYLOAD)
    assert (header2, chunks2) == (header, chunks), "same bytes with either code path"
    assert open_chunks(header, chunks) == PAYLOAD


def test_key_derivation_follows_the_spec() -> None:
    header, chunks = sealed(b"x" * 70)
    parsed, _ = StreamHeader.unpack(header)
    key = HKDF(hashes.SHA256(), 32, salt=parsed.salt, info=b"migsgx/v1 stream key" + header).derive(
        SECRET
    )
    aead = AESGCM(key)
    assert aead.decrypt(bytes(11) + b"\x00", chunks[0], header) == b"x" * 64
    assert aead.decrypt((1).to_bytes(11, "big") + b"\x01", chunks[1], header) == b"x" * 6


def test_large_counter_nonce_path() -> None:
    header, _ = sealed(b"")
    sealer = StreamSealer(SECRET, header, length=None, on_final=None)
    opener = StreamOpener(SECRET, header, length=None, on_final=None)
    sealer._counter = opener._counter = (1 << 64) + 5
    c1 = sealer.seal_chunk(b"a" * 64, final=False)
    c2 = sealer.seal_chunk(b"b", final=True)
    assert opener.open_chunk(c1) + opener.open_chunk(c2) == b"a" * 64 + b"b"


# --- attacks on chunks ---------------------------------------------------------------------
def _fails(header: bytes, chunks: list[bytes], match: str = "") -> StreamError:
    with pytest.raises(StreamError, match=match) as info:
        open_chunks(header, chunks)
    return info.value


def test_tampered_chunk_is_one_opaque_error() -> None:
    header, chunks = sealed(PAYLOAD)
    for i in range(len(chunks)):
        bad = list(chunks)
        flipped = bytearray(bad[i])
        flipped[len(flipped) // 2] ^= 0x04
        bad[i] = bytes(flipped)
        err = _fails(header, bad, "chunk failed authentication")
        assert err.context == {} and err.message == "chunk failed authentication"
        assert err.__cause__ is None and err.__suppress_context__


def test_failed_chunk_leaves_no_plaintext_in_the_buffer() -> None:
    header, chunks = sealed(b"secret!!" * 8)
    bad = bytearray(chunks[0])
    bad[-1] ^= 1  # tag only: the ciphertext itself decrypts to the secret
    out = bytearray(b"\xaa" * 64)
    with pytest.raises(StreamError):
        opener_for(header).open_into(bytes(bad), out)
    assert out == bytes(64)


def test_reordered_chunks() -> None:
    header, chunks = sealed(PAYLOAD)
    _fails(header, [chunks[1], chunks[0], *chunks[2:]], "authentication")


def test_dropped_chunk() -> None:
    header, chunks = sealed(PAYLOAD)
    _fails(header, chunks[:3] + chunks[4:], "authentication")


def test_duplicated_chunk() -> None:
    header, chunks = sealed(PAYLOAD)
    _fails(header, [*chunks[:3], chunks[2], *chunks[3:]], "authentication")


def test_truncated_stream() -> None:
    header, chunks = sealed(PAYLOAD)
    _fails(header, chunks[:-1], "before its final chunk")
    # A full-size non-final chunk cannot pass as the final one.
    opener = opener_for(header)
    with pytest.raises(StreamError, match="authentication"):
        opener.open_chunk(chunks[0], final=True)


def test_appended_chunk() -> None:
    header, chunks = sealed(PAYLOAD)
    opener = opener_for(header)
    for c in chunks:
        opener.open_chunk(c)
    with pytest.raises(StreamError, match="after the final"):
        opener.open_chunk(chunks[-1])
    # In the one-byte-string form, appended bytes shift the final chunk: it fails.
    blob = b"".join(chunks)
    for extra in (b"x", chunks[-1], chunks[0]):
        with pytest.raises(StreamError):
            opener_for(header).open(blob + extra)
    # With the length known from the manifest, the receiver stops at the final chunk.
    section = Section.dense("memory", len(PAYLOAD))
    _, rx = channels()
    known = rx.opener(header, expect=section)
    with pytest.raises(StreamError, match="after the final"):
        known.open(blob + chunks[0])


def test_stream_dead_after_error() -> None:
    header, chunks = sealed(PAYLOAD)
    opener = opener_for(header)
    with pytest.raises(StreamError):
        opener.open_chunk(chunks[1])
    with pytest.raises(StreamError, match="failed earlier"):
        opener.open_chunk(chunks[0])


def test_bad_chunk_sizes() -> None:
    header, chunks = sealed(PAYLOAD)
    with pytest.raises(StreamError, match="invalid size"):
        opener_for(header).open_chunk(b"short")
    with pytest.raises(StreamError, match="invalid size"):
        opener_for(header).open_chunk(chunks[0] + b"x")


def test_empty_final_chunk_after_data_is_refused_even_if_authentic() -> None:
    header, _ = sealed(b"z" * 64)
    parsed, _ = StreamHeader.unpack(header)
    key = HKDF(hashes.SHA256(), 32, salt=parsed.salt, info=b"migsgx/v1 stream key" + header).derive(
        SECRET
    )
    aead = AESGCM(key)
    full = aead.encrypt(bytes(11) + b"\x00", b"z" * 64, header)
    empty_final = aead.encrypt((1).to_bytes(11, "big") + b"\x01", b"", header)
    _fails(header, [full, empty_final], "empty final chunk")


def test_wrong_final_hint_fails() -> None:
    header, chunks = sealed(b"q" * 128)
    with pytest.raises(StreamError):
        opener_for(header).open_chunk(chunks[0], final=True)
    opener = opener_for(header)
    opener.open_chunk(chunks[0], final=False)
    assert opener.open_chunk(chunks[1], final=True) == b"q" * 64


def test_counter_overflow() -> None:
    tx, rx = channels()
    sealer = tx.sealer("memory", 64)
    sealer._counter = COUNTER_LIMIT - 1
    with pytest.raises(StreamError, match="overflow"):
        sealer.seal_chunk(b"a" * 64, final=False)
    last = sealer.seal_chunk(b"a", final=True)  # the last counter can carry the final chunk
    opener = rx.opener(sealer.header_bytes, expect="memory")
    opener._counter = COUNTER_LIMIT - 1
    assert opener.open_chunk(last) == b"a"
    sealer2 = StreamSealer(SECRET, sealer.header_bytes, length=None, on_final=None)
    sealer2._counter = COUNTER_LIMIT
    with pytest.raises(StreamError, match="overflow"):
        sealer2.seal_chunk(b"a", final=True)
    opener2 = StreamOpener(SECRET, sealer.header_bytes, length=None, on_final=None)
    opener2._counter = COUNTER_LIMIT
    with pytest.raises(StreamError, match="overflow"):
        opener2.open_chunk(last)


# --- streams from elsewhere ------------------------------------------------------------------
def test_stream_of_an_earlier_migration_is_refused() -> None:
    old_tx, _ = channels(secret=hashlib.sha256(b"old").digest(), mid=bytes(16))
    old = old_tx.sealer("memory", 64)
    chunks = split_chunks(old, PAYLOAD)
    _, rx = channels()
    with pytest.raises(StreamError, match="another migration"):
        rx.opener(old.header_bytes, expect="memory")
    # Even under a header rewritten for this migration, the old chunks do not open.
    forged = StreamHeader.unpack(old.header_bytes)[0]
    forged = StreamHeader(MID, SRC, DST, 64, 0, forged.salt, "memory")
    opener = rx.opener(forged.pack(), expect="memory")
    with pytest.raises(StreamError, match="authentication"):
        opener.open_chunk(chunks[0])


def test_same_migration_other_session_keys() -> None:
    tx, _ = channels(secret=hashlib.sha256(b"another session").digest())
    sealer = tx.sealer("memory", 64)
    chunks = split_chunks(sealer, PAYLOAD)
    with pytest.raises(StreamError, match="authentication"):
        open_chunks(sealer.header_bytes, chunks)


def test_header_checks_against_the_session() -> None:
    _, rx = channels()
    other = EnclaveIdentity(b"\x01" * 32, SRC.mr_signer, 7, 3)
    salt = bytes(16)
    with pytest.raises(StreamError, match="another source"):
        rx.opener(StreamHeader(MID, other, DST, 64, 0, salt, "m").pack(), expect="m")
    with pytest.raises(StreamError, match="another destination"):
        rx.opener(StreamHeader(MID, SRC, other, 64, 0, salt, "m").pack(), expect="m")
    with pytest.raises(StreamError, match="number 1 where 0"):
        rx.opener(StreamHeader(MID, SRC, DST, 64, 1, salt, "m").pack(), expect="m")
    with pytest.raises(StreamError, match="labelled 'm' where 'state'"):
        rx.opener(StreamHeader(MID, SRC, DST, 64, 0, salt, "m").pack(), expect="state")
    good = StreamHeader(MID, SRC, DST, 64, 0, salt, "m").pack()
    with pytest.raises(StreamError, match="after the stream header"):
        rx.opener(good + b"x", expect="m")


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (0, 0x00, "not a migsgx stream"),
        (4, 0x02, "version 2"),
        (6, 0x01, "reserved"),
        (5, 0x00, "invalid stream header"),
        (5, 0x7F, "truncated"),
        (184, 0x20, "invalid stream header"),
        (8, 0x7F, "invalid stream header"),
    ],
)
def test_malformed_headers(offset: int, value: int, match: str) -> None:
    header = bytearray(StreamHeader(MID, SRC, DST, 64, 0, bytes(16), "memory").pack())
    header[offset] = value
    with pytest.raises(StreamError, match=match):
        StreamHeader.unpack(bytes(header))
    with pytest.raises(StreamError, match="truncated"):
        StreamHeader.unpack(bytes(header[:100]))


def test_header_roundtrip_and_layout() -> None:
    h = StreamHeader(MID, SRC, DST, 1 << 20, 5, bytes(range(16, 32)), "round-2/memory")
    raw = h.pack()
    assert raw[:4] == b"MGXS" and raw[4] == 1 and raw[5] == len("round-2/memory")
    assert len(raw) == 184 + 14
    assert StreamHeader.unpack(raw + b"rest") == (h, len(raw))


def test_streams_run_in_sequence() -> None:
    tx, rx = channels()
    s0 = tx.sealer("a", 64)
    with pytest.raises(ValueError, match="previous stream"):
        tx.sealer("b", 64)
    c0 = s0.seal(b"first")
    s1 = tx.sealer("b", 64)
    c1 = s1.seal(b"second")
    with pytest.raises(StreamError, match="number 1 where 0"):
        rx.opener(s1.header_bytes, expect="b")  # stream 0 dropped
    o0 = rx.opener(s0.header_bytes, expect="a")
    with pytest.raises(StreamError, match="previous stream ended"):
        rx.opener(s1.header_bytes, expect="b")  # stream 0 truncated
    o0.open(c0)
    with pytest.raises(StreamError, match="number 0 where 1"):
        rx.opener(s0.header_bytes, expect="a")  # stream 0 replayed
    assert rx.opener(s1.header_bytes, expect="b").open(c1) == b"second"
    assert [s.sequence for s in rx.summaries] == [0, 1]
    assert tx.digest() == rx.digest()


def test_channel_direction_and_sender_misuse() -> None:
    tx, rx = channels()
    with pytest.raises(ValueError):
        rx.sealer("a", 64)
    with pytest.raises(ValueError):
        tx.opener(b"", expect="a")
    with pytest.raises(ValueError):
        tx.sealer("bad label", 64)
    with pytest.raises(ValueError):
        tx.sealer("a", 32)  # below the format's minimum chunk size
    sealer = tx.sealer("a", 64)
    with pytest.raises(ValueError, match="exactly the chunk size"):
        sealer.seal_chunk(b"x", final=False)
    with pytest.raises(ValueError, match="larger"):
        sealer.seal_chunk(b"x" * 65, final=True)
    with pytest.raises(ValueError, match="must hold"):
        sealer.seal_into(b"x", bytearray(10), final=True)
    sealer.seal_chunk(b"x" * 64, final=False)
    with pytest.raises(ValueError, match="empty final"):
        sealer.seal_chunk(b"", final=True)
    with pytest.raises(ValueError, match="whole stream"):
        sealer.seal(b"abc")
    sealer.seal_chunk(b"y", final=True)
    with pytest.raises(ValueError, match="has ended"):
        sealer.seal_chunk(b"y", final=True)


# --- manifests and sections ------------------------------------------------------------------
@pytest.mark.parametrize("pages", [range(0), range(7), range(5, 1 << 20), range(3, 40, 2)])
def test_sparse_section_of_a_range_is_that_of_its_pages(pages: range) -> None:
    assert Section.sparse("round-0/memory", pages) == Section.sparse("round-0/memory", list(pages))


def test_sparse_section_runs_are_the_runs_of_its_pages() -> None:
    rng = random.Random(12)
    for _ in range(300):
        pages = [rng.randrange(0, 200) for _ in range(rng.randrange(0, 80))]
        runs: list[tuple[int, int]] = []
        for page in sorted(set(pages)):
            if runs and sum(runs[-1]) == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((page, 1))
        section = Section.sparse("round-1/memory", pages)
        assert section.runs == tuple(runs)
        assert section.length == len(set(pages)) * 4096
    with pytest.raises(ValueError):
        Section.sparse("round-1/memory", [1 << 70])
    with pytest.raises(ValueError):
        Section.sparse("round-1/memory", [-1, 3])


def test_sparse_section_layout() -> None:
    sec = Section.sparse("round-1/memory", [9, 3, 4, 5, 20, 21, 100], page_size=64)
    assert sec.runs == ((3, 3), (9, 1), (20, 2), (100, 1))
    assert sec.length == 7 * 64
    assert sec.chunk_count(128) == 4
    assert sec.chunk_pages(0, 128) == [(3, 2)]
    assert sec.chunk_pages(1, 128) == [(5, 1), (9, 1)]
    assert sec.chunk_pages(2, 128) == [(20, 2)]
    assert sec.chunk_pages(3, 128) == [(100, 1)]
    assert sec.chunk_pages(0, 1024) == [(3, 3), (9, 1), (20, 2), (100, 1)]
    with pytest.raises(ValueError):
        sec.chunk_pages(0, 96)
    with pytest.raises(ValueError):
        sec.chunk_extent(4, 128)
    empty = Section.sparse("none", [], page_size=4096)
    assert empty.length == 0 and empty.chunk_count(4096) == 1


def test_manifest_roundtrip() -> None:
    m = Manifest(
        (
            Section.dense("state", 10),
            Section.dense("memory", 1 << 30),
            Section.sparse("dirty", range(0, 1 << 16, 2), page_size=4096),
        )
    )
    assert Manifest.decode(m.encode()) == m


@pytest.mark.parametrize(
    "doc",
    [
        b"\xff",
        {"t": "manifest", "v": 2, "sections": []},
        {"t": "manifest", "v": 1, "sections": [{"t": "dense", "label": "manifest", "length": 1}]},
        {"t": "manifest", "v": 1, "sections": [{"t": "dense", "label": "a b", "length": 1}]},
        {"t": "manifest", "v": 1, "sections": [{"t": "dense", "label": "a", "length": -1}]},
        {"t": "manifest", "v": 1, "sections": [{"t": "dense", "label": "a", "length": 1 << 64}]},
        {
            "t": "manifest",
            "v": 1,
            "sections": [{"t": "dense", "label": "a", "length": 1}] * 2,
        },
        {
            "t": "manifest",
            "v": 1,
            "sections": [{"t": "sparse", "label": "a", "page_size": 100, "runs": []}],
        },
        {
            "t": "manifest",
            "v": 1,
            "sections": [{"t": "sparse", "label": "a", "page_size": 64, "runs": [[5, 2], [6, 1]]}],
        },
        {
            "t": "manifest",
            "v": 1,
            "sections": [{"t": "sparse", "label": "a", "page_size": 64, "runs": [[5, 0]]}],
        },
        {
            "t": "manifest",
            "v": 1,
            "sections": [{"t": "sparse", "label": "a", "page_size": 64, "runs": [[5]]}],
        },
        {"t": "manifest", "v": 1, "sections": [{"t": "dense", "label": "a", "length": True}]},
        {"t": "manifest", "v": 1, "sections": [], "extra": 1},
    ],
)
def test_invalid_manifests(doc: object) -> None:
    import cbor2

    data = doc if isinstance(doc, bytes) else cbor2.dumps(doc)
    with pytest.raises(StreamError, match="manifest"):
        Manifest.decode(data)


def test_whole_transfer_dense_and_sparse() -> None:
    page = 64
    memory = b"".join(hashlib.sha256(bytes([i])).digest() * 2 for i in range(32))  # 32 pages
    state = b"structured state as CBOR"
    dirty = [1, 2, 3, 17, 30]
    manifest = Manifest(
        (
            Section.dense("state", len(state)),
            Section.dense("memory", len(memory)),
            Section.sparse("round-1/memory", dirty, page_size=page),
        )
    )
    tx, rx = channels()
    wire: list[tuple[bytes, list[bytes]]] = []
    m_sealer = tx.sealer(MANIFEST_LABEL, 256)
    wire.append((m_sealer.header_bytes, [m_sealer.seal(manifest.encode())]))
    sources = {"state": state, "memory": memory}
    for sec in manifest.sections:
        sealer = tx.sealer(sec, 128)
        chunks = []
        for i in range(sec.chunk_count(128)):
            if sec.page_size:
                data = b"".join(
                    memory[p * page : (p + n) * page] for p, n in sec.chunk_pages(i, 128)
                )
            else:
                off, n = sec.chunk_extent(i, 128)
                data = sources[sec.label][off : off + n]
            chunks.append(sealer.seal_chunk(data, final=i == sec.chunk_count(128) - 1))
        wire.append((sealer.header_bytes, chunks))

    # Destination.
    (mh, (mblob,)), *rest = wire
    got = Manifest.decode(rx.opener(mh, expect=MANIFEST_LABEL).open(mblob))
    assert got == manifest
    dest_state = bytearray(len(state))
    dest_memory = bytearray(len(memory))
    rounds = bytearray(len(memory))
    for sec, (header, chunks) in zip(got.sections, rest, strict=True):
        opener = rx.opener(header, expect=sec)
        for ct in chunks:
            i = opener.position
            off, n = sec.chunk_extent(i, 128)
            if sec.page_size:
                tmp = bytearray(n)
                opener.open_into(ct, tmp)
                pos = 0
                for p, cnt in sec.chunk_pages(i, 128):
                    rounds[p * page : (p + cnt) * page] = tmp[pos : pos + cnt * page]
                    pos += cnt * page
            else:
                target = dest_state if sec.label == "state" else dest_memory
                opener.open_into(ct, memoryview(target)[off : off + n])
        opener.summary()
    assert dest_state == state and dest_memory == memory
    for p in dirty:
        assert rounds[p * page : (p + 1) * page] == memory[p * page : (p + 1) * page]
    assert rx.digest() == tx.digest() and len(rx.summaries) == 4 and not rx.busy


def test_section_length_is_enforced_on_both_ends() -> None:
    tx, rx = channels()
    sec = Section.dense("state", 100)
    sealer = tx.sealer(sec, 64)
    with pytest.raises(ValueError, match="declared length"):
        sealer.seal_chunk(b"x" * 64, final=True)
    c0 = sealer.seal_chunk(b"x" * 64, final=False)
    c1 = sealer.seal_chunk(b"x" * 36, final=True)
    # A receiver that expects another length refuses the chunks before decrypting.
    opener = rx.opener(sealer.header_bytes, expect=Section.dense("state", 200))
    assert opener.open_chunk(c0) == b"x" * 64
    with pytest.raises(StreamError, match="manifest declares"):
        opener.open_chunk(c1)
    with pytest.raises(ValueError, match="multiple of its page size"):
        channels()[0].sealer(Section.sparse("p", [1], page_size=4096), 1024)
    with pytest.raises(StreamError, match="multiple of its page size"):
        header = StreamHeader(MID, SRC, DST, 1024, 0, bytes(16), "p").pack()
        channels()[1].opener(header, expect=Section.sparse("p", [1], page_size=4096))


# --- properties ---------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None)
@given(
    chunk=st.integers(min_value=64, max_value=300),
    payload=st.binary(min_size=0, max_size=1500),
)
def test_property_roundtrip(chunk: int, payload: bytes) -> None:
    tx, rx = channels()
    sealer = tx.sealer("memory", chunk)
    blob = sealer.seal(payload)
    assert len(blob) == len(payload) + 16 * max(1, -(-len(payload) // chunk))
    assert rx.opener(sealer.header_bytes, expect="memory").open(blob) == payload


_FIXED_HEADER, _FIXED_CHUNKS = sealed(PAYLOAD[:300], chunk=128)
_FIXED_STREAM = _FIXED_HEADER + b"".join(_FIXED_CHUNKS)


@settings(max_examples=300, deadline=None, database=None)
@given(bit=st.integers(min_value=0, max_value=len(_FIXED_STREAM) * 8 - 1))
def test_property_any_single_bit_flip_fails(bit: int) -> None:
    data = bytearray(_FIXED_STREAM)
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(StreamError):
        header, used = StreamHeader.unpack(bytes(data))
        StreamOpener(SECRET, bytes(data[:used]), length=None, on_final=None).open(data[used:])
        del header


@settings(max_examples=60, deadline=None, database=None)
@given(st.data())
def test_property_drop_or_swap_fails(data: st.DataObject) -> None:
    chunks = list(_FIXED_CHUNKS)
    i = data.draw(st.integers(0, len(chunks) - 1))
    j = data.draw(st.integers(0, len(chunks) - 1))
    if i == j:
        del chunks[i]
    else:
        chunks[i], chunks[j] = chunks[j], chunks[i]
    with pytest.raises(StreamError):
        open_chunks(_FIXED_HEADER, chunks)


# --- benchmark (prints numbers; not a test) -------------------------------------------------------
def bench(total_mib: int = 1024, repeats: int = 3) -> None:
    """Single-core seal_into/open_into throughput: ``python tests/unit/test_stream.py [MiB]``.

    A region of ``total_mib`` is sealed chunk by chunk into three rotating slots (as
    into a shared ring) and each slot is opened into a second region at the chunk's
    offset.  Best of ``repeats`` passes; raw ``AESGCM.encrypt_into`` for reference.
    """

    import os
    import time

    total = total_mib << 20
    src = memoryview(bytearray(os.urandom(1 << 20)) * total_mib)
    dst = memoryview(bytearray(total))
    dst[::4096] = b"\x01" * len(dst[::4096])  # first touch outside the timing
    print(f"{total_mib} MiB, best of {repeats}; into-methods: {stream_mod.HAVE_INTO}")
    for chunk in (64 << 10, 256 << 10, 1 << 20, 4 << 20):
        seal_t = open_t = raw_t = float("inf")
        slots = [memoryview(bytearray(chunk + 16)) for _ in range(3)]
        for _ in range(repeats):
            tx, rx = channels()
            section = Section.dense("memory", total)
            sealer = tx.sealer(section, chunk)
            opener = rx.opener(sealer.header_bytes, expect=section)
            n = section.chunk_count(chunk)
            ts = to = 0.0
            for i in range(n):
                off, size = i * chunk, min(chunk, total - i * chunk)
                slot = slots[i % 3][: size + 16]
                t0 = time.perf_counter()
                sealer.seal_into(src[off : off + size], slot, final=i == n - 1)
                t1 = time.perf_counter()
                opener.open_into(slot, dst[off : off + size])
                to += time.perf_counter() - t1
                ts += t1 - t0
            assert opener.done
            seal_t, open_t = min(seal_t, ts), min(open_t, to)
            aead, nonce = AESGCM(SECRET), bytes(12)
            t0 = time.perf_counter()
            for i in range(n):
                aead.encrypt_into(nonce, src[i * chunk : (i + 1) * chunk], b"", slots[i % 3])
            raw_t = min(raw_t, time.perf_counter() - t0)
        gib = total / 2**30
        print(
            f"{chunk >> 10:5d} KiB chunks: seal_into {gib / seal_t:5.2f} GiB/s, "
            f"open_into {gib / open_t:5.2f} GiB/s, raw encrypt_into {gib / raw_t:5.2f} GiB/s"
        )
    assert dst == src


if __name__ == "__main__":
    import sys

    bench(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
