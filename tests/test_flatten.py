"""``client.tree.flatten``: the tree, the components and the aliases a snapshot is made of.

No daemon is needed except for the last test, which takes a flat state dict with shared storage
through a real one.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from helpers import same_bits
from torch import nn

import ckptd
from ckptd.tree import decode
from client import Client
from client.tree import MAX_DEPTH, Component, Flat, flatten


def _lookup(flat: Flat) -> Any:
    """``tensor(component, name)`` as the loader builds it: stored tensors plus their aliases."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for c in flat.components:
        loaded = dict(c.tensors)
        for alias, target in c.aliases.items():
            loaded[alias] = loaded[target]
        tensors[c.name] = loaded
    return lambda component, name: tensors[component][name]


def _decoded(flat: Flat) -> Any:
    # Through JSON, as the manifest stores the tree.
    return decode(json.loads(json.dumps(flat.tree)), _lookup(flat))


def _only(flat: Flat) -> Component:
    assert len(flat.components) == 1
    return flat.components[0]


def _stored(comp: Component) -> list[str]:
    return [n for n, _ in comp.tensors]


# --- the tree --------------------------------------------------------------------------------------


def test_flat_state_dict_is_one_module_node_that_decodes_to_the_same_dict() -> None:
    state = {f"layer{i}.weight": torch.randn(3, 2) for i in range(50)}
    state["step"] = torch.tensor(7)
    flat = flatten(state)
    assert flat.tree == {"$dict": {"model": {"$module": "model", "keys": list(state)}}}
    comp = _only(flat)
    assert comp.name == "model"
    assert _stored(comp) == list(state)
    assert comp.aliases == {}
    assert not flat.cuda
    out = _decoded(flat)
    assert list(out) == ["model"]
    assert list(out["model"]) == list(state), "same keys, same order"
    for k, v in state.items():
        assert out["model"][k] is v, k


def test_state_dict_among_plain_values_is_a_module_node_too() -> None:
    weights = {"a": torch.ones(2), "b.c": torch.zeros(3)}
    flat = flatten({"weights": weights, "step": 3, "lr": 0.5})
    assert flat.tree == {
        "$dict": {"weights": {"$module": "weights", "keys": ["a", "b.c"]}, "step": 3, "lr": 0.5}
    }
    out = _decoded(flat)
    assert out["step"] == 3 and out["lr"] == 0.5
    assert out["weights"].keys() == weights.keys()
    assert all(out["weights"][k] is v for k, v in weights.items())


def test_nested_and_mixed_values_keep_the_node_per_value_tree() -> None:
    t, u, v = torch.ones(1), torch.zeros(2), torch.arange(3)
    obj = {
        "extra": {"t": t, "n": 1, "nested": {"u": u}, "seq": [v, 2.5, None, (True, "s")], "nan": math.nan},
        "empty": {},
    }
    flat = flatten(obj)
    assert flat.tree == {
        "$dict": {
            "extra": {
                "$dict": {
                    "t": {"$tensor": ["extra", "t"]},
                    "n": 1,
                    "nested": {"$dict": {"u": {"$tensor": ["extra", "nested.u"]}}},
                    "seq": {
                        "$list": [
                            {"$tensor": ["extra", "seq.0"]},
                            2.5,
                            None,
                            {"$tuple": [True, "s"]},
                        ]
                    },
                    "nan": {"$float": "nan"},
                }
            },
            "empty": {"$dict": {}},
        }
    }
    assert _stored(_only(flat)) == ["t", "nested.u", "seq.0"]
    out = _decoded(flat)
    assert out["extra"]["t"] is t and out["extra"]["nested"]["u"] is u and out["extra"]["seq"][0] is v
    assert out["extra"]["seq"][1:] == [2.5, None, (True, "s")]
    assert math.isnan(out["extra"]["nan"])
    assert out["empty"] == {}


def test_nested_tensors_at_the_depth_limit_are_kept_and_one_deeper_refused() -> None:
    def nest(leaf: object, depth: int, as_list: bool) -> object:
        for _ in range(depth):
            leaf = [leaf] if as_list else {"k": leaf}
        return leaf

    for as_list in (False, True):
        for leaf in (torch.ones(1), 5):
            flat = flatten({"deep": nest(leaf, MAX_DEPTH, as_list), "step": 1})
            inner = _decoded(flat)["deep"]
            for _ in range(MAX_DEPTH):
                inner = inner[0] if as_list else inner["k"]
            assert inner is leaf if isinstance(leaf, torch.Tensor) else inner == leaf
            with pytest.raises(TypeError, match=f"nested deeper than {MAX_DEPTH} levels"):
                flatten({"deep": nest(leaf, MAX_DEPTH + 1, as_list), "step": 1})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_noted_wherever_a_cuda_tensor_is() -> None:
    cpu = {"a": torch.ones(2)}
    assert not flatten(cpu).cuda
    assert flatten({"a": torch.ones(2, device="cuda")}).cuda
    assert flatten({"cpu": cpu, "extra": {"x": [torch.ones(1, device="cuda")]}}).cuda
    model = nn.Linear(2, 2).cuda()
    assert flatten({"model": model, "step": 1}).cuda


