"""The model repository: find model folders and check one before anything runs it.

A repository is a folder of model folders, each holding ``manifest.json`` beside its ONNX files
(see :mod:`service.model.manifest`). :func:`load_model_dir` validates the manifest and verifies every
file's existence, size and SHA-256; it refuses anything else with :class:`ModelRepositoryError`.
Torch-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from service.model.manifest import MANIFEST_FILENAME, FileEntry, Manifest

_CHUNK = 1 << 20


class ModelRepositoryError(Exception):
    """A model folder that cannot be served: bad manifest, missing or altered file."""

    def __init__(self, folder: Path, message: str) -> None:
        self.folder = folder
        super().__init__(f"model folder {folder}: {message}")


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder: its manifest and the absolute path of every file it lists."""

    root: Path
    manifest: Manifest
    paths: dict[str, Path]

    def path_of(self, entry: FileEntry) -> Path:
        return self.paths[entry.path]


def discover(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that hold a manifest, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_FILENAME).is_file())


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_model_dir(path: Path) -> ModelFolder:
    """Validate a model folder's manifest and verify every file it lists."""
    folder = Path(path).resolve()
    manifest_path = folder / MANIFEST_FILENAME
    if not manifest_path.is_file():
        raise ModelRepositoryError(folder, f"no {MANIFEST_FILENAME}")
    try:
        manifest = Manifest.load(manifest_path)
    except ValidationError as exc:
        raise ModelRepositoryError(folder, f"invalid {MANIFEST_FILENAME}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelRepositoryError(folder, f"cannot read {MANIFEST_FILENAME}: {exc}") from exc

    paths: dict[str, Path] = {}
    for entry in manifest.files:
        file_path = (folder / entry.path).resolve()
        # the schema refuses '..' and absolute paths; this also catches symlinks leading out
        if not file_path.is_relative_to(folder):
            raise ModelRepositoryError(folder, f"file {entry.path}: resolves outside the folder")
        if not file_path.is_file():
            raise ModelRepositoryError(folder, f"file {entry.path}: missing")
        size = file_path.stat().st_size
        if size != entry.size_bytes:
            raise ModelRepositoryError(
                folder,
                f"file {entry.path}: size {size} bytes, manifest says {entry.size_bytes} "
                "(truncated or replaced)",
            )
        digest = sha256_of(file_path)
        if digest != entry.sha256:
            raise ModelRepositoryError(
                folder,
                f"file {entry.path}: SHA-256 {digest} does not match the manifest's "
                f"{entry.sha256} (altered or corrupted)",
            )
        paths[entry.path] = file_path
    return ModelFolder(root=folder, manifest=manifest, paths=paths)
