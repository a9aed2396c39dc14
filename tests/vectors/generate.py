"""Generate the test vectors of ``docs/spec/stream.md`` and ``docs/spec/handshake.md``.

    python tests/vectors/generate.py           # rewrite the *.json files
    python tests/vectors/generate.py --check   # exit 1 if they differ from what is generated

Everything is deterministic: keys, salts, ids and ephemeral keys come from fixed
seeds, and the handshake uses a *vector platform* whose quote is just
``"VQ01" || REPORT body`` (no signature: the vectors pin the protocol's bytes and
key schedule, not a platform's signatures).  ``tests/test_vectors.py`` imports the
helpers below and runs every vector.

Vector files: ``{"format": "migsgx-vectors/2", "kind": ..., "spec": ..., "cases": [...]}``;
each case declares its inputs, the produced bytes and ``"expect"``: either
``{"ok": {...}}`` or ``{"error": "<error code>"}``.  Format 2 writes a run of at
least ``RUN_MIN`` equal bytes inside a hex string as ``<HH*N>`` (byte ``HH``, ``N``
times; :func:`expand_hex` reads it back): SGX structures are mostly zeros.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from migsgx.agent.datalink import DestinationLink, SourceLink
from migsgx.core.commit import (
    DESTINATION_TO_SOURCE,
    SOURCE_TO_DESTINATION,
    open_control,
    seal_control,
)
from migsgx.core.handshake import Handshake, HandshakeComplete, Role, transcript_item
from migsgx.core.policy import EnclaveIdentity, MigrationPolicy, PolicyMode
from migsgx.core.rounds import REPAIR_LABEL, digest_key, full_digest_body, round_label
from migsgx.core.stream import Manifest, Section, StreamHeader, StreamSealer
from migsgx.errors import MigSGXError, QuoteFormatError
from migsgx.sgx.sgxext import PckExtension
from migsgx.sgx.structs import FLAG_DEBUG, FLAG_INIT, FLAG_MODE64BIT, Attributes, ReportBody
from migsgx.wire import HEADER, decode_body, encode

HERE = Path(__file__).resolve().parent
FORMAT = "migsgx-vectors/2"
#: The shortest run of one byte that a hex string writes as ``<HH*N>``.
RUN_MIN = 32
#: The most bytes one hex string of a vector file may expand to (the largest holds
#: a few KiB): a planted ``<00*99999999999>`` is refused, not allocated.
EXPANDED_MAX = 1 << 20
_PLAIN_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_RUN_HEX = re.compile(r"(?:[0-9a-f]{2}|<[0-9a-f]{2}\*[1-9][0-9]*>)+")
_RUN = re.compile(r"<([0-9a-f]{2})\*([0-9]+)>")
VQ_MAGIC = b"VQ01"


# --- deterministic inputs ----------------------------------------------------------------------
def det_bytes(seed: str, length: int) -> bytes:
    """``SHA-256(seed || u64 counter)`` blocks, counter from 0, cut to ``length``."""

    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed.encode() + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:length])


def plaintext_of(spec: dict[str, Any]) -> bytes:
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    assert spec["generator"] == "sha256-counter"
    return det_bytes(spec["seed"], spec["length"])


def queue_rng(items: list[str]) -> Callable[[int], bytes]:
    """Randomness that hands out exactly the given hex strings, in order."""

    pending: Iterator[str] = iter(items)

    def rng(n: int) -> bytes:
        value = bytes.fromhex(next(pending))
        assert len(value) == n, f"vector randomness: wanted {n} bytes, have {len(value)}"
        return value

    return rng


def identity(name: str, *, svn: int = 1, signer: str = "author", debug: bool = False) -> ReportBody:
    flags = FLAG_INIT | FLAG_MODE64BIT | (FLAG_DEBUG if debug else 0)
    return ReportBody(
        hashlib.sha256(b"mrenclave:" + name.encode()).digest(),
        hashlib.sha256(b"mrsigner:" + signer.encode()).digest(),
        Attributes(flags),
        isv_prod_id=42,
        isv_svn=svn,
    )


class VectorAttester:
    def __init__(self, body: ReportBody) -> None:
        self.body = body

    def quote(self, report_data: bytes) -> bytes:
        return VQ_MAGIC + self.body.with_report_data(report_data).pack()


class VectorVerifier:
    def verify(self, quote: bytes) -> ReportBody:
        if len(quote) != 4 + 384 or quote[:4] != VQ_MAGIC:
            raise QuoteFormatError("not a vector quote")
        return ReportBody.unpack(quote[4:])


SRC_ID = EnclaveIdentity.from_report(identity("kv-store"))
DST_ID = EnclaveIdentity.from_report(identity("kv-store", svn=2))
MID = det_bytes("migration id", 16)
SECRET = det_bytes("stream secret", 32)


def _chunk_key(secret: bytes, header: bytes) -> AESGCM:
    parsed, _ = StreamHeader.unpack(header)
    key = HKDF(hashes.SHA256(), 32, parsed.salt, b"migsgx/v1 stream key" + header).derive(secret)
    return AESGCM(key)


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


# --- stream vectors -----------------------------------------------------------------------------
def stream_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def header(label: str = "memory", chunk: int = 64, seq: int = 0, mid: bytes = MID) -> bytes:
        salt = det_bytes(f"salt {label} {chunk} {seq}", 16)
        return StreamHeader(mid, SRC_ID, DST_ID, chunk, seq, salt, label).pack()

    def seal(hdr: bytes, payload: bytes) -> bytes:
        return hdr + StreamSealer(SECRET, hdr, length=None, on_final=None).seal(payload)

    def ok(name: str, hdr: bytes, pt: dict[str, Any], comment: str) -> dict[str, Any]:
        data = plaintext_of(pt)
        sealed = seal(hdr, data)
        chunk = StreamHeader.unpack(hdr)[0].chunk_size
        case = {
            "name": name,
            "comment": comment,
            "secret": SECRET.hex(),
            "plaintext": pt,
            "sealed": sealed.hex(),
            "expect": {
                "ok": {
                    "length": len(data),
                    "chunks": max(1, -(-len(data) // chunk)),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            },
        }
        cases.append(case)
        return case

    def bad(name: str, sealed: bytes, comment: str) -> None:
        cases.append(
            {
                "name": name,
                "comment": comment,
                "secret": SECRET.hex(),
                "sealed": sealed.hex(),
                "expect": {"error": "stream"},
            }
        )

    gen = {"generator": "sha256-counter", "seed": "state"}
    ok("empty", header(), {"hex": ""}, "an empty stream is one empty chunk flagged final")
    ok("one-byte", header(), {"hex": "2a"}, "")
    ok("one-full-chunk", header(), {**gen, "length": 64}, "a full chunk flagged final")
    ok("exact-multiple", header(), {**gen, "length": 192}, "three full chunks, the last final")
    ok("short-tail", header(), {**gen, "length": 200}, "three full chunks and 8 bytes")
    big = ok(
        "chunk-1024",
        header("round-2/memory", 1024, 7),
        {**gen, "length": 3000},
        "a larger chunk size and a later stream number",
    )
    manifest = Manifest((Section.dense("state", 100), Section.sparse("pages", [1, 2, 9], 4096)))
    ok("manifest", header("manifest"), {"hex": manifest.encode().hex()}, "a transfer's manifest")

    base_hdr = header()
    base_pt = det_bytes("state", 200)
    base = seal(base_hdr, base_pt)
    h = len(base_hdr)
    full = 64 + 16
    chunks = [base[h + i : h + i + full] for i in range(0, len(base) - h, full)]

    def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
        b = bytearray(data)
        b[index] ^= mask
        return bytes(b)

    bad("tampered-ciphertext", flip(base, h + 70), "one bit of chunk 0's ciphertext")
    bad("tampered-tag", flip(base, h + full - 1), "one bit of chunk 0's tag")
    bad("tampered-header-salt", flip(base, 40), "the salt: another key")
    bad("tampered-header-label", flip(base, h - 1, 0x02), "the label: another key and AAD")
    bad("tampered-header-identity", flip(base, 120), "the destination identity")
    bad("truncated", base_hdr + b"".join(chunks[:-1]), "the final chunk is missing")
    exact = bytes.fromhex(cases[3]["sealed"])
    bad("truncated-at-boundary", exact[: len(exact) - full], "last full chunk dropped")
    bad("appended-chunk", base + chunks[-1], "the final chunk twice")
    bad("appended-bytes", base + b"\x00" * 5, "bytes after the final chunk")
    bad("reordered", base_hdr + chunks[1] + chunks[0] + b"".join(chunks[2:]), "")
    bad("duplicated", base_hdr + chunks[0] + b"".join(chunks), "chunk 0 twice")
    bad("dropped-middle", base_hdr + chunks[0] + b"".join(chunks[2:]), "chunk 1 missing")
    bad("header-only", base_hdr, "no chunk at all")
    bad("bad-magic", b"X" + base[1:], "")
    bad("version-2", base[:4] + b"\x02" + base[5:], "")
    aead = _chunk_key(SECRET, base_hdr)
    no_final = base_hdr + b"".join(
        aead.encrypt(_nonce(i, False), base_pt[i * 64 : (i + 1) * 64], base_hdr) for i in range(3)
    )
    bad("no-final-flag", no_final, "authentic chunks, none flagged final")
    empty_final = (
        base_hdr
        + aead.encrypt(_nonce(0, False), base_pt[:64], base_hdr)
        + aead.encrypt(_nonce(1, True), b"", base_hdr)
    )
    bad("empty-final-after-data", empty_final, "an authentic empty final chunk at counter 1")
    other_hdr = header(mid=det_bytes("another migration", 16))
    spliced = other_hdr + base[h:]
    bad("spliced-header", spliced, "chunks under the header of another migration")
    big_sealed = bytes.fromhex(big["sealed"])
    bad(
        "tampered-final-tag",
        big_sealed[:-1] + bytes([big_sealed[-1] ^ 0x80]),
        "the final chunk's tag changed",
    )
    return cases


# --- manifest vectors -------------------------------------------------------------------------
def manifest_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def ok(name: str, manifest: Manifest, chunk_size: int) -> None:
        placements = []
        for sec in manifest.sections:
            count = sec.chunk_count(chunk_size)
            chunks: list[Any]
            if sec.page_size:
                chunks = [[list(r) for r in sec.chunk_pages(i, chunk_size)] for i in range(count)]
            else:
                chunks = [list(sec.chunk_extent(i, chunk_size)) for i in range(count)]
            placements.append({"label": sec.label, "chunks": chunks})
        cases.append(
            {
                "name": name,
                "cbor": manifest.encode().hex(),
                "chunk_size": chunk_size,
                "expect": {
                    "ok": {
                        "sections": [s.to_cbor() for s in manifest.sections],
                        "placements": placements,
                    }
                },
            }
        )

    def bad(name: str, doc: Any) -> None:
        cases.append({"name": name, "cbor": cbor2.dumps(doc).hex(), "expect": {"error": "stream"}})

    ok("dense", Manifest((Section.dense("state", 100), Section.dense("memory", 1000))), 256)
    ok("empty-section", Manifest((Section.dense("state", 0),)), 256)
    ok(
        "sparse",
        Manifest((Section.sparse("round-1/memory", [3, 4, 5, 9, 20, 21, 100], 64),)),
        128,
    )
    sec = {"t": "dense", "label": "a", "length": 1}
    bad("wrong-version", {"t": "manifest", "v": 2, "sections": []})
    bad("reserved-label", {"t": "manifest", "v": 1, "sections": [{**sec, "label": "manifest"}]})
    bad("repeated-label", {"t": "manifest", "v": 1, "sections": [sec, sec]})
    bad("extra-field", {"t": "manifest", "v": 1, "sections": [], "x": 0})
    sparse = {"t": "sparse", "label": "p", "page_size": 64}
    bad(
        "overlapping-runs",
        {"t": "manifest", "v": 1, "sections": [{**sparse, "runs": [[1, 2], [2, 1]]}]},
    )
    bad("empty-run", {"t": "manifest", "v": 1, "sections": [{**sparse, "runs": [[1, 0]]}]})
    bad(
        "page-size",
        {"t": "manifest", "v": 1, "sections": [{**sparse, "page_size": 96, "runs": []}]},
    )
    return cases


# --- handshake vectors --------------------------------------------------------------------------
def _policy(doc: dict[str, Any]) -> MigrationPolicy:
    return MigrationPolicy(PolicyMode(doc["mode"]), doc["allow_debug"])


def _tamper(frame: bytes, change: dict[str, Any] | None, schema_name: str) -> bytes:
    if change is None or change["message"] != schema_name:
        return frame
    msg = decode_body(frame[HEADER.size :], None)
    msg[change["field"]] = bytes.fromhex(change["hex"]) if "hex" in change else change["value"]
    if change.get("requote"):
        t1 = (
            transcript_item("protocol", b"migsgx/v1 handshake")
            + transcript_item("migration-id", msg["mid"])
            + transcript_item("source-share", msg["share"])
        )
        body = ReportBody.unpack(msg["quote"][4:])
        msg["quote"] = VectorAttester(body).quote(hashlib.sha512(t1).digest())
    return encode(msg)


def run_handshake(case: dict[str, Any]) -> dict[str, Any]:
    """Drive both ends over the vector platform; return messages, keys or the error."""

    ends = {}
    for role, name in ((Role.SOURCE, "source"), (Role.DESTINATION, "destination")):
        doc = case[name]
        ends[name] = Handshake(
            role,
            attester=VectorAttester(ReportBody.unpack(bytes.fromhex(doc["report"]))),
            verifier=VectorVerifier(),
            policy=_policy(doc["policy"]),
            rng=queue_rng(doc["random"]),
        )
    src, dst = ends["source"], ends["destination"]
    change = case.get("tamper")
    messages: dict[str, str] = {}
    side = "source"
    try:
        src.start()
        m1 = _tamper(src.data_to_send(), change, "source-hello")
        messages["source-hello"] = m1.hex()
        side = "destination"
        dst.receive_data(m1)
        dst.next_event()
        m2 = _tamper(dst.data_to_send(), change, "destination-hello")
        messages["destination-hello"] = m2.hex()
        side = "source"
        src.receive_data(m2)
        ev_s = src.next_event()
        m3 = _tamper(src.data_to_send(), change, "source-finished")
        messages["source-finished"] = m3.hex()
        side = "destination"
        dst.receive_data(m3)
        ev_d = dst.next_event()
    except MigSGXError as exc:
        return {"messages": messages, "error": exc.code, "at": side}
    assert isinstance(ev_s, HandshakeComplete) and isinstance(ev_d, HandshakeComplete)
    ks, kd = ev_s.keys, ev_d.keys
    assert (ks.stream_secret, ks.transcript_hash) == (kd.stream_secret, kd.transcript_hash)
    return {
        "messages": messages,
        "ok": {
            "migration_id": ks.migration_id.hex(),
            "transcript_hash": ks.transcript_hash.hex(),
            "stream_secret": ks.stream_secret.hex(),
            "control_source_key": ks.control_source_key.hex(),
            "control_destination_key": ks.control_destination_key.hex(),
        },
    }


def handshake_cases() -> list[dict[str, Any]]:
    same = {"mode": "same-enclave", "allow_debug": False}
    signer = {"mode": "same-signer", "allow_debug": False}

    def end(body: ReportBody, policy: dict[str, Any], *seeds: tuple[str, int]) -> dict[str, Any]:
        return {
            "report": body.pack().hex(),
            "policy": policy,
            "random": [det_bytes(seed, n).hex() for seed, n in seeds],
        }

    def case(name: str, src: ReportBody, dst: ReportBody, **kw: Any) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "comment": kw.pop("comment", ""),
            "source": end(src, kw.pop("src_policy", same), ("mid", 16), ("source x25519", 32)),
            "destination": end(dst, kw.pop("dst_policy", same), ("destination x25519", 32)),
        }
        if "tamper" in kw:
            c["tamper"] = kw.pop("tamper")
        assert not kw
        result = run_handshake(c)
        c["messages"] = result["messages"]
        c["expect"] = (
            {"ok": result["ok"]}
            if "ok" in result
            else {"error": result["error"], "at": result["at"]}
        )
        return c

    app = identity("kv-store")
    return [
        case("same-enclave", app, app, comment="the default policy; random: mid, ephemeral keys"),
        case(
            "same-signer-upgrade",
            identity("kv-store", svn=3),
            identity("kv-store-v2", svn=4),
            src_policy=signer,
            dst_policy=signer,
        ),
        case("other-mrenclave", app, identity("other"), comment="the destination refuses"),
        case(
            "lower-svn",
            identity("kv-store", svn=3),
            identity("kv-store-v0", svn=2),
            src_policy=signer,
            dst_policy=signer,
        ),
        case("debug-source", identity("kv-store", debug=True), identity("kv-store", debug=True)),
        case(
            "substituted-source-share",
            app,
            app,
            tamper={
                "message": "source-hello",
                "field": "share",
                "hex": det_bytes("mitm", 32).hex(),
            },
        ),
        case(
            "substituted-destination-share",
            app,
            app,
            tamper={
                "message": "destination-hello",
                "field": "share",
                "hex": det_bytes("mitm", 32).hex(),
            },
        ),
        case(
            "wrong-destination-confirm",
            app,
            app,
            tamper={"message": "destination-hello", "field": "confirm", "hex": "00" * 32},
        ),
        case(
            "wrong-source-confirm",
            app,
            app,
            tamper={"message": "source-finished", "field": "confirm", "hex": "00" * 32},
        ),
        case(
            "unsupported-version",
            app,
            app,
            tamper={"message": "source-hello", "field": "v", "value": 2},
        ),
        case(
            "low-order-share",
            app,
            app,
            tamper={"message": "source-hello", "field": "share", "hex": "00" * 32, "requote": True},
            comment="the quote binds the all-zero share; X25519 gives zero: refused",
        ),
    ]


# --- control message vectors ---------------------------------------------------------------------
def _jsonable(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: ({"hex": v.hex()} if isinstance(v, bytes) else v) for k, v in msg.items()}


def from_jsonable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: (bytes.fromhex(v["hex"]) if isinstance(v, dict) else v) for k, v in doc.items()}


def control_cases() -> list[dict[str, Any]]:
    keys = {"s2d": det_bytes("control s2d", 32), "d2s": det_bytes("control d2s", 32)}
    th = det_bytes("transcript hash", 64)
    digest = det_bytes("streams digest", 32)
    cases: list[dict[str, Any]] = []

    def add(name: str, direction: str, msg: dict[str, Any], **open_with: Any) -> None:
        nonce = det_bytes(f"nonce {name}", 12)
        frame = seal_control(keys[direction], direction, MID, th, msg, nonce)
        if "tamper" in open_with:
            b = bytearray(frame)
            b[open_with.pop("tamper")] ^= 0x01
            frame = bytes(b)
        params = {
            "key": keys[open_with.get("key_of", direction)].hex(),
            "direction": open_with.get("as_direction", direction),
            "migration_id": open_with.get("mid", MID).hex(),
            "transcript_hash": open_with.get("th", th).hex(),
        }
        try:
            opened = open_control(
                bytes.fromhex(params["key"]),
                params["direction"],
                bytes.fromhex(params["migration_id"]),
                bytes.fromhex(params["transcript_hash"]),
                frame,
            )
            expect: dict[str, Any] = {"ok": _jsonable(opened)}
        except MigSGXError as exc:
            expect = {"error": exc.code}
        cases.append(
            {
                "name": name,
                "sealed_with": {
                    "key": keys[direction].hex(),
                    "direction": direction,
                    "migration_id": MID.hex(),
                    "transcript_hash": th.hex(),
                    "nonce": nonce.hex(),
                    "message": _jsonable(msg),
                },
                "frame": frame.hex(),
                "open_with": params,
                "expect": expect,
            }
        )

    loaded = {"t": "loaded", "mid": MID, "streams": 3, "digest": digest}
    commit = {"t": "commit", "mid": MID, "streams": 3, "digest": digest}
    abort = {"t": "abort", "mid": MID, "code": "timeout", "message": "no LOADED within 30 s"}
    add("loaded", DESTINATION_TO_SOURCE, loaded)
    add("commit-token", SOURCE_TO_DESTINATION, commit)
    add("abort", SOURCE_TO_DESTINATION, abort)
    add("reflected-loaded", DESTINATION_TO_SOURCE, loaded, key_of="s2d", as_direction="s2d")
    add("other-direction-label", DESTINATION_TO_SOURCE, loaded, as_direction="s2d")
    add("other-migration", SOURCE_TO_DESTINATION, commit, mid=det_bytes("other mid", 16))
    add("other-transcript", SOURCE_TO_DESTINATION, commit, th=det_bytes("other th", 64))
    add("tampered", SOURCE_TO_DESTINATION, commit, tamper=-3)
    # REFUSED (commit.md, 2.2): the destination host's proof that it never runs `mid`.
    refused = {"t": "refused", "mid": MID}
    add("refused", DESTINATION_TO_SOURCE, refused)
    add("refused-reflected", DESTINATION_TO_SOURCE, refused, key_of="s2d", as_direction="s2d")
    add("refused-other-migration", DESTINATION_TO_SOURCE, refused, mid=det_bytes("other mid", 16))
    add("refused-other-transcript", DESTINATION_TO_SOURCE, refused, th=det_bytes("other th", 64))
    add("refused-tampered", DESTINATION_TO_SOURCE, refused, tamper=-3)
    return cases


# --- pre-copy vectors (docs/spec/precopy.md) -----------------------------------------------
def precopy_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    secret = det_bytes("precopy secret", 32)
    mid = det_bytes("precopy mid", 16)

    def digest(name: str, memory: dict[str, Any], *, flip: int | None = None) -> None:
        data = bytearray(plaintext_of(memory))
        if flip is not None:
            data[flip] ^= 1
        key = digest_key(secret, mid)
        cases.append(
            {
                "name": name,
                "stream_secret": secret.hex(),
                "migration_id": mid.hex(),
                "memory": memory,
                "flip": flip,
                "expect": {
                    "ok": {
                        "key": key.hex(),
                        "body": full_digest_body(key, bytes(data)).hex(),
                        "labels": [round_label(n) for n in (0, 1, 63)] + [REPAIR_LABEL],
                    }
                },
            }
        )

    page = {"generator": "sha256-counter", "seed": "enclave memory", "length": 3 * 4096}
    digest("three-pages", page)
    digest("three-pages-one-bit-differs", page, flip=4096 + 17)
    digest("empty", {"hex": ""})
    segments = {"generator": "sha256-counter", "seed": "segments", "length": (96 << 10) + 4096}
    digest("four-segments-last-partial", segments)
    groups = {"generator": "sha256-counter", "seed": "groups", "length": (16 + 2) * (32 << 10)}
    digest("eighteen-segments-two-groups", groups)
    return cases


# --- the PCK certificate's SGX extension ---------------------------------------------------
def sgxext_cases() -> list[dict[str, Any]]:
    """Fields -> DER (and back) for Intel's SGX extension; DER that must be refused."""

    def ok(name: str, ext: PckExtension, comment: str) -> dict[str, Any]:
        return {
            "name": name,
            "comment": comment,
            "fields": {
                "ppid": ext.ppid.hex(),
                "components": list(ext.components),
                "pce_svn": ext.pce_svn,
                "pce_id": ext.pce_id.hex(),
                "fmspc": ext.fmspc.hex(),
                "sgx_type": ext.sgx_type,
            },
            "der": ext.to_der().hex(),
            "expect": {"ok": True},
        }

    def bad(name: str, der: bytes, comment: str) -> dict[str, Any]:
        return {"name": name, "comment": comment, "der": der.hex(),
                "expect": {"error": "quote-format"}}  # fmt: skip

    fmspc = bytes.fromhex("00906ea10000")
    level3 = PckExtension(det_bytes("ppid", 16), (3,) * 16, 1, bytes(2), fmspc)
    mixed = PckExtension(bytes(16), tuple(range(16)), 0x1234, b"\x00\x01", fmspc)
    return [
        ok("level-3", level3, "a host at TCB level 3 of this deployment's FMSPC"),
        ok("mixed", mixed, "distinct component SVNs; a two-byte PCESVN and PCE-ID"),
        bad("truncated", level3.to_der()[:-4], "the last TLV cut short"),
        bad("empty", bytes.fromhex("3000"), "an empty SEQUENCE names no field"),
    ]


