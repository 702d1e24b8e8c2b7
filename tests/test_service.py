"""ckptd as a service (issue #12, items 13-15): metrics through prometheus_client, /healthz,
refusals apart from failures; deployment files that work as written, a daemon without torch;
no unused dependency, and sizes read as transformers reads them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DaemonProc, wait_for_socket
from prometheus_client.parser import text_string_to_metric_families

from ckptd.daemon.metrics import Metrics
from ckptd.sizes import parse_size
from client import CheckpointError, Client

REPO = Path(__file__).parent.parent
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    """Every sample, by name and labels, read by prometheus_client's own text parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return _parse(r.read().decode())


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until_health(port: int, code: int, timeout_s: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got, body = _health(port)
        except urllib.error.URLError as e:  # not listening yet
            got, body = 0, {"error": str(e)}
        if got == code:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz still {got} after {timeout_s}s: {body}")
        time.sleep(0.2)


def _one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- item 13: metrics, /healthz, refusals ---------------------------------------------------------


def test_label_values_with_quotes_backslashes_newlines_parse_back() -> None:
    m = Metrics()
    reason = 'said "no"\\ then\nleft'
    m.fail(reason)
    m.refuse("already_committed")
    m.commit(10, {"writing": 0.5})
    samples = _parse(m.render())
    assert _one(samples, "ckptd_snapshots_failed_total", reason=reason) == 1
    assert _one(samples, "ckptd_snapshots_refused_total", reason="already_committed") == 1
    assert _one(samples, "ckptd_stage_duration_seconds_count", stage="writing") == 1


def test_metrics_carry_readme_names_process_and_build_info(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port))
    c = connect(d)
    info = c.snapshot({"w": torch.ones(1000)}, step=1).wait(30)
    assert info is not None
    m = _scrape(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        exposed = set(re.findall(r"^# TYPE (\S+)", r.read().decode(), re.M))
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running it as a service") :]
    names = set(re.findall(r"`(ckptd_[a-z_]+)", section.split("- **Live view**")[0]))
    assert len(names) >= 8, names
    assert names <= exposed, sorted(names - exposed)
    assert _one(m, "ckptd_snapshots_committed_total") == 1
    assert _one(m, "ckptd_bytes_written_total") == info.bytes == 4000
    assert _one(m, "ckptd_clients") == 1 and _one(m, "ckptd_snapshots_in_flight") == 0
    assert _one(m, "ckptd_stage_duration_seconds_bucket", stage="writing", le="+Inf") == 1
    assert _one(m, "process_cpu_seconds_total") > 0
    assert _one(m, "process_resident_memory_bytes") > 0
    (build,) = [labels for name, labels in m if name == "ckptd_build_info"]
    from ckptd import __version__

    assert dict(build)["version"] == __version__
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)


def test_already_committed_is_a_refusal_not_an_io_failure(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port), faults="eio-write:2")
    c = connect(d)
    c.snapshot({"w": torch.ones(100)}, step=1).wait(30)
    with pytest.raises(CheckpointError, match="already committed") as e:
        c.snapshot({"w": torch.ones(100)}, step=1).wait(30)
    assert e.value.code == "already_committed"
    with pytest.raises(CheckpointError) as io:
        c.snapshot({"w": torch.ones(100)}, step=2).wait(30)
    assert io.value.code == "io_error"
    m = _scrape(port)
    failed = {dict(labels)["reason"]: v for (name, labels), v in m.items() if name.endswith("failed_total")}
    assert failed == {"io_error": 1}, failed
    assert _one(m, "ckptd_snapshots_refused_total", reason="already_committed") == 1


def test_healthz_is_200_with_a_json_body(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port))
    connect(d).snapshot({"w": torch.ones(100)}, step=1).wait(30)
    code, body = _health(port)
    assert code == 200 and body["status"] == "ok", body
    assert body["pid"] == d.proc.pid and isinstance(body["loop_lag_s"], float)


