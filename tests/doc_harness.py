"""Run the ```python examples of one section (``## Title``) of a markdown file, in order, as a
reader would: ``doc_harness.py FILE.md "Title"`` (run by ``tests/test_doc_examples.py`` in a fresh
directory, with ``CKPTD_SOCKET`` and ``CKPTD_ROOT`` naming a daemon of its own for each section).

The examples of a section share one namespace, so a later example may use what an earlier one
made (``trainer``, ``ckpt``). Names an example uses that the documentation leaves to the reader (its
model, optimizer, data, ``train_step``, ...) come from ``SUPPLIED``, made afresh for each example
that mentions them: a tiny GPT-2 as ``model`` (a Hugging Face model that ``from_pretrained``
loads), or a tiny LightningModule when the example imports ``lightning``.

An example is skipped only when the line right above its fence is ``<!-- doc-test: skip REASON
-->`` (for an example that cannot run here; keep them rare).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```python\s*$")
SECTION = re.compile(r"^##\s+(.*?)\s*$")
SKIP = re.compile(r"^<!--\s*doc-test:\s*skip\b.*-->\s*$")


@dataclass(frozen=True)
class Example:
    where: str  # FILE.md:LINE of the opening fence
    section: str  # the title of the ``##`` section it is in ("" before the first)
    code: str
    skipped: bool


def examples(markdown: Path) -> Iterator[Example]:
    lines = markdown.read_text().splitlines()
    section = ""
    i = 0
    while i < len(lines):
        if m := SECTION.match(lines[i]):
            section = m.group(1)
        elif FENCE.match(lines[i]):
            start = i
            i += 1
            body: list[str] = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            skipped = start > 0 and bool(SKIP.match(lines[start - 1]))
            yield Example(f"{markdown.name}:{start + 1}", section, "\n".join(body) + "\n", skipped)
        elif lines[i].startswith("```"):  # another language's block: skip to its end
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
        i += 1


def used_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def imports_lightning(tree: ast.AST) -> bool:
    for n in ast.walk(tree):
        if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "lightning" for a in n.names):
            return True
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "lightning":
            return True
    return False


# --- what the reader supplies ----------------------------------------------------------------


def _tiny_gpt2() -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def _my_module() -> type:
    import lightning as L
    import torch
    from torch import nn

    class MyModule(L.LightningModule):  # type: ignore[misc]
        def __init__(self, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    return MyModule


class _Tokens:
    def __init__(self, n: int = 32) -> None:
        import torch

        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_step(model: Any, optimizer: Any, batch: dict[str, Any]) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _train_loader() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(2048, 4, generator=torch.Generator().manual_seed(0))  # one epoch: 2048 steps
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=1)


class Supplies:
    """The names the examples leave to the reader, made for one example."""

    def __init__(self, lightning: bool) -> None:
        self.lightning = lightning
        self.made: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self.made:
            self.made[name] = SUPPLIED[name](self)
        return self.made[name]


_clients: list[Any] = []


def _client(_: Supplies) -> Any:
    from client import Client

    if not _clients:
        _clients.append(Client.connect())
    return _clients[0]


def _module(name: str) -> Callable[[Supplies], Any]:
    def load(_: Supplies) -> Any:
        __import__(name)
        return sys.modules[name.split(".", maxsplit=1)[0]]

    return load


def _batch(_: Supplies) -> dict[str, Any]:
    ids = _Tokens(4).ids
    return {"input_ids": ids, "labels": ids}


def _optimizer(s: Supplies) -> Any:
    import torch

    return torch.optim.AdamW(s.get("model").parameters(), lr=1e-3)


def _auto_model(_: Supplies) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


SUPPLIED: dict[str, Callable[[Supplies], Any]] = {
    "torch": _module("torch"),
    "ckptd": _module("ckptd"),
    "safetensors": _module("safetensors.torch"),
    "AutoModelForCausalLM": _auto_model,
    "MyModule": lambda s: _my_module(),
    "model": lambda s: s.get("MyModule")() if s.lightning else _tiny_gpt2(),
    "optimizer": _optimizer,
    "batch": _batch,
    "steps": lambda s: 501,  # "Using it": steps 0 and 500, then (rerun) 1000
    "train_step": lambda s: _train_step,
    "train_dataset": lambda s: _Tokens(),
    "train_loader": lambda s: _train_loader(),
    "client": _client,
}


def run(markdown: Path, section: str) -> int:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for ex in examples(markdown):
        if ex.section != section:
            continue
        if ex.skipped:
            sys.stdout.write(f"doc-test: {ex.where} skipped (marked)\n")
            continue
        tree = ast.parse(ex.code, ex.where)
        supplies = Supplies(imports_lightning(tree))
        for name in sorted(used_names(tree) & SUPPLIED.keys()):
            namespace[name] = supplies.get(name)
        sys.stdout.write(f"doc-test: {ex.where} running\n")
        sys.stdout.flush()
        exec(compile(tree, ex.where, "exec"), namespace)
        sys.stdout.write(f"doc-test: {ex.where} ok\n")
    for c in _clients:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2]))