# --- the decision store's migration groups (docs/spec/commit.md, section 1.1) ----------------
def decision_cases() -> list[dict[str, Any]]:
    """Sequences of ``decide`` on a fresh store, each step with its declared outcome.

    A step is ``[owner, mid, kind, group, outcome]``: owners ``a``, ``b``, ``c``
    (the test maps them to counter owners), ``mid`` and ``group`` names from the
    case's ``mids`` and ``groups`` (hex; group ``-`` is none), ``outcome`` the kind
    that holds afterwards or ``error:CODE``.  ``recorded``: the store at the end.
    The frame of a decision is ``det_bytes("frame MID KIND", 4)``.  Kind ``gate``
    creates the record ``"!ckpt-" || hex(MID)`` (blob ``b"g"``) tagged with the
    group, ``ungate`` deletes it (commit.md, 1.1 rule 5: a group's decisions are
    dropped by the next ``decide`` once no record carries its tag).  Kind
    ``revoke`` revokes the owner's COMMIT of ``mid`` (commit.md, 2.2: only a
    commit, only its owner's; a revoked one counts as a commit in its group).
    """

    mids = {n: det_bytes("decision mid " + n, 16).hex() for n in "123456789xyz"}
    groups = {
        "g": det_bytes("decision group", 16).hex(),
        "o": det_bytes("decision other", 16).hex(),
        "short": det_bytes("decision group", 15).hex(),
        "-": "",
    }
    refused = "error:group-decided"
    cases: list[dict[str, Any]] = [
        {
            "name": "only-its-owners-commit-is-revoked-and-it-still-binds-the-group",
            "steps": [
                ["a", "x", "commit", "g", "commit"],
                ["b", "x", "revoke", "-", "error:counter"],
                ["a", "x", "revoke", "-", "revoked"],
                ["a", "x", "revoke", "-", "revoked"],
                ["a", "x", "abort", "g", "revoked"],
                ["b", "y", "abort", "g", refused],
                ["b", "y", "commit", "g", "commit"],
                ["c", "z", "abort", "-", "abort"],
                ["c", "z", "revoke", "-", "error:counter"],
                ["c", "9", "revoke", "-", "error:counter"],
                ["c", "9", "revoked", "-", "error:counter"],
            ],
            "recorded": {"x": "revoked", "y": "commit", "z": "abort", "9": None},
        },
        {
            "name": "first-commit-binds-the-group",
            "steps": [
                ["a", "1", "commit", "g", "commit"],
                ["b", "2", "abort", "g", refused],
                ["b", "2", "commit", "g", "commit"],
                ["c", "3", "abort", "-", "abort"],
                ["c", "4", "abort", "o", "abort"],
            ],
            "recorded": {"1": "commit", "2": "commit", "3": "abort", "4": "abort"},
        },
        {
            "name": "first-abort-binds-the-group",
            "steps": [
                ["a", "5", "abort", "g", "abort"],
                ["b", "6", "commit", "g", refused],
                ["b", "6", "abort", "g", "abort"],
            ],
            "recorded": {"5": "abort", "6": "abort"},
        },
        {
            "name": "a-held-decision-comes-back-before-the-group-rule",
            "steps": [
                ["a", "7", "commit", "g", "commit"],
                ["a", "7", "abort", "g", "commit"],
                ["b", "8", "commit", "g", "commit"],
            ],
            "recorded": {"7": "commit", "8": "commit"},
        },
        {
            "name": "a-checkpoint-group-binds-while-a-gate-is-tagged",
            "steps": [
                ["a", "x", "gate", "g", "ok"],
                ["a", "y", "gate", "g", "ok"],
                ["a", "x", "commit", "g", "commit"],
                ["a", "y", "abort", "g", refused],
                ["a", "y", "commit", "g", "commit"],
                ["a", "x", "ungate", "-", "ok"],
                ["a", "y", "ungate", "-", "ok"],
                ["b", "z", "abort", "o", "abort"],
            ],
            "recorded": {"x": None, "y": None, "z": "abort"},
        },
        {
            "name": "a-group-id-has-16-bytes",
            "steps": [["a", "9", "commit", "short", "error:counter"]],
            "recorded": {"9": None},
        },
    ]
    for case in cases:
        case["mids"] = {n: mids[n] for n in case["recorded"]}
        case["groups"] = {g: groups[g] for g in sorted({step[3] for step in case["steps"]})}
    return cases