def test_healthz_is_503_when_every_writer_is_wedged(
    start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]
) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port), "--workers", "1", faults="hang-write:1")
    _until_health(port, 200)
    c = connect(d)
    handle = c.snapshot({"w": torch.ones(100)}, step=1)  # its pwrite blocks for 10 minutes
    body = _until_health(port, 503)
    assert body["status"] == "unhealthy"
    (reason,) = body["reasons"]  # type: ignore[misc]
    assert "no writer thread has answered" in reason and "hung filesystem" in reason, reason
    assert "faulty_daemon: pwrite" in d.log_text()
    d.kill()
    with pytest.raises(CheckpointError):
        handle.wait(30)


def test_healthz_is_503_while_the_event_loop_stalls_then_200(
    start_daemon: Callable[..., DaemonProc],
) -> None:
    port = _free_port()
    d = start_daemon("--metrics-port", str(port), faults="stall-loop:2:6")
    _until_health(port, 200)
    body = _until_health(port, 503, timeout_s=15)  # answered off the loop, while it is stalled
    (reason,) = body["reasons"]  # type: ignore[misc]
    assert reason.startswith("the event loop has not run for"), reason
    assert _scrape(port), "metrics are served while the loop is stalled"
    assert "the event loop stalls" in d.log_text()
    _until_health(port, 200, timeout_s=20)


# --- item 14: deployment files, a daemon without torch --------------------------------------------


