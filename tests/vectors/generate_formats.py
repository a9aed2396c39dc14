"""Vectors for the sealed formats and the frame-based protocols (imported by ``generate.py``).

Sealed formats (``docs/spec/sealing.md``, ``persistent.md``, ``checkpoint.md``):
blobs are built here from the spec's layouts (``struct`` and AES-GCM, not the
library's sealer), under keys from a fixed root secret, so that the library's
opener is checked against the written format.  Frame protocols
(``channels.md``, ``agent-control.md``, ``app-control.md``): frames are CBOR
maps built here, then cut, tampered or sent out of turn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from migsgx.core.policy import EnclaveIdentity
from migsgx.sgx.keys import KeyDeriver
from migsgx.sgx.structs import KEYNAME_SEAL, KeyRequest, ReportBody

# Set by generate.py (it owns the deterministic helpers and the identities).
det_bytes: Any = None
identity: Any = None


def plain(value: Any) -> Any:
    """JSON form of plain data: bytes become ``{"hex": ...}``, recursively."""

    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# --- a host: root secret, CPUSVN; an enclave: an identity descriptor ------------------------
def host(name: str) -> dict[str, str]:
    return {"root_secret": det_bytes(f"root secret {name}", 32).hex(), "cpu_svn": "02" * 16}


def body_of(desc: dict[str, Any], platform: dict[str, str]) -> ReportBody:
    """The REPORT body of an enclave described by ``{name, svn, signer, debug}`` on a host."""

    base = identity(
        desc["name"],
        svn=desc.get("svn", 1),
        signer=desc.get("signer", "author"),
        debug=desc.get("debug", False),
    )
    return dataclasses.replace(base, cpu_svn=bytes.fromhex(platform["cpu_svn"]))


def enclave(name: str = "kv-store", **kw: Any) -> dict[str, Any]:
    return {"name": name, **kw}


class VectorServices:
    """Just enough of ``TrustedServices`` for sealing: an identity and EGETKEY."""

    def __init__(self, desc: dict[str, Any], platform: dict[str, str]) -> None:
        self.identity = body_of(desc, platform)
        self._cpu = KeyDeriver(
            bytes.fromhex(platform["root_secret"]), bytes.fromhex(platform["cpu_svn"])
        )

    def get_key(self, request: KeyRequest) -> bytes:
        return self._cpu.egetkey(self.identity, request)


SEAL_HEAD = struct.Struct("<8sHH16s32s12sI")


def platform_blob(
    sealer: dict[str, Any],
    platform: dict[str, str],
    plaintext: bytes,
    *,
    aad: bytes,
    policy: int,
    seed: str,
    magic: bytes = b"MSXSEAL1",
) -> bytes:
    """A platform sealed blob, laid out as ``sealing.md`` sections 2 and 3 say."""

    body = body_of(sealer, platform)
    key_id, nonce = det_bytes(seed + " key id", 32), det_bytes(seed + " nonce", 12)
    request = KeyRequest(
        KEYNAME_SEAL, key_policy=policy, isv_svn=body.isv_svn, cpu_svn=body.cpu_svn, key_id=key_id
    )
    key = VectorServices(sealer, platform).get_key(request)
    head = SEAL_HEAD.pack(magic, policy, body.isv_svn, body.cpu_svn, key_id, nonce, len(aad)) + aad
    return head + AESGCM(key).encrypt(nonce, plaintext, head)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- sealing.md, platform blob ------------------------------------------------------------------
def sealing_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    a, b = host("A"), host("B")
    text = b"the enclave's secret, sealed"

    def add(
        name: str,
        blob: bytes,
        opener: dict[str, Any],
        platform: dict[str, str],
        expect: dict[str, Any],
        *,
        aad: bytes | None = None,
    ) -> None:
        cases.append(
            {
                "name": name,
                "platform": platform,
                "opener": opener,
                "blob": blob.hex(),
                "aad": None if aad is None else aad.hex(),
                "expect": expect,
            }
        )

    ok = {"ok": {"plaintext": text.hex()}}
    bad = {"error": "unseal"}
    kv, kv2 = enclave(), enclave(svn=2)
    mre = platform_blob(kv, a, text, aad=b"record 1", policy=0x1, seed="s1")
    mrs = platform_blob(kv, a, text, aad=b"", policy=0x2, seed="s2")
    add("mrenclave", mre, kv, a, ok, aad=b"record 1")
    add("mrenclave-aad-not-checked", mre, kv, a, ok)
    add("mrsigner-same-signer-other-enclave", mrs, enclave("ledger"), a, ok)
    add("mrsigner-newer-svn-opens-older", mrs, kv2, a, ok)
    add("mrenclave-other-enclave", mre, enclave("ledger"), a, bad)
    add("mrsigner-other-signer", mrs, enclave(signer="mallory"), a, bad)
    add("other-host", mre, kv, b, bad)
    add("debug-opener", mrs, enclave(debug=True), a, bad)
    newer = platform_blob(kv2, a, text, aad=b"", policy=0x2, seed="s3")
    add("older-svn-refused-newer-blob", newer, kv, a, bad)
    add("aad-mismatch", mre, kv, a, bad, aad=b"record 2")
    add("tampered-ciphertext", flip(mre, len(mre) - 20), kv, a, bad)
    add("tampered-aad", flip(mre, SEAL_HEAD.size), kv, a, bad)
    add("tampered-key-id", flip(mre, 30), kv, a, bad)
    add("truncated", mre[:-1][: SEAL_HEAD.size + 8 + 15], kv, a, bad)
    add(
        "bad-magic",
        platform_blob(kv, a, text, aad=b"", policy=0x1, seed="s4", magic=b"MSXSEAL2"),
        kv,
        a,
        bad,
    )
    add("policy-both-bits", platform_blob(kv, a, text, aad=b"", policy=0x3, seed="s5"), kv, a, bad)
    long_aad = bytearray(mrs)
    struct.pack_into("<I", long_aad, SEAL_HEAD.size - 4, 1000)
    add("aad-length-beyond-blob", bytes(long_aad), kv, a, bad)
    return cases


# --- sealing.md section 7 / persistent.md section 5: migratable blob ----------------------------
MIG_HEAD = struct.Struct("<8s16sI32s12sQB3sI")


def migratable_blob(
    msk: bytes,
    rid: bytes,
    generation: int,
    plaintext: bytes,
    *,
    aad: bytes = b"",
    binding: tuple[str, int] | None = None,
    seed: str,
    reserved: bytes = bytes(3),
    raw_version: int | None = None,
) -> bytes:
    key_id, nonce = det_bytes(seed + " key id", 32), det_bytes(seed + " nonce", 12)
    name, version = binding if binding is not None else ("", 0)
    if raw_version is not None:
        version = raw_version
    raw = name.encode("ascii")
    head = (
        MIG_HEAD.pack(
            b"MSXMSEA1", rid, generation, key_id, nonce, version, len(raw), reserved, len(aad)
        )
        + raw
        + aad
    )
    info = b"migsgx/v1 migratable seal key" + rid + generation.to_bytes(4, "little")
    key = HKDF(hashes.SHA256(), 32, key_id, info).derive(msk)
    return head + AESGCM(key).encrypt(nonce, plaintext, head)


def migratable_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    keys = [det_bytes("msk 0", 32), det_bytes("msk 1", 32)]
    rid = det_bytes("record id", 16)
    text = b"migratable secret"

    def add(
        name: str,
        blob: bytes,
        expect: dict[str, Any],
        *,
        open_keys: list[bytes] = keys,
        open_rid: bytes = rid,
        aad: bytes | None = None,
        seal: dict[str, Any] | None = None,
    ) -> None:
        case: dict[str, Any] = {
            "name": name,
            "keys": [k.hex() for k in open_keys],
            "rid": open_rid.hex(),
            "blob": blob.hex(),
            "aad": None if aad is None else aad.hex(),
            "expect": expect,
        }
        if seal is not None:
            case["sealed_with"] = seal
        cases.append(case)

    def ok(generation: int, binding: tuple[str, int] | None, aad: bytes) -> dict[str, Any]:
        return {
            "ok": {
                "plaintext": text.hex(),
                "generation": generation,
                "binding": None if binding is None else list(binding),
                "aad": aad.hex(),
            }
        }

    def sealed_with(seed: str, generation: int, binding: Any, aad: bytes) -> dict[str, Any]:
        return {
            "generation": generation,
            "binding": None if binding is None else list(binding),
            "aad": aad.hex(),
            "plaintext": text.hex(),
            "random": [det_bytes(seed + " key id", 32).hex(), det_bytes(seed + " nonce", 12).hex()],
        }

    g0 = migratable_blob(keys[0], rid, 0, text, seed="m0")
    add("generation-0", g0, ok(0, None, b""), seal=sealed_with("m0", 0, None, b""))
    bound = ("requests", 7)
    g1 = migratable_blob(keys[1], rid, 1, text, aad=b"ctx", binding=bound, seed="m1")
    add(
        "generation-1-bound",
        g1,
        ok(1, bound, b"ctx"),
        aad=b"ctx",
        seal=sealed_with("m1", 1, bound, b"ctx"),
    )
    bad = {"error": "unseal"}
    add("generation-not-held", g1, bad, open_keys=keys[:1])
    add("other-record", g0, bad, open_rid=det_bytes("other record", 16))
    add("wrong-key-for-generation", g0, bad, open_keys=[keys[1], keys[0]])
    add("aad-mismatch", g1, bad, aad=b"other")
    add("tampered", flip(g1, len(g1) - 1), bad)
    add("tampered-binding-value", flip(g1, 8 + 16 + 4 + 32 + 12), bad)
    add("truncated", g0[: MIG_HEAD.size + 15], bad)
    add(
        "reserved-not-zero",
        migratable_blob(keys[0], rid, 0, text, seed="m2", reserved=b"\x00\x01\x00"),
        bad,
    )
    add(
        "binding-name-without-value",
        migratable_blob(keys[0], rid, 0, text, seed="m3", binding=("n", 1), raw_version=0),
        bad,
    )
    return cases


# --- persistent.md: the record and the persistent section ---------------------------------------
RECORD_AAD = b"migsgx persistent record v1 "


def persistent_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    a, kv = host("A"), enclave()
    rid = det_bytes("record id", 16)
    keys = [det_bytes("msk 0", 32), det_bytes("msk 1", 32)]
    record = {
        "v": 1,
        "name": "wallet",
        "rid": rid,
        "keys": keys,
        "epoch": [det_bytes("epoch id", 16).hex(), 3],
        "counters": {"requests": [det_bytes("counter id", 16).hex(), 5]},
    }

    def rec_blob(doc: Any, *, name: str = "wallet", policy: int = 0x1, seed: str = "r") -> bytes:
        return platform_blob(
            kv, a, cbor2.dumps(doc), aad=RECORD_AAD + name.encode(), policy=policy, seed=seed
        )

    def rec(
        name: str,
        blob: bytes,
        expect: dict[str, Any],
        *,
        open_as: str = "wallet",
        opener: dict[str, Any] = kv,
    ) -> None:
        cases.append(
            {
                "name": name,
                "what": "record",
                "platform": a,
                "opener": opener,
                "record_name": open_as,
                "blob": blob.hex(),
                "expect": expect,
            }
        )

    bad = {"error": "persistent"}
    rec("record", rec_blob(record), {"ok": plain(record)})
    rec(
        "record-newer-svn-same-enclave",
        rec_blob(record),
        {"ok": plain(record)},
        opener=enclave(svn=2),
    )
    rec("record-other-enclave", rec_blob(record), bad, opener=enclave("ledger"))
    rec("record-other-name", rec_blob(record), bad, open_as="purse")
    rec("record-name-inside-differs", rec_blob({**record, "name": "purse"}), bad)
    rec("record-no-keys", rec_blob({**record, "keys": []}), bad)
    rec(
        "record-negative-offset",
        rec_blob({**record, "counters": {"requests": [record["epoch"][0], -1]}}),
        bad,
    )
    rec("record-version-2", rec_blob({**record, "v": 2}), bad)
    rec(
        "record-not-cbor",
        platform_blob(kv, a, b"\xff\x00", aad=RECORD_AAD + b"wallet", policy=0x1, seed="r"),
        bad,
    )

    section = {
        "v": 1,
        "name": "wallet",
        "rid": rid,
        "keys": keys,
        "counters": {"requests": 5},
        "retiring": det_bytes("retiring", 32),
    }

    def sec(name: str, data: bytes, expect: dict[str, Any]) -> None:
        cases.append({"name": name, "what": "section", "section": data.hex(), "expect": expect})

    sec("section-empty", cbor2.dumps(None), {"ok": None})
    sec("section", cbor2.dumps(section), {"ok": plain(section)})
    sec("section-extra-field", cbor2.dumps({**section, "epoch": 1}), bad)
    sec("section-counter-bool", cbor2.dumps({**section, "counters": {"requests": True}}), bad)
    sec("section-short-rid", cbor2.dumps({**section, "rid": rid[:15]}), bad)
    sec("section-bad-name", cbor2.dumps({**section, "name": "../wallet"}), bad)
    sec("section-not-cbor", b"\xff", bad)
    return cases


# --- checkpoint.md section 2: the key record ----------------------------------------------------
CKPT_AAD = b"migsgx checkpoint v2 "
GATE_AAD = b"migsgx checkpoint gate v2 "


def checkpoint_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    a, b, kv = host("A"), host("B"), enclave()
    cid, secret = det_bytes("checkpoint id", 16), det_bytes("checkpoint secret", 32)
    source = EnclaveIdentity.from_report(body_of(kv, a))
    doc = {"v": 2, "id": cid, "secret": secret, "source": source.pack(), "debug": False}

    def blob(
        payload: Any, *, policy: int = 0x1, aad: bytes = CKPT_AAD + cid, seed: str = "c"
    ) -> bytes:
        return platform_blob(kv, a, cbor2.dumps(payload), aad=aad, policy=policy, seed=seed)

    def add(
        name: str,
        data: bytes,
        expect: dict[str, Any],
        *,
        platform: dict[str, str] = a,
        opener: dict[str, Any] = kv,
    ) -> None:
        cases.append(
            {
                "name": name,
                "platform": platform,
                "opener": opener,
                "blob": data.hex(),
                "expect": expect,
            }
        )

    ok = {
        "ok": {
            "checkpoint_id": cid.hex(),
            "secret": secret.hex(),
            "source": source.pack().hex(),
            "debug": False,
        }
    }
    bad = {"error": "unseal"}
    add("key", blob(doc), ok)
    add("key-same-signer-newer-opener", blob(doc, policy=0x2), ok, opener=enclave(svn=2))
    add("key-other-host", blob(doc), bad, platform=b)
    add("key-other-enclave", blob(doc), bad, opener=enclave("ledger"))
    add("key-wrong-label", blob(doc, aad=b"migsgx checkpoint v1 " + cid), bad)
    add("key-names-other-checkpoint", blob(doc, aad=CKPT_AAD + det_bytes("other", 16)), bad)
    add("key-short-source", blob({**doc, "source": source.pack()[:67]}), bad)
    add("key-version-1", blob({**doc, "v": 1}), bad)
    add("key-short-secret", blob({**doc, "secret": secret[:31]}), bad)

    # The gate record (section 2): pending, then committed with the metadata digest.
    share, counter = det_bytes("gate share", 32), det_bytes("gate counter", 16).hex()
    meta = hashlib.sha256(b'{"format": 1}\n').digest()
    gate = {"v": 2, "id": cid, "share": share, "counter": counter}

    def gate_blob(payload: Any, *, aad: bytes = GATE_AAD + cid) -> bytes:
        return platform_blob(kv, a, cbor2.dumps(payload), aad=aad, policy=0x1, seed="g")

    def add_gate(name: str, data: bytes, expect: dict[str, Any], **kw: Any) -> None:
        add(name, data, expect, **kw)
        cases[-1]["record"] = "gate"

    def gate_ok(bound: bytes | None) -> dict[str, Any]:
        return {"ok": {"checkpoint_id": cid.hex(), "share": share.hex(), "counter": counter,
                       "meta": None if bound is None else bound.hex()}}  # fmt: skip

    add_gate("gate-pending", gate_blob(gate), gate_ok(None))
    add_gate("gate-committed", gate_blob({**gate, "meta": meta}), gate_ok(meta))
    add_gate("gate-committed-nothing-bound", gate_blob({**gate, "meta": b""}), gate_ok(b""))
    add_gate("gate-other-host", gate_blob({**gate, "meta": meta}), bad, platform=b)
    add_gate("gate-short-meta", gate_blob({**gate, "meta": meta[:31]}), bad)
    add_gate("gate-meta-not-bytes", gate_blob({**gate, "meta": meta.hex()}), bad)
    add_gate("gate-extra-field", gate_blob({**gate, "meta": meta, "epoch": 1}), bad)
    add_gate("gate-key-label", gate_blob({**gate, "meta": meta}, aad=CKPT_AAD + cid), bad)
    return cases


# --- frames: channels.md, agent-control.md, app-control.md --------------------------------------
def frame(msg: Any) -> bytes:
    body = cbor2.dumps(msg)
    return len(body).to_bytes(4, "big") + body


def frame_case(
    name: str, schema: str, data: bytes, expect: dict[str, Any], max_size: int
) -> dict[str, Any]:
    return {
        "name": name,
        "what": "frame",
        "schema": schema,
        "max_size": max_size,
        "frame": data.hex(),
        "expect": expect,
    }


def ok_frame(msg: dict[str, Any]) -> dict[str, Any]:
    return {"ok": plain(msg)}


BAD = {"error": "frame"}


def channel_cases() -> list[dict[str, Any]]:
    cap = 1 << 20
    out: list[dict[str, Any]] = []

    def add(name: str, schema: str, data: bytes, expect: dict[str, Any]) -> None:
        out.append(frame_case(name, schema, data, expect, cap))

    launch = {"t": "launch", "files": {"manifest.toml": b"[enclave]\n", "enclave.py": b"x = 1\n"}}
    add("launch", "launch", frame(launch), ok_frame(launch))
    ecall = {"t": "ecall", "id": 7, "fn": "put", "args": ["k", b"v", 3, 1.5, None, True, [1]]}
    add("ecall", "ecall", frame(ecall), ok_frame(ecall))
    ret = {"t": "ret", "id": 7, "value": {"nested": [b"\x00", {"k": None}]}}
    add("ret-any-plain-value", "ecall", frame(ret), ok_frame(ret))
    oret = {"t": "oret", "id": 1, "ok": False, "value": None, "code": "error", "message": "no"}
    add("oret-error", "ecall", frame(oret), ok_frame(oret))
    oret_ok = {"t": "oret", "id": 2, "ok": True, "value": 5}
    add("oret-optional-fields-absent", "ecall", frame(oret_ok), ok_frame(oret_ok))
    upd = {
        "t": "ps_update",
        "name": "wallet",
        "record": None,
        "create": {},
        "advance": {},
        "destroy": ["c1"],
        "check": {"e": 3},
        "absent": False,
    }
    add("ps-update-delete", "platform", frame(upd), ok_frame(upd))
    claim = {"t": "claim", "mid": det_bytes("migration id", 16)}
    add("claim", "platform", frame(claim), ok_frame(claim))
    add("unknown-type", "ecall", frame({"t": "exec", "code": "x"}), BAD)
    add("no-type", "ecall", frame({"id": 1}), BAD)
    add("not-a-map", "ecall", frame(["ecall", 1]), BAD)
    add("extra-field", "ecall", frame({**ecall, "pickle": b""}), BAD)
    add("missing-field", "ecall", frame({"t": "ecall", "id": 1, "fn": "put"}), BAD)
    add("bool-as-int", "ecall", frame({**ecall, "id": True}), BAD)
    add("wrong-type", "platform", frame({"t": "ctr_inc", "id": "c", "by": "1"}), BAD)
    tagged = frame({"t": "ret", "id": 1, "value": cbor2.CBORTag(1, 0)})
    add("semantic-tag", "ecall", tagged, BAD)
    add("tag-as-set", "ecall", frame({"t": "ret", "id": 1, "value": cbor2.CBORTag(258, [1])}), BAD)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    shared = cbor2.dumps({"t": "ret", "id": 1, "value": cyclic}, value_sharing=True)
    add("cyclic-value", "ecall", len(shared).to_bytes(4, "big") + shared, BAD)
    add("not-cbor", "ecall", b"\x00\x00\x00\x02\xff\xff", BAD)
    add("oversize-length", "ecall", (cap + 1).to_bytes(4, "big") + b"\xa0", BAD)
    add("truncated-body", "ecall", frame(ecall)[:-1], BAD)
    add("truncated-header", "ecall", b"\x00\x00", BAD)
    add("empty", "ecall", b"", {"error": "closed"})
    return out


def _agent_session(name: str, msgs: list[dict[str, Any]], expect: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "what": "session",
        "frames": [frame(m).hex() for m in msgs],
        "expect": expect,
    }


def agent_cases() -> list[dict[str, Any]]:
    cap = 2 << 20
    out: list[dict[str, Any]] = []
    sid, data_key = det_bytes("session id", 16), det_bytes("data key", 32)
    hello = {"t": "hello", "version": 1, "host_id": "host-a"}
    begin = {
        "t": "begin",
        "session_id": sid,
        "enclaves": [{"info": _info()}],
        "pids": [1, 7],
        "pidns": True,
        "tcp_close": False,
        "page_tls": True,
    }
    begin_runc = {**begin, "driver": "runc", "target": {"id": "web"}, "page_server": False}
    # Post-copy: no page server; CRIU's lazy pages after the commit (migration.md).
    begin_lazy = {**begin, "page_server": False, "post_copy": True}
    restore_lazy = {"t": "restore", "lazy_port": 4002}
    window = {"t": "window", "seconds": 1.5}
    # Checked before the source freezes (agent-control.md, section 4): a process tree's
    # listening ports, a container's OCI specification.
    begin_ports = {
        **begin,
        "ports": [
            {"proto": "tcp", "address": "0.0.0.0", "port": 7001},
            {"proto": "udp", "address": "::", "port": 7002},
        ],
    }
    begin_spec = {**begin_runc, "spec": {"ociVersion": "1.0.2", "process": {"args": ["app"]}}}
    named = {id(begin_runc): "-runc", id(begin_lazy): "-post-copy", id(restore_lazy): "-lazy",
             id(begin_ports): "-ports", id(begin_spec): "-spec"}  # fmt: skip
    image = {"t": "image", "name": "core-1.img", "data": b"\x01\x02"}
    done = {"t": "images_done", "files": 1, "bytes": 2}
    steps = [hello, begin, {"t": "enclaves_done"}, image, done, {"t": "restore"}, {"t": "resume"}]
    for msg in [
        *steps,
        begin_runc,
        begin_lazy,
        begin_ports,
        begin_spec,
        restore_lazy,
        window,
        {"t": "abort", "reason": "operator"},
        {"t": "ready", "data_port": 4000, "page_port": 4001, "data_key": data_key},
        {"t": "err", "code": "agent-refused", "message": "pid 7 is in use"},
    ]:
        out.append(
            frame_case(
                f"control-{msg['t']}" + named.get(id(msg), ""),
                "agent-control",
                frame(msg),
                ok_frame(msg),
                cap,
            )
        )
    out.append(
        frame_case("control-oversize", "agent-control", (cap + 1).to_bytes(4, "big"), BAD, cap)
    )
    out.append(
        frame_case(
            "control-begin-driver-int", "agent-control", frame({**begin, "driver": 1}), BAD, cap
        )
    )
    out.append(
        frame_case(
            "control-begin-ports-map", "agent-control", frame({**begin, "ports": {}}), BAD, cap
        )
    )
    out.append(
        frame_case(
            "control-ready-with-token",
            "agent-control",
            frame({"t": "ready", "data_port": 1, "page_port": 2, "token": data_key}),
            BAD,
            cap,
        )
    )

    full = ["greeted", "receiving", "loaded", "images", "images-complete", "held", "resumed"]
    out.append(_agent_session("session", steps, {"ok": {"states": full, "finished": True}}))
    no_images = [s for s in steps if s is not image]
    out.append(
        _agent_session(
            "session-no-images",
            no_images,
            {"ok": {"states": [s for s in full if s != "images"], "finished": True}},
        )
    )
    # The overlapped order (the tool's default): images and restore while the enclaves load.
    overlapped = [hello, begin, image, done, {"t": "restore"}, {"t": "enclaves_done"},
                  {"t": "resume"}]  # fmt: skip
    early = ["greeted", "receiving", "images-early", "images-complete-early", "held-loading",
             "held", "resumed"]  # fmt: skip
    out.append(_agent_session("session-overlapped", overlapped,
                              {"ok": {"states": early, "finished": True}}))  # fmt: skip
    out.append(
        _agent_session(
            "session-overlapped-abort-held-loading",
            [*overlapped[:5], {"t": "abort", "reason": "test"}],
            {"ok": {"states": [*early[:5], "aborted"], "finished": True}},
        )
    )
    out.append(
        _agent_session(
            "session-overlapped-resume-before-enclaves_done",
            [*overlapped[:5], {"t": "resume"}],
            {"error": "protocol", "at": 5},
        )
    )
    for at in range(1, 7):
        msgs = [*steps[:at], {"t": "abort", "reason": "test"}]
        out.append(
            _agent_session(
                f"session-abort-after-{steps[at - 1]['t']}",
                msgs,
                {"ok": {"states": [*full[:at], "aborted"], "finished": True}},
            )
        )
    out.append(
        _agent_session(
            "session-abort-before-hello",
            [{"t": "abort", "reason": "x"}],
            {"error": "protocol", "at": 0},
        )
    )
    out.append(
        _agent_session("session-begin-before-hello", [begin], {"error": "protocol", "at": 0})
    )
    out.append(
        _agent_session("session-hello-twice", [hello, hello], {"error": "protocol", "at": 1})
    )
    out.append(
        _agent_session(
            "session-restore-before-images",
            [*steps[:3], {"t": "restore"}],
            {"error": "protocol", "at": 3},
        )
    )
    out.append(
        _agent_session(
            "session-resume-before-restore",
            [*steps[:5], {"t": "resume"}],
            {"error": "protocol", "at": 5},
        )
    )
    out.append(
        _agent_session(
            "session-abort-after-resume",
            [*steps, {"t": "abort", "reason": "x"}],
            {"error": "protocol", "at": 7},
        )
    )
    # A post-copy session that ended after the COMMIT: one refusal (commit.md 2.2).
    refuse = {"t": "refuse", "session_id": sid, "index": 0}
    out.append(
        _agent_session(
            "refuse-on-its-own-connection",
            [hello, refuse],
            {"ok": {"states": ["greeted", "delivered"], "finished": True}},
        )
    )
    out.append(_agent_session("refuse-in-a-session", [*steps[:2], refuse],
                              {"error": "protocol", "at": 2}))  # fmt: skip
    out.append(
        _agent_session(
            "session-answer-as-request",
            [hello, {"t": "welcome", "version": 1, "host_id": "b"}],
            {"error": "protocol", "at": 1},
        )
    )
    for bad_name in ["../core-1.img", ".hidden", "a/b", "x" * 129]:
        msgs = [*steps[:3], {**image, "name": bad_name}]
        out.append(
            _agent_session(
                f"session-image-name-{bad_name[:12].replace('/', '_')}",
                msgs,
                {"error": "protocol", "at": 3},
            )
        )
    out.extend(_version_cases(begin, cap))
    return out


def _version_cases(begin: dict[str, Any], cap: int) -> list[dict[str, Any]]:
    """agent-control.md, section 7: the agent's answer to a hello, and which fields a
    session of each version carries."""

    out: list[dict[str, Any]] = []
    for offered, oldest, newest, expect in [
        (2, 1, 2, {"ok": {"version": 2}}),  # this release, both ends
        (1, 1, 2, {"ok": {"version": 1}}),  # the previous release's tool
        (3, 1, 2, {"ok": {"version": 2}}),  # a later tool speaks down
        (1, 2, 2, {"error": "protocol-version"}),  # agent serve --min-protocol 2
        (2, 3, 4, {"error": "protocol-version"}),  # an agent too new for the tool
        (0, 1, 2, {"error": "protocol"}),
    ]:
        out.append(
            {
                "name": f"version-offer-{offered}-agent-{oldest}-{newest}",
                "what": "version",
                "frame": frame({"t": "hello", "version": offered, "host_id": "host-a"}).hex(),
                "oldest": oldest,
                "newest": newest,
                "expect": expect,
            }
        )
    begin_memory = {**begin, "memory_bytes": 64 << 20}
    images_ok = {"t": "images_ok", "page_bytes": 4096, "seconds": 0.25, "images_fs": "tmpfs"}
    for name, msg, version, expect in [
        ("begin-memory-v2", begin_memory, 2, {"ok": {}}),
        ("begin-memory-v1", begin_memory, 1, {"error": "protocol"}),
        ("begin-v1", begin, 1, {"ok": {}}),
        ("images_ok-fs-v2", images_ok, 2, {"ok": {}}),
        ("images_ok-fs-v1", images_ok, 1, {"error": "protocol"}),
    ]:
        out.append(
            {
                "name": f"version-fields-{name}",
                "what": "fields",
                "frame": frame(msg).hex(),
                "session_version": version,
                "expect": expect,
            }
        )
    return out


def _info(**kw: Any) -> dict[str, Any]:
    base = {
        "pid": 4242,
        "mr_enclave": det_bytes("mrenclave", 32),
        "mr_signer": det_bytes("signer", 32),
        "isv_prod_id": 42,
        "isv_svn": 1,
        "debug": False,
        "memory_size": 1 << 20,
        "thread_slots": 4,
        "ecalls": ["get", "put"],
    }
    base.update(kw)
    return base


def appctl_cases() -> list[dict[str, Any]]:
    cap = 64 << 20
    out: list[dict[str, Any]] = []
    info = _info()
    for msg in [
        {"t": "prepare", "timeout": 30.0},
        {"t": "resume"},
        {"t": "attach", "enclaves": [info]},
        {"t": "status"},
        {"t": "prepared", "enclaves": [{"info": info, "image_files": {"enclave.py": b"x = 1\n"}}]},
        {"t": "ok", "enclaves": 1},
        {"t": "state", "pid": 4242, "enclaves": 1, "handed_over": True},
        {"t": "err", "code": "appctl", "message": "the enclaves are handed over already"},
    ]:
        out.append(frame_case(f"frame-{msg['t']}", "appctl", frame(msg), ok_frame(msg), cap))
    out.append(frame_case("frame-prepare-no-timeout", "appctl", frame({"t": "prepare"}), BAD, cap))
    out.append(frame_case("frame-kill", "appctl", frame({"t": "kill", "pid": 1}), BAD, cap))

    def info_case(name: str, data: Any, expect: dict[str, Any]) -> None:
        out.append({"name": name, "what": "info", "info": plain(data), "expect": expect})

    info_case("info", info, {"ok": plain(info)})
    info_case(
        "info-missing-pid", {k: v for k, v in info.items() if k != "pid"}, {"error": "protocol"}
    )
    info_case("info-bool-svn", _info(isv_svn=True), {"error": "protocol"})
    info_case("info-extra-field", _info(path="/tmp"), {"error": "protocol"})
    info_case("info-ecall-not-text", _info(ecalls=["get", 1]), {"error": "protocol"})

    def files_case(name: str, data: Any, expect: dict[str, Any]) -> None:
        out.append({"name": name, "what": "image_files", "files": plain(data), "expect": expect})

    files_case("image-files", {"enclave.py": b"x"}, {"ok": plain({"enclave.py": b"x"})})
    files_case("image-files-empty", {}, {"error": "protocol"})
    files_case("image-files-text", {"enclave.py": "x"}, {"error": "protocol"})
    return out


def unplain(value: Any) -> Any:
    """Inverse of :func:`plain`."""

    if isinstance(value, dict):
        if set(value) == {"hex"} and isinstance(value["hex"], str):
            return bytes.fromhex(value["hex"])
        return {k: unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unplain(v) for v in value]
    return value
