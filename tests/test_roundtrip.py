"""Every kind of content, through a real daemon, back bit-exact via client.restore and ckptd.load."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import same_bits
from safetensors.torch import load_file
from torch import nn

import ckptd
from client import Client
from client.handle import CommitInfo


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def _trained(
    opt_cls: Callable[..., torch.optim.Optimizer], **kw: object
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _commit(client: Client, obj: object, step: int = 1) -> CommitInfo:
    info = client.snapshot(obj, step=step).wait(30)
    assert info is not None
    return info


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k, v in a.items():
        assert same_bits(v, b[k]), k


def _assert_optimizers_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert same_bits(v, sb["state"][i][k]), (i, k)
            else:
                assert v == sb["state"][i][k]


def test_module_round_trip(client: Client) -> None:
    model = _model()
    info = _commit(client, model)
    assert info.path == client.root / "default" / "step-000001"
    fresh = _model(seed=1)
    assert client.restore(fresh) == 1
    _assert_states_equal(model.state_dict(), fresh.state_dict())
    _assert_states_equal(model.state_dict(), ckptd.load(info.path)["model"])
    # Plain safetensors readers see the model too.
    shards = sorted(info.path.glob("model*.safetensors"))
    loaded = {k: v for s in shards for k, v in load_file(s).items()}
    assert loaded.keys() == model.state_dict().keys()


def test_state_dict_round_trip(client: Client) -> None:
    state = {"a": torch.randn(3, 3), "b": torch.arange(5)}
    info = _commit(client, state)
    target = {"a": torch.zeros(3, 3), "b": torch.zeros(5, dtype=torch.int64)}
    a_before = target["a"]
    client.restore(target)
    assert target["a"] is a_before, "restored in place"
    _assert_states_equal(state, target)
    _assert_states_equal(state, ckptd.load(info.path)["model"])


def test_every_host_copy_path_stores_the_values(client: Client) -> None:
    """Small contiguous tensors are copied with a raw memmove, the rest by torch: strided,
    broadcast, lazily negated or conjugated, large, empty, storage-less and offset views all
    arrive intact, also when the second snapshot reuses the first one's plan."""
    base = torch.randn(64)
    state = {
        "small": torch.randn(7, 5),
        "bf16": torch.randn(3, 9).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "offset": base[13:29].view(4, 4),  # contiguous, into the middle of a storage
        "strided": torch.randn(6, 8).t(),
        "broadcast": torch.randn(1, 4).expand(3, 4),
        "negated": torch._neg_view(torch.randn(5)),  # contiguous, with a lazy negation bit
        "conjugated": torch.randn(3, dtype=torch.complex64).conj(),
        "large": torch.randn(600_000),  # above the raw-copy size
        "empty": torch.zeros(0, 3),
        "zero": torch._efficientzerotensor((6,)),  # no storage: data_ptr() is 0
    }
    assert state["negated"].is_neg() and state["negated"].is_contiguous()
    for step in (1, 2):
        if step == 2:
            with torch.no_grad():
                for t in (state["small"], state["large"], base):
                    t.add_(1)
        expected = {k: v.resolve_neg().resolve_conj().contiguous().clone() for k, v in state.items()}
        info = _commit(client, state, step=step)
        shards = sorted(info.path.glob("model*.safetensors"))
        loaded = {k: v for s in shards for k, v in load_file(s).items()}
        _assert_states_equal(expected, {k: loaded[k] for k in expected})
        _assert_states_equal(expected, ckptd.load(info.path)["model"])


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [(torch.optim.AdamW, {"lr": 1e-2, "betas": (0.8, 0.9)}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})],
)
def test_optimizer_state_keyed_by_parameter_name(
    client: Client, opt_cls: Callable[..., torch.optim.Optimizer], kw: dict[str, object]
) -> None:
    model, opt = _trained(opt_cls, **kw)
    info = _commit(client, {"model": model, "optimizer": opt, "step": 3})
    stored = load_file(info.path / "optimizer" / "optimizer.safetensors")  # one shard: no index
    names = {n for n, _ in model.named_parameters()}
    state_keys = {k for k in stored if k.startswith("state.")}
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in state_keys} == names
    model2 = _model(seed=5)
    opt2 = opt_cls(model2.parameters(), lr=123.0)
    tree = {"model": model2, "optimizer": opt2, "step": 0}
    assert client.restore(tree) == 1
    assert tree["step"] == 3
    _assert_states_equal(model.state_dict(), model2.state_dict())
    _assert_optimizers_equal(opt, opt2)
    # The restored optimizer keeps training exactly like the original.
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(9)
        o.zero_grad()
        m(torch.randn(4, 8)).pow(2).mean().backward()
        o.step()
    _assert_states_equal(model.state_dict(), model2.state_dict())
    loaded = ckptd.load(info.path)["optimizer"]
    assert set(loaded["state"]) == names
    assert loaded["param_groups"][0]["params"] == [n for n, _ in model.named_parameters()]


