"""The untrusted host program of the key-value store: enclaves behind a TCP line protocol.

    python examples/kvstore/app.py --image IMAGE_DIR [--enclaves N] [--workers N]
        [--platform-socket PATH] [--bind 0.0.0.0] [--port 0] [--ready-file FILE]
        [--sqlite DB]

It launches N kvstore enclaves (each key lives in enclave ``hash(key) % N``),
opts in to migration (``enable_migration``) and answers one request per line,
one reply per line:

    PING                  -> PONG
    PUT key hexvalue      -> OK n
    GET key               -> VALUE hex | NONE
    UNSEAL key hexblob    -> OK n        (the enclave unseals; the app sees ciphertext only)
    DIGEST                -> DIGEST d0,d1,...
    NOTE key text         -> OK          (ordinary, untrusted memory)
    STATE                 -> STATE {json: notes, request count, workers}
    WORKER i              -> VALUE hex   (worker i's counter, read from its enclave)
    STOP                  -> OK          (stop the worker threads)
    ROW text              -> OK id       (with --sqlite: a row committed to DB)
    ROWS                  -> ROWS {json: integrity_check, count, max id, client row ids}
    LAUNCH key hexvalue   -> OK pid      (a new enclave launched now through the platform
                                          socket: put, get back, closed; checks the
                                          platform is reachable, e.g. after it restarted)

``--workers N`` starts N threads that keep calling the enclaves (``put`` of a
per-worker counter, then ``get`` to check it), so that a migration happens
while ECALLs are in flight; each worker stops after ``--max-calls`` calls.

``--sqlite DB`` keeps a ledger in sqlite in WAL mode, with a thread that
commits a row every few milliseconds: the process holds sqlite's POSIX locks
and its shared-memory mapping whenever it is checkpointed.  Requests use a
second connection opened at start, never a new one: after a move the files
have another device and inode, and a connection opened then is not matched to
the open ones by sqlite (it keys its shared-memory node by device and inode),
finds no other process's lock on the ``-shm`` file (its own do not count),
truncates it as if it were the first user, and a mapping of it beyond its new
end faults (SIGBUS).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migsgx.host.appctl import enable_migration
from migsgx.host.client import EnclaveClient


class Worker:
    def __init__(self, index: int, client: EnclaveClient, max_calls: int) -> None:
        self.index = index
        self.client = client
        self.max_calls = max_calls
        self.count = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"worker-{index}", daemon=True)

    def run(self) -> None:
        key = f"worker-{self.index}"
        while not self.stop.is_set() and self.count < self.max_calls:
            try:
                self.client.ecall.put(key, str(self.count + 1).encode())
                self.count += 1
                got = self.client.ecall.get(key)
                if got != str(self.count).encode():
                    self.errors.append(f"read back {got!r} after {self.count}")
            except Exception as exc:  # reported through STATE, never fatal
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)
            time.sleep(0.002)

    def report(self) -> dict[str, Any]:
        return {"count": self.count, "errors": self.errors[-5:], "alive": self.thread.is_alive()}


class Ledger:
    """sqlite in WAL mode under a write loop (a thread of its own, its own connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS rows ("
                "id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, text TEXT)"
            )
        # Opened before any move, like the loop's (see the module's docstring).
        self.requests = self.connect()
        self.requests_lock = threading.Lock()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None,
                               check_same_thread=False)  # fmt: skip

    def loop(self) -> None:
        db = self.connect()  # held open for good: its locks are held whenever it runs
        n = 0
        while True:
            n += 1
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO rows (kind, text) VALUES ('loop', ?)", (f"{n:08x}",))
            db.execute("COMMIT")
            time.sleep(0.002)

    def add(self, text: str) -> int:
        with self.requests_lock:
            cur = self.requests.execute(
                "INSERT INTO rows (kind, text) VALUES ('client', ?)", (text,)
            )
            return int(cur.lastrowid or 0)

    def check(self) -> dict[str, Any]:
        with self.requests_lock:
            db = self.requests
            integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
            count, top = db.execute("SELECT count(*), max(id) FROM rows").fetchone()
            client = [r[0] for r in db.execute("SELECT id FROM rows WHERE kind = 'client'")]
        return {"integrity": integrity, "count": count, "max": top, "client": client}


