"""Data: the MNIST IDX files, dynamic binarization, and folders of the user's own images.

MNIST is looked up in: an explicit folder (`--data-dir`), `$RECMIX_DATA_DIR`,
`../shared/data/mnist` beside the repository, then the user cache folder; when none has the files
they are downloaded into the cache from the public mirrors and checked against known SHA-256 sums.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

MNIST_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the uncompressed IDX content, so a re-compressed copy still verifies.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
TEST_BINARIZATION_SEED = 0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataNotFoundError(RuntimeError):
    """The data set is not on disk and could not be downloaded."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array of its declared shape and dtype."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _repo_shared_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recmix" / "mnist"


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_mnist(folder: Path) -> bool:
    return all(_find_file(folder, stem) for stem in MNIST_FILES.values())


def download_mnist(folder: Path) -> None:
    """Download the four gzipped IDX files into `folder`, verifying the SHA-256 of each one's content."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, digest in MNIST_SHA256.items():
        name = stem + ".gz"
        target = folder / name
        if (
            target.is_file()
            and hashlib.sha256(gzip.decompress(target.read_bytes())).hexdigest() == digest
        ):
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=30) as resp:
                    payload = resp.read()
                content = gzip.decompress(payload)
            except (OSError, EOFError) as exc:
                errors.append(f"{mirror}: {exc}")
                continue
            if hashlib.sha256(content).hexdigest() != digest:
                errors.append(f"{mirror}: checksum mismatch")
                continue
            tmp = target.with_suffix(".part")
            tmp.write_bytes(payload)
            tmp.replace(target)
            break
        else:
            raise DataNotFoundError(
                f"could not download {name} ({'; '.join(errors)}). Put the MNIST IDX files in a "
                "folder and pass it with --data-dir or set RECMIX_DATA_DIR."
            )


def resolve_mnist_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The first folder holding all four MNIST files, in the documented order of precedence."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not _has_mnist(folder):
            raise DataNotFoundError(
                f"--data-dir {folder} does not hold the MNIST files {sorted(MNIST_FILES.values())} "
                "(.gz or uncompressed)"
            )
        return folder
    candidates = []
    if os.environ.get("RECMIX_DATA_DIR"):
        candidates.append(Path(os.environ["RECMIX_DATA_DIR"]))
    candidates += [_repo_shared_dir(), _cache_dir()]
    for folder in candidates:
        if _has_mnist(folder):
            return folder
    if not download:
        raise DataNotFoundError("MNIST not found; pass --data-dir or set RECMIX_DATA_DIR")
    download_mnist(_cache_dir())
    return _cache_dir()


def load_mnist(
    split: str, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the `train` or `test` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    folder = resolve_mnist_dir(data_dir)
    images = read_idx(_find_file(folder, MNIST_FILES[f"{split}-images"]))  # type: ignore[arg-type]
    labels = read_idx(_find_file(folder, MNIST_FILES[f"{split}-labels"]))  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0)
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def binarize_once(x: torch.Tensor, seed: int = TEST_BINARIZATION_SEED) -> torch.Tensor:
    """One fixed Bernoulli draw of every pixel (the test set's binarization, kept for good)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=gen)


def dynamic_binarize(x: torch.Tensor) -> torch.Tensor:
    """A fresh Bernoulli draw of every pixel, each time a training image is used."""
    return torch.bernoulli(x)


def load_image_folder(
    folder: str | os.PathLike, height: int, width: int, channels: int = 1
) -> torch.Tensor:
    """Every image under `folder` (recursively), converted to `channels`, resized, scaled to [0, 1].

    Returns float32 (N, C, H, W), files in sorted order.
    """
    from PIL import Image

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert(mode)
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.uint8))
    return to_float(np.stack(arrays))


def load_dataset(
    name: str, data_dir: str | None, image_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) float tensors in [0, 1]; the test set already binarized once.

    `mnist`, or `folder:PATH` (the last 10% of the sorted files form the test split).
    """
    if name == "mnist":
        train, _ = load_mnist("train", data_dir)
        test, _ = load_mnist("test", data_dir)
        train_x, test_x = to_float(train), to_float(test)
    elif name.startswith("folder:"):
        c, h, w = image_shape
        x = load_image_folder(name.removeprefix("folder:"), h, w, c)
        n_test = max(1, len(x) // 10)
        train_x, test_x = x[:-n_test], x[-n_test:]
    else:
        raise ValueError(f"unknown dataset {name!r}: use mnist or folder:PATH")
    if tuple(train_x.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"data shape {tuple(train_x.shape[1:])} != --image-shape {tuple(image_shape)}"
        )
    return train_x, binarize_once(test_x)
