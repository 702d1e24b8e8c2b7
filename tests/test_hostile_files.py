"""Hostile files where a checkpoint is read: damaged shard headers, manifest file names that leave
the step directory, special files (FIFOs, links to ``/dev/zero``), a ``LATEST`` the daemon must not
follow, and something other than a directory where a step directory should be (issue #10, items
6-9 and part of 16).

Checkpoints are written by a real daemon and then damaged with real special files. Every reader
(``ckptd.load``, ``restore``, ``ckptd.verify``, ``ckptd ls``, ``ckptd verify``) runs in a child
process with a timeout, so a regression that hangs fails its test instead of hanging the suite.
The child is this file run as a script (``python tests/test_hostile_files.py OP:PATH ...``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from conftest import DaemonProc
from test_corruption import commit_steps, trained

from ckptd import checksum, paths
from ckptd.manifest import MANIFEST_NAME, FileRecord, Manifest, read_manifest
from client import CheckpointError, Client

TESTS = Path(__file__).parent
READER_TIMEOUT_S = 60


# --- the child: readers, each reporting one JSON line -------------------------------------------


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> dtype, shape and xxh3 of the bytes: equal fingerprints mean bit-exact tensors."""
    out = {}
    for name, t in sorted(tensors.items()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = f"{t.dtype} {tuple(t.shape)} {xxhash.xxh3_128_hexdigest(raw)}"
    return out


def restored_fingerprint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        state[f"opt.{i}.exp_avg"] = s["exp_avg"]
    return fingerprint(state)


def _child_op(op: str, arg: str) -> dict[str, Any]:
    import ckptd
    from client.restore import restore_run

    try:
        if op == "limit-memory":  # the rest of this child may map only ARG more bytes
            import resource

            vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm + int(arg), resource.RLIM_INFINITY))
            return {}
        if op == "memory-bound":  # the rest of this child believes memory and swap hold ARG bytes
            import ckptd.reading

            ckptd.reading._memory_bytes = lambda: int(arg)
            return {}
        if op == "verify":
            return {"problems": ckptd.verify(arg)}
        if op == "load":
            state = ckptd.load(arg)
            return {"step": state["step"], "model": fingerprint(state["model"])}
        if op == "restore":
            warnings: list[str] = []

            class Keep(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    warnings.append(record.getMessage())

            logging.getLogger().addHandler(Keep(logging.WARNING))
            model, opt = trained(999)
            tree: dict[str, object] = {"model": model, "optimizer": opt, "step": 0}
            try:
                step = restore_run(tree, Path(arg), step=None, fallback=True)
            except CheckpointError as e:
                return {"error": "CheckpointError", "message": str(e), "warnings": warnings}
            return {
                "step": step,
                "tree_step": tree["step"],
                "restored": restored_fingerprint(model, opt),
                "warnings": warnings,
            }
        if op == "restore-strict":  # fallback=False: the error, and the objects left as they were
            model, opt = trained(999)
            before = restored_fingerprint(model, opt)
            tree = {"model": model, "optimizer": opt, "step": 0}
            try:
                restore_run(tree, Path(arg), step=None, fallback=False)
            except CheckpointError as e:
                return {
                    "error": type(e).__name__,
                    "code": e.code,
                    "message": str(e),
                    "unchanged": restored_fingerprint(model, opt) == before and tree["step"] == 0,
                }
            return {"step": tree["step"]}
    except Exception as e:  # reported to the parent, which asserts on it
        return {"error": type(e).__name__, "message": str(e)}
    raise AssertionError(op)


def child_main(argv: list[str]) -> None:
    for item in argv:
        op, _, arg = item.partition(":")
        print(f"BEGIN {item}", file=sys.stderr, flush=True)
        print(json.dumps({"op": item, **_child_op(op, arg)}), flush=True)


# --- the parent ---------------------------------------------------------------------------------


def read_in_child(*ops: str, timeout_s: float = READER_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """Run reader ops (``verify:PATH``, ``load:PATH``, ``restore:RUN_DIR``) in one child process;
    fails the test, naming the op, if one does not return within ``timeout_s``."""
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *ops],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        begun = [line for line in err.splitlines() if line.startswith("BEGIN ")]
        pytest.fail(f"reader hung: {begun[-1] if begun else ops} gave no answer in {timeout_s}s")
    results = {}
    for line in done.stdout.splitlines():
        doc = json.loads(line)
        results[doc.pop("op")] = doc
    assert done.returncode == 0 and len(results) == len(ops), f"child failed:\n{done.stdout}\n{done.stderr}"
    return results


def cli(*args: str | Path, timeout_s: float = READER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "ckptd", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`ckptd {' '.join(map(str, args))}` hung (no exit in {timeout_s}s)")


def expected_model(step: int) -> dict[str, str]:
    return fingerprint(trained(step)[0].state_dict())


def expected_restored(step: int) -> dict[str, str]:
    return restored_fingerprint(*trained(step))


def assert_fell_back_to_step_1(result: dict[str, Any], damaged: Path) -> None:
    """``restore`` returned step 1 bit-exact and warned about the damaged step."""
    assert "error" not in result, result
    assert result["step"] == 1 and result["tree_step"] == 1, result
    assert result["restored"] == expected_restored(1)
    assert any(str(damaged) in w for w in result["warnings"]), result["warnings"]


def assert_refused(result: dict[str, Any], *words: str) -> None:
    """A domain error (never a raw RuntimeError, RecursionError, MemoryError...) naming ``words``."""
    assert result.get("error") in ("CorruptCheckpoint", "ManifestError", "CheckpointTooLarge"), result
    for w in words:
        assert w in result["message"], (w, result["message"])


@dataclass
class Committed:
    client: Client
    daemon: DaemonProc
    steps: dict[int, Path]

    @property
    def run_dir(self) -> Path:
        return self.steps[1].parent

    @property
    def newest(self) -> Path:
        return self.steps[2]


@pytest.fixture
def two_steps(daemon: DaemonProc, connect: Callable[..., Client]) -> Committed:
    """Steps 1 and 2 of run ``default``, written by a real daemon in several shards."""
    client = connect(daemon, max_shard_size="10KB")
    steps = commit_steps(client, [1, 2])
    assert len(read_manifest(steps[2]).components[0].shards) > 1
    return Committed(client, daemon, steps)


@pytest.fixture
def outside(workdir: Path) -> Path:
    """A directory beside the checkpoint root (not under it)."""
    d = workdir / "outside"
    d.mkdir()
    return d


def reseal(step_dir: Path, edit: Callable[[Manifest], Manifest]) -> None:
    """Rewrite the manifest through ``edit`` with a correct checksum of its own (what a careless
    tool, or an attacker, can always do: xxh3 detects damage, it does not authenticate)."""
    manifest = read_manifest(step_dir)
    (step_dir / MANIFEST_NAME).write_bytes(edit(manifest).to_bytes())


def with_shard(manifest: Manifest, i: int, record: FileRecord) -> Manifest:
    c = manifest.components[0]
    shards = [*c.shards[:i], record, *c.shards[i + 1 :]]
    return manifest.model_copy(update={"components": [c.model_copy(update={"shards": shards})]})


def with_file(manifest: Manifest, i: int, record: FileRecord) -> Manifest:
    files = [*manifest.files[:i], record, *manifest.files[i + 1 :]]
    return manifest.model_copy(update={"files": files})


def record_of(path: Path, name: str) -> FileRecord:
    data = path.read_bytes()
    return FileRecord.model_construct(file=name, bytes=len(data), xxh3_128=checksum.of_bytes(data))


# --- item 6: damaged shard headers --------------------------------------------------------------

_U64 = struct.Struct("<Q")


def _edit_header(header: dict[str, Any], how: str) -> dict[str, Any]:
    names = [k for k in header if k != "__metadata__"]
    if how == "negative-dim":  # same element count, so sizes still add up
        info = header[names[0]]
        info["shape"] = [-d for d in info["shape"]] if len(info["shape"]) == 2 else [-1, -info["shape"][0]]
    elif how == "zero-dim-next-to-huge":  # no bytes, but strides past int64
        header["evil"] = {"dtype": "F32", "shape": [0, 2**40, 2**40, 2**40], "data_offsets": [0, 0]}
    elif how == "float-dim":
        header[names[0]]["shape"] = [float(d) + 0.5 for d in header[names[0]]["shape"]]
    elif how == "deep-json":
        header["__metadata__"] = {"format": "pt", "x": [[]]}  # replaced below by deep nesting
    elif how == "metadata-zero":
        header["__metadata__"] = 0
    elif how == "metadata-list":
        header["__metadata__"] = []
    elif how == "offsets-past-the-file":
        info = header[names[-1]]
        start, end = info["data_offsets"]
        info["data_offsets"] = [start, end + 2**50]
    else:
        raise AssertionError(how)
    return header


def damage_header(shard: Path, how: str) -> None:
    raw = shard.read_bytes()
    (n,) = _U64.unpack_from(raw)
    data = raw[8 + n :]
    header = _edit_header(json.loads(raw[8 : 8 + n]), how)
    body = json.dumps(header).encode()
    if how == "deep-json":
        body = body.replace(b"[[]]", b"[" * 100_000 + b"]" * 100_000)
    shard.write_bytes(_U64.pack(len(body)) + body + data)


HEADERS = [
    "negative-dim",
    "zero-dim-next-to-huge",
    "float-dim",
    "deep-json",
    "offsets-past-the-file",
    "metadata-zero",
    "metadata-list",
]


@pytest.mark.parametrize("how", HEADERS)
def test_damaged_shard_header_is_corrupt_and_restore_falls_back(two_steps: Committed, how: str) -> None:
    step_dir = two_steps.newest
    shard = step_dir / read_manifest(step_dir).components[0].shards[0].file
    damage_header(shard, how)
    # The manifest is resealed with the damaged shard's checksum: only the header check is left.
    reseal(step_dir, lambda m: with_shard(m, 0, record_of(shard, shard.name)))

    run_dir = two_steps.run_dir
    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"load:{run_dir}", f"restore:{run_dir}")
    problems = r[f"verify:{step_dir}"]["problems"]
    assert problems and any(shard.name in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], shard.name)
    assert r[f"load:{run_dir}"] == {"step": 1, "model": expected_model(1)}  # falls back as restore
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)


