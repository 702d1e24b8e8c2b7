"""Tensors a snapshot cannot store as they are: refused by ``snapshot()`` before any copy, with
an error that names the tensor and says what to do, and nothing committed.

- A tensor whose storage is smaller than its view (``untyped_storage().resize_(0)``, as FSDP does
  to freed unsharded parameters, or a storage shrunk under a view): copying it would read outside
  the storage (a segfault, or foreign bytes committed). Each case runs the trainer in a
  subprocess, so a regression shows as a crash (-11), not as a dead pytest.
- Sparse tensors, quantized tensors, and dtypes safetensors cannot store: a refusal specific to
  the layout or dtype. The fp8 "fnuz" dtypes, which safetensors stores, round-trip.
- Names the daemon reserves (component ``ckptd``, tensor names ``""`` and ``__metadata__``):
  refused by ``snapshot()``, not only by the daemon at ``wait()``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import DaemonProc
from helpers import same_bits, step_dirs

import ckptd
from client import Client

# A trainer that snapshots step 1 (a valid state), then the bad state as step 2, then a valid
# state as step 3, and reports as JSON what each snapshot gave. ``CASE`` builds the bad state.
TRAINER = textwrap.dedent(
    """
    import json, sys
    import torch
    from client import Client

    sock, case = sys.argv[1], sys.argv[2]
    MiB = 2**20

    def bad_state():
        if case == "resized_to_zero":  # FSDP's freed unsharded parameter
            model = torch.nn.Linear(256, 256)
            model.weight.untyped_storage().resize_(0)
            return {"model": model}
        if case == "4mib_view_on_4kib":
            w = torch.randn(1024, 1024)
            w.untyped_storage().resize_(4096)
            return {"model": {"w": w, "b": torch.ones(4)}}
        if case == "strided_view_on_short_storage":
            w = torch.randn(512, 512).t()  # not contiguous: torch's copy path
            w.untyped_storage().resize_(4096)
            return {"model": {"w": w}}
        if case == "offset_view_past_storage":
            base = torch.randn(4096)
            v = base[1024:]
            base.untyped_storage().resize_(4096 * 4 - 8)
            return {"model": {"v": v}}
        if case == "set_storage_then_shrunk":
            t = torch.empty(0)
            t.set_(torch.UntypedStorage(4 * MiB), 0, (1024, 1024), (1024, 1))
            t.untyped_storage().resize_(4096)
            return {"opt": {"state": [t]}}
        if case == "cuda_resized_to_zero":  # the device-to-host copy path
            model = torch.nn.Linear(256, 256).cuda()
            model.weight.untyped_storage().resize_(0)
            return {"model": model}
        if case == "16_bytes_on_8":
            x = torch.arange(4, dtype=torch.float32)
            x.untyped_storage().resize_(8)
            return {"model": {"x": x}}
        raise SystemExit(f"unknown case {case}")

    good = {"model": {"ok": torch.arange(8, dtype=torch.float32)}}
    out = {}
    with Client.connect(sock, autostart=False) as c:
        c.snapshot(good, step=1).wait(60)
        try:
            c.snapshot(bad_state(), step=2).wait(60)
            out["bad"] = "accepted"
        except Exception as e:
            out["bad"] = f"{type(e).__name__}: {e}"
        c.snapshot(good, step=3).wait(60)
    print(json.dumps(out), flush=True)
    """
)


def run_trainer(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in its own process (a segfault there fails this test, not pytest); what it
    printed last, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"trainer exited with {proc.returncode}: {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict)
    return out


CASES = {
    # case: (tensor name the error must give, storage bytes it must give)
    "resized_to_zero": ("model/weight", "0 bytes"),
    "4mib_view_on_4kib": ("model/w", "4096 bytes"),
    "strided_view_on_short_storage": ("model/w", "4096 bytes"),
    "offset_view_past_storage": ("model/v", "16376 bytes"),
    "set_storage_then_shrunk": ("opt/state.0", "4096 bytes"),
    "16_bytes_on_8": ("model/x", "8 bytes"),
    "cuda_resized_to_zero": ("model/weight", "0 bytes"),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.gpu) if c.startswith("cuda") else c for c in sorted(CASES)],
)
def test_tensor_larger_than_its_storage_is_refused_not_copied(
    case: str, daemon: DaemonProc, record_property: Callable[[str, object], None]
) -> None:
    out = run_trainer(TRAINER, str(daemon.socket), case)
    name, storage = CASES[case]
    message = str(out["bad"])
    assert message.startswith("ValueError: "), message
    assert name in message and storage in message and "storage" in message, message
    assert "stride" in message and "offset" in message, message
    if case.endswith("resized_to_zero"):
        assert "FSDP" in message and "state_dict" in message, message
    # Nothing of step 2 was committed; the client went on with step 3.
    run_dir = daemon.root / "default"
    assert step_dirs(run_dir) == ["step-000001", "step-000003"]
    record_property("runs", 1)
    record_property("committed", 2)
    record_property("lost", sum(1 for s in step_dirs(run_dir) if ckptd.verify(run_dir / s)))


# FSDP frees and restores storages between steps: the plan is cached, the check must not be.
RESIZED_BETWEEN = textwrap.dedent(
    """
    import json, sys
    import torch
    import ckptd
    from client import Client

    out = {}
    model = torch.nn.Linear(64, 64)
    saved = model.weight.detach().clone()
    with Client.connect(sys.argv[1], autostart=False) as c:
        c.snapshot({"model": model}, step=1).wait(60)
        model.weight.untyped_storage().resize_(0)
        try:
            c.snapshot({"model": model}, step=2).wait(60)
            out["bad"] = "accepted"
        except Exception as e:
            out["bad"] = f"{type(e).__name__}: {e}"
        model.weight.untyped_storage().resize_(saved.nbytes)
        with torch.no_grad():
            model.weight.copy_(saved)
        info = c.snapshot({"model": model}, step=3).wait(60)
        out["equal"] = torch.equal(ckptd.load(info.path)["model"]["weight"], saved)
    print(json.dumps(out), flush=True)
    """
)


def test_storage_shrunk_between_snapshots_of_one_signature(daemon: DaemonProc) -> None:
    out = run_trainer(RESIZED_BETWEEN, str(daemon.socket))
    assert str(out["bad"]).startswith("ValueError: ") and "model/weight" in str(out["bad"]), out
    assert out["equal"] is True
    assert step_dirs(daemon.root / "default") == ["step-000001", "step-000003"]


def test_tensors_that_touch_no_bytes_pass_the_extent_check(client: Client, workdir: Path) -> None:
    """Zero-element views (even at an offset past their storage), an efficient zero tensor and
    a view ending exactly at its storage's end are fine."""
    base = torch.arange(16, dtype=torch.float32)
    state = {
        "empty_far": torch.empty(0).set_(torch.UntypedStorage(0), 0, (0, 3), (3, 1)),
        "tail": base[12:],
        "zero": torch._efficientzerotensor((6,)),
        "strided_tail": base.view(4, 4).t()[3:],
    }
    info = client.snapshot({"model": state}, step=1).wait(60)
    assert info is not None
    loaded = ckptd.load(info.path)["model"]
    assert loaded["empty_far"].shape == (0, 3)
    assert same_bits(loaded["tail"], base[12:])
    assert same_bits(loaded["strided_tail"], base.view(4, 4).t()[3:].contiguous())


