"""ckptd demo: train a small transformer, snapshot it every few steps, restore and check.

A Qwen2-style causal LM (built from a config: no download) learns to copy a random token sequence
on the CPU for about a minute, with AdamW. Every ``--every`` steps the model, the optimizer and a
few plain values are snapshotted with ckptd: ``snapshot()`` returns as soon as the tensors are
copied into shared memory (the *stall*), and the daemon writes and fsyncs the checkpoint while
training goes on (the *time to durable*, reported from a done callback, never waited for).

At the end the newest checkpoint is restored into a freshly built model and optimizer and every
tensor is compared with the trained ones; the exit status is non-zero if anything differs or any
snapshot failed. The daemon (autostarted if none was running) keeps running afterwards.

    python examples/demo.py                  # about a minute; checkpoints in ./checkpoints
    python examples/demo.py --seconds 10 --every 5 --root /tmp/ckpts
    python examples/demo.py --steps 12 --every 5     # a fixed amount of work (the test uses this)
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from client import CheckpointError, Client, SnapshotHandle

MB = 10**6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to train (default 60)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    p.add_argument("--every", type=int, default=10, help="snapshot every N steps (default 10)")
    p.add_argument(
        "--socket", type=Path, default=None, help="daemon socket (default $CKPTD_SOCKET or per user)"
    )
    p.add_argument(
        "--root", type=Path, default=None, help="checkpoint root (default $CKPTD_ROOT or ./checkpoints)"
    )
    # A fresh run name each time: a committed step is never overwritten, so rerunning the demo
    # into the same run would be refused.
    p.add_argument("--run", default=time.strftime("demo-%Y%m%d-%H%M%S"), help="run name")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=48, help="sequence length: a random half, then its copy")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (sizes are picked for two CPU cores)")
    args = p.parse_args(argv)
    if args.every < 1 or args.seconds <= 0 or args.seq < 2 or args.seq % 2:
        p.error("need --every >= 1, --seconds > 0 and an even --seq >= 2")
    return args


def build(args: argparse.Namespace, seed: int) -> tuple[Qwen2ForCausalLM, torch.optim.AdamW]:
    """The model and optimizer; called again with another seed to have something to restore into."""
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    return model, opt


def batch(args: argparse.Namespace, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens followed by the same tokens again; only the copy is scored, so the loss
    falls from ln(vocab) towards zero as the model learns to look back and copy."""
    half = args.seq // 2
    first = torch.randint(0, args.vocab, (args.batch, half), generator=gen)
    ids = torch.cat([first, first], dim=1)
    labels = ids.clone()
    labels[:, :half] = -100  # ignored by the loss: the first half cannot be predicted
    return ids.to(args.device), labels.to(args.device)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a snapshot holds: the model's unique tensors (tied ones count once) and the
    optimizer's state."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    optim = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return sum(seen.values()) + optim


@dataclass
class Record:
    step: int
    loss: float
    stall_s: float
    durable_s: float | None = None
    error: CheckpointError | None = None


