"""An incoming migration's tree: CRIU's images received, the tree restored and
held (from the images, or post-copy with CRIU lazy pages from the source), and
the records a restarted agent reads (:mod:`.held`): the intent before the
restore, the tree once made, and the answered record once every loaded copy was
checked alive, right before the source may commit.

:mod:`.incoming` answers the tool's requests with these steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from typing import Any

import cbor2

from ..containers import Restored, RestoreRequest
from ..containers.postcopy import PostCopyRestore
from ..criu.pageserver import page_bytes
from ..errors import MigSGXError, ProtocolError
from ..host.appctl import info_to_wire
from ..system.process import wait_stopped
from .faults import armed, fault
from .held import HeldRecord, start_time
from .held import remove as remove_record
from .imageroom import fs_type
from .incoming_data import Reply, _corrupt_images, _Enclave, _inject
from .incoming_settle import _SessionDecisions
from .lazy import Window
from .protocol import MAX_IMAGE_BYTES, MAX_IMAGE_FILES, AgentError, SessionState, check_image_name

__all__: list[str] = []

log = logging.getLogger("migsgx.agent")


class _TreeSteps(_SessionDecisions):
    """Images in, the tree restored and held, its records written."""

    #: The enclaves' duplicates of our end, given before their claims, by index.
    _holds: dict[int, tuple[list[object], str]]
    _holds_lock: threading.Lock

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holds = {}
        self._holds_lock = threading.Lock()

    def _held_after_loading(self, waited: float) -> None:
        """Overlapped: the tree was restored while the enclaves loaded; now they all
        did.  The record names every loaded copy and is answered (fsync'd) only
        after the liveness check, right before ``enclaves_ready``: from then on
        the source may commit, and a restarted agent adopts the tree."""

        assert self.restored is not None
        _inject(fault("agent.enclaves-loaded"), self)
        record = self._held_record(self.restored)
        record.write(self._records())  # (the arrivals and the enclaves' processes)
        # Right before the source may commit: every loaded copy must still be there.
        self._check_enclaves_alive()
        # What a restarted agent adopts (W2), or finishes by the resume marker (a tree
        # without enclaves), if this one dies holding the tree.
        record.answered = True
        record.write(self._records())
        log.info(
            "migration %s: every enclave loaded beside the restore (%.3f s waited): held",
            self.tag, waited,
        )  # fmt: skip

    def _image(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None
        name = check_image_name(msg["name"])
        if not self._files:
            self._images_t0 = time.monotonic()
        out = self._files.get(name)
        if out is None:
            if len(self._files) >= MAX_IMAGE_FILES:
                raise ProtocolError("too many image files")
            fd = os.open(
                self.images_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
            )
            out = self._files[name] = os.fdopen(fd, "wb")
        self._image_bytes += len(msg["data"])
        if self._image_bytes > MAX_IMAGE_BYTES:
            raise ProtocolError("the images exceed the size cap")
        out.write(msg["data"])
        return None

    def _images_done(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None
        files = self._close_files()
        if msg["files"] != files or msg["bytes"] != self._image_bytes:
            raise ProtocolError(
                f"image stream incomplete: {files} files / {self._image_bytes} bytes received, "
                f"{msg['files']} / {msg['bytes']} announced"
            )
        if self.page_server:
            self._await_page_connection()  # (bounded: incoming_pages)
            if self._page_error is not None:
                raise AgentError(f"page server: {self._page_error}") from self._page_error
            if self._page_server is None:
                raise AgentError("the source never connected to the page server")
            # Each end bounded, and ended at once by the control connection's hang-up.
            self._until(self._page_server.ended, self.config.io_timeout, "page server end")
            self._page_server.wait(0.0)
            if self._relay is not None:
                # Every page frame opened, the last one came: else nothing of it counts.
                self._until(self._relay.ended, self.config.io_timeout, "page stream end")
                self._relay.finish(0.0)
        pages = page_bytes(self.images_dir)
        seconds = time.monotonic() - (self._images_t0 or time.monotonic())
        self.agent.metrics.observe_phase("images", seconds)
        self.agent.metrics.bytes.labels("images").inc(self._image_bytes + pages)
        return {
            "t": "images_ok",
            "page_bytes": pages,
            "seconds": seconds,
            "images_fs": fs_type(self.images_dir),
        }

    def _restore(self, msg: dict[str, Any]) -> Reply:
        assert self.images_dir is not None and self.driver is not None
        action = fault("agent.before-restore")
        _inject(action, self)
        corrupt = action == "corrupt"
        t0 = time.monotonic()
        # What a restarted agent removes if this one dies inside the restore.
        self._intent_record().write(self._records())
        try:
            if self.post_copy:
                restored = self._restore_lazy(msg.get("lazy_port"), corrupt)
            else:
                restored = self.driver.restore(
                    RestoreRequest(
                        images=self.images_dir,
                        target=self.target,
                        tcp_close=self.tcp_close,
                        before=_corrupt_images if corrupt else None,
                        owner=self.session_id.hex(),
                        made=(lambda: _inject(fault("agent.in-restore"), self))
                        if self.driver.name != "pid" or armed("agent.in-restore")
                        else None,
                        made_tree=self._record_made_tree,
                        spend_images=self.config.spend_images and not self.config.keep_images,
                    )
                )
        except BaseException:
            remove_record(self.session_dir)  # (the driver removed what it made)
            raise
        self.restored = restored
        pid = self.root = restored.pid
        for adopted in (pid, *restored.adopt):
            self.agent.adopt(adopted)
        wait_stopped(pid)
        # What a restarted agent removes if this one dies before it answers.
        record = self._held_record(restored)
        record.write(self._records())
        _inject(fault("agent.after-restore"), self)
        loading = self.machine.state is SessionState.HELD_LOADING
        if not loading:
            # Right before the source may commit: every loaded copy must still be there.
            self._check_enclaves_alive()
            # What a restarted agent adopts (W2), or finishes by the resume marker (a tree
            # without enclaves: :mod:`.adoption`), if this one dies holding the tree.
            record.answered = True
            record.write(self._records())
        if self.window is not None and not self.window.post.serving:
            raise AgentError("the source stopped serving process pages before the commit point")
        seconds = time.monotonic() - t0
        self.agent.metrics.observe_phase("restore", seconds)
        log.info(
            "migration %s: restored %s (pid %d), held%s, in %.3f s",
            self.tag, restored.label, pid, " (enclaves still loading)" if loading else "",
            seconds,
        )  # fmt: skip
        return {"t": "restored", "pid": pid, "seconds": seconds}

    def _hold_before_claim(self, enclave: _Enclave) -> None:
        """Each enclave keeps a duplicate of our end of its connection from right
        before its claim (``__mig_hold``, once), and the held record names it.

        Window W3 (``docs/spec/commit.md``): from its claim until the tree has the
        connection, the enclave holds the only copy of the state, and its only
        connection is ours: our death would be its end of file.  With the
        duplicate it lives on, and a restarted agent takes the duplicate back
        (nonce checked) and resumes the tree with it (:mod:`.adoption`).  The
        hold names the held tree's root: once the tree is gone and the state
        claimed (or discarded) the enclave lets the duplicate go, and the
        application's ``attach`` lets it go too (``__mig_unhold``).  Not for a
        post-copy tree: no other agent can open its page window.  A hold refused
        (an older runtime) leaves the window as it was; the migration goes on.
        """

        engine = enclave.engine
        if (
            enclave.held or engine is None or engine.link is None or engine.info is None
            or self.restored is None or self.root is None or self.window is not None
        ):  # fmt: skip
            return
        enclave.held = True
        nonce = secrets.token_bytes(16)
        try:
            fd = engine.link.hold(self.root, nonce)
        except (MigSGXError, OSError) as exc:
            log.warning("migration %s: enclave %d keeps no duplicate of its connection (%s): "
                        "the agent's death after its claim would end it", self.tag,
                        enclave.index, exc)  # fmt: skip
            return
        pid = engine.info.pid
        started = start_time(pid)  # (as text, as :func:`.holders.take_held` reads it)
        entry = [pid, fd, str(started) if started else "", nonce.hex()]
        info = cbor2.dumps(info_to_wire(engine.info)).hex()
        with self._holds_lock:
            self._holds[enclave.index] = (entry, info)
            if self._finished:
                return  # (the session ended meanwhile: its record is gone, and stays so)
            record = self._held_record(self.restored)
            record.answered = True
            held = [self._holds[i] for i in sorted(self._holds)]
            record.holders = [h[0] for h in held]
            record.holder_infos = [h[1] for h in held]
            try:
                record.write(self._records())
            except OSError as exc:  # (the claim goes on: the enclave lives either way)
                log.warning("migration %s: enclave %d's hold is not recorded (%s): a "
                            "restarted agent could not take it back", self.tag,
                            enclave.index, exc)  # fmt: skip

    def _intent_record(self) -> HeldRecord:
        """The record of a restore not yet returned (:mod:`.held`): a container's
        name; a process tree's root once CRIU made it (:meth:`_record_made_tree`)."""

        assert self.driver is not None
        return HeldRecord(
            self.session_id.hex(), 0, 0, self.driver.name, self.peer, self.local_address, [],
            handle={k: str(self.target[k]) for k in ("id", "name") if k in self.target},
            answered=False, restoring=True, lazy_pages=self._lazy_pages(),
        )  # fmt: skip

    def _record_made_tree(self, root: int) -> None:
        """CRIU restored every task of the process tree, rooted at ``root`` (its pid
        here, the images' pids being those inside its pid namespace), and waits for
        this answer before it lets them go: the intent names the tree from now on
        (pid and start time), so that a restarted agent kills exactly it."""

        record = self._intent_record()
        record.root, record.start = root, start_time(root)
        record.write(self._records())

    def _held_record(self, restored: Restored) -> HeldRecord:
        """The record of the restored tree (:mod:`.held`), not yet answered."""

        assert self.driver is not None
        pid = restored.pid
        return HeldRecord(
            self.session_id.hex(), pid, start_time(pid), self.driver.name, self.peer,
            self.local_address,
            [cbor2.dumps(info_to_wire(e.source_info)).hex() for e in self.enclaves],
            [e.engine.migration_id.hex() if e.engine else "" for e in self.enclaves],
            {k: str(v) for k, v in restored.handle.items()},
            [[p, start_time(p)] for p in self.enclave_pids()],
            answered=False, lazy_pages=self._lazy_pages(),
        )  # fmt: skip

    def _lazy_pages(self) -> list[int]:
        """The post-copy window's ``criu lazy-pages`` daemon as [pid, start time]."""

        if self.window is None:
            return []
        pid = self.window.post.daemon.pid
        return [pid, start_time(pid)]

    def _restore_lazy(self, port: Any, corrupt: bool) -> Restored:
        """The tree from the images, held; its private memory stays on the source."""

        assert self.images_dir is not None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProtocolError("post-copy: restore names the port the source serves pages on")
        if corrupt:
            _corrupt_images(self.images_dir)
        ident = self.config.identity
        # Pages come only from the authenticated peer of this session, in TLS.
        post = PostCopyRestore(
            self.config.criu, self.images_dir, (self.peer, port),
            tls=(ident.ca, ident.cert, ident.key),
        )  # fmt: skip
        driver, images = self.driver, self.images_dir
        assert driver is not None
        if driver.name == "pid":
            self.window = Window(post, self.config.io_timeout, self.tag)
            self._intent_record().write(self._records())  # (now with the daemon: :mod:`.held`)

            def notify(script: str, root: int) -> None:
                if script == "post-restore" and root > 0:
                    self._record_made_tree(root)

            pid = post.restore(notify, run=False, file_locks=True, tcp_close=self.tcp_close)
            return Restored(pid=pid, label=f"process {pid}")
        # A container: its engine restores (``restore --lazy-pages``, held), and a
        # tree killed in the window goes with its container.
        made: list[Restored] = []

        def by_engine() -> int:
            made.append(driver.restore(RestoreRequest(
                images=images, target=self.target, tcp_close=self.tcp_close, lazy_pages=True,
                owner=self.session_id.hex(),
            )))  # fmt: skip
            return made[0].pid

        def lost() -> None:
            with contextlib.suppress(MigSGXError):
                driver.discard(made[0])

        self.window = Window(post, self.config.io_timeout, self.tag, on_lost=lost)
        self._intent_record().write(self._records())  # (now with the daemon: :mod:`.held`)
        post.restore(run=False, by=by_engine)
        return made[0]