# --- data connection opening (docs/spec/channels.md, section 8) ---------------------------
def datalink_cases() -> list[dict[str, Any]]:
    """Openings of a data connection: the three records, and refusals."""

    key, mid = det_bytes("data key", 32), det_bytes("data mid", 16)
    nonce_d, nonce_s = det_bytes("nonce d", 32), det_bytes("nonce s", 32)

    def records(index: int, *, source_key: bytes = key, source_mid: bytes = mid) -> dict[str, str]:
        dest = DestinationLink(key, mid, randbytes=lambda n: nonce_d)
        src = SourceLink(source_key, source_mid, index, randbytes=lambda n: nonce_s)
        challenge = dest.challenge()
        hello = src.hello(challenge)
        return {"challenge": challenge.hex(), "hello": hello.hex()}

    def case(name: str, index: int, hello_from: dict[str, str], expect: dict[str, Any]) -> None:
        cases.append({
            "name": name, "key": key.hex(), "mid": mid.hex(), "nonce_d": nonce_d.hex(),
            "nonce_s": nonce_s.hex(), "index": index, **hello_from, "expect": expect,
        })  # fmt: skip

    cases: list[dict[str, Any]] = []
    good = records(3)
    dest = DestinationLink(key, mid, randbytes=lambda n: nonce_d)
    dest.receive_hello(bytes.fromhex(good["hello"]))
    case("opening", 3, good, {"ok": {"index": 3, "proof": dest.proof().hex()}})
    case("wrong-key", 3, records(3, source_key=det_bytes("other key", 32)),
         {"error": "data-link"})  # fmt: skip
    case("other-migration", 3, records(3, source_mid=det_bytes("other mid", 16)),
         {"error": "data-link"})  # fmt: skip
    replayed = dict(good)
    replayed["challenge"] = (b"MIGSGXD1" + det_bytes("fresh nonce d", 32)).hex()
    case("replayed-hello", 3, replayed, {"error": "data-link"})
    return cases


