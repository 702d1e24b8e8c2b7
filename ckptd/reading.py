"""Reading checkpoints without a daemon: find the newest, verify it, load it.

``load`` checks every file against the checksums in the manifest while it reads, so a corrupted
checkpoint is never returned as if it were good.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ckptd import checksum, paths, safeio, tree
from ckptd.layout import MODEL
from ckptd.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    CorruptCheckpoint,
    FileRecord,
    Manifest,
    ManifestError,
    read_manifest,
)
from ckptd.safeio import UnsafeFile, open_regular
from ckptd.shardfile import ShardFormatError, decode_header, header_span

__all__ = ["CheckpointTooLarge", "CorruptCheckpoint", "ManifestError", "latest", "load", "verify"]

log = logging.getLogger(__name__)
_CHUNK = 64 * 2**20
#: An index, config.json or other small file of a step larger than this is refused unread (by its
#: size, before hashing). An index lists each tensor once, as the manifest's tree does, so it is
#: bounded like the manifest (an index of 700k tensors is ~40 MB).
MAX_FILE_BYTES = MAX_MANIFEST_BYTES


class CheckpointTooLarge(CorruptCheckpoint, MemoryError):
    """A step whose tensors together need more than this machine's memory and swap. It is a
    ``CorruptCheckpoint`` (``restore`` falls back past it: a sparse file costs nothing on disk), and a
    ``MemoryError``: a legitimate checkpoint this large cannot be loaded whole here."""


def latest(root: str | os.PathLike[str], run: str = "default") -> Path | None:
    """The newest committed checkpoint of ``run`` whose manifest is intact, or None: the
    highest such step (``LATEST`` names it too, unless moving ``LATEST`` failed)."""
    for p in candidates(Path(root) / paths.check_name("run", run)):
        try:
            read_manifest(p)
        except ManifestError:
            continue
        return p
    return None


def candidates(run_dir: Path) -> list[Path]:
    """Committed step directories, highest step first. ``LATEST`` only ever moves forward, so the
    highest intact step is at least as new as the one it names (it may lag if moving it failed)."""
    return [p for _, p in reversed(paths.committed_steps(run_dir))]


def verify(path: str | os.PathLike[str], *, checksums: bool = True) -> list[str]:
    """Every problem found in a checkpoint directory; an empty list means it verifies. With
    ``checksums=False`` only what needs no hashing is checked (the manifest, every file's kind
    and size, every shard's header): a truncated or missing file is found, a flipped bit is not."""
    step_dir = Path(path)
    try:
        manifest = read_manifest(step_dir)
    except ManifestError as e:
        return [str(e)]
    problems = _check_dirs(step_dir, manifest)
    if problems:
        return problems
    for c in manifest.components:
        for shard in c.shards:
            problems += _check_file(step_dir, shard, shard_file=True, checksums=checksums)
    for f in manifest.files:
        problems += _check_file(step_dir, f, shard_file=False, checksums=checksums)
    return problems


def _check_dirs(step_dir: Path, manifest: Manifest) -> list[str]:
    """Every component directory a manifest's files are in is a real directory of the step
    directory (ckptd makes no links: one there is not followed out of it)."""
    dirs = {c.dir for c in manifest.components}
    dirs.update(r.file.rpartition("/")[0] for c in manifest.components for r in c.shards)
    dirs.update(r.file.rpartition("/")[0] for r in manifest.files)
    problems = []
    for d in sorted(dirs - {""}):
        found = safeio.lstat_kind(step_dir / d)
        if found != "a directory":
            what = "missing" if found is None else f"{found}, not a directory"
            problems.append(f"{step_dir / d}: component directory is {what}; the step is damaged")
    return problems


def model_files(manifest: Manifest) -> list[str]:
    """The files of a step that ``save_pretrained`` would write for its ``model`` component (its
    shards, its index, ``config.json`` and the other small files at the top), relative to the
    step directory, in either format (``ckptd/1`` has the other components' files at the top
    too: they are left out). A per-rank ``model`` (non-contiguous DTensors) has none of its own:
    its per-rank files are no ``save_pretrained`` weights (``ckptd export`` makes those)."""
    model = next((c for c in manifest.components if c.name == MODEL), None)
    others = {c.index for c in manifest.components if c is not model}
    files = [s.file for s in model.shards] if model is not None and model.sharding == "consolidated" else []
    files += [f.file for f in manifest.files if "/" not in f.file and f.file not in others]
    return files


def _check_file(step_dir: Path, record: FileRecord, *, shard_file: bool, checksums: bool = True) -> list[str]:
    """Problems with one file of a step. Everything that needs no hashing is checked first: the
    size (an index or config file above ``MAX_FILE_BYTES`` is refused unread), and a shard's header,
    which must account for every byte of the file, so a sparse terabyte is never hashed."""
    path = step_dir / record.file  # a plain name (the manifest checks): inside step_dir
    try:
        fd = open_regular(path, None if shard_file else MAX_FILE_BYTES)
    except UnsafeFile as e:
        return [f"{path}: {e.strerror}; the file is damaged or was replaced"]
    except OSError as e:
        return [f"{path}: cannot read ({e.strerror})"]
    try:
        size = os.fstat(fd).st_size
        if size != record.bytes:
            return [f"{path}: {size} bytes, manifest says {record.bytes} (truncated or replaced)"]
        if shard_file:
            decode_header(_read_header(fd, size), size, str(path))
        if not checksums:
            return []
        digest, size = checksum.of_fd(fd)
        if size != record.bytes:
            return [f"{path}: {size} bytes, manifest says {record.bytes} (changed while read)"]
        if digest != record.xxh3_128:
            return [f"{path}: checksum mismatch (xxh3_128 {digest}, manifest says {record.xxh3_128})"]
    except ShardFormatError as e:
        return [str(e)]
    except OSError as e:
        return [f"{path}: cannot read ({e.strerror})"]
    finally:
        os.close(fd)
    return []


def _read_header(fd: int, size: int) -> bytes:
    """A shard's length field and header, never more than the file holds."""
    first8 = os.pread(fd, min(8, size), 0)
    return first8 + os.pread(fd, max(0, min(header_span(first8), size) - len(first8)), len(first8))


def resolve(path: str | os.PathLike[str], run: str = "default") -> Path:
    """A checkpoint directory from a step directory, a run directory or a root."""
    p = Path(path)
    if os.path.lexists(p / MANIFEST_NAME):  # whatever it is: read_manifest says what is wrong
        return p
    for step_dir in candidates(_run_dir(p, run)):
        try:
            read_manifest(step_dir)
        except ManifestError:
            continue
        return step_dir
    raise FileNotFoundError(f"no committed ckptd checkpoint at {p}")


def run_dir_of(path: str | os.PathLike[str], run: str = "default") -> Path:
    """The run directory ``path`` is (it holds ``LATEST`` or a step), or a root's run ``run``."""
    return _run_dir(Path(path), run)


def _run_dir(p: Path, run: str) -> Path:
    """The run directory ``p`` is (it holds ``LATEST`` or a step), or ``p``'s run ``run``."""
    if (p / paths.LATEST).exists() or paths.committed_steps(p):
        run_dir = Path(os.path.abspath(p))  # "." and "run/.." have a name here
        try:
            paths.check_name("run", run_dir.name)
        except paths.InvalidName:
            raise FileNotFoundError(
                f"no committed ckptd checkpoint at {p}: {run_dir.name!r} is not a run name ckptd "
                "writes (1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, "
                f"without '..'); rename the directory, or give a step directory ({p}/step-NNNNNN)"
            ) from None
        return run_dir
    return p / paths.check_name("run", run)


def load(path: str | os.PathLike[str], *, verify_checksums: bool = True) -> dict[str, Any]:
    """Load a checkpoint into plain objects: ``{"model": {name: tensor}, "optimizer": ..., ...}``.

    ``path`` is a step directory, a run directory or a root (its run ``default``). A step
    directory is loaded or raises ``CorruptCheckpoint`` (``ManifestError`` for the manifest) if it
    is damaged: a checksum that fails, a malformed shard, a file that is not a regular file in the
    step directory. A run directory (or root) loads its newest step that loads, as
    ``Client.restore`` does: a damaged newer step is skipped with a warning naming it and what is
    wrong; ``CorruptCheckpoint`` only if every step is damaged, ``FileNotFoundError`` if there is
    none. Tied tensors come back as one tensor under every name. Steps of every ckptd format
    (``ckptd/1``'s flat layout too) load.

    >>> state = ckptd.load("checkpoints/default/step-000500")  # doctest: +SKIP
    >>> model.load_state_dict(state["model"])                   # doctest: +SKIP
    """
    p = Path(path)
    if os.path.lexists(p / MANIFEST_NAME):  # a step directory: no fallback
        return load_manifest(p, read_manifest(p), verify_checksums=verify_checksums)
    steps = candidates(_run_dir(p, "default"))
    first: CorruptCheckpoint | None = None
    for i, step_dir in enumerate(steps):
        try:
            return load_manifest(step_dir, read_manifest(step_dir), verify_checksums=verify_checksums)
        except CorruptCheckpoint as e:  # ManifestError too: every damaged step, no more
            first = first or e
            later = "; trying an older step" if i + 1 < len(steps) else ""
            log.warning("skipping %s: %s%s", step_dir, e, later)
    if first is None:
        raise FileNotFoundError(f"no committed ckptd checkpoint at {p}")
    raise CorruptCheckpoint(
        f"no committed checkpoint at {p} loads; the newest, {steps[0].name}: {first}"
    ) from first


def load_manifest(step_dir: Path, manifest: Manifest, *, verify_checksums: bool = True) -> dict[str, Any]:
    """Load a step whose manifest was read; every problem with its files is ``CorruptCheckpoint``."""
    problems = _check_dirs(step_dir, manifest)
    if problems:
        raise CorruptCheckpoint("; ".join(problems))
    if verify_checksums:
        problems = [p for f in manifest.files for p in _check_file(step_dir, f, shard_file=False)]
        if problems:
            raise CorruptCheckpoint("; ".join(problems))
    _check_step_fits_memory(step_dir, manifest)
    tensors: dict[str, dict[str, Any]] = {}
    for c in manifest.components:
        loaded: dict[str, Any] = {}
        if c.sharding == "per-rank":  # blocks of non-contiguous DTensors: put together whole
            from ckptd import perrank

            loaded.update(perrank.assemble(step_dir, c, verify=verify_checksums))
        for shard in c.shards if c.sharding == "consolidated" else ():
            loaded.update(read_shard(step_dir / shard.file, shard if verify_checksums else None))
        for alias, target in c.aliases.items():
            if target not in loaded:
                raise CorruptCheckpoint(
                    f"{step_dir}: alias {c.name}/{alias} names a missing tensor {target!r}"
                )
            loaded[alias] = loaded[target]
        tensors[c.name] = loaded

    def lookup(component: str, name: str) -> Any:
        try:
            return tensors[component][name]
        except KeyError:
            raise CorruptCheckpoint(
                f"{step_dir}: tensor {component}/{name} missing from the shards"
            ) from None

    try:
        out = tree.decode(manifest.tree, lookup)
    except tree.TreeError as e:
        raise CorruptCheckpoint(f"{step_dir}: {e}") from e
    if not isinstance(out, dict):
        raise CorruptCheckpoint(f"{step_dir}: manifest tree is not a dict")
    return out


def read_shard(path: Path, record: FileRecord | None) -> dict[str, Any]:
    """Read one safetensors shard into CPU tensors, hashing it as it is read when ``record``.

    Each tensor gets its own storage, read straight from the file into it: no shard-sized buffer
    is kept alive by one small tensor, and every tensor is an ordinary one (offset 0).
    """
    import torch

    from ckptd.torch_dtypes import FROM_SAFETENSORS

    fd = _open_shard(path)
    try:
        size = os.fstat(fd).st_size
        if record is not None and size != record.bytes:  # before allocating anything for it
            raise CorruptCheckpoint(
                f"{path}: {size} bytes, manifest says {record.bytes} (truncated or replaced)"
            )
        h = checksum.new()
        prefix = _read_header(fd, size)
        try:
            header = decode_header(prefix, size, str(path))
        except ShardFormatError as e:
            raise CorruptCheckpoint(str(e)) from e
        h.update(prefix)
        _check_fits_memory(path, size - header.data_start)
        out = {}
        for entry in sorted(header.entries, key=lambda e: e.start):  # file order, for the hash
            try:
                t = torch.empty(entry.shape, dtype=FROM_SAFETENSORS[entry.dtype])
            except (RuntimeError, MemoryError) as e:  # torch's allocator says RuntimeError
                raise CorruptCheckpoint(
                    f"{path}: tensor {entry.name!r} needs {entry.end - entry.start} bytes, which cannot "
                    f"be allocated ({e}); the shard is damaged, or this machine has too little memory"
                ) from e
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            _read_into(fd, raw, header.data_start + entry.start, h, path)
            out[entry.name] = t
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read shard ({e.strerror})") from e
    finally:
        os.close(fd)
    if record is not None and (size != record.bytes or h.hexdigest() != record.xxh3_128):
        raise CorruptCheckpoint(
            f"{path}: content does not match the manifest checksum ({size} bytes, expected "
            f"{record.bytes}); the file is corrupted"
        )
    return out


def _check_fits_memory(path: Path, nbytes: int) -> None:
    """Refuse, before allocating, a shard whose tensors need more than this machine's memory and
    swap (a sparse file with a valid header costs nothing on disk; allocating it gets the reader
    killed, or fails only after reading gigabytes of zeros)."""
    limit = _memory_bytes()
    if limit is not None and nbytes > limit:
        raise CorruptCheckpoint(
            f"{path}: shard holds {nbytes} bytes of tensors, more than this machine's memory and swap "
            f"({limit} bytes); the shard is damaged, or it cannot be loaded on this machine"
        )


def _check_step_fits_memory(step_dir: Path, manifest: Manifest) -> None:
    """Refuse, before allocating anything, a step whose shards together hold more tensor bytes than
    this machine's memory and swap (each shard may fit while all of them do not)."""
    limit = _memory_bytes()
    if limit is None:
        return
    total = 0
    for c in manifest.components:
        for shard in c.shards:
            nbytes = _tensor_bytes(step_dir / shard.file)
            _check_fits_memory(step_dir / shard.file, nbytes)  # one shard alone: name it
            total += nbytes
    if total > limit:
        raise CheckpointTooLarge(
            f"{step_dir}: its shards hold {total} bytes of tensors, more than this machine's memory "
            f"and swap ({limit} bytes), so ckptd.load cannot load the step whole here; read its "
            "shards one at a time with safetensors' lazy safe_open, or load on a larger machine "
            "(or the shards are damaged)"
        )


def _open_shard(path: Path) -> int:
    """A shard opened as a regular file (never through a link, a FIFO or a device)."""
    try:
        return open_regular(path)
    except OSError as e:
        raise CorruptCheckpoint(
            f"{path}: cannot read shard ({e.strerror}); the checkpoint is incomplete"
        ) from e


def _tensor_bytes(path: Path) -> int:
    """A shard's tensor bytes, from its header (decoded and checked against the file's size, which
    it must account for exactly): a malformed shard is named before the step's total is judged."""
    fd = _open_shard(path)
    try:
        size = os.fstat(fd).st_size
        header = decode_header(_read_header(fd, size), size, str(path))
    except ShardFormatError as e:
        raise CorruptCheckpoint(str(e)) from e
    except OSError as e:
        raise CorruptCheckpoint(f"{path}: cannot read shard ({e.strerror})") from e
    finally:
        os.close(fd)
    return size - header.data_start


def _memory_bytes() -> int | None:
    """Physical memory plus swap in bytes (``/proc/meminfo``), or None where it cannot be told."""
    try:
        with open("/proc/meminfo", "rb") as f:
            lines = f.read(65536).decode("ascii", "replace").splitlines()
    except OSError:
        return None
    kib = {}
    for line in lines:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key in ("MemTotal", "SwapTotal") and fields and fields[0].isdigit():
            kib[key] = int(fields[0])
    return (kib["MemTotal"] + kib.get("SwapTotal", 0)) * 1024 if "MemTotal" in kib else None


def _read_into(fd: int, view: memoryview, offset: int, h: Any, path: Path) -> None:
    pos = 0
    while pos < len(view):
        n = os.preadv(fd, [view[pos : pos + _CHUNK]], offset + pos)
        if n == 0:
            raise CorruptCheckpoint(f"{path}: file shrank while being read")
        h.update(view[pos : pos + n])
        pos += n