class App:
    def __init__(
        self,
        clients: list[EnclaveClient],
        workers: list[Worker],
        ledger: Ledger | None = None,
        launch: Callable[[], EnclaveClient] | None = None,
    ) -> None:
        self.clients = clients
        self.launch = launch
        self.workers = workers
        self.ledger = ledger
        self.notes: dict[str, str] = {}
        self.requests = 0
        self.lock = threading.Lock()

    def enclave_for(self, key: str) -> EnclaveClient:
        if not self.clients:
            raise LookupError("this instance runs without enclaves")
        return self.clients[zlib.crc32(key.encode()) % len(self.clients)]

    def answer(self, line: str) -> str:
        parts = line.split(" ", 2)
        cmd = parts[0].upper()
        with self.lock:
            self.requests += 1
        if cmd == "PING":
            return "PONG"
        if cmd == "PUT" and len(parts) == 3:
            return f"OK {self.enclave_for(parts[1]).ecall.put(parts[1], bytes.fromhex(parts[2]))}"
        if cmd == "GET" and len(parts) == 2:
            value = self.enclave_for(parts[1]).ecall.get(parts[1])
            return "NONE" if value is None else f"VALUE {value.hex()}"
        if cmd == "UNSEAL" and len(parts) == 3:
            n = self.enclave_for(parts[1]).ecall.unseal_value(parts[1], bytes.fromhex(parts[2]))
            return f"OK {n}"
        if cmd == "DIGEST":
            return "DIGEST " + ",".join(c.ecall.digest() for c in self.clients)
        if cmd == "PERSIST" and len(parts) == 2:
            # The first enclave opens (or creates) its persistent state: it moves with it.
            return f"OK {int(self.clients[0].ecall.open_persistent(parts[1]))}"
        if cmd == "NOTE" and len(parts) == 3:
            with self.lock:
                self.notes[parts[1]] = parts[2]
            return "OK"
        if cmd == "STATE":
            with self.lock:
                state = {
                    "notes": dict(self.notes),
                    "requests": self.requests,
                    "workers": [w.report() for w in self.workers],
                    "enclave_pids": [c.info.pid for c in self.clients],
                }
            return "STATE " + json.dumps(state, sort_keys=True)
        if cmd == "WORKER" and len(parts) == 2:
            worker = self.workers[int(parts[1])]
            value = worker.client.ecall.get(f"worker-{worker.index}")
            return "NONE" if value is None else f"VALUE {value.hex()}"
        if cmd == "STOP":
            for w in self.workers:
                w.stop.set()
            # Answer once every worker has finished its last put/get pair, so that
            # its reported count and the value in its enclave agree.
            for w in self.workers:
                w.thread.join(timeout=30)
            return "OK"
        if cmd == "ROW" and len(parts) >= 2 and self.ledger is not None:
            return f"OK {self.ledger.add(line.split(' ', 1)[1])}"
        if cmd == "LAUNCH" and len(parts) == 3 and self.launch is not None:
            value = bytes.fromhex(parts[2])
            with self.launch() as fresh:
                fresh.ecall.put(parts[1], value)
                if fresh.ecall.get(parts[1]) != value:
                    return "ERR the new enclave lost the value"
                return f"OK {fresh.info.pid}"
        if cmd == "ROWS" and self.ledger is not None:
            return "ROWS " + json.dumps(self.ledger.check(), sort_keys=True)
        return "ERR unknown request"

    def serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rw", encoding="utf-8", newline="\n") as stream:
            for line in stream:
                try:
                    reply = self.answer(line.strip())
                except Exception as exc:
                    reply = f"ERR {type(exc).__name__}: {exc}"
                stream.write(reply + "\n")
                stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None, help="needed with --enclaves > 0")
    parser.add_argument("--platform-socket", default=None)
    parser.add_argument("--enclaves", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--max-calls", type=int, default=200_000)
    parser.add_argument("--bind", default="0.0.0.0")  # noqa: S104 (inside a test namespace)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--sqlite", type=Path, default=None, help="a ledger in WAL mode here")
    parser.add_argument(
        "--ballast", type=int, default=0, help="MiB of ordinary memory (a longer CRIU dump)"
    )
    args = parser.parse_args()
    # Touched pages: CRIU dumps every one of them.
    ballast = bytearray(b"\x5a") * (args.ballast << 20)

    log: list[str] = []
    clients = [
        EnclaveClient.launch(
            args.image,
            socket_path=args.platform_socket,
            ocalls={"log": lambda text: log.append(str(text)[:200]) if len(log) < 100 else None},
        )
        for _ in range(args.enclaves)
    ]
    enable_migration(clients)
    workers = [Worker(i, clients[i % len(clients)], args.max_calls) for i in range(args.workers)]

    def launch() -> EnclaveClient:
        return EnclaveClient.launch(args.image, socket_path=args.platform_socket)

    ledger = Ledger(args.sqlite) if args.sqlite is not None else None
    app = App(clients, workers, ledger, launch if args.image is not None else None)
    for w in workers:
        w.thread.start()

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.bind, args.port))
    server.listen(64)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(f"{server.getsockname()[1]}\n")
        os.replace(tmp, args.ready_file)
    while ballast is not None:  # (it lives as long as the server)
        conn, _ = server.accept()
        threading.Thread(target=app.serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