def sparse_shard(shard: Path, nbytes: int) -> None:
    """Replace ``shard`` by a sparse file with a valid header: one F32 tensor of ``nbytes``."""
    body = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]},
        }
    ).encode()
    with open(shard, "wb") as f:
        f.write(_U64.pack(len(body)) + body)
        f.truncate(8 + len(body) + nbytes)


@pytest.mark.parametrize("case", ["larger-than-memory", "allocation-fails"])
def test_huge_sparse_shard_is_corrupt_and_restore_falls_back(two_steps: Committed, case: str) -> None:
    """A shard whose valid header asks for more memory than can be had: ``CorruptCheckpoint``
    naming the shard and the size (never a raw RuntimeError or an OOM kill); restore falls back."""
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    shard = step_dir / read_manifest(step_dir).components[0].shards[-1].file
    # Larger than any machine's memory; or 1 GiB in a child that may map only 256 MiB more.
    nbytes = 2**43 if case == "larger-than-memory" else 2**30
    sparse_shard(shard, nbytes)
    size = shard.stat().st_size
    # The manifest is resealed for the new size (its checksum is never reached: nothing is read).
    fake = FileRecord.model_construct(file=shard.name, bytes=size, xxh3_128="0" * 32)
    reseal(step_dir, lambda m: with_shard(m, len(m.components[0].shards) - 1, fake))

    ops = ["limit-memory:" + str(256 * 2**20)] if case == "allocation-fails" else []
    r = read_in_child(*ops, f"load:{step_dir}", f"restore:{run_dir}")
    assert_refused(r[f"load:{step_dir}"], shard.name, str(nbytes))
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)


