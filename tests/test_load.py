"""Load and leaks: several training processes on one daemon, and many snapshot cycles.

- Four trainer processes (forked from one process that imported torch once) snapshot 50 steps
  each, each to its own run, all at once: every snapshot commits and verifies, every process
  finishes in comparable time (no starvation), and the daemon's RSS stays within the client
  arenas it maps plus a fixed overhead, without growing with the number of snapshots.
- 100 snapshot cycles of one client: its RSS, descriptors and memfd mappings, and the daemon's
  RSS and descriptors, stay flat after warm-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DaemonProc
from helpers import memfd_mappings, open_fds, wait_until

import ckptd
from ckptd import paths
from client import Client

MiB = 2**20
PROCESSES = 4
SNAPSHOTS = 50

# Each trainer: connect, say ready, wait for "go", snapshot SNAPSHOTS steps (two slots, so one
# stages while the other is written), wait for every commit, report what it saw as JSON. After
# each snapshot() it samples the daemon's RSS, so the samples follow the run's progress (one per
# snapshot, however fast the machine), not the clock.
ZYGOTE = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from client import Client

    sock, out, processes, snapshots = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    daemon_pid = int(sys.argv[5])

    def daemon_rss():
        with open(f"/proc/{daemon_pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def trainer(i):
        c = Client.connect(sock, autostart=False, run=f"p{i}")
        g = torch.Generator().manual_seed(i)
        state = {"model": {"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g)}}
        open(f"{out}/ready-{i}", "w").close()
        while not os.path.exists(f"{out}/go"):
            time.sleep(0.005)
        start = time.monotonic()
        handles, rss = [], []
        for step in range(1, snapshots + 1):
            state["model"]["b"][0] = float(step)  # every step differs
            state["step"] = step
            handles.append(c.snapshot(state, step=step))
            rss.append(daemon_rss())
        infos = [h.wait(120) for h in handles]
        elapsed = time.monotonic() - start
        c.close()
        result = {
            "steps": [info.step for info in infos],
            "elapsed_s": elapsed,
            "stall_s": [info.stall_s for info in infos],
            "durable_s": [info.durable_s for info in infos],
            "daemon_rss": rss,
        }
        with open(f"{out}/result-{i}.json", "w") as f:
            json.dump(result, f)

    pids = []
    for i in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                trainer(i)
            except BaseException as e:
                print(f"trainer {i}: {e!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    sys.exit(max(codes))
    """
)


