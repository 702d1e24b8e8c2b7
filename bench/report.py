"""The terminal table, ckptd's targets, and the chart, all from the results.json structure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GB = 1e9
SLOTS = 2  # ckptd's default arenas per client


def _f(x: Any, fmt: str = ".3f", width: int = 8) -> str:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return format(x, fmt).rjust(width)
    return "-".rjust(width)


def _ok(r: dict[str, Any]) -> bool:
    return r.get("applicable", True) and "error" not in r and "stall_s" in r


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return float(a) / float(b)
    return None


COLUMNS = (
    ("system", 16, "<"),
    ("stall s", 9, ">"),
    ("first s", 8, ">"),
    ("/memcpy", 8, ">"),
    ("durable s", 9, ">"),
    ("no-fsync", 8, ">"),
    ("GB/s", 6, ">"),
    ("/disk", 6, ">"),
    ("RSS+ GB", 8, ">"),
    ("/bytes", 6, ">"),
    ("daemon GB", 9, ">"),
)


def table(data: dict[str, Any]) -> str:
    gpu = data.get("device") == "cuda"  # stall (host blocked) and staged (safe to change) differ
    columns = (*COLUMNS[:2], ("staged s", 9, ">"), *COLUMNS[2:]) if gpu else COLUMNS
    head = " ".join(f"{name:{align}{w}}" for name, w, align in columns)
    lines = [""]
    for wl, systems in data["results"].items():
        lim = data["limits"].get(wl, {})
        memcpy, disk = lim.get("memcpy_s"), lim.get("disk_gbps")
        lines.append(
            f"== {wl}: {lim.get('description', '')} — {_f(lim.get('bytes', 0) / GB, '.3f', 0)} GB, "
            f"{lim.get('tensors', '?')} tensors; memcpy floor {_f(memcpy, '.4f', 0)} s "
            f"({_f(lim.get('memcpy_gbps'), '.2f', 0)} GB/s), disk write+fsync {_f(disk, '.3f', 0)} GB/s"
            + (
                f", D2H pinned {_f(lim['d2h_pinned_gbps'], '.1f', 0)} GB/s"
                if "d2h_pinned_gbps" in lim
                else ""
            )
        )
        lines += [head, "-" * len(head)]
        for name, r in systems.items():
            if not r.get("applicable", True):
                lines.append(f"{name:<16} n/a: {r.get('reason', '')}")
                continue
            if not _ok(r):
                lines.append(f"{name:<16} ERROR: {r.get('error', '?')}")
                continue
            daemon = r.get("daemon", {}).get("peak_rss")
            label = name + (
                "*" if name == "save_pretrained" and r["payload_bytes"] < lim.get("bytes", 0) else ""
            )
            cells = [
                f"{label:<16}",
                _f(r["stall_s"], ".4f", 9),
                *([_f(r["staged_s"], ".4f", 9)] if gpu else []),
                _f(r["first_stall_s"], ".3f", 8),
                _f(_ratio(r["stall_s"], memcpy), ".2f", 8),
                _f(r["durable_s"], ".3f", 9),
                _f(None if r["native_fsync"] else r["durable_nofsync_s"], ".3f", 8),
                _f(r["throughput_gbps"], ".3f", 6),
                _f(_ratio(r["throughput_gbps"], disk), ".2f", 6),
                _f(r["rss_overhead"] / GB, ".3f", 8),
                _f(_ratio(r["rss_overhead"], r["payload_bytes"]), ".2f", 6),
                _f(daemon / GB if daemon else None, ".3f", 9),
            ]
            lines.append(" ".join(cells))
        lines += _ckptd_detail(systems.get("ckptd", {}))
        lines.append("")
    lines.append(
        "stall: median blocking time after a warm-up (first s: the warm-up's); /memcpy: stall over the "
        "memcpy floor; durable: until fsynced (added for systems that do not fsync; no-fsync: without it); "
        "GB/s: payload / durable; /disk: over the disk's write+fsync limit; RSS+: trainer peak RSS over "
        "its RSS before checkpointing; daemon: the daemon's peak RSS (its arena mappings are shared "
        "with the trainer). * model part only."
    )
    lines += _training_lines(data.get("training", {}))
    lines += _target_lines(data.get("targets", {}))
    return "\n".join(lines)


def _ckptd_detail(r: dict[str, Any]) -> list[str]:
    """Where ckptd's time goes: the daemon's stages and its CPU per GB."""
    if not _ok(r):
        return []
    extra, daemon = r.get("extra", {}), r.get("daemon", {})
    snapshots = r["runs"] + 1
    gb = r["payload_bytes"] * snapshots / GB
    stages = ", ".join(
        f"{k.removeprefix('daemon_')} {v:.3f}" for k, v in extra.items() if k.startswith("daemon_")
    )
    line = (
        f"   ckptd: stall {r['stall_s']:.4f} s vs floor measured alongside {r.get('memcpy_local_s', 0):.4f} s"
    )
    line += f"; daemon stages (s from accept): {stages}"
    if daemon and gb:
        line += (
            f"; daemon CPU {daemon.get('cpu_s', 0) / gb:.2f} s/GB, "
            f"{daemon.get('minor_faults', 0) / snapshots:.0f} minor faults/snapshot"
        )
    return [line]


def _training_lines(training: dict[str, Any]) -> list[str]:
    if not training.get("systems"):
        return []
    base = training.get("baseline_steps_per_s")
    first: dict[str, Any] = next(iter(training["systems"].values()), {})
    out = [
        "",
        f"== training interference: {first.get('model', '')}, 2 threads, a checkpoint every "
        f"{first.get('every', '?')} steps; no checkpoints: {_f(base, '.2f', 0)} steps/s "
        f"(runs: {', '.join(_f(b.get('steps_per_s'), '.2f', 0) for b in training.get('baseline', []))})",
        f"{'system':<16} {'steps/s':>8} {'interf %':>8} {'blocked %':>9} {'ckpts':>6} {'stall s':>8} "
        f"{'durable s':>9} {'RSS+ GB':>8}  steps/s of each round",
    ]
    for name, r in training["systems"].items():
        if "error" in r:
            out.append(f"{name:<16} ERROR: {r['error']}")
            continue
        rounds = ", ".join(f"{x:.2f}" for x in r.get("steps_per_s_all", []))
        out.append(
            f"{name:<16} {_f(r['steps_per_s'], '.2f')} {_f(r.get('interference_pct'), '.1f')} "
            f"{_f(r.get('blocked_pct'), '.2f', 9)} {r['checkpoints']:>6} {_f(r['stall_s'], '.4f')} "
            f"{_f(r['durable_s'], '.3f', 9)} {_f(r['rss_overhead'] / GB, '.3f')}  {rounds}"
        )
    return out


def targets(data: dict[str, Any]) -> dict[str, Any]:
    """ckptd against its targets, per workload and for training; each entry: ok, value, bound."""
    out: dict[str, Any] = {}
    for wl, systems in data.get("results", {}).items():
        ck, lim = systems.get("ckptd", {}), data.get("limits", {}).get(wl, {})
        if not _ok(ck) or "memcpy_s" not in lim:
            continue
        # only systems that save the same bytes (save_pretrained saves the model part alone)
        others = {
            n: r
            for n, r in systems.items()
            if n != "ckptd" and _ok(r) and r["payload_bytes"] >= ck["payload_bytes"]
        }
        min_stall = min((r["stall_s"] for r in others.values()), default=math.inf)
        min_durable = min((r["durable_s"] for r in others.values()), default=math.inf)
        bound_rss = SLOTS * ck["payload_bytes"] * 1.05
        tput, disk = ck["throughput_gbps"], 0.85 * lim["disk_gbps"]
        checks = {  # name: (ok, value, bound)
            "stall <= 1.2 x memcpy floor": (
                ck["stall_s"] <= 1.2 * lim["memcpy_s"],
                ck["stall_s"],
                1.2 * lim["memcpy_s"],
            ),
            "stall < every other system's": (ck["stall_s"] < min_stall, ck["stall_s"], min_stall),
            "throughput >= 0.85 x disk limit": (tput >= disk, tput, disk),
            "durable < every other system's": (ck["durable_s"] < min_durable, ck["durable_s"], min_durable),
            "trainer RSS overhead <= slots x bytes + 5%": (
                ck["rss_overhead"] <= bound_rss,
                ck["rss_overhead"],
                bound_rss,
            ),
        }
        out[wl] = {k: {"ok": ok, "value": v, "bound": b} for k, (ok, v, b) in checks.items()}
    train = data.get("training", {}).get("systems", {})
    ck, dcp = train.get("ckptd", {}), train.get("dcp_async", {})
    if "interference_pct" in ck:
        mine = ck["interference_pct"]
        out["training"] = {"interference <= 3%": {"ok": mine <= 3.0, "value": mine, "bound": 3.0}}
        if "interference_pct" in dcp:
            theirs = dcp["interference_pct"]
            out["training"]["interference < async_save's"] = {
                "ok": mine < theirs,
                "value": mine,
                "bound": theirs,
            }
    return out


def _target_lines(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    out = ["", "== ckptd against its targets"]
    for scope, checks in t.items():
        for name, c in checks.items():
            verdict = "PASS" if c["ok"] else "FAIL"
            out.append(f"{verdict}  {scope:<11} {name:<44} {c['value']:.4g} vs {c['bound']:.4g}")
    return out


def chart(data: dict[str, Any], path: Path) -> None:
    """Stall and time to durable per system per workload (log scale), with the limits drawn in;
    a last panel with training steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(data["results"])
    training = data.get("training", {}).get("systems", {})
    panels = len(workloads) + (1 if training else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.2 * max(panels, 1), 4.8), squeeze=False)
    for ax, wl in zip(axes[0], workloads, strict=False):
        rows = [(n, r) for n, r in data["results"][wl].items() if _ok(r)]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["stall_s"] for _, r in rows], 0.4, label="stall", color="tab:blue")
        ax.bar(
            [x + 0.2 for x in xs], [r["durable_s"] for _, r in rows], 0.4, label="durable", color="tab:orange"
        )
        lim = data["limits"].get(wl, {})
        if "memcpy_s" in lim:
            ax.axhline(lim["memcpy_s"], color="tab:blue", ls=":", label="memcpy floor")
        if lim.get("disk_gbps"):
            ax.axhline(lim["bytes"] / GB / lim["disk_gbps"], color="tab:orange", ls="--", label="disk limit")
        ax.set_xticks(list(xs), [n for n, _ in rows], rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"{wl} ({lim.get('bytes', 0) / GB:.3g} GB)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if training:
        ax = axes[0][-1]
        names = [n for n, r in training.items() if "steps_per_s" in r]
        ax.bar(names, [training[n]["steps_per_s"] for n in names], color="tab:green")
        base = data["training"].get("baseline_steps_per_s")
        if base:
            ax.axhline(base, color="black", ls="--", label="no checkpoints")
            ax.legend(fontsize=7)
        ax.set_ylabel("training steps/s")
        ax.set_title("training interference")
    fig.suptitle(data.get("command", ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