def test_huge_sparse_index_is_refused_unread_and_restore_falls_back(two_steps: Committed) -> None:
    """An index truncated to 1 TiB (sparse) with the manifest resealed for its size: verify, load
    and restore refuse it by its size within seconds (hashing it would take many minutes)."""
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    manifest = read_manifest(step_dir)
    i = next(i for i, f in enumerate(manifest.files) if f.file == manifest.components[0].index)
    index = step_dir / manifest.files[i].file
    os.truncate(index, 2**40)
    fake = FileRecord.model_construct(file=index.name, bytes=2**40, xxh3_128="0" * 32)
    reseal(step_dir, lambda m: with_file(m, i, fake))

    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"restore:{run_dir}", timeout_s=20)
    problems = r[f"verify:{step_dir}"]["problems"]
    assert any(index.name in p and str(2**40) in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], index.name, str(2**40))
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)
    done = cli("verify", step_dir, timeout_s=20)
    assert done.returncode == 1 and index.name in done.stdout, done


def test_shard_with_sparse_bytes_past_its_data_is_refused_unread(two_steps: Committed) -> None:
    """A shard grown by 1 TiB of sparse bytes past what its header describes (manifest resealed
    for the size): verify and load refuse it from the header, without hashing the terabyte."""
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    shard = step_dir / read_manifest(step_dir).components[0].shards[0].file
    size = shard.stat().st_size + 2**40
    os.truncate(shard, size)
    fake = FileRecord.model_construct(file=shard.name, bytes=size, xxh3_128="0" * 32)
    reseal(step_dir, lambda m: with_shard(m, 0, fake))

    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"restore:{run_dir}", timeout_s=20)
    problems = r[f"verify:{step_dir}"]["problems"]
    assert any(shard.name in p and str(size) in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], shard.name, str(size))
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)