def test_tree_with_plain_values(client: Client) -> None:
    tree = {
        "model": _model(),
        "extra": {"ema": {"w": torch.randn(4)}, "hist": [torch.ones(2), 3], "name": "x"},
        "step": 7,
        "lr": 0.5,
        "flags": [True, None, "s", (1, 2)],
        "nan": float("nan"),
        "inf": float("-inf"),
    }
    info = _commit(client, tree, step=7)
    loaded = ckptd.load(info.path)
    assert loaded["step"] == 7 and loaded["lr"] == 0.5
    assert loaded["flags"] == [True, None, "s", (1, 2)]
    assert loaded["nan"] != loaded["nan"] and loaded["inf"] == float("-inf")
    assert loaded["extra"]["name"] == "x" and loaded["extra"]["hist"][1] == 3
    assert same_bits(loaded["extra"]["ema"]["w"], tree["extra"]["ema"]["w"])  # type: ignore[index]
    target = copy.deepcopy(tree)
    target["step"] = 0
    target["extra"]["ema"]["w"].zero_()  # type: ignore[index]
    client.restore(target)
    assert target["step"] == 7
    assert same_bits(target["extra"]["ema"]["w"], tree["extra"]["ema"]["w"])  # type: ignore[index]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_stored_once_and_restored_tied(client: Client) -> None:
    model = Tied()
    info = _commit(client, model)
    stored = load_file(info.path / "model.safetensors")  # one shard: no index
    assert set(stored) == {"embed.weight"}, "the tied copy is not stored twice"
    loaded = ckptd.load(info.path)["model"]
    assert loaded["head.weight"] is loaded["embed.weight"]
    fresh = Tied()
    client.restore(fresh)
    assert fresh.head.weight is fresh.embed.weight
    assert same_bits(fresh.embed.weight, model.embed.weight)


def test_awkward_tensors(client: Client) -> None:
    base = torch.randn(6, 8)
    state = {
        "noncontig": base.t(),
        "strided": base[::2, 1::3],
        "bf16": torch.randn(5, 3).bfloat16(),
        "fp8": torch.randn(4).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(4).to(torch.float8_e5m2),
        "f16": torch.randn(3).half(),
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7),
        "empty": torch.empty(0, 3),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "i16": torch.arange(5, dtype=torch.int16),
        "i32": torch.arange(5, dtype=torch.int32),
        "u16": torch.arange(5).to(torch.uint16),
        "u32": torch.arange(5).to(torch.uint32),
        "u64": torch.arange(5).to(torch.uint64),
        "f64": torch.randn(3, dtype=torch.float64),
        "c64": torch.randn(3, dtype=torch.complex64),
        "negzero_nan": torch.tensor([-0.0, float("nan"), float("inf")]),
    }
    info = _commit(client, state)
    loaded = ckptd.load(info.path)["model"]
    for k, v in state.items():
        assert same_bits(loaded[k], v.contiguous()), k
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    client.restore(target)
    for k, v in state.items():
        assert same_bits(target[k], v), k


def test_restore_picks_newest_step_and_explicit_steps(client: Client) -> None:
    model = _model()
    for step in (10, 20, 30):
        with torch.no_grad():
            model[0].weight.fill_(step)
        _commit(client, model, step=step)
    assert ckptd.latest(client.root) == client.root / "default" / "step-000030"
    fresh = _model()
    assert client.restore(fresh) == 30
    assert fresh[0].weight[0, 0].item() == 30
    assert client.restore(fresh, step=20) == 20
    assert fresh[0].weight[0, 0].item() == 20


def test_runs_are_separate(client: Client) -> None:
    _commit(client, {"w": torch.ones(2)}, step=1)
    client.snapshot({"w": torch.full((2,), 2.0)}, step=1, run="other").wait(30)
    target = {"w": torch.zeros(2)}
    client.restore(target, run="other")
    assert target["w"].tolist() == [2.0, 2.0]
    runs = sorted(p.name for p in client.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["default", "other"]  # beside .ckptd-nodes/ (the daemon's node lock)


def test_restore_reports_a_mismatched_target(client: Client) -> None:
    _commit(client, _model())
    from client import CheckpointError

    with pytest.raises(CheckpointError, match="no \\['optimizer'\\]"):
        client.restore({"model": _model(), "optimizer": torch.optim.SGD(_model().parameters(), lr=1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        client.restore(nn.Sequential(nn.Linear(8, 17), nn.LayerNorm(17), nn.ReLU(), nn.Linear(17, 3)))


def test_component_names_must_be_safe(client: Client) -> None:
    with pytest.raises(ValueError, match="cannot name a checkpoint component"):
        client.snapshot({"../evil": {"w": torch.ones(1)}, "step": 1}, step=1)
    with pytest.raises(ValueError, match="run name"):
        client.snapshot({"w": torch.ones(1)}, step=1, run="../../etc")


def test_unsupported_values_are_refused_clearly(client: Client, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="nothing is pickled"):
        client.snapshot({"w": torch.ones(1), "obj": object()}, step=1)
    with pytest.raises(TypeError, match="cannot snapshot a int"):
        client.snapshot(3, step=1)


def test_restore_falls_back_past_a_corrupt_step_only_when_allowed(client: Client) -> None:
    from client import CheckpointError

    for step in (1, 2):
        _commit(client, {"w": torch.full((4,), float(step))}, step=step)
    shard = next((client.root / "default" / "step-000002").glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = {"w": torch.zeros(4)}
    with pytest.raises(CheckpointError, match="checksum") as e:
        client.restore(target, fallback=False)
    assert e.value.code == "corrupt" and target["w"].tolist() == [0.0] * 4, "nothing half-restored"
    assert client.restore(target) == 1
    assert target["w"].tolist() == [1.0] * 4
