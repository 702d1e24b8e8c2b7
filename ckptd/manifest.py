"""``ckptd.json``: what a committed checkpoint holds, as JSON, with a checksum of its own.

A directory without a manifest that parses and verifies is not a checkpoint.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, JsonValue, ValidationError

from ckptd import checksum
from ckptd.paths import parse_step_dirname
from ckptd.safeio import read_small

MANIFEST_NAME = "ckptd.json"
#: ``ckptd/2``: the top of a step directory is the ``model`` component as ``save_pretrained``
#: writes it, every other component in a subdirectory of its name (``ckptd.layout``), a
#: single-shard component without an index. ``ckptd/1`` (read, never written): every component's
#: shards and index at the top, always ``<name>-0000k-of-0000n.safetensors`` and an index.
#: ``ckptd/3``: as ``ckptd/2``, with per-rank components (``ComponentRecord.sharding``); written
#: only for a step that has one, so that an older ckptd refuses it rather than misread it.
Format = Literal["ckptd/1", "ckptd/2", "ckptd/3"]
FORMAT: Format = "ckptd/2"
PER_RANK_FORMAT: Format = "ckptd/3"
#: How a component's tensors are stored: whole, in consolidated (Hugging Face) files; or as
#: per-rank blocks (non-contiguous DTensors), each file's header carrying ``DCP_SHARDING_INFO``.
Sharding = Literal["consolidated", "per-rank"]
#: A manifest larger than this is refused unread. Its tree and small files come from one request
#: frame (64 MiB); the rest is one short record per shard and file.
MAX_MANIFEST_BYTES = 1 << 30


def plain_name(name: str) -> str:
    """A file name inside a directory: no directory part, no '..', no NUL."""
    if not name or "/" in name or "\x00" in name or name in (".", ".."):
        raise ValueError(
            f"file name {name!r} is not a plain file name in the step directory "
            "(a manifest names its files without '/', '..' or NUL)"
        )
    return name


def step_path(path: str) -> str:
    """A file of the step directory: a plain name, or ``<component directory>/<plain name>``.
    Checked when a manifest is read, so no reader can be sent outside the step directory by one
    (readers also refuse a component directory that is a link)."""
    parts = path.split("/")
    if len(parts) > 2 or not all(parts) or "\x00" in path or {".", ".."} & set(parts):
        raise ValueError(
            f"file name {path!r} is not a plain file name in the step directory nor one in a "
            "component directory (a manifest names its files as 'name' or 'component/name', "
            "without '..', a leading '/' or NUL)"
        )
    return path


FileName = Annotated[str, AfterValidator(plain_name)]
StepPath = Annotated[str, AfterValidator(step_path)]


class _Model(BaseModel):
    # Unknown fields are ignored, so that a newer ckptd's manifests still read here.
    model_config = ConfigDict(frozen=True, extra="ignore")


class FileRecord(_Model):
    file: StepPath  # relative to the step directory
    bytes: int
    xxh3_128: str


class ComponentRecord(_Model):
    name: str
    dir: FileName | Literal[""] = ""  # its directory in the step directory; "": the top
    index: StepPath | None = None  # ckptd/2: None for a single shard
    shards: list[FileRecord]
    tensors: int
    total_size: int
    aliases: dict[str, str] = {}
    sharding: Sharding = "consolidated"


class PartRecord(_Model):
    """One rank's part of a multi-rank step: its part manifest (a path in the step directory)
    and the files that rank wrote."""

    rank: int
    manifest: FileRecord  # ``file`` is the part manifest's name inside ``ckptd.ranks.PARTS_DIR``
    files: list[StepPath]  # paths in the step directory, as FileRecord.file
    bytes: int


class Manifest(_Model):
    format: Format = FORMAT
    ckptd_version: str
    run: str
    step: int
    rank: int = 0
    world_size: int = 1
    created_unix: float
    bytes: int
    components: list[ComponentRecord]
    files: list[FileRecord]  # indexes, config.json, teacher/config.json, ...
    tree: JsonValue
    timings: dict[str, float] = {}
    parts: list[PartRecord] = []  # a multi-rank step: which rank wrote which file
    checksum: str = ""  # xxh3-128 of the file's bytes with this value blanked (the last field)

    def to_bytes(self) -> builtins.bytes:
        body = self.model_copy(update={"checksum": ""}).model_dump_json(indent=1).encode() + b"\n"
        head, tail = _split_checksum(body)
        return head + checksum.of_bytes(body).encode() + tail


class CorruptCheckpoint(ValueError):
    """A committed step that cannot be read as the checkpoint its manifest describes (damaged,
    truncated, or holding files ckptd never writes). ``restore`` falls back past exactly these."""


class ManifestError(CorruptCheckpoint):
    """The manifest is missing, unreadable, malformed, or does not match its own checksum."""


def read_manifest(step_dir: Path) -> Manifest:
    path = step_dir / MANIFEST_NAME
    try:
        raw = read_small(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror}); not a ckptd checkpoint") from e
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ManifestError(
            f"{path}: manifest is malformed ({e.error_count()} errors; {where}: {first['msg']})"
        ) from e
    try:
        head, tail = _split_checksum(raw)
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from e
    if checksum.of_bytes(head + tail) != manifest.checksum:
        raise ManifestError(f"{path}: manifest checksum mismatch; the file was modified or corrupted")
    named = parse_step_dirname(os.path.basename(os.path.abspath(step_dir)))
    if named is not None and named != manifest.step:
        raise ManifestError(
            f"{path}: manifest says step {manifest.step}, but its directory is "
            f"{os.path.basename(os.path.abspath(step_dir))}; the manifest was copied or modified"
        )
    return manifest


_CHECKSUM_FIELD = b'"checksum": "'


def _split_checksum(raw: bytes) -> tuple[bytes, bytes]:
    """The file around the checksum value. It is the last field, so its key is the last match:
    a user's value in the tree comes before it."""
    start = raw.rfind(_CHECKSUM_FIELD)
    if start < 0:
        raise ValueError("manifest has no checksum field")
    start += len(_CHECKSUM_FIELD)
    end = raw.find(b'"', start)
    return raw[:start], raw[end:]
