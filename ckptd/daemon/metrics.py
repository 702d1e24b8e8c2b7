"""Prometheus metrics of the daemon, served as text on ``--metrics-port`` (``GET /metrics``).

Names follow Prometheus conventions: ``_total`` counters, base units (bytes, seconds), a
``reason`` label on failures and a ``stage`` label on the stage-duration histogram.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Histogram buckets for stage durations, in seconds.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS_S)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS_S):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Counters and histograms updated on the event loop; gauges read at scrape time."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.committed = 0
        self.failed: dict[str, int] = defaultdict(int)
        self.stage_seconds: dict[str, Histogram] = defaultdict(Histogram)
        self.last_commit_unix = 0.0
        self.gauges: dict[str, Callable[[], float]] = {}

    def commit(self, nbytes: int, stages: dict[str, float]) -> None:
        self.committed += 1
        self.bytes_written += nbytes
        self.last_commit_unix = time.time()
        for stage, seconds in stages.items():
            self.stage_seconds[stage].observe(seconds)

    def fail(self, reason: str) -> None:
        self.failed[reason] += 1

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric("ckptd_bytes_written_total", "counter", "Shard bytes committed.", [("", self.bytes_written)])
        metric("ckptd_snapshots_committed_total", "counter", "Snapshots committed.", [("", self.committed)])
        metric(
            "ckptd_snapshots_failed_total",
            "counter",
            "Snapshots failed, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.failed.items())],
        )
        metric(
            "ckptd_last_commit_timestamp_seconds",
            "gauge",
            "Unix time of the last commit.",
            [("", self.last_commit_unix)],
        )
        for name, read in sorted(self.gauges.items()):
            metric(f"ckptd_{name}", "gauge", name.replace("_", " ").capitalize() + ".", [("", read())])
        out.append("# HELP ckptd_stage_duration_seconds Time spent in each pipeline stage.")
        out.append("# TYPE ckptd_stage_duration_seconds histogram")
        for stage, h in sorted(self.stage_seconds.items()):
            for bound, n in zip(BUCKETS_S, h.counts, strict=True):  # counts are cumulative
                out.append(f'ckptd_stage_duration_seconds_bucket{{stage="{stage}",le="{bound:g}"}} {n}')
            out.append(f'ckptd_stage_duration_seconds_bucket{{stage="{stage}",le="+Inf"}} {h.count}')
            out.append(f'ckptd_stage_duration_seconds_sum{{stage="{stage}"}} {_number(h.sum)}')
            out.append(f'ckptd_stage_duration_seconds_count{{stage="{stage}"}} {h.count}')
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 responder: ``GET /metrics`` gets the text format, anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body = metrics.render().encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            else:
                body = b"not found; metrics are at /metrics\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on http://%s:%s/metrics", host, port)
    return server
