"""The layout planner: Hugging Face's shard rule, alignment, and a slot that holds everything."""

from __future__ import annotations

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.dtypes import ITEMSIZE
from ckptd.layout import (
    ALIGN,
    TensorSpec,
    component_files,
    plan,
    small_file,
    split_shards,
    split_small_file,
)
from ckptd.torch_dtypes import FROM_SAFETENSORS

specs_strategy = st.lists(
    st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 40), min_size=0, max_size=3)),
    min_size=1,
    max_size=30,
).map(lambda xs: [TensorSpec(f"t{i}", dt, tuple(shape)) for i, (dt, shape) in enumerate(xs)])


@settings(max_examples=150, deadline=None)
@given(specs=specs_strategy, max_shard=st.integers(1, 4000))
def test_split_matches_huggingface_hub(specs: list[TensorSpec], max_shard: int) -> None:
    # Distinct storages, as in a state dict without ties (ties are removed before splitting).
    state = {s.name: torch.empty(s.shape, dtype=FROM_SAFETENSORS[s.dtype]) for s in specs}
    hf = split_torch_state_dict_into_shards(state, max_shard_size=max_shard)
    hf_groups = sorted(sorted(names) for names in hf.filename_to_tensors.values())
    ours = sorted(sorted(s.name for s in group) for group in split_shards(specs, max_shard))
    # HF skips zero-byte storages' duplicates by storage id; empty tensors all share id 0, so
    # compare only shards of tensors with bytes.
    if all(s.nbytes for s in specs):
        assert ours == hf_groups


@settings(max_examples=150, deadline=None)
@given(specs=specs_strategy, max_shard=st.integers(1, 4000))
def test_every_tensor_is_aligned_and_shards_do_not_overlap(specs: list[TensorSpec], max_shard: int) -> None:
    lay = plan([("model", specs)], max_shard)
    placed = [p for c in lay.components for s in c.shards for p in s.tensors]
    assert sorted(p.spec.name for p in placed) == sorted(s.name for s in specs)
    end = 0
    for shard in lay.components[0].shards:
        assert shard.offset % ALIGN == 0
        assert shard.offset >= end
        end = shard.offset + shard.nbytes
        pos = 0
        for p in shard.tensors:
            assert p.start == pos, "tensors are back to back: safetensors forbids gaps"
            assert p.start % ITEMSIZE[p.spec.dtype] == 0, "every view must be aligned"
            pos = p.end
        assert pos == shard.nbytes
    assert lay.slot_bytes >= end


def test_oversized_tensor_gets_its_own_shard_and_order_is_kept() -> None:
    specs = [
        TensorSpec("a", "F32", (10,)),
        TensorSpec("big", "F32", (1000,)),
        TensorSpec("b", "F32", (10,)),
        TensorSpec("c", "F32", (20,)),
    ]
    groups = [[s.name for s in g] for g in split_shards(specs, 100)]
    assert groups == [["big"], ["a", "b"], ["c"]]


def test_several_components_share_one_slot() -> None:
    lay = plan(
        [("model", [TensorSpec("w", "BF16", (3, 5))]), ("optimizer", [TensorSpec("m", "F32", (7,))])],
        10**9,
    )
    assert [c.name for c in lay.components] == ["model", "optimizer"]
    assert lay.components[1].shards[0].offset == ALIGN


def test_file_names_are_what_save_pretrained_writes_and_other_components_in_their_directory() -> None:
    assert component_files("model", 1).shard(0) == "model.safetensors"
    assert component_files("model", 1).index is None  # one shard: no index, as save_pretrained
    model = component_files("model", 3)
    assert [model.shard(i) for i in range(3)] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert model.index == "model.safetensors.index.json"
    opt = component_files("optimizer", 2)
    assert (opt.dir, opt.shard(1), opt.name(1)) == (
        "optimizer",
        "optimizer/optimizer-00002-of-00002.safetensors",
        "optimizer-00002-of-00002.safetensors",  # what its index maps to, in its directory
    )
    assert opt.index == "optimizer/optimizer.safetensors.index.json"
    teacher = component_files("teacher", 1, pretrained=True)
    assert teacher.shard(0) == "teacher/model.safetensors"
    assert small_file("model", "config.json") == "config.json"
    assert small_file("teacher", "config.json") == "teacher/config.json"
    assert split_small_file("teacher/config.json") == ("teacher", "config.json")
    assert split_small_file("config.json") == ("model", "config.json")