# --- aliases ---------------------------------------------------------------------------------------


def test_keys_sharing_storage_are_stored_once_and_recorded_as_aliases() -> None:
    w = torch.randn(4, 4)
    state = {
        "w": w,
        "w_again": w,  # the same tensor under another key
        "w_view": w.view(4, 4),  # same storage, offset, shape and strides
        "w_param": nn.Parameter(w),  # a parameter sharing w's storage
        "flat": w.view(16),  # same start, another shape
        "flat_again": w.reshape(16),  # ... an alias of the first tensor of that shape
        "transposed": w.t(),  # same start and shape, other strides
        "as_int": w.view(torch.int32),  # same start, shape and strides, other dtype
        "row1": w[1],  # other offset
        "row1_again": w[1],
        "other": torch.randn(4, 4),
    }
    flat = flatten(state)
    comp = _only(flat)
    assert _stored(comp) == ["w", "flat", "transposed", "as_int", "row1", "other"]
    assert comp.aliases == {
        "w_again": "w",
        "w_view": "w",
        "w_param": "w",
        "flat_again": "flat",
        "row1_again": "row1",
    }
    out = _decoded(flat)["model"]
    assert list(out) == list(state)
    assert out["w_again"] is out["w"] and out["row1_again"] is out["row1"]
    for k, v in state.items():
        assert same_bits(out[k], v), k


def test_zero_element_tensors_never_alias() -> None:
    e = torch.empty(0)
    base = torch.randn(6)
    state = {
        "e": e,
        "e_again": e,
        "other_empty": torch.empty(0),
        "empty_2d": torch.empty(0, 3),
        "slice_a": base[2:2],
        "slice_b": base[2:2],
        "base": base,
    }
    comp = _only(flatten(state))
    assert _stored(comp) == list(state)
    assert comp.aliases == {}


def _reference_aliases(items: list[tuple[str, torch.Tensor]]) -> tuple[list[str], dict[str, str]]:
    """The rule, by brute force: an alias of the first stored tensor with the same data pointer,
    shape, strides and dtype, unless it has no elements."""
    stored: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    for name, t in items:
        match = next(
            (
                n
                for n, s in stored
                if t.numel()
                and (s.data_ptr(), s.shape, s.stride(), s.dtype)
                == (t.data_ptr(), t.shape, t.stride(), t.dtype)
            ),
            None,
        )
        if match is None:
            stored.append((name, t))
        else:
            aliases[name] = match
    return [n for n, _ in stored], aliases


