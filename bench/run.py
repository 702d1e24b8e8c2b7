"""``python -m bench.run [--quick] [--out DIR]``: every system and the limits, side by side.

The parent process imports no torch: it starts a real ``ckptd serve`` where needed, runs each
measurement as a child (``python -m bench.run --one SYSTEM WORKLOAD ...``, a fresh process per
system and workload so memory peaks do not mix; ``--quick`` runs them all in one child), samples
the daemon's memory, and writes ``DIR/results.json``, ``DIR/chart.png`` and the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.daemon import Daemon
from bench.names import SYSTEMS, TRAIN_SYSTEMS, WORKLOADS, not_applicable

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny workloads, one child, seconds in total")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the workload tensors live")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of systems")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of workloads")
    p.add_argument(
        "--reps", type=int, default=None, help="measured checkpoints after the warm-up (5; quick 3)"
    )
    p.add_argument("--adamw-layers", type=int, default=None, help="layers of the qwen_adamw model (24)")
    p.add_argument("--train-seconds", type=float, default=None, help="per training run (20; quick 1.5)")
    p.add_argument("--no-train", action="store_true", help="skip the training-interference runs")
    p.add_argument("--train-rounds", type=int, default=None, help="interleaved training rounds (2; quick 1)")
    p.add_argument("--daemon-args", default="", help="extra `ckptd serve` arguments, e.g. '--workers 2'")
    # internal: run measurements in this process (a child of the harness) and write JSON
    p.add_argument("--one", nargs=2, action="append", metavar=("SYSTEM", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--socket", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    args.train_seconds = args.train_seconds or (1.5 if args.quick else 20.0)
    args.train_rounds = args.train_rounds or (1 if args.quick else 2)
    for name, allowed in (("systems", SYSTEMS), ("workloads", WORKLOADS)):
        chosen = [s for s in getattr(args, name).split(",") if s]
        bad = set(chosen) - set(allowed)
        if bad:
            p.error(f"unknown {name} {sorted(bad)}; choose from {allowed}")
        setattr(args, name, chosen)
    return args


def every_for(steps_per_s: float, quick: bool) -> int:
    """Checkpoint interval in steps: every 3 s of training (quick: 0.3 s), so a write fits."""
    return max(1, round(steps_per_s * (0.3 if quick else 3.0)))


# --- child ----------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """Run the ``--one`` measurements in order; each workload is built once, when first needed."""
    from bench import measure, training, workloads

    results: list[dict[str, Any]] = []
    built: dict[str, Any] = {}
    every = args.every
    for system, target in args.one:
        log.info("measuring %s %s", system, target)
        try:
            if system == "train":
                rates = [r["steps_per_s"] for r in results if r.get("task") == ["train", "none"]]
                if not every and target != "none":  # from this child's own baseline run
                    every = every_for(rates[-1], args.quick) if rates else 10
                r = training.train(
                    target,
                    seconds=args.train_seconds,
                    every=every,
                    quick=args.quick,
                    scratch=args.scratch,
                    socket_path=args.socket,
                )
            else:
                if target not in built:
                    built.clear()
                    built[target] = workloads.build(
                        target, quick=args.quick, device=args.device, adamw_layers=args.adamw_layers
                    )
                wl = built[target]
                if system == "limits":
                    r = measure.run_limits(wl, args.scratch, reps=5, disk_reps=1 if args.quick else 3)
                else:
                    r = measure.run_system(
                        system,
                        wl,
                        args.scratch,
                        reps=args.reps,
                        socket_path=args.socket,
                        settle_s=0.0 if args.quick else 0.5,
                    )
            r["task"] = [system, target]
        except Exception as e:
            log.exception("%s %s failed", system, target)
            r = {"task": [system, target], "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        args.result.write_text(json.dumps(results, indent=1, default=str))
    return 0 if all("error" not in r for r in results) else 1


# --- parent ---------------------------------------------------------------------------------------


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out.absolute()
        self.scratch = self.out / "scratch"
        self.logs = self.out / "logs"
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp"))  # short: sun_path is 108 bytes
        self.daemons: list[Daemon] = []
        self.errors: list[str] = []
        self.n = 0

    def run_child(self, tasks: list[tuple[str, str]], every: int = 0) -> list[dict[str, Any]]:
        """Run ``tasks`` in one child, with a fresh daemon if one of them is ckptd's."""
        self.n += 1
        result = self.logs / f"child-{self.n:02d}.json"
        cmd = [sys.executable, "-m", "bench.run", "--result", str(result), "--scratch", str(self.scratch)]
        cmd += ["--device", self.args.device, "--reps", str(self.args.reps), "--every", str(every)]
        cmd += ["--train-seconds", str(self.args.train_seconds)]
        cmd += ["--quick"] if self.args.quick else []
        cmd += ["--adamw-layers", str(self.args.adamw_layers)] if self.args.adamw_layers else []
        for system, target in tasks:
            cmd += ["--one", system, target]
        daemon = None
        if any(s == "ckptd" or t == "ckptd" for s, t in tasks):
            sock = self.sock_dir / f"d{self.n}.sock"
            root = self.scratch / f"ckptd-root-{self.n}"
            daemon = Daemon(
                sock, root, self.logs / f"daemon-{self.n:02d}.log", *shlex.split(self.args.daemon_args)
            )
            self.daemons.append(daemon)
            cmd += ["--socket", str(sock)]
        log.info("child %d: %s", self.n, " ".join(f"{s}/{t}" for s, t in tasks))
        started = time.monotonic()
        try:
            with open(self.logs / f"child-{self.n:02d}.log", "wb") as logf:
                done = subprocess.run(
                    cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    timeout=900 if self.args.quick else 3600, check=False,
                )  # fmt: skip
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            stats = daemon.stop() if daemon is not None else {}
            if daemon is not None:
                shutil.rmtree(daemon.root, ignore_errors=True)
        results: list[dict[str, Any]] = json.loads(result.read_text()) if result.exists() else []
        for r in results:
            if "ckptd" in r.get("task", ()) and stats:
                r["daemon"] = stats
            if "error" in r:
                self.errors.append(f"{'/'.join(r['task'])}: {r['error']}")
        if (rc != 0 and len(results) < len(tasks)) or rc == -1:
            self.errors.append(
                f"child {self.n} ({tasks}) exited with {rc}; see {self.logs}/child-{self.n:02d}.log"
            )
        log.info("child %d done in %.0fs (exit %d)", self.n, time.monotonic() - started, rc)
        return results

    def run(self) -> dict[str, Any]:
        args = self.args
        plan: list[tuple[str, str]] = []
        for wl in args.workloads:
            plan.append(("limits", wl))
            plan += [(s, wl) for s in args.systems if not not_applicable(s, wl)]
        # Every system run sits between two baseline runs (none, ckptd, none, dcp_async, none, ...)
        # and is compared with their mean: slow drifts of the machine's speed cancel out; each
        # figure is the median over the rounds.
        chosen = [s for s in TRAIN_SYSTEMS if s in args.systems]
        rounds = [t for s in chosen for t in (("train", "none"), ("train", s))] * args.train_rounds
        rounds.append(("train", "none"))
        train = [] if args.no_train or not chosen else rounds
        if args.quick:  # one child for everything: seconds, not minutes (memory peaks then mix)
            results = self.run_child(plan + train)
        else:
            results = [r for task in plan for r in self.run_child([task])]
            if train:
                base = self.run_child([train[0]])
                rate = base[0]["steps_per_s"] if base and "steps_per_s" in base[0] else 0.0
                every = every_for(rate, quick=False) if rate else 10
                results += base + [r for task in train[1:] for r in self.run_child([task], every=every)]
        return collect(args, results, self.errors)

    def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def collect(args: argparse.Namespace, results: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    """Arrange the children's results as results.json has them."""
    out: dict[str, Any] = {"limits": {}, "results": {wl: {} for wl in args.workloads}, "errors": errors}
    train_runs: list[dict[str, Any]] = []
    for r in results:
        system, target = r.get("task", ("?", "?"))
        if system == "limits":
            out["limits"][target] = r
        elif system == "train":
            train_runs.append(r)
        else:
            out["results"][target][system] = r
    for wl in args.workloads:
        for s in args.systems:
            reason = not_applicable(s, wl)
            if reason:
                out["results"][wl][s] = {"system": s, "workload": wl, "applicable": False, "reason": reason}
            elif s not in out["results"][wl]:
                out["results"][wl][s] = {"error": "no result (the child died?)"}
    for wl, lim in out["limits"].items():  # the floor, robust to moments of machine load
        local = [r["memcpy_local_s"] for r in out["results"][wl].values() if "memcpy_local_s" in r]
        if "memcpy_s" in lim:
            lim["memcpy_limits_child_s"] = lim["memcpy_s"]
            lim["memcpy_s"] = statistics.median([lim["memcpy_s"], *local])
            lim["memcpy_gbps"] = lim["bytes"] / lim["memcpy_s"] / 1e9
    out["training"] = training_summary(train_runs)
    return out


def training_summary(sequence: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system: the median of its rounds; interference of each run against the mean of the
    baseline runs just before and after it (its bracket), median over the rounds."""
    baseline = [r for r in sequence if r.get("task", ("", ""))[1] == "none"]
    out: dict[str, Any] = {"baseline": baseline, "systems": {}}
    rates = [b["steps_per_s"] for b in baseline if "steps_per_s" in b]
    out["baseline_steps_per_s"] = statistics.median(rates) if rates else None
    runs: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
    for i, r in enumerate(sequence):
        system = r.get("task", ("", ""))[1]
        if system != "none":
            runs.setdefault(system, []).append((r, _bracket(sequence, i)))
    for system, pairs in runs.items():
        ok = [(r, b) for r, b in pairs if "steps_per_s" in r]
        if not ok:
            out["systems"][system] = {"system": system, "error": pairs[0][0].get("error", "no result")}
            continue
        rs = [r for r, _ in ok]
        agg: dict[str, Any] = dict(rs[len(rs) // 2])
        for key in ("steps_per_s", "stall_s", "durable_s", "rss_overhead"):
            agg[key] = statistics.median(r[key] for r in rs)
        agg["steps_per_s_all"] = [r["steps_per_s"] for r in rs]
        agg["checkpoints"] = sum(r["checkpoints"] for r in rs)
        # the time the training thread itself was held by checkpointing, a low-noise figure
        agg["blocked_pct"] = statistics.median(100.0 * r["blocked_s"] / r["seconds"] for r in rs)
        paired = [100.0 * (1.0 - r["steps_per_s"] / b) for r, b in ok if b]
        agg["interference_all_pct"] = paired
        if paired:
            agg["interference_pct"] = statistics.median(paired)
        out["systems"][system] = agg
    return out


def _bracket(sequence: list[dict[str, Any]], i: int) -> float | None:
    """Mean steps/s of the nearest baseline runs before and after run ``i``."""
    near = []
    for step in (-1, 1):
        j = i + step
        while 0 <= j < len(sequence):
            r = sequence[j]
            if r.get("task", ("", ""))[1] == "none" and "steps_per_s" in r:
                near.append(float(r["steps_per_s"]))
                break
            j += step
    return sum(near) / len(near) if near else None


def host_info(out: Path) -> dict[str, Any]:
    import psutil

    versions = {}
    for pkg in ("torch", "transformers", "safetensors"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_total": psutil.virtual_memory().total,
        "out_dir": str(out),
        "load_avg_start": os.getloadavg(),
        **versions,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.one:
        if args.result is None or args.scratch is None:
            raise SystemExit("--one needs --result and --scratch")
        return child(args)
    command = shlex.join([sys.executable, "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    print(f"$ {command}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    started = time.time()
    harness = Harness(args)
    try:
        data = {"command": command, "quick": args.quick, "device": args.device, "host": host_info(args.out)}
        data["started"] = datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds")
        data |= harness.run()
    finally:
        harness.close()
    data["elapsed_s"] = round(time.time() - started, 1)
    data["host"]["load_avg_end"] = os.getloadavg()
    data["targets"] = report.targets(data)
    (args.out / "results.json").write_text(json.dumps(finite(data), indent=1, default=str))
    print(report.table(data), flush=True)
    report.chart(data, args.out / "chart.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'chart.png'} in {data['elapsed_s']:.0f}s")
    for e in data["errors"]:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if data["errors"] else 0


def finite(o: Any) -> Any:
    """The same structure with NaN and infinities as null (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o


if __name__ == "__main__":
    sys.exit(main())
