"""One thread per enclave: the per-enclave steps the tool runs side by side.

A migration moves every enclave of an application at once (its handshake, its
pre-copy rounds); each step runs in a thread of its own, keeps its error on its
transfer, and the caller decides what one failure means for the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from .applink import HandedEnclave

__all__ = ["each_in_thread"]


class Leg(Protocol):
    handed: HandedEnclave
    error: BaseException | None


L = TypeVar("L", bound=Leg)


def each_in_thread(transfers: Sequence[L], work: Callable[[L], None], name: str) -> L | None:
    """``work(t)`` for every transfer in parallel; returns the first that failed, if any.

    A failure is kept on its transfer (``t.error``), never raised from a thread.
    """

    def one(t: L) -> None:
        try:
            work(t)
        except BaseException as exc:
            t.error = exc

    threads = [
        threading.Thread(target=one, args=(t,), name=f"migsgx-{name}-{t.handed.index}")
        for t in transfers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return next((t for t in transfers if t.error is not None), None)