class Reporter:
    """Prints one line per snapshot once it is durable (or failed), from the client's I/O thread.

    The callback is registered after ``snapshot()`` returned, so the stall is known by then; the
    lock keeps lines from the I/O thread and the main thread whole.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        self._done = threading.Condition()
        self._reported = 0

    def header(self, nbytes: int, path: str) -> None:
        self.say(f"state: {nbytes / MB:.1f} MB per snapshot (model + AdamW state) -> {path}")
        self.say(f"{'step':>6} {'loss':>8} {'stall':>10} {'durable':>11}")

    def say(self, line: str) -> None:
        with self._done:
            print(line, flush=True)

    def track(self, handle: SnapshotHandle, loss: float) -> None:
        rec = Record(handle.step, loss, handle.stall_s)
        with self._done:
            self.records.append(rec)

        def on_done(h: SnapshotHandle) -> None:
            # Runs when the daemon reports the commit; wait() returns at once here.
            try:
                info = h.wait(0)
                rec.durable_s = info.durable_s if info is not None else None
            except CheckpointError as e:
                rec.error = e
            with self._done:
                if rec.error is not None:
                    print(f"{rec.step:>6} {rec.loss:>8.4f}  FAILED: {rec.error}", flush=True)
                else:
                    durable = f"{rec.durable_s * 1e3:8.1f} ms" if rec.durable_s is not None else "skipped"
                    print(f"{rec.step:>6} {rec.loss:>8.4f} {rec.stall_s * 1e3:7.1f} ms {durable}", flush=True)
                self._reported += 1
                self._done.notify_all()

        handle.add_done_callback(on_done)

    def wait_all(self, timeout_s: float) -> bool:
        with self._done:
            return self._done.wait_for(lambda: self._reported == len(self.records), timeout_s)


def mismatches(got: Mapping[str, Any], want: Mapping[str, Any], where: str) -> list[str]:
    """Every difference between two (nested) state dicts: tensors bit-for-bit, values by ==."""
    out = []
    for key in sorted(set(got) | set(want), key=str):
        name = f"{where}.{key}"
        if key not in got or key not in want:
            out.append(f"{name}: only in {'restored' if key in got else 'trained'}")
            continue
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
                out.append(f"{name}: tensor differs")
        elif isinstance(b, Mapping) and isinstance(a, Mapping):
            out += mismatches(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} != {b!r}")
    return out


def count_tensors(*states: Mapping[str, Any]) -> int:
    n = 0
    for s in states:
        for v in s.values():
            n += count_tensors(v) if isinstance(v, Mapping) else isinstance(v, torch.Tensor)
    return n


@dataclass
class Trainer:
    """The training loop and its snapshots."""

    args: argparse.Namespace
    model: Qwen2ForCausalLM
    opt: torch.optim.AdamW
    client: Client
    reporter: Reporter
    step: int = 0
    loss: float = math.nan
    last: SnapshotHandle | None = None
    step_times: list[float] = field(default_factory=list)
    gen: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.args.seed)

    def train_step(self) -> None:
        t0 = time.perf_counter()
        ids, labels = batch(self.args, self.gen)
        out = self.model(input_ids=ids, labels=labels)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.loss = out.loss.item()
        self.step_times.append(time.perf_counter() - t0)

    def tree(self) -> dict[str, Any]:
        # Plain values (step, loss) go into the manifest as JSON, tensors into the shards.
        return {"model": self.model, "optimizer": self.opt, "step": self.step, "loss": self.loss}

    def snapshot(self) -> None:
        handle = self.client.snapshot(self.tree(), step=self.step)
        if not self.reporter.records:
            self.reporter.header(state_bytes(self.model, self.opt), str(self.client.root / self.args.run))
        self.reporter.track(handle, self.loss)
        self.last = handle

    def run(self) -> SnapshotHandle:
        """Train until the deadline, snapshotting every ``--every`` steps; returns the last handle."""
        self.model.train()
        deadline = time.monotonic() + self.args.seconds
        steps = self.args.steps
        try:
            while self.step < steps if steps is not None else time.monotonic() < deadline:
                self.train_step()
                if self.step == 1:
                    # AdamW made its state in that step: make the arena slots for snapshots of
                    # this tree now, so the first snapshot stalls only for its copy.
                    self.client.prepare(self.tree())
                if self.step % self.args.every == 0:
                    self.snapshot()
        except KeyboardInterrupt:
            print("interrupted: finishing with a last snapshot and the restore check")
        # The restore check compares with the final state, so that state must be the last snapshot.
        if self.last is None or self.last.step != self.step:
            self.snapshot()
        assert self.last is not None
        return self.last


def check_restore(args: argparse.Namespace, client: Client, trainer: Trainer) -> tuple[int, list[str]]:
    """Restore the newest committed step into a model and optimizer built from another seed (so a
    restore that loaded nothing could not pass) and list every difference from the trained ones."""
    model, opt = build(args, args.seed + 1)
    target: dict[str, Any] = {"model": model, "optimizer": opt, "step": -1, "loss": math.nan}
    restored_step = client.restore(target)
    trained = {"model": trainer.model.state_dict(), "optimizer": trainer.opt.state_dict()}
    restored = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    problems = mismatches(restored, trained, "state")
    if restored_step != trainer.step or target["step"] != trainer.step:
        problems.append(
            f"restored step {restored_step} (tree says {target['step']}), trained to {trainer.step}"
        )
    if target["loss"] != trainer.loss:
        problems.append(f"restored loss {target['loss']!r}, trained {trainer.loss!r}")
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        problems.append("lm_head is no longer tied to the embedding")
    return count_tensors(restored), problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The client logs warnings (a retry, a skipped corrupt step) worth seeing next to the output.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model, opt = build(args, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Qwen2-style, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} "
        f"layers, vocab {args.vocab}), batch {args.batch}x{args.seq}, {torch.get_num_threads()} "
        f"threads, {args.device}"
    )
    try:
        client = Client.connect(args.socket, root=args.root, run=args.run)
    except CheckpointError as e:  # e.g. a daemon already runs on that socket with another root
        print(f"cannot connect to ckptd: {e}", file=sys.stderr)
        return 2
    print(f"ckptd: socket {client.socket_path}, root {client.root}, run {args.run}")
    reporter = Reporter()
    trainer = Trainer(args, model, opt, client, reporter)
    last = trainer.run()

    try:
        info = last.wait(timeout=300)
    except (CheckpointError, TimeoutError) as e:
        print(f"the last snapshot (step {last.step}) did not commit: {e}", file=sys.stderr)
        return 1
    if not reporter.wait_all(timeout_s=60):
        print("some snapshots were never reported as committed or failed", file=sys.stderr)
        return 1
    assert info is not None  # only skipped snapshots have none, and the policy is "block"
    n_tensors, problems = check_restore(args, client, trainer)
    pid = client.status().pid
    client.close()

    records = reporter.records
    failed = sum(r.error is not None for r in records)
    stalls = [r.stall_s * 1e3 for r in records]
    durables = [r.durable_s * 1e3 for r in records if r.durable_s is not None]
    times = trainer.step_times
    print()
    print(
        f"trained {trainer.step} steps in {sum(times):.1f}s "
        f"({statistics.median(times) * 1e3:.0f} ms/step median), loss {trainer.loss:.4f}"
    )
    print(f"snapshots: {len(records)} taken, {len(records) - failed} committed, {failed} failed")
    print(f"stall: median {statistics.median(stalls):.1f} ms, max {max(stalls):.1f} ms")
    if durables:
        print(f"time to durable: median {statistics.median(durables):.1f} ms, max {max(durables):.1f} ms")
    print(f"checkpoint: {info.path}")
    print("  load it with ckptd.load(path) or AutoModelForCausalLM.from_pretrained(path)")
    if problems:
        print(f"restore: MISMATCH at step {info.step}:")
        for p in problems[:20]:
            print(f"  {p}")
    else:
        print(
            f"restore: OK, step {info.step} restored into a fresh model and optimizer, "
            f"all {n_tensors} tensors match"
        )
    print(f"daemon: pid {pid} keeps running on {client.socket_path} (stop it: kill {pid})")
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