def test_step_whose_shards_together_exceed_memory_is_refused_before_reading(two_steps: Committed) -> None:
    """Every shard fits in memory but all of the step's together do not: ``load`` refuses before
    allocating, naming the step's total and the bound and how to read it in parts."""
    step_dir = two_steps.newest
    shards = [step_dir / s.file for s in read_manifest(step_dir).components[0].shards]
    sizes = [s.stat().st_size for s in shards]
    assert len(sizes) > 1
    bound = max(sizes) + (sum(sizes) - max(sizes)) // 2  # above any one shard, below their sum
    r = read_in_child(f"memory-bound:{bound}", f"load:{step_dir}", f"restore:{two_steps.run_dir}")
    assert_refused(r[f"load:{step_dir}"], str(step_dir), str(bound), "safe_open")
    restore = r[f"restore:{two_steps.run_dir}"]  # step 1 is as large: nothing restores
    assert restore.get("error") == "CheckpointError" and "no committed checkpoint" in restore["message"]
    assert any(str(bound) in w and "memory" in w for w in restore["warnings"]), restore


@pytest.mark.parametrize("name", ["weird name", "-dash", "a..b"])
def test_load_of_a_run_directory_whose_name_is_no_run_name_says_no_checkpoint(
    two_steps: Committed, outside: Path, name: str
) -> None:
    """A copy of a run directory under a name ckptd never gives a run: ``load`` says there is no
    checkpoint there and how to load one (never ``InvalidName``); its step directories load."""
    copy = outside / name
    shutil.copytree(two_steps.run_dir, copy)
    r = read_in_child(f"load:{copy}", f"load:{copy / 'step-000002'}")
    result = r[f"load:{copy}"]
    assert result["error"] == "FileNotFoundError", result
    assert f"no committed ckptd checkpoint at {copy}" in result["message"], result
    assert repr(name) in result["message"] and "step directory" in result["message"], result
    assert r[f"load:{copy / 'step-000002'}"] == {"step": 2, "model": expected_model(2)}


