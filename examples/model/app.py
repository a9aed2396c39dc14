"""The untrusted host program of the secret model: predictions over a TCP line protocol.

    python examples/model/app.py --image IMAGE_DIR --rows R --cols C [--seed S]
        [--ordinary-mib M] [--dirty-rate BYTES] [--platform-socket PATH]
        [--bind 0.0.0.0] [--port 0] [--ready-file FILE]

The enclave makes its secret weights itself (``generate(rows, cols, seed)``,
rows x cols float32), so they never exist outside it.  ``--ordinary-mib``
adds that much ordinary memory (a deterministic pattern) that CRIU moves with
the process.  ``--dirty-rate`` keeps a thread changing that many bytes of
random weight pages per second through ECALLs (``scribble``), as the live
migration benchmark's workload does.  Requests, one per line:

    PING     -> PONG
    DIGEST   -> DIGEST enclave_digest ordinary_digest
    PREDICT  -> PREDICT y0,y1,...   (weights times a vector of ones)
    INFO     -> INFO {json}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

from migsgx.host.appctl import enable_migration
from migsgx.host.client import EnclaveClient


def ordinary_memory(mib: int, seed: int) -> np.ndarray:
    """``mib`` MiB of bytes that are not zero pages, made quickly."""

    block = np.random.default_rng(seed).integers(0, 256, size=1 << 20, dtype=np.uint8)
    out = np.empty((mib, 1 << 20), dtype=np.uint8)
    for i in range(mib):
        out[i] = block
        out[i, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--platform-socket", default=None)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--cols", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ordinary-mib", type=int, default=0)
    parser.add_argument("--dirty-rate", type=int, default=0)
    parser.add_argument("--bind", default="0.0.0.0")  # noqa: S104 (inside a test namespace)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args()

    model = EnclaveClient.launch(args.image, socket_path=args.platform_socket)
    model.ecall.generate(args.rows, args.cols, args.seed)
    enable_migration([model])
    memory = ordinary_memory(args.ordinary_mib, args.seed + 1)
    lock = threading.Lock()
    served = [0]
    scribbled = [0]

    def scribble(rate: int) -> None:
        """32 random pages per call, ``rate`` bytes of pages per second, never in a burst."""

        period = 32 * 4096 / rate
        next_at = time.monotonic()
        while True:
            model.ecall.scribble(32, scribbled[0])
            scribbled[0] += 1
            next_at += period
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()  # behind (frozen, say): no catching up

    if args.dirty_rate > 0:
        threading.Thread(target=scribble, args=(args.dirty_rate,), daemon=True).start()

    def answer(line: str) -> str:
        cmd = line.strip().upper()
        with lock:
            served[0] += 1
        if cmd == "PING":
            return "PONG"
        if cmd == "DIGEST":
            ordinary = hashlib.sha256(memory.data).hexdigest()
            return f"DIGEST {model.ecall.digest()} {ordinary}"
        if cmd == "PREDICT":
            ys = model.ecall.predict([1.0] * args.cols)
            return "PREDICT " + ",".join(f"{y:.6g}" for y in ys[:4])
        if cmd == "INFO":
            info = model.ecall.info()
            info.update(served=served[0], ordinary_mib=args.ordinary_mib, scribbled=scribbled[0])
            return "INFO " + json.dumps(info, sort_keys=True)
        return "ERR unknown request"

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            for line in stream:
                try:
                    reply = answer(line)
                except Exception as exc:
                    reply = f"ERR {type(exc).__name__}: {exc}"
                stream.write(reply + "\n")
                stream.flush()

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.bind, args.port))
    server.listen(64)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(f"{server.getsockname()[1]}\n")
        os.replace(tmp, args.ready_file)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
