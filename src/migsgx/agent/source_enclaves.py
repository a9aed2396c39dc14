"""The enclave streams of ``migsgx migrate``: pre-copy, the early handshake,
each enclave's transfer on a data connection of its own, and what the guardian
and the journal need to deliver an enclave's state again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from .._trace import step
from ..datapath.enclave_link import EnclaveLink, kept_by_another, refusal_kind
from ..datapath.outgoing import OutgoingEnclave
from ..errors import HoldRefusedError, MigrationError, MigSGXError, ProtocolError
from ..limits import MIGRATE_CHUNK_SIZE
from . import early, precopy
from .applink import HandedEnclave
from .ckpt_journal import start_time
from .control import CONNECT_TIMEOUT
from .datalink import open_data
from .dumphold import MidDumpHold
from .fault_relays import flipping_relay
from .faults import fault
from .protocol import plain_stats
from .redeliver import HeldEnclave
from .source_state import _MigrationState, _Transfer

__all__: list[str] = []

log = logging.getLogger("migsgx.migrate")


class _EnclaveSteps(_MigrationState):
    """The enclaves' side of a migration, from their handshake to LOADED."""

    def _precopy(self, pids: list[int], pidns: bool) -> dict[str, Any]:
        """Live: side channels, ``begin``, every enclave's rounds; the application runs on."""

        assert self.link is not None and self.control is not None
        self.note("precopy")
        self.transfers = [_Transfer(h) for h in self.link.side()]
        ready = self.control.call(self._begin(pids, pidns), "ready")

        def connect(index: int) -> socket.socket:
            peer = socket.create_connection(
                (self.opts.to[0], int(ready["data_port"])), timeout=CONNECT_TIMEOUT
            )
            peer.settimeout(None)
            open_data(peer, ready["data_key"], self.session_id, index)
            return peer

        try:
            # ``tool.after-handshake`` at its place here too: every enclave's handshake
            # done, no round yet, nothing frozen (as after the early handshake).
            precopy.run_precopy(
                self.transfers, connect, rules=self.opts.stop_rules,
                chunk_size=self.opts.chunk_size, report=self.opts.round_report,
                handshaken=lambda: self._inject(self._fault("tool.after-handshake")),
            )  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(MigSGXError):
                self.control.call({"t": "abort", "reason": f"pre-copy failed: {exc}"}, "aborted")
            raise
        self.note("precopied")
        return ready

    def _handshake_early(self, pids: list[int], pidns: bool) -> dict[str, Any] | None:
        """Before the freeze: ``begin`` and every enclave's handshake (:mod:`.early`).

        ``None`` (and nothing begun) for an application without enclaves.
        """

        assert self.link is not None and self.control is not None
        sides = self.link.side()
        if not sides:
            return None
        self.note("handshake")
        self.transfers = [_Transfer(h) for h in sides]
        try:
            ready = self.control.call(self._begin(pids, pidns), "ready")
        except BaseException:
            early.abandon(self.transfers, "begin failed")
            raise
        try:
            early.handshake_all(
                self.transfers, lambda index: self._connect(index, ready),
                mode=self.opts.mode, chunk_size=self.opts.chunk_size or MIGRATE_CHUNK_SIZE,
                memory_hint=self.prefault_ahead,
            )  # fmt: skip
        except BaseException as exc:
            with contextlib.suppress(MigSGXError):
                self.control.call({"t": "abort", "reason": str(exc)[:500]}, "aborted")
            raise
        self.note("handshaken")
        self._inject(self._fault("tool.after-handshake"))
        return ready

    def _adopt(self, handed: list[HandedEnclave]) -> None:
        try:
            early.adopt(self.transfers, handed)
        except ProtocolError:
            assert self.link is not None
            with contextlib.suppress(MigSGXError):
                self.link.resume([h.sock for h in handed])  # the application's, back to it
            raise

    def _connect(self, index: int, ready: dict[str, Any]) -> tuple[socket.socket, socket.socket]:
        """Enclave ``index``'s authenticated data connection to the destination agent,
        and what the enclave's transfer uses (itself, or a fault's relay in front of it)."""

        peer = socket.create_connection((self.opts.to[0], int(ready["data_port"])),
                                        timeout=CONNECT_TIMEOUT)  # fmt: skip
        peer.settimeout(None)
        open_data(peer, ready["data_key"], self.session_id, index)
        action = fault("tool.enclave-stream")
        if action is not None and action.startswith("flip-byte="):
            return peer, flipping_relay(peer, int(action.partition("=")[2]))
        if action is not None and action.startswith(("hold-to-restored=", "flip-byte-in-restore=")):
            # Overlapped restore: the load cannot end before the restore (is asked).
            held = action.startswith("hold")
            event = self.restore_answered if held else self.restore_asked
            return peer, flipping_relay(peer, int(action.partition("=")[2]), event.is_set,
                                        flip=not held)  # fmt: skip
        if action is not None and action.startswith(
            ("flip-byte-in-dump=", "drop-in-dump=", "kill-in-dump=")
        ):
            # The damaged byte (or the drop) comes once CRIU wrote 1 MiB of pages, CRIU held
            # till the cancel.
            hold = MidDumpHold(lambda: None if self.plan is None else self.plan.images,
                               lambda: None if self.plan is None else self.plan.cancel,
                               self._guardian_note,
                               kill=action.startswith("kill"))  # fmt: skip
            return peer, flipping_relay(peer, int(action.partition("=")[2]), hold,
                                        drop=action.startswith("drop"))  # fmt: skip
        return peer, peer

    def _start_enclaves(self, ready: dict[str, Any]) -> None:
        self._threads: list[threading.Thread] = []
        if not self.transfers:
            return
        kwargs: dict[str, Any] = {"mode": self.opts.mode, "memory_hint": self.prefault_ahead}
        kwargs["chunk_size"] = self.opts.chunk_size or MIGRATE_CHUNK_SIZE
        for position, transfer in enumerate(self.transfers):
            h = transfer.handed
            if transfer.outgoing is None:  # (live: made for the pre-copy)
                transfer.outgoing = OutgoingEnclave(h.sock, h.info, h.image_files, **kwargs)
            transfer.outgoing.on_handshake = self._journal_enclave
            transfer.outgoing.link.before_ring_fds = lambda: self._inject(
                self._fault("tool.ring-handover")
            )
            transfer.outgoing.index = position
            if transfer.outgoing.migration_id is not None:  # (live: its handshake is done)
                self._journal_enclave(position, transfer.outgoing.migration_id)
        self.note("enclaves")
        self._threads = [
            threading.Thread(
                target=self._transfer, args=(t, ready), name=f"migsgx-enclave-{i}", daemon=True
            )
            for i, t in enumerate(self.transfers)
        ]
        for thread in self._threads:
            thread.start()

    def _journal_enclave(self, index: int, migration_id: bytes) -> None:
        """Before its dump starts, an enclave's own migration id goes to the journal."""

        if self.journal is None:
            return
        with self._journal_lock:
            mids = list(self.journal.data["enclave_mids"]) or [""] * len(self.transfers)
            mids[index] = migration_id.hex()
            self.journal.update(enclave_mids=mids)

    def _join_enclaves(self) -> None:
        for thread in getattr(self, "_threads", []):
            thread.join()

    def _finish_enclaves(self) -> None:
        """Every enclave LOADED at the destination (or the migration fails here)."""

        if not self.transfers:
            self.control_call({"t": "enclaves_done"}, "enclaves_ready")
            return
        self._join_enclaves()
        for transfer in self.transfers:
            if transfer.error is not None:
                err = transfer.error
                raise MigrationError(
                    f"enclave {transfer.handed.index} did not migrate: {type(err).__name__}: {err}"
                ) from err
        self.note("enclaves_sent")
        reply = self.control_call({"t": "enclaves_done"}, "enclaves_ready")
        self.stats["enclaves_destination"] = reply["stats"]

    def _transfer(self, transfer: _Transfer, ready: dict[str, Any]) -> None:
        if self.opts.live and transfer.peer is not None:
            try:
                transfer.stats = precopy.finish(transfer)
            except BaseException as exc:
                transfer.error = exc
                self._enclave_failed(transfer, exc)
            return
        try:
            peer = transfer.peer  # (an early handshake connected it, and uses its own)
            if peer is None:
                transfer.peer, peer = self._connect(transfer.handed.index, ready)
            t0 = time.monotonic()
            assert transfer.outgoing is not None
            stats = transfer.outgoing.transfer(peer)
            transfer.stats = {**plain_stats(stats), "timeline": stats.get("timeline", {})}
            transfer.stats["tool_seconds"] = time.monotonic() - t0
        except BaseException as exc:
            transfer.error = exc
            self._enclave_failed(transfer, exc)

    def _enclave_failed(self, transfer: _Transfer, exc: BaseException) -> None:
        """An enclave stream failed, so the migration will not happen: stop the dump now.

        Waiting for CRIU to finish a dump whose result is thrown away keeps the
        source frozen for seconds; cancelled, CRIU resumes the tree at once.
        """

        step("enclave-failed")
        if not self.committed:
            self.cancel.cancel(f"enclave {transfer.handed.index}: {type(exc).__name__}: {exc}")

    def _guardian_enclaves(self, handed: Sequence[HandedEnclave]) -> None:
        """What the guardian needs to deliver a committed enclave's state again (W2)."""

        if self.guardian is None or self.journal is None:
            return
        described = []
        for position, h in enumerate(handed):
            held = HeldEnclave(h.sock, h.info, dict(h.image_files), self.opts.mode)
            described.append(held.describe())
            self.guardian.note(f"enclave {position} {described[-1]}")
        # Each enclave keeps a duplicate of this end of its connection: should this
        # tool and its guardian both die, it keeps its state (committed: the state to
        # deliver again; undecided: the application's writes) instead of ending, and
        # ``migsgx recover`` takes the duplicate back (``recover.HeldSource``).
        # An enclave that keeps another party's duplicate refuses its hold: the
        # migration stops there (the holds given so far are in the journal first, for
        # whoever finishes the roll-back), before anything is frozen or decided.
        holders: list[list[object]] = []
        refused: HoldRefusedError | None = None
        for h in handed:
            entry, refused = self._hold(h)
            holders.append(entry)
            if refused is not None:
                break
        holders.extend([] for _ in range(len(handed) - len(holders)))
        self.journal.update(guardian_pid=self.guardian.proc.pid, enclaves=described,
                            holders=holders)  # fmt: skip
        if refused is not None:
            raise refused

    def _hold(self, h: HandedEnclave) -> tuple[list[object], HoldRefusedError | None]:
        """``[pid, fd, start, nonce]`` of the duplicate enclave ``h`` now holds ([] if
        none), and the refusal to migrate when it keeps another party's instead.

        The nonce names this hold: a ``recover`` reading a stale journal (the
        duplicate let go since, its number reused by a later migration's) finds
        another nonce there and leaves it alone (:func:`.holders.take_held`).  A
        refusal's kind decides (:func:`~migsgx.datapath.enclave_link.kept_by_another`):
        ``hold-kept`` means that the enclave keeps a duplicate another process gave
        it (the application's own ``__mig_hold``, say), which names no nonce of this
        journal: should this tool and its guardian die once the enclave is frozen
        or committed, ``migsgx recover`` could not take its state back.  So that
        refuses the migration.  An enclave runtime older than the call (it answers
        ``unknown-ecall``) keeps nothing, and migrates without a duplicate as before.
        """

        links = [t.outgoing.link for t in self.transfers if t.handed is h and t.outgoing]
        link = next((k for k in links if k.sock is h.sock), None) or EnclaveLink(h.sock)
        try:
            app = self.link.pid if self.link is not None else None
            nonce = secrets.token_bytes(16)  # this hold's, and so this migration's
            fd = link.hold(app, nonce)
            return [h.info.pid, fd, start_time(h.info.pid), nonce.hex()], None
        except (MigSGXError, OSError) as exc:
            if kept_by_another(exc):
                return [], HoldRefusedError(
                    f"enclave {h.index} (pid {h.info.pid}) keeps another process's duplicate "
                    f"of its connection and refused this migration's ({refusal_kind(exc)}: {exc}): "
                    "were this tool and its guardian to die, migsgx recover could not take "
                    "its state back; nothing moved, the source runs on"
                )
            log.warning("enclave %d keeps no duplicate of its connection: %s", h.index, exc)
            return [], None