SPARSE = {
    "coo": lambda t: t.to_sparse(),
    "csr": lambda t: t.to_sparse_csr(),
    "csc": lambda t: t.to_sparse_csc(),
    "bsr": lambda t: t.to_sparse_bsr((2, 2)),
    "bsc": lambda t: t.to_sparse_bsc((2, 2)),
}


@pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR|CSC|BSC) tensor support is in beta")
@pytest.mark.parametrize("layout", sorted(SPARSE))
def test_sparse_tensor_is_refused_with_what_to_do(client: Client, layout: str) -> None:
    sparse = SPARSE[layout](torch.eye(4))
    with pytest.raises(ValueError) as e:
        client.snapshot({"model": {"emb": sparse}}, step=1)
    message = str(e.value)
    assert "model/emb" in message and "sparse" in message and str(sparse.layout) in message, message
    assert ".to_dense()" in message and "values()" in message, message
    assert "data pointer" not in message
    assert step_dirs(client.root / "default") == []


def _raw(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8).view(dtype)


REFUSED_DTYPES: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    "complex128": (lambda: torch.zeros(3, dtype=torch.complex128), "two float64 tensors"),
    "complex32": (lambda: torch.zeros(3, dtype=torch.complex32), ".to(torch.complex64)"),
    "qint8": (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8), ".dequantize()"),
    "quint4x2": (lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint4x2), ".dequantize()"),
    "uint4": (lambda: _raw(torch.uint4), ".view(torch.uint8)"),
    "int4": (lambda: _raw(torch.int4), ".view(torch.uint8)"),
    "bits16": (lambda: torch.zeros(4, dtype=torch.int16).view(torch.bits16), ".view(torch.uint16)"),
    "bits8": (lambda: _raw(torch.bits8), ".view(torch.uint8)"),
    "float8_e8m0fnu": (lambda: _raw(torch.float8_e8m0fnu), ".view(torch.uint8)"),
    "float4_e2m1fn_x2": (lambda: _raw(torch.float4_e2m1fn_x2), ".view(torch.uint8)"),
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", sorted(REFUSED_DTYPES))
def test_unsupported_dtype_refusal_is_specific_to_the_dtype(client: Client, dtype: str) -> None:
    make, fix = REFUSED_DTYPES[dtype]
    try:
        t = make()
    except (RuntimeError, TypeError) as e:  # not every build makes every bit type
        pytest.skip(f"torch cannot make a {dtype} tensor here: {e}")
    with pytest.raises(TypeError) as e:
        client.snapshot({"model": {"w": t}}, step=1)
    message = str(e.value)
    assert "'w'" in message and f"torch.{dtype}" in message and fix in message, message
    if dtype != "complex128":
        assert "complex128" not in message, message
    assert step_dirs(client.root / "default") == []


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz], ids=str)
def test_fp8_fnuz_dtypes_round_trip(client: Client, dtype: torch.dtype) -> None:
    """safetensors stores them (``F8_E4M3FNUZ``, ``F8_E5M2FNUZ``): so does ckptd."""
    t = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    info = client.snapshot({"model": {"w": t}}, step=1).wait(60)
    assert info is not None
    assert same_bits(ckptd.load(info.path)["model"]["w"], t)
    (shard,) = sorted(Path(info.path).glob("model*.safetensors"))
    assert same_bits(safetensors.torch.load_file(shard)["w"], t)