def test_aliases_match_the_rule_on_many_views() -> None:
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(24, generator=gen), torch.randn(24, generator=gen).half(), torch.empty(0)]
    items: list[tuple[str, torch.Tensor]] = []
    for i in range(400):
        b = bases[int(torch.randint(len(bases), (1,), generator=gen))]
        if b.numel() == 0:
            t = b
        else:
            start = int(torch.randint(3, (1,), generator=gen))
            length = int(torch.randint(4, (1,), generator=gen)) * 6  # 0, 6, 12 or 18 elements
            t = b[start : start + length]
            kind = int(torch.randint(4, (1,), generator=gen))
            if kind == 1 and length:
                t = t.view(length // 6, 6)
            elif kind == 2 and length:
                t = t.view(length // 6, 6).t()
            elif kind == 3 and length and b.dtype == torch.float16:
                t = t.view(torch.int16)
        items.append((f"t{i}", t))
    comp = Component("c")
    for name, t in items:
        comp.add(name, t)
    stored, aliases = _reference_aliases(items)
    assert _stored(comp) == stored
    assert comp.aliases == aliases
    assert aliases and len(stored) > 10, "the draw covers both cases"
    bulk = Component("c")
    bulk.add_all(items)
    assert (bulk.tensors, bulk.aliases) == (comp.tensors, comp.aliases)


class _Tied(nn.Module):
    """Declares ``head.weight`` tied (Hugging Face drops it when saving); ``head`` comes first."""

    _tied_weights_keys = ["head.weight"]  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 5, bias=False)
        self.embed = nn.Embedding(5, 3)
        self.head.weight = self.embed.weight


def test_tied_weights_keep_the_name_hugging_face_keeps() -> None:
    model = _Tied()
    flat = flatten(model)
    comp = _only(flat)
    assert _stored(comp) == ["embed.weight"]
    assert comp.aliases == {"head.weight": "embed.weight"}
    assert flat.tree == {"$dict": {"model": {"$module": "model", "keys": ["head.weight", "embed.weight"]}}}
    out = _decoded(flat)["model"]
    assert out["head.weight"] is out["embed.weight"]
    assert out["embed.weight"].data_ptr() == model.embed.weight.data_ptr()


def test_optimizer_state_is_keyed_by_parameter_name() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    flat = flatten({"model": model, "optimizer": opt, "step": 1})
    comps = {c.name: c for c in flat.components}
    assert list(comps) == ["model", "optimizer"]
    assert _stored(comps["optimizer"]) == [
        f"state.{p}.{s}" for p in model.state_dict() for s in ("step", "exp_avg", "exp_avg_sq")
    ]
    out = _decoded(flat)
    saved = opt.state_dict()
    assert out["optimizer"]["param_groups"] == [
        {**g, "params": list(model.state_dict())} for g in saved["param_groups"]
    ]
    for i, name in enumerate(model.state_dict()):
        for k, v in saved["state"][i].items():
            assert same_bits(out["optimizer"]["state"][name][k], v), (name, k)
    assert out["step"] == 1


# --- the garbage collector -------------------------------------------------------------------------


class _Watching(Mapping[str, Any]):
    """A mapping that notes whether the cyclic GC is on whenever it is read."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.gc_seen: list[bool] = []

    def __getitem__(self, key: str) -> Any:
        self.gc_seen.append(gc.isenabled())
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        self.gc_seen.append(gc.isenabled())
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@pytest.fixture
def gc_state() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.usefixtures("gc_state")
def test_gc_is_paused_during_flatten_and_restored_after() -> None:
    gc.enable()
    watching = _Watching({"a": torch.ones(1), "b": 1})
    flatten({"extra": watching, "step": 2})
    assert watching.gc_seen and not any(watching.gc_seen)
    assert gc.isenabled()


@pytest.mark.usefixtures("gc_state")
def test_gc_left_off_when_the_caller_had_it_off() -> None:
    gc.disable()
    flatten({"w": torch.ones(1)})
    assert not gc.isenabled()
    with pytest.raises(ValueError, match="meta device"):
        flatten({"w": torch.empty(1, device="meta")})
    assert not gc.isenabled()


@pytest.mark.usefixtures("gc_state")
@pytest.mark.parametrize(
    "obj",
    [
        {"w": torch.empty(1, device="meta")},
        {"model": {1: torch.ones(1)}, "step": 1},
        {"model": {"w": torch.ones(1), "o": object()}},
        3,
    ],
    ids=["meta", "non-str-key", "object", "not-a-tree"],
)
def test_gc_re_enabled_when_flatten_raises(obj: object) -> None:
    gc.enable()
    with pytest.raises((TypeError, ValueError)):
        flatten(obj)
    assert gc.isenabled()


# --- errors ----------------------------------------------------------------------------------------


def _raises(exc: type[Exception], message: str, obj: object) -> None:
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        flatten(obj)


META = (
    "is on the meta device (an offloaded or uninitialised parameter); "
    "onload the model (accelerate) before snapshotting"
)


def test_non_string_keys_are_refused_as_before() -> None:
    _raises(TypeError, "dict keys in a snapshot must be strings; model/ has 1", {1: torch.ones(1)})
    _raises(
        TypeError,
        "dict keys in a snapshot must be strings; model/ has 2",
        {"a": torch.ones(1), 2: torch.ones(1)},
    )
    _raises(
        TypeError,
        "dict keys in a snapshot must be strings; extra/inner has 3",
        {"extra": {"inner": {3: torch.ones(1)}}},
    )
    _raises(TypeError, "top-level keys must be strings, got 1", {1: 2, "step": 3})


def test_meta_tensors_are_refused_as_before() -> None:
    _raises(ValueError, f"tensor model/w {META}", {"a": torch.ones(1), "w": torch.empty(2, device="meta")})
    _raises(ValueError, f"tensor opt/s.m {META}", {"opt": {"s": {"m": torch.empty(2, device="meta")}}})
    with torch.device("meta"):
        meta_model = nn.Linear(2, 2)
    _raises(ValueError, f"tensor model/weight {META}", meta_model)
    # The meta check comes before the dtype check.
    _raises(
        ValueError, f"tensor model/c {META}", {"c": torch.empty(2, dtype=torch.complex128, device="meta")}
    )


def test_other_errors_unchanged() -> None:
    _raises(
        TypeError,
        "tensor 'c' has dtype torch.complex128, which safetensors cannot store; "
        "convert it (e.g. complex128 -> two float64 tensors) before snapshotting",
        {"a": torch.ones(1), "c": torch.ones(1, dtype=torch.complex128)},
    )
    _raises(
        ValueError,
        "two tensors would both be named 'a.b' in component 'model'; "
        "rename a key so that dotted paths are unique",
        {"model": {"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}},
    )
    with pytest.raises(ValueError, match="cannot name a checkpoint component"):
        flatten({"../evil": {"w": torch.ones(1)}})
    with pytest.raises(TypeError, match="nothing is pickled"):
        flatten({"w": torch.ones(1), "obj": object()})


# --- through a daemon ------------------------------------------------------------------------------


def test_flat_state_dict_with_shared_storage_round_trips(client: Client) -> None:
    w = torch.randn(4, 4)
    state = {"w": w, "w_again": w, "row": w[1], "empty": torch.empty(0), "b": torch.arange(3)}
    info = client.snapshot(state, step=1).wait(30)
    assert info is not None
    loaded = ckptd.load(info.path)["model"]
    assert list(loaded) == list(state)
    assert loaded["w_again"] is loaded["w"]
    for k, v in state.items():
        assert same_bits(loaded[k], v), k
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    client.restore(target)
    for k, v in state.items():
        assert same_bits(target[k], v), k
