"""Prometheus metrics of an agent: ``migsgx agent serve --metrics ADDRESS:PORT``.

The agent is the destination of migrations, so what it can tell is what
arrives: every migration's outcome, how long each of its phases took on this
side, how many bytes came in, which are held and not yet decided (in doubt:
the restored tree waits for the commit, and only the source host's decision
record settles it), the enclaves it is receiving or received, by host, and
which control protocol versions the tools that connect speak (during a rolling
upgrade: once no tool of version 1 arrives any more, ``--min-protocol 2``).
Metric names and labels are listed in ``docs/operations.md``.

Each agent has a registry of its own (not the library's global one), served
by ``prometheus_client``'s HTTP server on a thread; nothing is served unless
``--metrics`` is given.  No label carries a secret or anything a peer chose
freely: drivers and outcomes are from fixed sets, host ids come from the
peer's certificate-checked hello and are bounded in length.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .versions import VERSION

__all__ = ["OUTCOMES", "PHASES", "AgentMetrics"]

#: How a migration into this host ended.
OUTCOMES: Final = ("committed", "aborted", "rolled_forward", "failed")
#: Phases timed on the destination.
PHASES: Final = ("enclave_receive", "images", "restore", "resume", "post_copy_window")
BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MAX_LABEL: Final = 64


class AgentMetrics:
    """The metrics of one agent, and their HTTP endpoint once :meth:`serve` ran."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id[:MAX_LABEL]
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter(
            "migsgx_migrations", "Migrations into this host, by outcome and driver",
            ["outcome", "driver"], registry=r,
        )  # fmt: skip
        self.phase_seconds = Histogram(
            "migsgx_migration_phase_seconds", "Duration of each destination-side phase",
            ["phase"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "migsgx_migration_bytes", "Bytes received, by kind (enclave state, images)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.enclaves_received = Counter(
            "migsgx_enclaves_received", "Enclaves loaded here, by the host they came from",
            ["source_host"], registry=r,
        )  # fmt: skip
        self.in_progress = Gauge(
            "migsgx_migrations_in_progress", "Migrations into this host under way", registry=r
        )
        self.in_doubt = Gauge(
            "migsgx_migrations_in_doubt",
            "Migrations whose restored tree is held here awaiting the commit decision",
            registry=r,
        )
        self.enclaves = Gauge(
            "migsgx_enclaves_incoming", "Enclaves being received into this host, by host",
            ["host"], registry=r,
        )  # fmt: skip
        self.control_sessions = Counter(
            "migsgx_control_sessions",
            "Control connections greeted, by the protocol version agreed (refused: none)",
            ["version"], registry=r,
        )  # fmt: skip
        for label in (*(str(v) for v in range(1, VERSION + 1)), "refused"):
            self.control_sessions.labels(label)
        for outcome in OUTCOMES:
            for driver in ("pid", "runc", "podman", "containerd"):
                self.migrations.labels(outcome, driver)
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        for kind in ("enclave", "images"):
            self.bytes.labels(kind)
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    def track(self, in_doubt: Callable[[], int], incoming_enclaves: Callable[[], int]) -> None:
        """Gauges read at scrape time from the agent's live sessions."""

        self.in_doubt.set_function(lambda: float(in_doubt()))
        self.enclaves.labels(self.host_id).set_function(lambda: float(incoming_enclaves()))

    def observe_phase(self, phase: str, seconds: float) -> None:
        if phase in PHASES and seconds >= 0:
            self.phase_seconds.labels(phase).observe(seconds)

    def finished(self, outcome: str, driver: str) -> None:
        if outcome in OUTCOMES:
            self.migrations.labels(outcome, driver[:MAX_LABEL]).inc()

    def greeted(self, version: int | None) -> None:
        """A ``hello`` answered with ``version`` (None: refused for its version)."""

        if version is None or 1 <= version <= VERSION:
            self.control_sessions.labels("refused" if version is None else str(version)).inc()

    def serve(self, address: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``address:port`` (port 0: any); returns the bound address."""

        server, thread = start_http_server(port, addr=address, registry=self.registry)
        self._server, self._thread = server, thread
        host, bound = server.server_address[:2]
        return str(host), int(bound)

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None
