"""``ckptd.json``: what a committed checkpoint holds, as JSON, with a checksum of its own.

A directory without a manifest that parses and verifies is not a checkpoint.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from ckptd import checksum

MANIFEST_NAME = "ckptd.json"
FORMAT = "ckptd/1"


class _Model(BaseModel):
    # Unknown fields are ignored, so that a newer ckptd's manifests still read here.
    model_config = ConfigDict(frozen=True, extra="ignore")


class FileRecord(_Model):
    file: str
    bytes: int
    xxh3_128: str


class ComponentRecord(_Model):
    name: str
    index: str
    shards: list[FileRecord]
    tensors: int
    total_size: int
    aliases: dict[str, str] = {}


class Manifest(_Model):
    format: Literal["ckptd/1"] = "ckptd/1"
    ckptd_version: str
    run: str
    step: int
    rank: int = 0
    world_size: int = 1
    created_unix: float
    bytes: int
    components: list[ComponentRecord]
    files: list[FileRecord]  # indexes, config.json, ...
    tree: JsonValue
    timings: dict[str, float] = {}
    checksum: str = ""  # xxh3-128 of the file's bytes with this value blanked (the last field)

    def to_bytes(self) -> builtins.bytes:
        body = self.model_copy(update={"checksum": ""}).model_dump_json(indent=1).encode() + b"\n"
        head, tail = _split_checksum(body)
        return head + checksum.of_bytes(body).encode() + tail


class ManifestError(ValueError):
    """The manifest is missing, unreadable, or does not match its own checksum."""


def read_manifest(step_dir: Path) -> Manifest:
    path = step_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror}); not a ckptd checkpoint") from e
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise ManifestError(f"{path}: manifest is malformed ({e.error_count()} errors)") from e
    try:
        head, tail = _split_checksum(raw)
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from e
    if checksum.of_bytes(head + tail) != manifest.checksum:
        raise ManifestError(f"{path}: manifest checksum mismatch; the file was modified or corrupted")
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
