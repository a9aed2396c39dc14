"""Run every test vector in ``tests/vectors/*.json`` (see ``tests/vectors/generate.py``).

Each vector declares its inputs and the expected outcome.  Where it is cheap, the
check recomputes the expected values from the spec's formulas directly (HKDF,
X25519, SHA-512 over the transcript), not only through the library.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from migsgx.agent.datalink import DestinationLink
from migsgx.agent.protocol import (
    CONTROL,
    CONTROL_FRAME_MAX,
    SessionMachine,
    check_image_name,
)
from migsgx.agent.versions import agent_choice, check_version
from migsgx.channel import ECALL, LAUNCH, PLATFORM
from migsgx.core.commit import open_control, seal_control
from migsgx.core.manifest import Manifest
from migsgx.core.pagestream import DOWN, UP, PageFrameOpener, page_stream_key
from migsgx.core.rounds import REPAIR_LABEL, full_digest_body, round_label
from migsgx.core.stream import StreamHeader, StreamOpener, StreamSealer
from migsgx.core.transcript import transcript_item
from migsgx.enclave import checkpoints, persistent_format, sealing
from migsgx.errors import MigSGXError
from migsgx.host.appctl import APPCTL, check_image_files, info_from_wire
from migsgx.sgx.counters import CounterStore
from migsgx.sgx.sgxext import PckExtension
from migsgx.sgx.store_types import Decision, RecordUpdate
from migsgx.sgx.structs import ReportBody
from migsgx.wire import HEADER, decode_body, encode, recv_frame

VECTORS = Path(__file__).resolve().parent / "vectors"


def _generator() -> ModuleType:
    name = "_migsgx_vector_generator"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, VECTORS / "generate.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


GEN = _generator()


def _all_cases() -> list[Any]:
    params = []
    for path in sorted(VECTORS.glob("*.json")):
        doc = GEN.load(path)
        assert doc["format"] == GEN.FORMAT, path
        for case in doc["cases"]:
            params.append(pytest.param(doc["kind"], case, id=f"{path.stem}:{case['name']}"))
    return params


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except MigSGXError as exc:
        return {"error": exc.code}


# --- per kind ---------------------------------------------------------------------------
def check_stream(case: dict[str, Any]) -> None:
    secret = bytes.fromhex(case["secret"])
    data = bytes.fromhex(case["sealed"])

    def open_() -> dict[str, Any]:
        _, used = StreamHeader.unpack(data)
        opener = StreamOpener(secret, data[:used], length=None, on_final=None)
        plain = opener.open(data[used:])
        return {
            "length": len(plain),
            "chunks": opener.summary().chunks,
            "sha256": hashlib.sha256(plain).hexdigest(),
        }

    assert _outcome(open_) == case["expect"]
    if "ok" in case["expect"]:
        plain = GEN.plaintext_of(case["plaintext"])
        assert hashlib.sha256(plain).hexdigest() == case["expect"]["ok"]["sha256"]
        _, used = StreamHeader.unpack(data)
        resealed = StreamSealer(secret, data[:used], length=None, on_final=None).seal(plain)
        assert data[:used] + resealed == data, "sealing is deterministic given the header"


def check_manifest(case: dict[str, Any]) -> None:
    def decode() -> dict[str, Any]:
        manifest = Manifest.decode(bytes.fromhex(case["cbor"]))
        size = case["chunk_size"]
        placements = []
        for sec in manifest.sections:
            n = sec.chunk_count(size)
            if sec.page_size:
                chunks: list[Any] = [[list(r) for r in sec.chunk_pages(i, size)] for i in range(n)]
            else:
                chunks = [list(sec.chunk_extent(i, size)) for i in range(n)]
            placements.append({"label": sec.label, "chunks": chunks})
        return {"sections": [s.to_cbor() for s in manifest.sections], "placements": placements}

    assert _outcome(decode) == case["expect"]


def _fields(messages: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, hexed in messages.items():
        raw = bytes.fromhex(hexed)
        (length,) = HEADER.unpack_from(raw)
        assert length == len(raw) - HEADER.size
        out[name] = decode_body(raw[HEADER.size :], None)
    return out


def check_handshake(case: dict[str, Any]) -> None:
    result = GEN.run_handshake(case)
    assert result["messages"] == case["messages"]
    expect = case["expect"]
    if "error" in expect:
        assert (result.get("error"), result.get("at")) == (expect["error"], expect["at"])
        return
    assert result["ok"] == expect["ok"]
    # Recompute from the spec's formulas, independently of the library's key schedule.
    m = _fields(case["messages"])
    hello, dhello, fin = m["source-hello"], m["destination-hello"], m["source-finished"]
    t1 = (
        transcript_item("protocol", b"migsgx/v1 handshake")
        + transcript_item("migration-id", hello["mid"])
        + transcript_item("source-share", hello["share"])
    )
    t2 = (
        t1
        + transcript_item("source-quote", hello["quote"])
        + transcript_item("destination-share", dhello["share"])
    )
    th = hashlib.sha512(t2 + transcript_item("destination-quote", dhello["quote"])).digest()
    assert ReportBody.unpack(hello["quote"][4:]).report_data == hashlib.sha512(t1).digest()
    assert ReportBody.unpack(dhello["quote"][4:]).report_data == hashlib.sha512(t2).digest()
    assert th.hex() == expect["ok"]["transcript_hash"]
    x_s = X25519PrivateKey.from_private_bytes(bytes.fromhex(case["source"]["random"][1]))
    z = x_s.exchange(X25519PublicKey.from_public_bytes(dhello["share"]))
    master = HKDF(hashes.SHA256(), 32, th, b"migsgx/v1 handshake master").derive(z)

    def k(label: str) -> bytes:
        return HKDFExpand(hashes.SHA256(), 32, b"migsgx/v1 " + label.encode()).derive(master)

    assert k("stream source to destination").hex() == expect["ok"]["stream_secret"]
    assert k("control source to destination").hex() == expect["ok"]["control_source_key"]
    assert k("control destination to source").hex() == expect["ok"]["control_destination_key"]
    assert dhello["confirm"] == std_hmac.digest(k("destination confirm"), th, "sha256")
    assert fin["confirm"] == std_hmac.digest(k("source confirm"), th, "sha256")


def check_control(case: dict[str, Any]) -> None:
    frame = bytes.fromhex(case["frame"])
    params = case["open_with"]

    def open_() -> dict[str, Any]:
        msg = open_control(
            bytes.fromhex(params["key"]),
            params["direction"],
            bytes.fromhex(params["migration_id"]),
            bytes.fromhex(params["transcript_hash"]),
            frame,
        )
        return {k: ({"hex": v.hex()} if isinstance(v, bytes) else v) for k, v in msg.items()}

    assert _outcome(open_) == case["expect"]
    if "ok" in case["expect"]:
        s = case["sealed_with"]
        again = seal_control(
            bytes.fromhex(s["key"]),
            s["direction"],
            bytes.fromhex(s["migration_id"]),
            bytes.fromhex(s["transcript_hash"]),
            GEN.from_jsonable(s["message"]),
            bytes.fromhex(s["nonce"]),
        )
        assert again == frame


def check_precopy(case: dict[str, Any]) -> None:
    """The memory digest, recomputed from the spec's formula (``precopy.md``, section 3)."""

    memory = bytearray(GEN.plaintext_of(case["memory"]))
    if case["flip"] is not None:
        memory[case["flip"]] ^= 1
    secret, mid = bytes.fromhex(case["stream_secret"]), bytes.fromhex(case["migration_id"])
    expect = case["expect"]["ok"]
    info = b"migsgx/v3 memory digest"
    key = HKDF(hashes.SHA256(), 32, mid, info).derive(secret)
    segment, group = 32 << 10, 16
    tags = [
        AESGCM(key).encrypt(i.to_bytes(12, "big"), b"", bytes(memory[start : start + segment]))
        for i, start in enumerate(range(0, len(memory), segment))
    ]
    groups = b"".join(
        AESGCM(key).encrypt(((1 << 95) + j).to_bytes(12, "big"), b"", b"".join(tags[i : i + group]))
        for j, i in enumerate(range(0, len(tags), group))
    )
    head = (
        bytes([3, 0])
        + group.to_bytes(2, "big")
        + segment.to_bytes(4, "big")
        + len(memory).to_bytes(8, "big")
    )
    assert key.hex() == expect["key"]
    assert (head + groups).hex() == expect["body"]
    assert full_digest_body(key, bytes(memory)).hex() == expect["body"]
    assert [round_label(n) for n in (0, 1, 63)] + [REPAIR_LABEL] == expect["labels"]


