"""Relay CRIU's page stream between a local socket and the wire, sealed.

Format: ``docs/spec/pagestream.md``.

CRIU's dump (source) and ``criu page-server`` (destination) each get one end
of a local socket pair (``--ps-socket``) and speak their plain page protocol
on it; a :class:`PageRelay` on each side moves those bytes to and from the TCP
connection between the hosts in AES-GCM frames (:mod:`migsgx.core.pagestream`).
One pump thread per direction: the outgoing one gathers whatever CRIU wrote (up
to 4 MiB) into one frame, the incoming one opens frames and writes their
payload to CRIU.  An incoming frame that fails, or a stream that ends without
its last frame, shuts the local socket down, so CRIU's next read or write fails
and the step ends in an error; :meth:`PageRelay.wait` then raises
:class:`~migsgx.errors.PageStreamError`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Final

from ..core.pagestream import (
    DOWN,
    HEADER_SIZE,
    MAX_PAYLOAD,
    TAG_SIZE,
    UP,
    PageFrameOpener,
    PageFrameSealer,
    page_stream_key,
)
from ..errors import PageStreamError

__all__ = ["PageRelay", "local_pair", "relay_keys"]

#: Kernel buffer asked for the local pair: CRIU writes up to this much before the
#: relay's next read, so frames come out large.
LOCAL_BUFFER: Final = 4 << 20
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33


def local_pair() -> tuple[socket.socket, socket.socket]:
    """(relay's end, CRIU's end): a Unix stream pair with large buffers."""

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):
        for force, plain in (
            (_SO_SNDBUFFORCE, socket.SO_SNDBUF),
            (_SO_RCVBUFFORCE, socket.SO_RCVBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, LOCAL_BUFFER)
            except OSError:  # without CAP_NET_ADMIN: as much as net.core.*mem_max allows
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, plain, LOCAL_BUFFER)
    return ours, theirs


def relay_keys(data_key: bytes, session_id: bytes, *, source: bool) -> dict[str, bytes]:
    """``seal_key`` and ``open_key`` for one side: the source seals UP, the destination DOWN."""

    up, down = (page_stream_key(data_key, session_id, d) for d in (UP, DOWN))
    return {"seal_key": up, "open_key": down} if source else {"seal_key": down, "open_key": up}


def _recv_exactly(sock: socket.socket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


class PageRelay:
    """Both directions of one page connection, between ``local`` (CRIU) and ``wire``."""

    def __init__(
        self, local: socket.socket, wire: socket.socket, *, seal_key: bytes, open_key: bytes
    ) -> None:
        self.local = local
        self.wire = wire
        self._sealer = PageFrameSealer(seal_key)
        self._opener = PageFrameOpener(open_key)
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.sent = 0  # plaintext bytes sealed and sent
        self.received = 0  # plaintext bytes opened and handed to CRIU
        self._threads = [
            threading.Thread(target=self._outgoing, name="migsgx-pages-out", daemon=True),
            threading.Thread(target=self._incoming, name="migsgx-pages-in", daemon=True),
        ]

    def start(self) -> PageRelay:
        for thread in self._threads:
            thread.start()
        return self

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.close()

    def abort(self, reason: str) -> None:
        """Stop both directions at once (a cancelled dump); :meth:`wait` raises ``reason``."""

        self._fail(PageStreamError(reason))

    def close(self) -> None:
        """Shut both sockets down: CRIU's next step on its end fails, the pumps end."""

        for sock in (self.local, self.wire):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _outgoing(self) -> None:
        buf = bytearray(MAX_PAYLOAD)
        out = bytearray(HEADER_SIZE + MAX_PAYLOAD + TAG_SIZE)
        view, outv = memoryview(buf), memoryview(out)
        try:
            while True:
                n = self.local.recv_into(view)
                if n == 0:
                    break
                while n < MAX_PAYLOAD:  # gather what is there already: fewer, larger frames
                    try:
                        more = self.local.recv_into(view[n:], 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    if more == 0:
                        break
                    n += more
                size = self._sealer.seal_into(view[:n], outv)
                self.wire.sendall(outv[:size])
                self.sent += n
            if self.error is not None:
                return  # the relay failed: the stream must not look complete
            size = self._sealer.seal_into(view[:0], outv, last=True)
            self.wire.sendall(outv[:size])
            with contextlib.suppress(OSError):
                self.wire.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)

    def _incoming(self) -> None:
        header = bytearray(HEADER_SIZE)
        body = bytearray(MAX_PAYLOAD + TAG_SIZE)
        out = bytearray(MAX_PAYLOAD)
        hv, bv, ov = memoryview(header), memoryview(body), memoryview(out)
        try:
            while True:
                got = _recv_exactly(self.wire, hv)
                if got == 0:
                    self._opener.end()  # raises unless the last frame came
                    break
                if got < HEADER_SIZE:
                    raise PageStreamError("the page stream ended before its last frame")
                if self._opener.done:
                    raise PageStreamError("the page stream did not authenticate")
                size = self._opener.body_size(hv)
                if _recv_exactly(self.wire, bv[:size]) < size:
                    raise PageStreamError("the page stream ended before its last frame")
                n, _last = self._opener.open_into(bytes(header), bv[:size], ov)
                if n:
                    self.local.sendall(ov[:n])
                    self.received += n
            with contextlib.suppress(OSError):
                self.local.shutdown(socket.SHUT_WR)
        except (OSError, PageStreamError) as exc:
            self._fail(exc)

    def wait(self, timeout: float) -> None:
        """Both directions ended cleanly, else :class:`PageStreamError` (the first cause)."""

        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                self._fail(PageStreamError(f"the page stream did not end within {timeout} s"))
                thread.join(5.0)
        err = self.error
        if isinstance(err, PageStreamError):
            raise err
        if err is not None:
            raise PageStreamError(f"the page connection failed: {err}") from err

    def finish(self, timeout: float) -> None:
        """:meth:`wait`, then :meth:`dispose`."""

        try:
            self.wait(timeout)
        finally:
            self.dispose()

    def dispose(self) -> None:
        """Shut down, let the pumps end, close both sockets (idempotent)."""

        self.close()
        for thread in self._threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join(5.0)
        for sock in (self.local, self.wire):
            with contextlib.suppress(OSError):
                sock.close()
