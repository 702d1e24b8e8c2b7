"""``python -m bench.multirank [--quick] [--worlds 2,4] [--out DIR]``: ckptd against
``dcp.async_save`` and ``dcp.save`` under ``torchrun`` (gloo, CPU), DDP and FSDP2 state.

For each world size and workload the harness starts a real ``ckptd serve`` (root under
``DIR/scratch``), runs ``bench/multirank_worker.py`` on W ranks (every system on the same state
in the same job, interleaved), measures the disk limit for the job's unique bytes, and stops the
daemon; torchrun runs in its own process group, killed whatever happens. The table goes to
stdout, every figure to ``DIR/results.json``, the ranks' and daemons' logs to ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import multirank_report as report
from bench.daemon import Daemon

log = logging.getLogger("bench.multirank")
REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "multirank_worker.py"
SYSTEMS = ("ckptd", "dcp_async", "dcp_save")
WORKLOADS = ("ddp", "fsdp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multirank", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny state, one rep: shows the harness works")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multirank")
    p.add_argument("--worlds", default="2,4", help="comma-separated world sizes (ranks on this node)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of ddp,fsdp")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of systems")
    p.add_argument("--mb-per-rank", type=float, default=None, help="state per rank, MB (250; quick 8)")
    p.add_argument("--hidden", type=int, default=None, help="width of the model's layers (1024; quick 256)")
    p.add_argument("--shard-size", default=None, help="ckptd's max_shard_size (32MB; quick 1MB)")
    p.add_argument("--reps", type=int, default=None, help="measured reps after a warm-up (3; quick 1)")
    p.add_argument("--timeout-s", type=float, default=None, help="per torchrun job (1200; quick 300)")
    p.add_argument("--daemon-args", default="", help="extra `ckptd serve` arguments")
    args = p.parse_args(argv)
    args.mb_per_rank = args.mb_per_rank or (8.0 if args.quick else 250.0)
    args.hidden = args.hidden or (256 if args.quick else 1024)
    args.shard_size = args.shard_size or ("1MB" if args.quick else "32MB")
    args.reps = args.reps or (1 if args.quick else 3)
    args.timeout_s = args.timeout_s or (300.0 if args.quick else 1200.0)
    args.worlds = [int(w) for w in args.worlds.split(",") if w]
    if any(w < 2 for w in args.worlds):
        p.error("--worlds: each world size must be at least 2")
    for name, allowed in (("systems", SYSTEMS), ("workloads", WORKLOADS)):
        chosen = [s for s in getattr(args, name).split(",") if s]
        bad = set(chosen) - set(allowed)
        if bad:
            p.error(f"unknown {name} {sorted(bad)}; choose from {allowed}")
        setattr(args, name, chosen)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun(cmd: list[str], log_path: Path, timeout_s: float) -> int:
    """Run ``cmd``; its status (-1: timed out). torchrun starts each rank in a session of its
    own, so killing its process group would leave them: the processes under it are collected
    while it runs and every one still there is killed after, whatever happened."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    seen: dict[int, psutil.Process] = {}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error):
                    seen.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(1.0)
            log.error("torchrun %d ran past %.0fs; killing it and its ranks", proc.pid, timeout_s)
            return -1
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in seen.values():
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil refuses a pid reused by another process
            psutil.wait_procs(list(seen.values()), timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out.absolute()
        self.scratch = self.out / "scratch"
        self.logs = self.out / "logs"
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ckmr-", dir="/tmp"))  # sun_path < 108 bytes
        self.errors: list[str] = []

    def job(self, world: int, workload: str) -> dict[str, Any]:
        """One torchrun job: every system on ``workload`` at ``world`` ranks."""
        from bench import limits

        args, name = self.args, f"{workload}-w{world}"
        job_out = self.scratch / name
        job_out.mkdir(parents=True)
        daemon = None
        if "ckptd" in args.systems:
            sock = self.sock_dir / f"{name}.sock"
            root = self.scratch / f"ckptd-root-{name}"
            daemon = Daemon(sock, root, self.logs / f"daemon-{name}.log", *shlex.split(args.daemon_args))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
            "--workload", workload, "--out", str(job_out), "--systems", ",".join(args.systems),
            "--mb-per-rank", str(args.mb_per_rank), "--hidden", str(args.hidden),
            "--shard-size", args.shard_size, "--reps", str(args.reps),
            "--settle-s", "0" if args.quick else "0.5", "--timeout-s", str(args.timeout_s / 2),
        ]  # fmt: skip
        if daemon is not None:
            cmd += ["--socket", str(daemon.socket_path)]
        log.info("job %s: %s", name, shlex.join(cmd))
        started = time.monotonic()
        try:
            rc = torchrun(cmd, self.logs / f"torchrun-{name}.log", args.timeout_s)
        finally:
            stats = daemon.stop() if daemon is not None else {}
        ranks = [job_out / f"rank-{r}.json" for r in range(world)]
        found = [json.loads(p.read_text()) for p in ranks if p.exists()]
        log.info("job %s done in %.0fs (exit %d)", name, time.monotonic() - started, rc)
        if rc != 0 or len(found) < world:
            self.errors.append(f"{name}: torchrun exited {rc}; see {self.logs}/torchrun-{name}.log")
            return {"error": f"torchrun exited {rc}", "world_size": world, "workload": workload}
        unique = found[0]["unique_bytes"]
        disk = limits.disk_limit(unique, self.scratch / "disk", reps=1 if args.quick else 3)
        shutil.rmtree(job_out, ignore_errors=True)
        return report.summarize(found, disk, stats)

    def run(self) -> dict[str, Any]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, Any] = {}
        for workload in self.args.workloads:
            for world in self.args.worlds:
                jobs[f"{workload}-w{world}"] = self.job(world, workload)
        return {"jobs": jobs, "errors": self.errors}

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the finally blocks stop the ranks and the daemon


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.join([sys.executable, "-m", "bench.multirank", *(sys.argv[1:] if argv is None else argv)])
    print(f"$ {command}", flush=True)
    started = time.time()
    harness = Harness(args)
    data: dict[str, Any] = {"command": command, "quick": args.quick, "cpus": os.cpu_count()}
    data["started"] = datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds")
    data["load_avg_start"] = os.getloadavg()
    try:
        data |= harness.run()
    finally:
        harness.close()
    data["elapsed_s"] = round(time.time() - started, 1)
    data["load_avg_end"] = os.getloadavg()
    data["targets"] = report.targets(data["jobs"])
    (args.out / "results.json").write_text(json.dumps(report.finite(data), indent=1))
    print(report.table(data), flush=True)
    print(f"\nwrote {args.out / 'results.json'} in {data['elapsed_s']:.0f}s")
    for e in data["errors"]:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