# --- sealed page stream (docs/spec/pagestream.md) --------------------------------------------
def pagestream_cases() -> list[dict[str, Any]]:
    """One direction of a session's page stream: keys, frames, and what is refused.

    One case, its variants as orders of the frames (a digit per frame index), one with
    a byte flipped (``flip``: "FRAME:OFFSET").
    """

    from migsgx.core.pagestream import UP, PageFrameSealer, page_stream_key

    data_key, session = det_bytes("page data key", 32), det_bytes("page session", 16)
    payloads = [det_bytes("page payload 0", 8), b"", det_bytes("page payload 2", 5)]
    sealer = PageFrameSealer(page_stream_key(data_key, session, UP))
    frames = [sealer.seal(p) for p in payloads] + [sealer.seal(b"", last=True)]
    ok = {"ok": {"plaintext": b"".join(payloads).hex()}}
    bad = {"error": "page-stream"}

    def variant(name: str, order: str, expect: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"name": name, "order": order, **more, "expect": expect}

    return [
        {
            "name": "up",
            "data_key": data_key.hex(),
            "session_id": session.hex(),
            "frames": [f.hex() for f in frames],
            "variants": [
                variant("as-sent", "0123", ok),
                variant("flipped", "0123", bad, flip="2:10"),
                variant("dropped", "023", bad),
                variant("reordered", "1023", bad),
                variant("truncated", "012", bad),
                variant("appended", "01230", bad),
            ],
        }
    ]