# --- sealed formats: sealing.md, persistent.md, checkpoint.md -----------------------------
FMT = GEN.formats()


def _services(case: dict[str, Any]) -> Any:
    return FMT.VectorServices(case["opener"], case["platform"])


def _hex_or_none(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def check_sealing(case: dict[str, Any]) -> None:
    blob = bytes.fromhex(case["blob"])

    def open_() -> dict[str, Any]:
        plain = sealing.unseal(_services(case), blob, aad=_hex_or_none(case["aad"]))
        return {"plaintext": plain.hex()}

    assert _outcome(open_) == case["expect"]


def check_migratable(case: dict[str, Any]) -> None:
    blob = bytes.fromhex(case["blob"])
    keys = [bytes.fromhex(k) for k in case["keys"]]
    rid = bytes.fromhex(case["rid"])

    def open_() -> dict[str, Any]:
        plain, head = sealing.open_with_msk(keys, rid, blob, aad=_hex_or_none(case["aad"]))
        binding = None if head.binding is None else list(head.binding)
        return {
            "plaintext": plain.hex(),
            "generation": head.generation,
            "binding": binding,
            "aad": head.aad.hex(),
        }

    assert _outcome(open_) == case["expect"]
    if "sealed_with" in case:
        s = case["sealed_with"]
        again = sealing.seal_with_msk(
            keys[s["generation"]],
            rid,
            bytes.fromhex(s["plaintext"]),
            generation=s["generation"],
            aad=bytes.fromhex(s["aad"]),
            binding=None if s["binding"] is None else tuple(s["binding"]),
            random=GEN.queue_rng(s["random"]),
        )
        assert again == blob, "the library's sealer writes the specified layout"


def check_persistent(case: dict[str, Any]) -> None:
    if case["what"] == "record":
        blob = bytes.fromhex(case["blob"])

        def open_() -> Any:
            record = persistent_format.open_record(_services(case), case["record_name"], blob)
            return FMT.plain(record)
    else:

        def open_() -> Any:
            pending = persistent_format.parse_section(bytes.fromhex(case["section"]))
            if pending is None:
                return None
            return FMT.plain(
                {
                    "v": 1,
                    "name": pending.name,
                    "rid": pending.record_id,
                    "keys": pending.keys,
                    "counters": pending.values,
                    "retiring": pending.retiring,
                }
            )

    assert _outcome(open_) == case["expect"]


def check_checkpoint(case: dict[str, Any]) -> None:
    blob = bytes.fromhex(case["blob"])

    def open_gate() -> dict[str, Any]:
        cid, share, counter, meta = checkpoints.open_gate_record(_services(case), blob)
        return {
            "checkpoint_id": cid.hex(),
            "share": share.hex(),
            "counter": counter,
            "meta": None if meta is None else meta.hex(),
        }

    if case.get("record") == "gate":
        assert _outcome(open_gate) == case["expect"]
        return

    def open_() -> dict[str, Any]:
        cid, secret, source = checkpoints.open_key_record(_services(case), blob)
        return {
            "checkpoint_id": cid.hex(),
            "secret": secret.hex(),
            "source": source.pack().hex(),
            "debug": source.debug,
        }

    assert _outcome(open_) == case["expect"]


# --- frames: channels.md, agent-control.md, app-control.md --------------------------------
SCHEMAS = {s.name: s for s in (LAUNCH, ECALL, PLATFORM, CONTROL, APPCTL)}


class _Bytes:
    """A socket that holds these bytes and then reports end of file."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def sendall(self, data: bytes, /) -> None:
        raise AssertionError("not used")

    def recv_into(self, buffer: Any, nbytes: int = 0, /) -> int:
        n = min(nbytes or len(buffer), len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def _frame(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["frame"])
    schema = SCHEMAS[case["schema"]]

    def decode() -> Any:
        return FMT.plain(recv_frame(_Bytes(data), schema, max_size=case["max_size"]))

    assert _outcome(decode) == case["expect"]
    if "ok" in case["expect"]:
        assert encode(FMT.unplain(case["expect"]["ok"]), max_size=case["max_size"]) == data


def check_frames(case: dict[str, Any]) -> None:
    _frame(case)


def check_agent(case: dict[str, Any]) -> None:
    if case["what"] == "frame":
        _frame(case)
        return
    if case["what"] in ("version", "fields"):
        msg = recv_frame(_Bytes(bytes.fromhex(case["frame"])), CONTROL, max_size=CONTROL_FRAME_MAX)
        if case["what"] == "version":
            result = _outcome(
                lambda: {"version": agent_choice(msg["version"], case["oldest"], case["newest"])}
            )
        else:
            result = _outcome(lambda: check_version(msg, case["session_version"]) or {})
        assert result == case["expect"], result
        return
    machine = SessionMachine()
    states = []
    for at, hexed in enumerate(case["frames"]):
        try:
            msg = recv_frame(_Bytes(bytes.fromhex(hexed)), CONTROL, max_size=CONTROL_FRAME_MAX)
            if msg["t"] == "image":
                check_image_name(msg["name"])
            states.append(machine.advance(msg["t"]).value)
        except MigSGXError as exc:
            assert {"error": exc.code, "at": at} == case["expect"]
            assert at == len(case["frames"]) - 1, "a session ends at its first error"
            return
    assert {"ok": {"states": states, "finished": machine.finished}} == case["expect"]


def check_appctl(case: dict[str, Any]) -> None:
    what = case["what"]
    if what == "frame":
        _frame(case)
    elif what == "info":
        info = FMT.unplain(case["info"])
        assert _outcome(lambda: FMT.plain(info_from_wire(info))) == case["expect"]
    else:
        files = FMT.unplain(case["files"])
        assert _outcome(lambda: FMT.plain(check_image_files(files))) == case["expect"]


def check_sgxext(case: dict[str, Any]) -> None:
    der = bytes.fromhex(case["der"])
    outcome = _outcome(lambda: PckExtension.from_der(der) is not None)
    assert outcome == case["expect"], outcome
    if "ok" in case["expect"]:
        f = case["fields"]
        ext = PckExtension(
            ppid=bytes.fromhex(f["ppid"]),
            components=tuple(f["components"]),
            pce_svn=f["pce_svn"],
            pce_id=bytes.fromhex(f["pce_id"]),
            fmspc=bytes.fromhex(f["fmspc"]),
            sgx_type=f["sgx_type"],
        )
        assert ext.to_der() == der
        assert PckExtension.from_der(der) == ext


_GATE_SHA = hashlib.sha256(b"g").digest()


def check_decisions(case: dict[str, Any]) -> None:
    mids = {name: bytes.fromhex(h) for name, h in case["mids"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        store = CounterStore(Path(tmp) / "counters.cbor")
        for owner, mid, kind, group, expect in case["steps"]:

            def decide(owner: str = owner, mid: str = mid, kind: str = kind,
                       group: str = group) -> str:  # fmt: skip
                who, tag = owner.encode() + bytes(34), bytes.fromhex(case["groups"][group])
                gate = "!ckpt-" + mids[mid].hex()
                if kind == "gate":  # a checkpoint's gate, created tagged with its group
                    store.record_update(who, gate, RecordUpdate(b"g", expect_absent=True,
                                                                group=tag))  # fmt: skip
                    return "ok"
                if kind == "ungate":  # the gate goes (restored or aborted)
                    store.record_update(who, gate, RecordUpdate(None, expect=_GATE_SHA))
                    return "ok"
                if kind == "revoke":  # the destination's proven refusal (commit.md, 2.2)
                    return store.revoke(who, mids[mid]).kind
                frame = GEN.det_bytes(f"frame {mid} {kind}", 4)
                decision = Decision(mids[mid], kind, frame, group=tag)
                return store.decide(who, decision).kind

            outcome = _outcome(decide)
            assert outcome.get("ok", f"error:{outcome.get('error')}") == expect, (mid, kind)
        for mid, kind in case["recorded"].items():
            held = store.decision(mids[mid])
            assert (held.kind if held is not None else None) == kind, mid


def check_datalink(case: dict[str, Any]) -> None:
    key, mid = bytes.fromhex(case["key"]), bytes.fromhex(case["mid"])
    challenge, hello = bytes.fromhex(case["challenge"]), bytes.fromhex(case["hello"])
    nonce_d = challenge[8:]
    dest = DestinationLink(key, mid, randbytes=lambda n: nonce_d)
    assert dest.challenge() == challenge

    def open_() -> dict[str, Any]:
        index = dest.receive_hello(hello)
        return {"index": index, "proof": dest.proof().hex()}

    assert _outcome(open_) == case["expect"]
    if "ok" in case["expect"]:
        # The formula of the spec, recomputed without the module.
        index, nonce_s = case["index"], bytes.fromhex(case["nonce_s"])

        def mac(label: bytes) -> bytes:
            msg = label + bytes([len(mid)]) + mid + nonce_d + nonce_s + index.to_bytes(2, "big")
            return std_hmac.digest(key, msg, "sha256")

        assert hello == b"MIGSGXS1" + index.to_bytes(2, "big") + nonce_s + mac(
            b"migsgx data source"
        )
        assert case["expect"]["ok"]["proof"] == mac(b"migsgx data dest").hex()


def check_pagestream(case: dict[str, Any]) -> None:
    data_key, session = bytes.fromhex(case["data_key"]), bytes.fromhex(case["session_id"])
    frames = [bytes.fromhex(f) for f in case["frames"]]
    for variant in case["variants"]:
        direction = {"up": UP, "down": DOWN}[variant.get("direction", "up")]
        key = page_stream_key(data_key, session, direction)
        # The spec's formula, recomputed without the module.
        info = b"migsgx/v1 page stream " + direction
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=info)
        assert key == hkdf.derive(data_key)
        sequence = [frames[int(i)] for i in variant["order"]]
        if "flip" in variant:
            index, offset = map(int, variant["flip"].split(":"))
            changed = bytearray(sequence[index])
            changed[offset] ^= 0x01
            sequence[index] = bytes(changed)

        def open_(sequence: list[bytes] = sequence, key: bytes = key) -> dict[str, Any]:
            opener = PageFrameOpener(key)
            plaintext = b""
            for frame in sequence:
                payload, _ = opener.open(frame)
                plaintext += payload
            opener.end()
            return {"plaintext": plaintext.hex()}

        assert _outcome(open_) == variant["expect"], variant["name"]
        if "ok" in variant["expect"]:
            for i, frame in enumerate(sequence):
                last = b"\x01" if i == len(sequence) - 1 else b"\x00"
                assert int.from_bytes(frame[:4], "big") == len(frame) - 4
                # raises unless sealed as the spec says
                AESGCM(key).decrypt(i.to_bytes(11, "big") + last, frame[4:], frame[:4])


CHECKS = {
    "sgxext": check_sgxext,
    "stream": check_stream,
    "manifest": check_manifest,
    "handshake": check_handshake,
    "control": check_control,
    "precopy": check_precopy,
    "sealing": check_sealing,
    "migratable": check_migratable,
    "persistent": check_persistent,
    "checkpoint": check_checkpoint,
    "frames": check_frames,
    "agent": check_agent,
    "appctl": check_appctl,
    "datalink": check_datalink,
    "pagestream": check_pagestream,
    "decisions": check_decisions,
}


@pytest.mark.parametrize(("kind", "case"), _all_cases())
def test_vector(kind: str, case: dict[str, Any]) -> None:
    CHECKS[kind](case)


def test_vector_files_are_up_to_date_and_small() -> None:
    assert GEN.main(["--check"]) == 0, "run: python tests/vectors/generate.py"
    files = list(VECTORS.glob("*.json"))
    kinds = {json.loads(p.read_text())["kind"] for p in files}
    assert kinds == set(CHECKS)
    # The vectors are read beside the specs, and reviewed as diffs: a set a person can
    # read.  Long runs of one byte (SGX structures are mostly zeros) are written short.
    assert sum(p.stat().st_size for p in files) < 200_000


@pytest.mark.parametrize(
    "plain",
    ["", "00", "00" * 31, "00" * 32, "ab" + "00" * 40 + "ab", "00" * 32 + "01" * 33,
     "0" + "00" * 40, "0a" * 32 + "a0" * 32, "not hex" + "00" * 40],
)  # fmt: skip
def test_a_run_of_bytes_written_short_reads_back_the_same(plain: str) -> None:
    short = GEN.compact_hex(plain)
    assert GEN.expand_hex(short) == plain
    assert len(short) < len(plain) or short == plain


@pytest.mark.parametrize("text", [f"<00*{(1 << 20) + 1}>", "01<00*99999999999>", "<ab*600000>" * 2])
def test_a_run_longer_than_any_vector_is_refused_not_allocated(text: str) -> None:
    with pytest.raises(ValueError, match="at most"):
        GEN.expand_hex(text)
    assert len(GEN.expand_hex("<00*1048576>")) == 2 << 20  # (the most there may be)
