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
    model_config = ConfigDict(frozen=True, extra="forbid")


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
    checksum: str = ""  # xxh3-128 of this manifest's JSON with checksum ""

    def sealed(self) -> Manifest:
        body = self.model_copy(update={"checksum": ""}).model_dump_json(indent=1)
        return self.model_copy(update={"checksum": checksum.of_bytes(body.encode())})

    def to_bytes(self) -> builtins.bytes:
        return self.sealed().model_dump_json(indent=1).encode() + b"\n"


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
    if manifest.sealed().checksum != manifest.checksum:
        raise ManifestError(f"{path}: manifest checksum mismatch; the file was modified or corrupted")
    return manifest
