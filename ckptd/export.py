"""``ckptd export``: a committed step's ``model`` component as a plain ``save_pretrained``
directory, for tools that know nothing of ckptd (``from_pretrained(out_dir)``, inference servers).

Everything is found through the step's manifest, never by file name: the model's shards (copied
byte for byte, each checked against its manifest checksum while it is copied, renamed as
``save_pretrained`` names them: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``) and the small files beside them (``config.json``,
``generation_config.json``, tokenizer files). The output is built in a temp directory beside
``out_dir`` and renamed into place, so a failed export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from ckptd import checksum
from ckptd.dtypes import numel
from ckptd.layout import TensorSpec, split_shards
from ckptd.manifest import (
    MANIFEST_NAME,
    ComponentRecord,
    CorruptCheckpoint,
    FileRecord,
    Manifest,
    read_manifest,
)
from ckptd.reading import MAX_FILE_BYTES, candidates, run_dir_of
from ckptd.safeio import open_regular, read_small
from ckptd.shardfile import HeaderEntry, ShardFormatError, decode_header, encode_header, header_span

MODEL = "model"
log = logging.getLogger(__name__)
_CHUNK = 16 * 2**20


class ExportError(RuntimeError):
    """The step cannot be exported as asked; the message says why and what to do."""


def export_pretrained(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write the ``model`` component of the checkpoint at ``path`` (a step directory, or a run
    directory: its newest intact step) to ``out_dir`` as ``save_pretrained`` would; returns the
    step directory exported. ``out_dir`` must not exist, or be an empty directory.

    >>> export_pretrained("checkpoints/default/step-000500", "exported")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("exported")                   # doctest: +SKIP
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new output directory")
    p = Path(path)
    if os.path.lexists(p / MANIFEST_NAME):  # a step directory: exactly that step, or an error
        _export_step(p, out)
        return p
    steps = candidates(run_dir_of(p))
    if not steps:
        raise FileNotFoundError(f"no committed ckptd checkpoint at {p}")
    for step_dir in steps[:-1]:  # a run: its newest step that is intact, as load() does
        try:
            _export_step(step_dir, out)
        except CorruptCheckpoint as e:
            log.warning("skipping %s: %s; trying an older step", step_dir, e)
            continue
        return step_dir
    _export_step(steps[-1], out)
    return steps[-1]


def _export_step(step_dir: Path, out: Path) -> None:
    if Path(os.path.realpath(out.parent)).is_relative_to(os.path.realpath(step_dir)):
        raise ExportError(
            f"{out} is inside the step directory {step_dir}: a committed step is never changed; "
            "export to a directory outside it"
        )
    manifest = read_manifest(step_dir)
    model = next((c for c in manifest.components if c.name == MODEL), None)
    if model is None:
        names = ", ".join(c.name for c in manifest.components) or "none"
        raise ExportError(
            f"{step_dir} has no {MODEL!r} component (components: {names}); export writes the model "
            "component of a snapshot (snapshot a module, or a tree with a 'model' entry)"
        )
    tmp = out.with_name(f"{out.name}.ckptd-export-{secrets.token_hex(4)}")
    tmp.mkdir(parents=False)
    try:
        _write(step_dir, manifest, model, tmp)
        _fsync(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(step_dir: Path, manifest: Manifest, model: ComponentRecord, tmp: Path) -> None:
    if model.sharding == "per-rank":
        _write_consolidated(step_dir, manifest, model, tmp)
        return
    n = len(model.shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    total_size = total_parameters = 0
    for record, name in zip(model.shards, names, strict=True):
        for entry in _copy_shard(step_dir / record.file, record, tmp / name):
            weight_map[entry[0]] = name
            total_size += entry[1]
            total_parameters += entry[2]
    if n > 1:
        if model.index is not None:  # the daemon's count: parameters, not buffers (as transformers)
            total_parameters = _indexed_parameters(step_dir / model.index, total_parameters)
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in _model_files(manifest):
        (tmp / f.file).write_bytes(_read_small_file(step_dir / f.file, f))
    for p in tmp.iterdir():
        _fsync(p)


#: The shard size of a consolidated export of per-rank files (``save_pretrained``'s default).
EXPORT_SHARD_BYTES = 5 * 10**9


def _write_consolidated(step_dir: Path, manifest: Manifest, model: ComponentRecord, tmp: Path) -> None:
    """A per-rank ``model`` component (non-contiguous DTensors) put together: each tensor read
    whole from its blocks (the files checked against their checksums first) and written into
    ``save_pretrained``'s shards, one shard's tensors in memory at a time."""
    import torch

    from ckptd import perrank
    from ckptd.reading import _check_file

    problems = [p for r in model.shards for p in _check_file(step_dir, r, shard_file=True)]
    if problems:
        raise CorruptCheckpoint("; ".join(problems))
    found = perrank.blocks(step_dir, model)
    specs = [TensorSpec(name, b[0].entry.dtype, perrank.shape_of(b)) for name, b in sorted(found.items())]
    groups = split_shards(specs, EXPORT_SHARD_BYTES)
    n = len(groups)
    weight_map: dict[str, str] = {}
    total_size = total_parameters = 0
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {s.name: perrank.read_box(found[s.name], (0,) * len(s.shape), s.shape) for s in group}
        entries, pos = [], 0
        for s in group:
            entries.append(HeaderEntry(s.name, s.dtype, s.shape, pos, pos + s.nbytes))
            pos += s.nbytes
        with open(tmp / name, "xb") as out:
            out.write(encode_header(entries))
            for s in group:
                out.write(tensors[s.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        weight_map.update((s.name, name) for s in group)
        total_size += pos
        total_parameters += sum(numel(s.shape) for s in group)
    if n > 1:
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in _model_files(manifest):
        (tmp / f.file).write_bytes(_read_small_file(step_dir / f.file, f))
    for p in tmp.iterdir():
        _fsync(p)


def _indexed_parameters(index_path: Path, counted: int) -> int:
    """``total_parameters`` of the step's own model index (``counted``, every element, when the
    index has none: a ckptd/1 step)."""
    try:
        meta = json.loads(read_small(index_path, MAX_FILE_BYTES)).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return counted
    value = meta.get("total_parameters") if isinstance(meta, dict) else None
    return value if isinstance(value, int) and value >= 0 else counted


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_files(manifest: Manifest) -> list[FileRecord]:
    """The small files that belong beside the model's weights: every file at the top of the
    step that is not ckptd's own (the manifest, a component's index) nor another component's
    (those live in subdirectories)."""
    own = {MANIFEST_NAME} | {c.index for c in manifest.components}
    return [f for f in manifest.files if "/" not in f.file and f.file not in own]


def _copy_shard(src: Path, record: FileRecord, dst: Path) -> list[tuple[str, int, int]]:
    """Copy one shard, hashing it; returns (name, bytes, elements) of each tensor in it."""
    try:
        fd = open_regular(src)
    except OSError as e:
        raise CorruptCheckpoint(f"{src}: cannot read shard ({e.strerror}); the checkpoint is damaged") from e
    h = checksum.new()
    try:
        size = os.fstat(fd).st_size
        if size != record.bytes:
            raise CorruptCheckpoint(
                f"{src}: {size} bytes, manifest says {record.bytes} (truncated or replaced)"
            )
        first8 = os.pread(fd, min(8, size), 0)
        rest = os.pread(fd, max(0, min(header_span(first8), size) - len(first8)), len(first8))
        try:
            header = decode_header(first8 + rest, size, str(src))
        except ShardFormatError as e:
            raise CorruptCheckpoint(str(e)) from e
        with open(dst, "xb") as out:
            pos = 0
            while pos < size:
                chunk = os.pread(fd, min(_CHUNK, size - pos), pos)
                if not chunk:
                    raise CorruptCheckpoint(f"{src}: file shrank while being read")
                h.update(chunk)
                out.write(chunk)
                pos += len(chunk)
    finally:
        os.close(fd)
    if h.hexdigest() != record.xxh3_128:
        raise CorruptCheckpoint(f"{src}: checksum mismatch; the shard is corrupted (nothing was exported)")
    return [(e.name, e.end - e.start, numel(e.shape)) for e in header.entries]


def _read_small_file(path: Path, record: FileRecord) -> bytes:
    try:
        data = read_small(path, MAX_FILE_BYTES)
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read ({e.strerror}); the checkpoint is damaged") from e
    if len(data) != record.bytes or checksum.of_bytes(data) != record.xxh3_128:
        raise CorruptCheckpoint(f"{path}: does not match its manifest checksum; the file is corrupted")
    return data