def test_daemon_and_operator_commands_run_without_torch(
    workdir: Path, connect: Callable[..., Client]
) -> None:
    """The daemon, ``status``, ``ls`` and ``verify`` with torch unimportable (a ``torch`` that
    raises on import shadows the real one), and ``-X importtime`` lists no torch module."""
    shadow = workdir / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sock, root = workdir / "d.sock", workdir / "root"
    cli = [sys.executable, "-m", "ckptd"]
    with open(workdir / "d.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "ckptd",
                "serve",
                "--root",
                str(root),
                "--socket",
                str(sock),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for_socket(sock, proc)
        c = connect(DaemonProc(proc, sock, root, workdir / "d.log"))
        info = c.snapshot({"w": torch.arange(10.0)}, step=1).wait(30)
        assert info is not None
        for args in (["status", "--socket", str(sock), "--json"], ["ls", str(root)], ["verify", info.path]):
            done = subprocess.run(
                cli + args, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        c.close(timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (workdir / "d.log").read_text()
    imported = {
        line.rsplit("|", 1)[1].strip() for line in text.splitlines() if line.startswith("import time:")
    }
    assert "ckptd.daemon.server" in imported and "prometheus_client" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "safetensors", "accelerate")]


def test_daemon_package_does_not_require_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [re.split(r"[<>=\[ ;]", d)[0].lower() for d in project["dependencies"]]
    assert "torch" not in base and "prometheus_client" in base
    client = [re.split(r"[<>=\[ ;]", d)[0].lower() for d in project["optional-dependencies"]["client"]]
    assert "torch" in client
    assert "ckptd[client]" in project["optional-dependencies"]["test"]  # make setup installs it
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", dockerfile), "the daemon image installs no torch"


def test_pod_trainer_is_not_restarted_after_it_finishes_and_requests_resources() -> None:
    pod = yaml.safe_load((DEPLOY / "kubernetes" / "pod.yaml").read_text())
    spec = pod["spec"]
    assert spec.get("restartPolicy") in ("Never", "OnFailure"), "Always would train again, forever"
    (sidecar,) = spec["initContainers"]
    (trainer,) = spec["containers"]
    for container in (sidecar, trainer):
        requests = container["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], container["name"]
    probe = sidecar["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] == sidecar["ports"][0]["name"]
    cmd = sidecar["command"]
    assert cmd[cmd.index("--metrics-host") + 1] == "0.0.0.0"  # the kubelet probes the pod's IP


def test_systemd_unit_finds_the_installed_ckptd(workdir: Path) -> None:
    unit = (DEPLOY / "systemd" / "ckptd.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    assert shlex.split(exec_start)[0] == "%h/.local/bin/ckptd", "the user manager's PATH has no venv"
    install = [line.split("#", 2)[1].strip() for line in unit.splitlines() if line.startswith("#   $ ")]
    assert install, "the unit's header shows the install commands"
    home = workdir / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for line in install:  # as a user who ran `make setup` (this venv's ckptd on PATH) runs them
        subprocess.run(line.removeprefix("$ "), shell=True, env=env, cwd=REPO, check=True, timeout=60)
    done = subprocess.run(
        [str(home / ".local/bin/ckptd"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "--metrics-port" in done.stdout
    installed = home / ".config/systemd/user/ckptd.service"
    assert installed.read_text() == unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here; the unit's files were checked")
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(installed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    (home / ".local/bin/ckptd").unlink()  # the check is real: without the link it fails
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(installed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode != 0 and "is not executable" in verify.stderr


TRAIN_PY = """
import torch
from client import Client

c = Client.connect(autostart=False)  # $CKPTD_SOCKET, as the job exports it
print("committed", c.snapshot({"w": torch.arange(10.0)}, step=7).wait(60).path)
c.close()
"""

# srun stand-in: drop srun's options, run the command once, here.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""


def test_sbatch_script_runs_daemon_training_and_drain(workdir: Path) -> None:
    """The script itself, with a stand-in srun, fake SLURM_* variables, a missing socket/log
    directory and a train.py that snapshots one step: it exits 0, the step is committed, the
    daemon's log is where the script says, and the daemon is gone."""
    script = DEPLOY / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    fake = workdir / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "srun").chmod(0o755)
    (workdir / "train.py").write_text(TRAIN_PY)
    env = {
        "PATH": f"{fake}{os.pathsep}{BIN}{os.pathsep}/usr/bin:/bin",
        "HOME": str(workdir),
        "SLURM_JOB_NAME": "train-with-ckptd",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "CKPTD_DIR": str(workdir / "run" / "ckptd"),  # missing: the daemon makes it
    }
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the script left, the daemon included
        except ProcessLookupError:
            pass
        proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    step = workdir / "checkpoints" / "train-with-ckptd" / "default" / "step-000007"
    assert f"committed {step}" in text
    assert (step / "ckptd.json").is_file()
    log = workdir / "run" / "ckptd" / "job-4242.log"
    assert "ckptd stopped" in log.read_text(), log.read_text()
    assert not (workdir / "run" / "ckptd" / "job-4242.sock").exists()


# --- item 15: dependencies, sizes -----------------------------------------------------------------


def test_every_daemon_dependency_is_imported() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sources = "\n".join(p.read_text() for p in (REPO / "ckptd").rglob("*.py"))
    for dep in project["dependencies"]:
        module = re.split(r"[<>=\[ ;]", dep)[0].replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), (
            f"{dep} is declared, never imported"
        )
    everything = json.dumps(project)
    assert "aiofiles" not in everything


SIZES = [
    "5GB",
    "5Gb",
    "5gb",
    "5gB",
    "5GiB",
    "5gib",
    "5MB",
    "5Mb",
    "5mb",
    "500MiB",
    "500KB",
    "500Kb",
    "500kb",
    "1KiB",
    "10KB",
    "4KB",
    "7Kb",
    "3Mb",
    "1GB",
    "2Gb",
    "9GiB",
    "12MB",
    "13mib",
    "100KiB",
    "1kib",
    "64MB",
    "1Mb",
    "8Kb",
    "1b5GB",
    "GB",
    "5",
    "4096",
    "5TB",
    "1.5GB",
    "5B",
    "-5GB",
    "0GB",
    "5 GB",
    " 5GB",
    "5 GB ",
    "+5GB",
    "5_000MB",
    "05GB",
    "five GB",
    "",
]


@pytest.mark.parametrize("value", SIZES)
def test_parse_size_reads_strings_as_transformers_does(value: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        expected = convert_file_size_to_int(value)
    except ValueError:
        expected = None
    if expected is not None and expected > 0:
        assert parse_size(value) == expected
    elif value.strip().isdigit() and int(value) > 0:  # ckptd's one extension: bytes as digits
        assert parse_size(value) == int(value)
    else:  # transformers refuses it, or reads a size that is not positive: ckptd refuses it
        with pytest.raises(ValueError, match="size"):
            parse_size(value)


def test_parse_size_ints_and_the_reported_case() -> None:
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_size("5Gb") == convert_file_size_to_int("5Gb") == 625_000_000
    for n in (1, 4096, 5 * 10**9):
        assert parse_size(n) == convert_file_size_to_int(n) == n
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            parse_size(bad)
