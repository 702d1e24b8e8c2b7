"""A multi-rank job of a user who is not root: the daemon and the ranks run as uid 65534, where
file permissions hold (root's tests would never see an EACCES)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for_socket
from helpers import stop_launcher

import ckptd
from ckptd import paths

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import multirank_fsdp_worker as fsdp_worker  # noqa: E402
from test_multirank_fsdp import free_port  # noqa: E402

NOBODY = 65534
# The checkout may be in a directory only root can read (CI clones into mktemp -d): the other
# user may read the code it runs, nothing more (no write permission is bypassed).
AS_NOBODY = [
    "setpriv",
    "--reuid",
    str(NOBODY),
    "--regid",
    str(NOBODY),
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a job as another user")


@pytest.fixture
def home() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ckptd-"))
    os.chmod(d, 0o755)
    h = d / "h"
    h.mkdir()
    os.chown(h, NOBODY, NOBODY)
    try:
        yield h
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False, timeout=60)


def test_fsdp_job_of_a_user_who_is_not_root_commits(home: Path) -> None:
    root, sock, out = home / "root", home / "d.sock", home / "out"
    env = {
        **os.environ,
        "HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(TESTS.parent),
        "HF_HOME": str(home / "hf"),
    }
    subprocess.run([*AS_NOBODY, "mkdir", str(out)], check=True, timeout=30)
    with open(home / "d.log", "wb") as log:
        daemon = subprocess.Popen(
            [*AS_NOBODY, sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(sock)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(TESTS.parent),
        )
    try:
        wait_for_socket(sock, daemon)
        cmd = [
            *AS_NOBODY, sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            str(TESTS / "multirank_fsdp_worker.py"), "save", str(out), str(sock),
        ]  # fmt: skip
        with open(home / "job.log", "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(TESTS.parent))
            try:
                rc = proc.wait(150)
            finally:
                stop_launcher(proc)
        logs = (home / "job.log").read_text(errors="replace")[-3000:] + (home / "d.log").read_text()[-3000:]
        assert rc == 0, logs
        saved = [json.loads((out / f"save-2-rank-{r}.json").read_text()) for r in range(2)]
        assert all(r["path"] for r in saved), logs
        step_dir = Path(saved[0]["path"])
        assert step_dir == root / fsdp_worker.RUN / paths.step_dirname(fsdp_worker.STEP)
        assert ckptd.verify(step_dir) == []
        files = sorted(step_dir.glob("*.safetensors"))
        assert files and all(os.stat(f).st_uid == NOBODY for f in files)
        assert all(os.stat(f).st_mode & 0o777 == 0o444 for f in files)  # sealed read-only
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