def test_load_of_the_current_run_directory(two_steps: Committed) -> None:
    """``ckptd.load(".")`` in a run directory loads its newest step (``"."`` has no name)."""
    done = subprocess.run(
        [sys.executable, "-c", "import ckptd; print(ckptd.load('.')['step'])"],
        cwd=two_steps.run_dir,
        capture_output=True,
        text=True,
        timeout=READER_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "2", done


# --- item 7: file names that leave the step directory -------------------------------------------


def _escape(step_dir: Path, target: Path) -> str:
    return os.path.relpath(target, step_dir)


NAMES = ["shard-dotdot", "shard-absolute", "shard-dev-zero", "files-etc-passwd", "index-absolute", "nul"]


@pytest.mark.parametrize("how", NAMES)
def test_manifest_file_names_are_confined_to_the_step_directory(
    two_steps: Committed, outside: Path, how: str
) -> None:
    step_dir = two_steps.newest
    manifest = read_manifest(step_dir)
    shard = step_dir / manifest.components[0].shards[0].file
    copy = outside / shard.name
    shutil.copyfile(shard, copy)  # bit-identical: a reader that follows the name would succeed
    if how == "shard-dotdot":
        name = _escape(step_dir, copy)
        assert name.startswith("../")
        edit = lambda m: with_shard(m, 0, record_of(copy, name))  # noqa: E731
    elif how == "shard-absolute":
        name = str(copy)
        edit = lambda m: with_shard(m, 0, record_of(copy, name))  # noqa: E731
    elif how == "shard-dev-zero":
        name = "/dev/zero"
        edit = lambda m: with_shard(m, 0, m.components[0].shards[0].model_copy(update={"file": name}))  # noqa: E731
    elif how == "files-etc-passwd":
        name = "../../../../../../../../etc/passwd"
        edit = lambda m: with_file(m, 0, record_of(Path("/etc/passwd"), name))  # noqa: E731
    elif how == "index-absolute":
        index = step_dir / manifest.components[0].index
        name = str(outside / index.name)
        shutil.copyfile(index, name)
        c = manifest.components[0]

        def edit(m: Manifest) -> Manifest:
            i = [f.file for f in m.files].index(c.index)
            m = with_file(m, i, record_of(Path(name), name))
            return m.model_copy(update={"components": [m.components[0].model_copy(update={"index": name})]})
    else:
        name = shard.name + "\x00.txt"
        edit = lambda m: with_shard(m, 0, m.components[0].shards[0].model_copy(update={"file": name}))  # noqa: E731
    reseal(step_dir, edit)

    run_dir = two_steps.run_dir
    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"load:{run_dir}", f"restore:{run_dir}")
    problems = r[f"verify:{step_dir}"]["problems"]
    assert problems and any("not a plain file name" in p and repr(name) in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], "not a plain file name")
    # The manifest itself is refused, so the run's newest readable step is step 1.
    assert r[f"load:{run_dir}"] == {"step": 1, "model": expected_model(1)}
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)

    done = cli("verify", step_dir)
    assert done.returncode != 0 and "not a plain file name" in done.stdout + done.stderr, done


# --- item 8: special files in a checkpoint ------------------------------------------------------


def _plant(path: Path, what: str, outside: Path) -> str:
    """Replace ``path`` by a special file; returns a word the error must contain."""
    original = path.read_bytes() if path.exists() else b""
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
        return "FIFO"
    if what == "dev-zero":
        path.symlink_to("/dev/zero")
        return "symlink"
    if what == "link-to-copy":  # an identical regular file, but through a link
        (outside / path.name).write_bytes(original)
        path.symlink_to(outside / path.name)
        return "symlink"
    if what == "huge-sparse":
        with open(path, "wb") as f:
            f.truncate(2 * 2**30)
        return "bytes"
    raise AssertionError(what)


MANIFEST_CASES = ["fifo", "dev-zero", "link-to-copy", "huge-sparse"]


@pytest.mark.parametrize("what", MANIFEST_CASES)
def test_special_manifest_is_not_a_checkpoint_and_nothing_hangs(
    two_steps: Committed, outside: Path, what: str
) -> None:
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    word = _plant(step_dir / MANIFEST_NAME, what, outside)

    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"load:{run_dir}", f"restore:{run_dir}")
    problems = r[f"verify:{step_dir}"]["problems"]
    assert problems and MANIFEST_NAME in problems[0] and word in problems[0], problems
    assert_refused(r[f"load:{step_dir}"], MANIFEST_NAME, word)
    assert r[f"load:{run_dir}"] == {"step": 1, "model": expected_model(1)}
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)

    done = cli("ls", two_steps.daemon.root, "--json")
    assert done.returncode == 0, done
    rows = {row["step"]: row for row in json.loads(done.stdout)}
    assert sorted(rows) == [1, 2]
    assert "error" not in rows[1] and word in rows[2]["error"], rows
    done = cli("verify", step_dir)
    assert done.returncode == 1 and word in done.stdout, done


SHARD_CASES = ["fifo", "dev-zero", "link-to-copy"]