# --- files ------------------------------------------------------------------------------
def formats() -> ModuleType:
    """The sealed-format and frame-protocol generators (``generate_formats.py``)."""

    name = "_migsgx_vector_formats"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "generate_formats.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        module.det_bytes, module.identity = det_bytes, identity
    return sys.modules[name]


def build() -> dict[str, dict[str, Any]]:
    def doc(kind: str, spec: str, cases: list[dict[str, Any]]) -> dict[str, Any]:
        return {"format": FORMAT, "kind": kind, "spec": spec, "cases": cases}

    f = formats()
    return {
        "stream.json": doc("stream", "docs/spec/stream.md", stream_cases()),
        "manifest.json": doc("manifest", "docs/spec/stream.md#6", manifest_cases()),
        "handshake.json": doc("handshake", "docs/spec/handshake.md", handshake_cases()),
        "control.json": doc("control", "docs/spec/handshake.md#9", control_cases()),
        "precopy.json": doc("precopy", "docs/spec/precopy.md#3", precopy_cases()),
        "sealing.json": doc("sealing", "docs/spec/sealing.md", f.sealing_cases()),
        "migratable.json": doc("migratable", "docs/spec/sealing.md#7", f.migratable_cases()),
        "persistent.json": doc("persistent", "docs/spec/persistent.md", f.persistent_cases()),
        "checkpoint.json": doc("checkpoint", "docs/spec/checkpoint.md#2", f.checkpoint_cases()),
        "channels.json": doc("frames", "docs/spec/channels.md", f.channel_cases()),
        "agent.json": doc("agent", "docs/spec/agent-control.md", f.agent_cases()),
        "appctl.json": doc("appctl", "docs/spec/app-control.md", f.appctl_cases()),
        "sgxext.json": doc("sgxext", "docs/spec/collateral.md#4", sgxext_cases()),
        "datalink.json": doc("datalink", "docs/spec/channels.md#8", datalink_cases()),
        "pagestream.json": doc("pagestream", "docs/spec/pagestream.md", pagestream_cases()),
        "decisions.json": doc("decisions", "docs/spec/commit.md#11", decision_cases()),
    }


