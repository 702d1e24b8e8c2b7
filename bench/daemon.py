"""A real ``ckptd serve`` for the benchmark, its memory sampled, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class RssSampler:
    """Samples a process's RSS (and RSS minus shared pages) in a thread; keeps the peaks."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_private = 0
        self.cpu_start = self._cpu()
        self.faults_start = self._faults()
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _faults(self) -> tuple[int, int]:
        """(minor, major) page faults so far, from /proc/PID/stat."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[7]), int(fields[9])
        except (OSError, IndexError, ValueError):
            return 0, 0

    def _cpu(self) -> float:
        try:
            t = self.proc.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def _sample(self) -> None:
        try:
            m = self.proc.memory_info()
        except psutil.Error:
            return
        self.peak_rss = max(self.peak_rss, m.rss)
        self.peak_private = max(self.peak_private, m.rss - m.shared)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._sample()
        self.cpu_s = self._cpu() - self.cpu_start
        minor, major = (b - a for a, b in zip(self.faults_start, self._faults(), strict=True))
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss": self.peak_rss,
            "peak_private": self.peak_private,
            "cpu_s": self.cpu_s,
            "minor_faults": minor,
            "major_faults": major,
        }


class Daemon:
    """``python -m ckptd serve`` on ``socket_path`` writing under ``root``, logging to ``log_path``."""

    def __init__(self, socket_path: Path, root: Path, log_path: Path, *args: str) -> None:
        self.socket_path = socket_path
        self.root = root
        self.log_path = log_path
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ckptd", "serve", "--root", str(root), "--socket", str(socket_path)]
        cmd += [*args, "--log-file", str(log_path)]
        log.info("starting daemon: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            self._wait_for_socket(60.0)
        except BaseException:
            self.stop()
            raise
        self.sampler = RssSampler(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_for_socket(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ckptd exited with {self.proc.returncode}: {self.log_tail()}")
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(self.socket_path))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        raise TimeoutError(f"ckptd did not listen on {self.socket_path} within {timeout_s}s")

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        return ""

    def stop(self, timeout_s: float = 120.0) -> dict[str, float]:
        """SIGTERM (the daemon drains), then SIGKILL after ``timeout_s``; returns the memory peaks."""
        stats = self.sampler.stop() if hasattr(self, "sampler") else {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("ckptd %d did not exit after SIGTERM; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        return stats