@pytest.mark.parametrize("what", SHARD_CASES)
def test_special_shard_is_corrupt_and_restore_falls_back(
    two_steps: Committed, outside: Path, what: str
) -> None:
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    shard = step_dir / read_manifest(step_dir).components[0].shards[-1].file
    word = _plant(shard, what, outside)

    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"restore:{run_dir}")
    problems = r[f"verify:{step_dir}"]["problems"]
    assert any(shard.name in p and word in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], shard.name, word)
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)
    done = cli("verify", run_dir)
    assert done.returncode == 1 and shard.name in done.stdout and word in done.stdout, done


def test_special_index_fails_verify_and_restore_falls_back(two_steps: Committed) -> None:
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    index = step_dir / read_manifest(step_dir).components[0].index
    index.unlink()
    index.symlink_to("/dev/zero")
    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"restore:{run_dir}")
    assert any(index.name in p and "symlink" in p for p in r[f"verify:{step_dir}"]["problems"]), r
    assert_refused(r[f"load:{step_dir}"], index.name, "symlink")
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)


@pytest.mark.parametrize("what", ["fifo", "dev-zero"])
def test_special_latest_is_ignored_by_readers(two_steps: Committed, outside: Path, what: str) -> None:
    run_dir = two_steps.run_dir
    _plant(run_dir / paths.LATEST, what, outside)
    done = cli("ls", two_steps.daemon.root, "--json")
    assert done.returncode == 0, done
    rows = json.loads(done.stdout)
    assert [(row["step"], "error" in row) for row in rows] == [(1, False), (2, False)], rows
    assert "LATEST" in done.stderr, done.stderr  # a warning says what is wrong with it
    r = read_in_child(f"load:{run_dir}", f"restore:{run_dir}")
    assert r[f"load:{run_dir}"] == {"step": 2, "model": expected_model(2)}
    assert r[f"restore:{run_dir}"]["restored"] == expected_restored(2)
    done = cli("verify", run_dir)
    assert done.returncode == 0 and "OK" in done.stdout, done


# --- item 9: the daemon does not follow LATEST -------------------------------------------------


@pytest.fixture
def keep_two(start_daemon: Callable[..., DaemonProc], connect: Callable[..., Client]) -> Iterator[Committed]:
    d = start_daemon("--keep-last", "2")
    client = connect(d)
    yield Committed(client, d, commit_steps(client, [1]))


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "passwd"])
def test_daemon_commits_past_a_special_latest(keep_two: Committed, what: str) -> None:
    run_dir = keep_two.run_dir
    latest = run_dir / paths.LATEST
    latest.unlink()
    if what == "fifo":
        os.mkfifo(latest)
    else:
        latest.symlink_to("/dev/zero" if what == "dev-zero" else "/etc/passwd")
    passwd = Path("/etc/passwd").read_bytes()

    for step in (2, 3):  # a stuck commit would hold step 3 behind it
        model, opt = trained(step)
        handle = keep_two.client.snapshot({"model": model, "optimizer": opt, "step": step}, step=step)
        info = handle.wait(20)
        assert info is not None and info.path == run_dir / paths.step_dirname(step)
    assert not latest.is_symlink() and latest.is_file()
    assert paths.read_latest(run_dir) == "step-000003"
    assert [p.name for _, p in paths.committed_steps(run_dir)] == ["step-000002", "step-000003"]
    assert Path("/etc/passwd").read_bytes() == passwd
    log = keep_two.daemon.log_text()
    assert "LATEST" in log and ("FIFO" in log or "symlink" in log), log
    r = read_in_child(f"restore:{run_dir}")
    assert r[f"restore:{run_dir}"]["restored"] == expected_restored(3)


# --- item 16 (part): something else where a step directory should be ---------------------------


