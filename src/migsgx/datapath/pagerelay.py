"""Relay CRIU's page stream between a local socket and the wire, sealed.

Format: ``docs/spec/pagestream.md``.

CRIU's dump (source) and ``criu page-server`` (destination) each get one end
of a local socket pair (``--ps-socket``) and speak their plain page protocol
on it; a :class:`PageRelay` on each side moves those bytes to and from the TCP
connection between the hosts in AES-GCM frames (:mod:`migsgx.core.pagestream`).
One pump thread per direction: the outgoing one gathers whatever CRIU wrote (up
to 4 MiB) into one frame, the incoming one opens frames and writes their
payload to CRIU.  Each pump counts its frames, receive calls and thread CPU
(``frames_out``, ``wire_receives``, ``cpu_in`` ...).  An incoming frame that
fails, or a stream that ends without its last frame, shuts the local socket
down, so CRIU's next read or write fails and the step ends in an error;
:meth:`PageRelay.wait` then raises :class:`~migsgx.errors.PageStreamError`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Final, TypedDict

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


class RelayKeys(TypedDict):
    seal_key: bytes
    open_key: bytes


def relay_keys(data_key: bytes, session_id: bytes, *, source: bool) -> RelayKeys:
    """``seal_key`` and ``open_key`` for one side: the source seals UP, the destination DOWN."""

    up, down = (page_stream_key(data_key, session_id, d) for d in (UP, DOWN))
    if source:
        return RelayKeys(seal_key=up, open_key=down)
    return RelayKeys(seal_key=down, open_key=up)


#: The most CRIU bytes an outgoing frame carries (the format allows up to
#: ``MAX_PAYLOAD``).
FRAME_BYTES: Final = MAX_PAYLOAD


class PageRelay:
    """Both directions of one page connection, between ``local`` (CRIU) and ``wire``."""

    def __init__(
        self,
        local: socket.socket,
        wire: socket.socket,
        *,
        seal_key: bytes,
        open_key: bytes,
        frame_bytes: int = FRAME_BYTES,
    ) -> None:
        """``frame_bytes``: the most CRIU bytes one outgoing frame carries."""

        if not 0 < frame_bytes <= MAX_PAYLOAD:
            raise ValueError(f"a frame carries 1 to {MAX_PAYLOAD} bytes")
        self.frame_bytes = frame_bytes
        # Each frame goes out in one ``sendall``: Nagle could only hold back its
        # tail, and CRIU's few small requests and answers, for an acknowledgement.
        with contextlib.suppress(OSError):  # (not a TCP socket)
            wire.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local = local
        self.wire = wire
        self._sealer = PageFrameSealer(seal_key)
        self._opener = PageFrameOpener(open_key)
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.sent = 0  # plaintext bytes sealed and sent
        self.received = 0  # plaintext bytes opened and handed to CRIU
        # What each pump did: frames, receive calls, its thread's CPU seconds.
        self.frames_out = self.frames_in = 0
        self.local_receives = self.wire_receives = 0
        self.cpu_out = self.cpu_in = 0.0
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
        # One frame buffer, reused: CRIU's bytes are read into ``buf`` and sealed
        # into ``out`` (header, ciphertext, tag: one ``sendall``).  AES-GCM here
        # refuses to work in place, so two buffers.
        buf = bytearray(self.frame_bytes)
        out = bytearray(HEADER_SIZE + self.frame_bytes + TAG_SIZE)
        view, outv = memoryview(buf), memoryview(out)
        cap = self.frame_bytes
        try:
            while True:
                n = self.local.recv_into(view)
                self.local_receives += 1
                if n == 0:
                    break
                while n < cap:  # gather what is there already: fewer, larger frames
                    try:
                        more = self.local.recv_into(view[n:], 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    self.local_receives += 1
                    if more == 0:
                        break
                    n += more
                size = self._sealer.seal_into(view[:n], outv)
                self.wire.sendall(outv[:size])
                self.sent += n
                self.frames_out += 1
            if self.error is not None:
                return  # the relay failed: the stream must not look complete
            size = self._sealer.seal_into(view[:0], outv, last=True)
            self.wire.sendall(outv[:size])
            self.frames_out += 1
            with contextlib.suppress(OSError):
                self.wire.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)
        finally:
            self.cpu_out = time.thread_time()

    def _fill(self, view: memoryview) -> int:
        """Fill ``view`` from the wire (fewer bytes only where the stream ended).

        Each receive takes what is there.  The wire keeps its low-water mark of
        one byte: a mark raised to what is missing of a frame (``SO_RCVLOWAT``)
        left the receive asleep with its buffer full and the window shut, the
        sender probing a zero window, and CRIU's dump waiting for good.
        """

        got, want = 0, len(view)
        while got < want:
            n = self.wire.recv_into(view[got:])
            self.wire_receives += 1
            if n == 0:
                break
            got += n
        return got

    def _incoming(self) -> None:
        # Header and body in one buffer, opened into ``out``; both reused.
        frame = bytearray(HEADER_SIZE + MAX_PAYLOAD + TAG_SIZE)
        out = bytearray(MAX_PAYLOAD)
        fv, ov = memoryview(frame), memoryview(out)
        hv = fv[:HEADER_SIZE]
        try:
            while True:
                got = self._fill(hv)
                if got == 0:
                    self._opener.end()  # raises unless the last frame came
                    break
                if got < HEADER_SIZE:
                    raise PageStreamError("the page stream ended before its last frame")
                if self._opener.done:
                    raise PageStreamError("the page stream did not authenticate")
                size = self._opener.body_size(hv)
                body = fv[HEADER_SIZE : HEADER_SIZE + size]
                if self._fill(body) < size:
                    raise PageStreamError("the page stream ended before its last frame")
                n, _last = self._opener.open_into(bytes(hv), body, ov)
                self.frames_in += 1
                if n:
                    self.local.sendall(ov[:n])
                    self.received += n
            with contextlib.suppress(OSError):
                self.local.shutdown(socket.SHUT_WR)
        except (OSError, PageStreamError) as exc:
            self._fail(exc)
        finally:
            self.cpu_in = time.thread_time()

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

    def ended(self, timeout: float) -> bool:
        """Whether both directions ended, waited for up to ``timeout`` seconds (a step
        of a longer wait; :meth:`finish` then reads how they ended)."""

        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

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
