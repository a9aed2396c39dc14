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
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from migsgx.agent.datalink import DestinationLink
from migsgx.core.commit import open_control, seal_control
from migsgx.core.handshake import transcript_item
from migsgx.core.stream import Manifest, StreamHeader, StreamOpener, StreamSealer
from migsgx.errors import MigSGXError
from migsgx.sgx.sgxext import PckExtension
from migsgx.sgx.structs import ReportBody
from migsgx.wire import HEADER, decode_body

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
        doc = json.loads(path.read_text())
        assert doc["format"] == "migsgx-vectors/1", path
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


CHECKS = {
    "sgxext": check_sgxext,
    "stream": check_stream,
    "manifest": check_manifest,
    "handshake": check_handshake,
    "control": check_control,
    "datalink": check_datalink,
}


@pytest.mark.parametrize(("kind", "case"), _all_cases())
def test_vector(kind: str, case: dict[str, Any]) -> None:
    CHECKS[kind](case)


def test_vector_files_are_up_to_date_and_small() -> None:
    assert GEN.main(["--check"]) == 0, "run: python tests/vectors/generate.py"
    files = list(VECTORS.glob("*.json"))
    assert {p.name for p in files} >= {f"{kind}.json" for kind in CHECKS}
    assert sum(p.stat().st_size for p in files) < 200_000