@pytest.mark.parametrize("what", ["fifo", "regular-file", "symlink-to-dir", "dangling-symlink"])
def test_non_directory_at_a_step_path_is_named_and_ignored(
    two_steps: Committed, outside: Path, what: str
) -> None:
    run_dir = two_steps.run_dir
    target = run_dir / paths.step_dirname(3)
    if what == "fifo":
        os.mkfifo(target)
        kind = "a FIFO"
    elif what == "regular-file":
        target.write_text("not a checkpoint\n")
        kind = "a regular file"
    elif what == "symlink-to-dir":
        shutil.copytree(two_steps.newest, outside / "step-000003")  # a valid-looking checkpoint
        target.symlink_to(outside / "step-000003")
        kind = "a symlink"
    else:
        target.symlink_to(outside / "nothing-here")
        kind = "a symlink"
    before = sorted(p.name for p in outside.iterdir())

    model, opt = trained(3)
    handle = two_steps.client.snapshot({"model": model, "optimizer": opt, "step": 3}, step=3)
    with pytest.raises(CheckpointError) as e:
        handle.wait(20)
    message = str(e.value)
    assert e.value.code == "commit_error", message
    assert str(target) in message and "is not a checkpoint directory" in message, message
    assert f"({kind})" in message and "remove it" in message and "already committed" not in message, message
    assert sorted(p.name for p in outside.iterdir()) == before

    assert [s for s, _ in paths.committed_steps(run_dir)] == [1, 2]
    done = cli("ls", two_steps.daemon.root, "--json")
    assert done.returncode == 0, done
    assert [row["step"] for row in json.loads(done.stdout)] == [1, 2]
    r = read_in_child(f"load:{run_dir}", f"restore:{run_dir}")
    assert r[f"load:{run_dir}"] == {"step": 2, "model": expected_model(2)}
    assert r[f"restore:{run_dir}"]["step"] == 2


# --- a resealed manifest whose tree or step does not fit ----------------------------------------


def _edit_tree(how: str) -> Callable[[Manifest], Manifest]:
    def edit(m: Manifest) -> Manifest:
        tree = json.loads(json.dumps(m.tree))
        top = tree["$dict"]
        if how == "optimizer-state-list":
            top["optimizer"]["state"] = {"$list": []}
        elif how == "module-keys-missing":
            keys = top["model"]["keys"]
            top["model"]["keys"] = [k for k in keys if not k.endswith("bias")]
        elif how == "module-is-int":
            top["model"] = 5
        elif how == "param-groups-wrong":
            top["optimizer"]["param_groups"] = {"$list": [7]}
        elif how == "module-key-extra":
            top["model"]["keys"] = [*top["model"]["keys"], "2.bias_extra"]
        else:
            raise AssertionError(how)
        return m.model_copy(update={"tree": tree})

    return edit


TREES = [
    "optimizer-state-list",
    "module-keys-missing",
    "module-is-int",
    "param-groups-wrong",
    "module-key-extra",
]


@pytest.mark.parametrize("how", TREES)
def test_tree_that_does_not_fit_the_objects_falls_back_and_changes_nothing(
    two_steps: Committed, how: str
) -> None:
    """Step 2's manifest tree (resealed) does not fit the model and optimizer it was taken from:
    ``restore`` falls back to step 1 bit-exact with a warning naming step 2; with
    ``fallback=False`` it raises ``CheckpointError`` and the model and optimizer are unchanged."""
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    reseal(step_dir, _edit_tree(how))
    r = read_in_child(f"restore:{run_dir}", f"restore-strict:{run_dir}")
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)
    strict = r[f"restore-strict:{run_dir}"]
    assert strict.get("error") == "CheckpointError", strict
    assert strict["code"] in ("restore_mismatch", "corrupt") and str(step_dir) in strict["message"], strict
    assert strict["unchanged"], strict


@pytest.mark.parametrize("field", ["step"])
def test_manifest_naming_another_step_or_run_is_corrupt(two_steps: Committed, field: str) -> None:
    """Step 2's manifest (resealed) says step 1, or run ``other``: ``verify`` and ``load`` say the
    manifest does not match its directory, ``restore`` falls back to step 1 and returns 1."""
    step_dir, run_dir = two_steps.newest, two_steps.run_dir
    value: object = 1 if field == "step" else "other"
    reseal(step_dir, lambda m: m.model_copy(update={field: value}))
    r = read_in_child(f"verify:{step_dir}", f"load:{step_dir}", f"restore:{run_dir}")
    problems = r[f"verify:{step_dir}"]["problems"]
    assert problems and any(f"{field}" in p and step_dir.name in p for p in problems), problems
    assert_refused(r[f"load:{step_dir}"], step_dir.name)
    assert_fell_back_to_step_1(r[f"restore:{run_dir}"], step_dir)


if __name__ == "__main__":
    child_main(sys.argv[1:])
