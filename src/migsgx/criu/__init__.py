"""CRIU, driven through its RPC (``criu swrk``), and where to find a working one."""

from migsgx.criu.cancel import DumpCancel
from migsgx.criu.enter import Enter, InNetns, InTaskNamespaces
from migsgx.criu.keeplog import KEEP_LOGS_ENV, keep_log, log_excerpt
from migsgx.criu.locate import MIN_VERSION, CriuVersion, binary_version, find_criu
from migsgx.criu.rpc import Criu
from migsgx.criu.swrk import NotifyCallback

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