def compact_hex(text: str) -> str:
    """A hex string with every run of ``RUN_MIN`` or more equal bytes as ``<HH*N>``."""

    if len(text) < 2 * RUN_MIN or not _PLAIN_HEX.fullmatch(text):
        return text
    out, i, end = [], 0, len(text)
    while i < end:
        j = i + 2
        while j < end and text[j : j + 2] == text[i : i + 2]:
            j += 2
        count = (j - i) // 2
        out.append(f"<{text[i : i + 2]}*{count}>" if count >= RUN_MIN else text[i:j])
        i = j
    return "".join(out)


def expand_hex(text: str) -> str:
    """The plain hex string that :func:`compact_hex` wrote (other strings as they are)."""

    if "<" not in text or not _RUN_HEX.fullmatch(text):
        return text
    runs = _RUN.findall(text)
    size = (len(_RUN.sub("", text)) // 2) + sum(int(n) for _, n in runs)
    if size > EXPANDED_MAX:
        raise ValueError(f"a vector's hex string of {size} bytes (at most {EXPANDED_MAX})")
    return _RUN.sub(lambda m: m.group(1) * int(m.group(2)), text)


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (decoded JSON) with ``fn`` applied to every string value (not keys)."""

    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    return value


def load(path: Path) -> dict[str, Any]:
    """A vector file with its hex strings expanded: what the checks read."""

    document: dict[str, Any] = map_strings(json.loads(path.read_text()), expand_hex)
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(map_strings(document, compact_hex), indent=1) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, document in build().items():
        path = HERE / name
        text = render(document)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