class RssSampler:
    """Samples a process's RSS every ``period_s`` on a thread (for its peak: how many samples a
    run gets depends on the machine's speed)."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self._period = period_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self._period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def daemon_fds(d: DaemonProc) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


@pytest.mark.slow
def test_four_trainers_snapshot_at_once(
    start_daemon: Callable[..., DaemonProc],
    connect: Callable[..., Client],
    workdir: Path,
    record_property: Callable[[str, object], None],
) -> None:
    d = start_daemon()
    out = workdir / "load"
    out.mkdir()
    args = [str(d.socket), str(out), str(PROCESSES), str(SNAPSHOTS), str(d.proc.pid)]
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: all((out / f"ready-{i}").exists() for i in range(PROCESSES)) or zygote.poll() is not None,
            timeout_s=120,
            what="trainers ready",
        )
        assert zygote.poll() is None, zygote.communicate()
        baseline = psutil.Process(d.proc.pid).memory_info().rss
        with RssSampler(d.proc.pid) as rss:
            (out / "go").touch()
            _, err = zygote.communicate(timeout=180)
    finally:
        if zygote.poll() is None:
            zygote.kill()
            zygote.wait()
    assert zygote.returncode == 0, err

    results = [json.loads((out / f"result-{i}.json").read_text()) for i in range(PROCESSES)]
    committed = lost = 0
    for i, r in enumerate(results):
        assert r["steps"] == list(range(1, SNAPSHOTS + 1))
        run_dir = d.root / f"p{i}"
        for step in r["steps"]:
            path = run_dir / paths.step_dirname(step)
            committed += 1
            if not path.is_dir() or ckptd.verify(path) != []:
                lost += 1
                continue
            loaded = ckptd.load(path)
            if loaded["step"] != step or loaded["model"]["b"][0].item() != float(step):
                lost += 1
        assert paths.read_latest(run_dir) == paths.step_dirname(SNAPSHOTS)
    record_property("runs", PROCESSES)
    record_property("committed", committed)
    record_property("lost", lost)
    assert lost == 0

    # No starvation: every process finished, in comparable time.
    elapsed = [r["elapsed_s"] for r in results]
    record_property("elapsed_s", json.dumps([round(e, 2) for e in elapsed]))
    assert max(elapsed) < 3 * min(elapsed) + 2.0, elapsed

    observer = connect(d)
    status = observer.status()
    assert status.committed == PROCESSES * SNAPSHOTS and status.failed == 0
    check_daemon_rss(baseline, rss.samples, [r["daemon_rss"] for r in results], record_property)


def check_daemon_rss(
    baseline: int, timed: list[int], by_step: list[list[int]], record_property: Callable[[str, object], None]
) -> None:
    """Daemon memory: within the arenas it maps plus a fixed overhead, and flat over the run.
    ``timed``: samples on a clock (for the peak); ``by_step``: each trainer's, one per snapshot."""
    arena_bytes = PROCESSES * 2 * 2 * MiB  # two 2 MiB slots per trainer (the arena rounding)
    # Flat: the first and last quarter of the snapshots each have PROCESSES * SNAPSHOTS / 4
    # samples, whatever the machine's speed.
    assert all(len(samples) == SNAPSHOTS for samples in by_step), [len(s) for s in by_step]
    quarter = SNAPSHOTS // 4
    early = max(max(samples[:quarter]) for samples in by_step)
    late = max(max(samples[-quarter:]) for samples in by_step)
    peak = max([*timed, *(x for samples in by_step for x in samples)])
    mib = {"baseline": baseline, "peak": peak, "early": early, "late": late}
    record_property("daemon_rss_mib", json.dumps({k: v // MiB for k, v in mib.items()}))
    assert peak <= baseline + arena_bytes + 64 * MiB, (baseline // MiB, peak // MiB)
    assert late <= early + 16 * MiB, f"daemon RSS grew from {early // MiB} to {late // MiB} MiB"


@pytest.mark.slow
def test_hundred_cycles_keep_client_and_daemon_resources_flat(
    daemon: DaemonProc, client: Client, record_property: Callable[[str, object], None]
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters())
    me = psutil.Process()
    them = psutil.Process(daemon.proc.pid)

    def cycle(step: int) -> None:
        opt.zero_grad()
        model(torch.randn(8, 256)).sum().backward()
        opt.step()
        info = client.snapshot({"model": model, "optimizer": opt, "step": step}, step=step).wait(30)
        assert info is not None

    for step in range(20):  # warm-up: arenas sized, allocator and caches settled
        cycle(step)
    time.sleep(0.2)
    before = {
        "client_rss": me.memory_info().rss,
        "client_fds": open_fds(),
        "client_memfds": memfd_mappings(),
        "daemon_rss": them.memory_info().rss,
        "daemon_fds": daemon_fds(daemon),
    }
    for step in range(20, 120):
        cycle(step)
    time.sleep(0.2)
    after = {
        "client_rss": me.memory_info().rss,
        "client_fds": open_fds(),
        "client_memfds": memfd_mappings(),
        "daemon_rss": them.memory_info().rss,
        "daemon_fds": daemon_fds(daemon),
    }
    record_property("runs", 100)
    record_property("committed", 100)
    record_property(
        "lost", sum(1 for s in (20, 60, 119) if ckptd.verify(client.root / "default" / paths.step_dirname(s)))
    )
    record_property("resources", json.dumps({k: [before[k], after[k]] for k in before}))
    assert after["client_fds"] == before["client_fds"]
    assert after["client_memfds"] == before["client_memfds"] <= 2
    assert after["daemon_fds"] == before["daemon_fds"]
    assert after["client_rss"] - before["client_rss"] < 16 * MiB, (before, after)
    assert after["daemon_rss"] - before["daemon_rss"] < 8 * MiB, (before, after)
