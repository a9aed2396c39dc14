"""One ``criu swrk`` process and its socket, for exactly one request.

The RPC client (:mod:`.rpc`) builds a request from the caller's options; this
module owns the process's lifetime: it starts CRIU (in the namespaces asked for,
:mod:`.enter`), sends the request, answers each NOTIFY through the caller's
callback, reaps or kills CRIU and whatever it left half restored, and turns
every failure into a :class:`~migsgx.errors.CriuError` with CRIU's own words and
its log's end.  Nothing received is evaluated: messages are decoded only as the
declared protobuf schema.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from migsgx import _proc
from migsgx.criu.cancel import DumpCancel
from migsgx.criu.enter import Enter
from migsgx.criu.keeplog import harmless, keep_log, log_excerpt
from migsgx.errors import CriuError

__all__ = ["NotifyCallback", "Session"]


#: ``notify(script, pid)``: CRIU's action name and, where CRIU sends one
#: (``setup-namespaces``, ``post-restore``), the pid of the root task, else 0.
NotifyCallback = Callable[[str, int], None]


_MAX_MESSAGE: Final = 1 << 20


_MAX_FDS: Final = 16


_EXIT_GRACE: Final = 10.0


class Session:
    """One ``criu swrk`` process and its socket, for exactly one request."""

    def __init__(
        self,
        binary: Path,
        enter: Enter | None,
        timeout: float | None,
        action: str,
        log_path: Path | None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.action = action
        self.log_path = log_path
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by run())
        argv = [*(enter.argv_prefix() if enter else []), str(binary), "swrk", str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(), *pass_fds),
                stdin=subprocess.DEVNULL,
                stdout=self.stderr,
                stderr=self.stderr,
            )
        except OSError as exc:
            ours.close()
            self.stderr.close()
            raise CriuError(f"cannot start {argv[0]}: {exc}", action=action) from exc
        finally:
            theirs.close()
        ours.settimeout(timeout)

    def run(
        self, pb: Any, req: Any, notify: NotifyCallback | None, cancel: DumpCancel | None = None
    ) -> Any:
        failed: tuple[str, Exception] | None = None
        try:
            self._send(req)
            while True:
                resp = self._receive(pb)
                if resp.type != pb.NOTIFY:
                    break
                script = str(resp.notify.script)
                ok = True
                if notify is not None or cancel is not None:
                    try:
                        if cancel is not None:
                            cancel.check()  # a cancelled dump says no at its next step
                        if notify is not None:
                            notify(script, int(resp.notify.pid))
                    except Exception as exc:
                        ok = False
                        if failed is None:
                            failed = (script, exc)
                self._send(pb.criu_req(type=pb.NOTIFY, notify_success=ok))
            if resp.type != req.type:
                raise self._error(f"answered a {req.type} request with type {resp.type}")
            self._reap()
            if failed is not None:
                failed_script, cause = failed
                raise self._error(
                    f"{failed_script} callback failed ({type(cause).__name__}: {cause}); "
                    f"CRIU {'still succeeded' if resp.success else 'aborted'}",
                    resp,
                    notify_script=failed_script,
                ) from cause
            if not resp.success:
                raise self._error("failed", resp)
            return resp
        except BaseException:
            self._abort()
            raise
        finally:
            self.sock.close()
            self.stderr.close()

    def _send(self, msg: Any) -> None:
        try:
            self.sock.send(msg.SerializeToString())
        except OSError as exc:
            raise self._error(f"cannot send request: {exc}") from exc

    def _receive(self, pb: Any) -> Any:
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
            )
        except TimeoutError as exc:
            raise self._error("timed out waiting for CRIU") from exc
        except OSError as exc:
            raise self._error(f"cannot receive: {exc}") from exc
        # CRIU may pass a descriptor with a notification (orphan-pts-master);
        # nothing here uses it, so it is closed at once.
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            self._wait_exit()
            raise self._error("exited without an answer")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise self._error("sent an oversize message")
        try:
            return pb.criu_resp.FromString(data)
        except Exception as exc:  # the protobuf runtime's DecodeError
            raise self._error(f"sent an undecodable message: {exc}") from exc

    def _reap(self) -> None:
        """CRIU exits after its answer; reap it (and kill it if it lingers)."""

        self.sock.close()
        try:
            self.proc.wait(timeout=_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self._abort()

    def _abort(self) -> None:
        if self.proc.poll() is None:
            # A restore that is cut short (a timeout, a damaged image that makes
            # CRIU's restorer spin) leaves half-restored tasks below CRIU: they
            # go first, so nothing of them lingers (a held socket name, say).
            for pid in _proc.descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=_EXIT_GRACE)

    def _wait_exit(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_EXIT_GRACE)

    def _stderr_text(self) -> str:
        if self.stderr.closed:
            return ""
        try:
            self.stderr.seek(0)
            return self.stderr.read(16384).decode("utf-8", errors="replace").strip()
        except OSError:
            return ""

    def _error(self, what: str, resp: Any = None, **context: Any) -> CriuError:
        parts = [f"criu {self.action} {what}"]
        errno_ = errmsg = None
        if resp is not None:
            if resp.HasField("cr_errno") and resp.cr_errno:
                errno_ = int(resp.cr_errno)
                parts.append(f"errno {errno_} ({os.strerror(errno_)})")
            if resp.HasField("cr_errmsg") and resp.cr_errmsg:
                # CRIU reports the first error it logged, which may be noise.
                errmsg = str(resp.cr_errmsg).strip()
                if not harmless(errmsg):
                    parts.append(f"CRIU says: {errmsg}")
        status = self.proc.poll()
        if status not in (None, 0):
            parts.append(f"exit status {status}")
        stderr = self._stderr_text()
        if stderr:
            parts.append(f"stderr: {stderr}")
        if resp is not None and resp.success and resp.HasField("restore"):
            # A callback failed but CRIU went on (it ignores failed answers to
            # pre-resume and post-resume): the tree runs, and the caller needs
            # its pid to decide what to do with it.
            context["restored_pid"] = int(resp.restore.pid)
        excerpt = ""
        if self.log_path is not None:
            keep_log(self.log_path, f"criu {self.action}")
            excerpt = log_excerpt(self.log_path)
        if excerpt:
            parts.append(f"log {self.log_path}:\n{excerpt}")
        return CriuError(
            "; ".join(parts),
            action=self.action,
            cr_errno=errno_,
            cr_errmsg=errmsg,
            log_path=str(self.log_path) if self.log_path is not None else None,
            **context,
        )
