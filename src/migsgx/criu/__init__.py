"""CRIU, driven through its RPC (``criu swrk``), and where to find a working one."""

from migsgx.criu.cancel import DumpCancel
from migsgx.criu.keeplog import KEEP_LOGS_ENV, keep_log
from migsgx.criu.locate import MIN_VERSION, CriuVersion, binary_version, find_criu
from migsgx.criu.rpc import (
    Criu,
    Enter,
    InNetns,
    InTaskNamespaces,
    NotifyCallback,
    log_excerpt,
)

__all__ = [
    "KEEP_LOGS_ENV",
    "MIN_VERSION",
    "Criu",
    "CriuVersion",
    "DumpCancel",
    "Enter",
    "InNetns",
    "InTaskNamespaces",
    "NotifyCallback",
    "binary_version",
    "find_criu",
    "keep_log",
    "log_excerpt",
]
