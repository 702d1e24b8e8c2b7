"""Prometheus metrics of the daemon (``prometheus_client``), served on ``--metrics-port``.

Names follow Prometheus conventions: ``_total`` counters, base units (bytes, seconds), a
``reason`` label on failures and refusals and a ``stage`` label on the stage-duration histogram.
A *failure* is a snapshot the daemon took and could not write (``io_error``, ``commit_error``,
...); a *refusal* is a request it declined before writing anything (``already_committed``,
``invalid_request``, ``stopping``, ...): the caller's to fix, not the disk's, so it is counted
apart (``ckptd_snapshots_refused_total``). The registry also carries the process collector
(``process_*``), the Python platform and GC collectors, and ``ckptd_build_info``.

Counters are updated on the event loop; scrapes run on the HTTP server's threads
(``ckptd.daemon.httpd``), never on the loop, so a slow scraper cannot stall it.
"""

from __future__ import annotations

import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ckptd import __version__
from ckptd.protocol import PROTOCOL_VERSION

#: Histogram buckets for stage durations, in seconds.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# The ``*_created`` series of every counter would double the exposition for no use here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class _Gauges(Collector):
    """Gauges read at scrape time (on the HTTP thread: each read must be safe off the loop)."""

    def __init__(self, gauges: dict[str, Callable[[], float]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterable[Metric]:
        for name, read in sorted(self._gauges.items()):
            yield GaugeMetricFamily(f"ckptd_{name}", name.replace("_", " ").capitalize() + ".", value=read())


class Metrics:
    """The daemon's counters (also read by ``status``) and the Prometheus registry that exports them."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.committed = 0
        self.failed: dict[str, int] = defaultdict(int)
        self.refused: dict[str, int] = defaultdict(int)
        self.last_commit_unix = 0.0
        #: ``name -> read()``, exported as ``ckptd_<name>`` gauges (set by the daemon).
        self.gauges: dict[str, Callable[[], float]] = {}
        self.registry = r = CollectorRegistry()
        self._bytes = Counter("ckptd_bytes_written", "Shard bytes committed.", registry=r)
        self._committed = Counter("ckptd_snapshots_committed", "Snapshots committed.", registry=r)
        self._failed = Counter(
            "ckptd_snapshots_failed",
            "Snapshots taken and not written (I/O and internal failures), by reason.",
            ["reason"],
            registry=r,
        )
        self._refused = Counter(
            "ckptd_snapshots_refused",
            "Snapshot requests refused before anything was written (the caller's to fix), by reason.",
            ["reason"],
            registry=r,
        )
        self._last_commit = Gauge(
            "ckptd_last_commit_timestamp_seconds", "Unix time of the last commit.", registry=r
        )
        self._stages = Histogram(
            "ckptd_stage_duration_seconds",
            "Time spent in each pipeline stage.",
            ["stage"],
            buckets=BUCKETS_S,
            registry=r,
        )
        Info("ckptd_build", "The ckptd daemon's version and wire protocol.", registry=r).info(
            {"version": __version__, "protocol": str(PROTOCOL_VERSION), "python": platform.python_version()}
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_Gauges(self.gauges))

    def commit(self, nbytes: int, stages: dict[str, float]) -> None:
        self.committed += 1
        self.bytes_written += nbytes
        self.last_commit_unix = time.time()
        self._committed.inc()
        self._bytes.inc(nbytes)
        self._last_commit.set(self.last_commit_unix)
        for stage, seconds in stages.items():
            self._stages.labels(stage=stage).observe(seconds)

    def fail(self, reason: str) -> None:
        """A snapshot the daemon took failed (``Failed.code``)."""
        self.failed[reason] += 1
        self._failed.labels(reason=reason).inc()

    def refuse(self, reason: str) -> None:
        """A snapshot request was refused before anything was written (``Failed.code``)."""
        self.refused[reason] += 1
        self._refused.labels(reason=reason).inc()

    def render(self) -> str:
        """The Prometheus text exposition of everything above."""
        return prometheus_client.generate_latest(self.registry).decode()
