"""The migration tool's side of the application control protocol (:mod:`migsgx.host.appctl`).

The application runs the server (``host/appctl.py``, inside its own process);
the agent and the ``checkpoint`` command are its only clients, so the client
lives here, beside them, and the application never imports process-tree code.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..host.appctl import CONTROL_PREFIX, REQUEST_TIMEOUT, AppControlError
from ..host.appctl_wire import (
    APPCTL,
    APPCTL_FRAME_MAX,
    check_image_files,
    close_fds,
    info_from_wire,
    info_to_wire,
    recv_frame_fds,
    send_frame_fds,
)
from ..host.client import EnclaveInfo
from ..system.process import abstract_listeners, socket_in_netns, tree_pids

__all__ = ["AppLink", "HandedEnclave", "find_control"]


@dataclass
class HandedEnclave:
    """One enclave connection handed over by ``prepare``."""

    index: int
    info: EnclaveInfo
    image_files: dict[str, bytes]
    sock: socket.socket


def find_control(root: int) -> tuple[int, str] | None:
    """The process of tree ``root`` that listens for migration control, and its name."""

    for pid in tree_pids(root):
        for name in abstract_listeners(pid, CONTROL_PREFIX):
            return pid, name
    return None


class AppLink:
    """The migration tool's (or agent's) link to one cooperating application."""

    def __init__(self, pid: int, name: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.pid = pid
        self.name = name
        self.timeout = timeout

    @classmethod
    def find(cls, root: int, *, timeout: float = REQUEST_TIMEOUT) -> AppLink | None:
        found = find_control(root)
        return None if found is None else cls(found[0], found[1], timeout=timeout)

    def _request(
        self, msg: Mapping[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        sock = socket_in_netns(self.pid, socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect("\0" + self.name)
                send_frame_fds(sock, msg, fds, max_size=APPCTL_FRAME_MAX)
                reply, got = recv_frame_fds(sock, APPCTL, max_size=APPCTL_FRAME_MAX)
            except OSError as exc:
                raise AppControlError(f"application {self.pid}: {msg['t']} failed: {exc}") from exc
            try:
                # The application closes first: after this it holds no link to us.
                if sock.recv(1):
                    raise AppControlError("the application sent more than one answer")
            except BaseException:
                close_fds(got)
                raise
        if reply["t"] == "err":
            close_fds(got)
            raise AppControlError(
                f"application {self.pid} refused {msg['t']}: [{reply['code']}] {reply['message']}"
            )
        return reply, got

    def side(self) -> list[HandedEnclave]:
        """Side channels for a live migration's rounds (the application keeps its own)."""

        return self._handed_enclaves(*self._request({"t": "side"}))

    def prepare(self, timeout: float = 30.0) -> list[HandedEnclave]:
        return self._handed_enclaves(*self._request({"t": "prepare", "timeout": timeout}))

    def _handed_enclaves(self, reply: dict[str, Any], fds: list[int]) -> list[HandedEnclave]:
        try:
            items = reply.get("enclaves")
            if reply["t"] != "prepared" or not isinstance(items, list) or len(items) != len(fds):
                raise AppControlError("malformed prepare answer")
            out = [
                HandedEnclave(
                    i,
                    EnclaveInfo(**info_from_wire(item["info"])),
                    check_image_files(item["image_files"]),
                    socket.socket(fileno=fd),
                )
                for i, (item, fd) in enumerate(zip(items, fds, strict=True))
            ]
        except BaseException:
            close_fds(fds)
            raise
        return out

    def resume(self, socks: Sequence[socket.socket]) -> int:
        reply, _ = self._request({"t": "resume"}, [s.fileno() for s in socks])
        return int(reply.get("enclaves", 0))

    def attach(self, socks: Sequence[socket.socket], infos: Sequence[EnclaveInfo]) -> int:
        msg = {"t": "attach", "enclaves": [info_to_wire(i) for i in infos]}
        reply, _ = self._request(msg, [s.fileno() for s in socks])
        return int(reply.get("enclaves", 0))

    def status(self) -> dict[str, Any]:
        reply, _ = self._request({"t": "status"})
        return reply
