"""The data reader and the real command line: train, resume, evaluate."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    MNIST_FILES,
    DataNotFoundError,
    load_dataset,
    load_mnist,
    read_idx,
    resolve_mnist_dir,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--latent-dim", "4", "--encoder-hidden", "16", "--decoder-hidden", "16"]


def test_mnist_reader_shapes_and_known_labels():
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train_x.max() == 255 and train_x.min() == 0


def test_reader_takes_uncompressed_files_and_refuses_bad_ones(tmp_path):
    src = resolve_mnist_dir()
    for stem in MNIST_FILES.values():
        (tmp_path / stem).write_bytes(gzip.decompress((src / f"{stem}.gz").read_bytes()))
    images, labels = load_mnist("test", tmp_path)
    assert images.shape == (10000, 28, 28) and labels[0] == 7
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="expected 5 values"):
        read_idx(bad)


def test_missing_data_dir_names_the_flag(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_mnist("train", tmp_path)


def test_test_set_binarization_is_fixed_and_binary():
    _, a = load_dataset("mnist", None, (1, 28, 28))
    _, b = load_dataset("mnist", None, (1, 28, 28))
    assert torch.equal(a, b)
    assert set(torch.unique(a).tolist()) == {0.0, 1.0}


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        mode = "RGB" if i % 2 else "L"
        arr = rng.integers(0, 256, (40, 30, 3) if mode == "RGB" else (40, 30), dtype=np.uint8)
        Image.fromarray(arr, mode).save(tmp_path / f"img{i}.{'png' if i % 3 else 'jpg'}")
    train, test = load_dataset(f"folder:{tmp_path}", None, (1, 28, 28))
    assert train.shape == (11, 1, 28, 28) and test.shape == (1, 1, 28, 28)
    assert train.min() >= 0.0 and train.max() <= 1.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_lists_every_subcommand_and_default():
    out = run_cli("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("train", "evaluate", "export"))
    out = run_cli("train", "--help")
    assert "--kl-form" in out.stdout and "default: bounded" in out.stdout


@pytest.mark.parametrize("method", ["vae", "recmix", "me"])
def test_smoke_train_one_short_epoch(method, tmp_path):
    out = run_cli(
        "train",
        "--method",
        method,
        "--mixture-order",
        "3",
        "--add-every",
        "0",
        *TINY,
        "--epochs",
        "1",
        "--limit-batches",
        "3",
        "--eval-samples",
        "6",
        "--eval-images",
        "20",
        "--epoch-eval-images",
        "50",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_elbo"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_test_images"] == 20 and results["test_log_likelihood"] > -2000
    assert (tmp_path / "last.pt").exists() and (tmp_path / "model.pt").exists()


def test_resume_continues_from_the_checkpoint(tmp_path):
    common = [
        "train",
        "--method",
        "recmix",
        "--mixture-order",
        "2",
        "--add-every",
        "1",
        *TINY,
        "--limit-batches",
        "2",
        "--eval-samples",
        "0",
        "--epoch-eval-images",
        "0",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert run_cli(*common, "--epochs", "1").returncode == 0
    first = torch.load(tmp_path / "last.pt", weights_only=False)
    assert first["epoch"] == 1 and int(first["model"]["active"]) == 1
    out = run_cli(*common, "--epochs", "2", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and int(state["model"]["active"]) == 2
    epochs = [
        json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]
    # A different model configuration is refused rather than silently mixed.
    bad = run_cli(*common, "--epochs", "3", "--resume", "--latent-dim", "5")
    assert bad.returncode != 0 and "different model configuration" in bad.stderr


def test_evaluate_subcommand(tmp_path):
    assert (
        run_cli(
            "train",
            "--method",
            "vae",
            *TINY,
            "--epochs",
            "1",
            "--limit-batches",
            "2",
            "--eval-samples",
            "0",
            "--epoch-eval-images",
            "0",
            "--out",
            str(tmp_path),
            "--no-progress",
        ).returncode
        == 0
    )
    out = run_cli(
        "evaluate",
        str(tmp_path / "model.pt"),
        "--samples",
        "10",
        "--num-images",
        "30",
        "--timing-repeats",
        "3",
        "--out",
        str(tmp_path / "eval.json"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["num_test_images"] == 30 and res["test_log_likelihood"] >= res["test_elbo"] - 5
    assert res["inference_seconds_per_image"] > 0


def test_data_dir_flag_is_used(tmp_path):
    shutil.copy(resolve_mnist_dir() / "t10k-labels-idx1-ubyte.gz", tmp_path)
    out = run_cli(
        "train", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "r")
    )
    assert out.returncode != 0 and "--data-dir" in out.stderr
