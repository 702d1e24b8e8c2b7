"""Running ckptd as a service: systemd notify, Prometheus metrics, and the deploy examples."""

from __future__ import annotations

import configparser
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DaemonProc

from client import CheckpointError, Client

DEPLOY = Path(__file__).parent.parent / "deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _datagrams(sock: socket.socket, until: Callable[[list[str]], bool], timeout_s: float = 20) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not until(got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def test_daemon_speaks_sd_notify(start_daemon: Callable[..., DaemonProc], workdir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(workdir / "notify"))
        d = start_daemon(env={"NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "200000"})
        got = _datagrams(notify, lambda g: sum("WATCHDOG=1" in m for m in g) >= 3)
        ready = [m for m in got if "READY=1" in m]
        assert ready and f"MAINPID={d.proc.pid}" in ready[0]
        assert sum("WATCHDOG=1" in m for m in got) >= 3, got
        d.stop(signal.SIGTERM)
        assert d.proc.returncode == 0
        got = _datagrams(notify, lambda g: any("STOPPING=1" in m for m in g))
        assert any("STOPPING=1" in m for m in got), got


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_prometheus_metrics(start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port), faults="eio-write:2")
    c = connect(d)
    before = _scrape(port)
    assert before["ckptd_snapshots_committed_total"] == 0
    info = c.snapshot({"w": torch.ones(1000)}, step=1).wait(30)
    assert info is not None
    with pytest.raises(CheckpointError):
        c.snapshot({"w": torch.ones(1000)}, step=2).wait(30)
    m = _scrape(port)
    assert m["ckptd_snapshots_committed_total"] == 1
    assert m['ckptd_snapshots_failed_total{reason="io_error"}'] == 1
    assert m["ckptd_bytes_written_total"] == info.bytes == 4000
    assert m["ckptd_snapshots_in_flight"] == 0 and m["ckptd_clients"] == 1
    assert m["ckptd_arena_bytes"] > 0
    assert abs(m["ckptd_last_commit_timestamp_seconds"] - time.time()) < 60
    assert m['ckptd_stage_duration_seconds_count{stage="writing"}'] == 1
    assert m['ckptd_stage_duration_seconds_bucket{le="+Inf",stage="writing"}'] == 1
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)


def test_systemd_unit_is_notify_with_drain_time() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "ckptd.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["RuntimeDirectory"] == "ckptd" and service["RuntimeDirectoryMode"] == "0700"
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "ckptd" and argv[1] == "serve"
    assert argv[argv.index("--socket") + 1] == "%t/ckptd/ckptd.sock"  # = $XDG_RUNTIME_DIR/ckptd/...
    drain = float(argv[argv.index("--drain-timeout") + 1])
    assert float(service["TimeoutStopSec"]) > drain
    assert service["KillSignal"] == "SIGTERM" and int(service["WatchdogSec"]) > 0
    assert int(service["CPUWeight"]) < 100, "the daemon yields the CPU to training units"


def test_kubernetes_sidecar_shares_socket_and_drains() -> None:
    pod = yaml.safe_load((DEPLOY / "kubernetes" / "pod.yaml").read_text())
    spec = pod["spec"]
    (sidecar,) = spec["initContainers"]
    (trainer,) = spec["containers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar outlives the trainer"
    cmd = sidecar["command"]
    assert cmd[:2] == ["ckptd", "serve"]
    sock = cmd[cmd.index("--socket") + 1]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["CKPTD_SOCKET"] == sock
    mounts = {c["name"]: {m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, trainer)}
    assert any(Path(sock).is_relative_to(m) for m in mounts["ckptd"] & mounts["trainer"])
    assert "/dev/shm" in mounts["ckptd"] & mounts["trainer"]
    assert spec["terminationGracePeriodSeconds"] > float(cmd[cmd.index("--drain-timeout") + 1])


def test_dockerfile_and_slurm_script_name_the_daemon() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["ckptd"\]', dockerfile, re.M)
    script = DEPLOY / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ckptd serve --root" in text and "kill -TERM" in text


def test_second_sigterm_exits_without_waiting_for_the_drain(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    d = start_daemon("--workers", "1", faults="slow:2.0")
    c = connect(d, max_shard_size="4KB")
    handle = c.snapshot({f"t{i}": torch.ones(32, 32) for i in range(8)}, step=1)  # ~20 s to write
    time.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)  # starts draining
    time.sleep(0.5)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)  # the operator insists
    assert d.proc.wait(10) != 0
    assert time.monotonic() - t0 < 5
    with pytest.raises(CheckpointError):
        handle.wait(10)
    assert not (d.root / "default" / "step-000001").exists(), "nothing partial became visible"