RESERVED = {
    "component_ckptd": ({"ckptd": {"w": torch.ones(2)}}, "'ckptd'"),
    "empty_tensor_name": ({"model": {"": torch.ones(2)}}, "''"),
    "metadata_tensor": ({"model": {"__metadata__": torch.ones(2)}}, "'__metadata__'"),
    "metadata_in_a_state_dict": ({"__metadata__": torch.ones(2), "w": torch.ones(2)}, "'__metadata__'"),
    "metadata_in_a_list": ({"opt": {"__metadata__": [torch.ones(2)]}}, None),
}


@pytest.mark.parametrize("case", sorted(RESERVED))
def test_reserved_names_are_refused_by_snapshot(client: Client, case: str) -> None:
    tree, named = RESERVED[case]
    if named is None:  # its tensor is named "__metadata__.0", which is not reserved
        info = client.snapshot(tree, step=1).wait(60)
        assert info is not None
        assert same_bits(ckptd.load(info.path)["opt"]["__metadata__"][0], torch.ones(2))
        return
    with pytest.raises(ValueError) as e:
        client.snapshot(tree, step=1)
    message = str(e.value)
    assert named in message and "reserved" in message, message
    assert client.status().failed == 0  # refused before anything reached the daemon
    assert step_dirs(client.root / "default") == []


@pytest.mark.parametrize("view", ["conj", "neg"])
def test_a_lazy_conjugate_or_negative_view_is_not_stored_as_a_tie(client: Client, view: str) -> None:
    """``z.conj()`` and ``x._neg_view()`` share their base's bytes but not its values: stored as
    one tied tensor, the view came back with the base's values (a silent wrong checkpoint)."""
    g = torch.Generator().manual_seed(3)
    if view == "conj":
        base = torch.randn(64, dtype=torch.complex64, generator=g)
        other = base.conj()
    else:
        base = torch.randn(64, generator=g)
        other = base._neg_view()
    info = client.snapshot({"model": {"a": base, "b": other}}, step=1).wait(30)
    loaded = ckptd.load(info.path)["model"]
    assert torch.equal(loaded["a"], base.resolve_conj().resolve_neg())
    assert torch.equal(loaded["b"], other.resolve_conj().resolve_neg())
    assert not torch.equal(loaded["a"], loaded["b"])
