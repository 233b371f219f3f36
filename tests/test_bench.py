"""`recmix-train bench` end to end on a tiny budget: trains, evaluates, times, writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["vae", "savae", "iaf", "me", "recmix"]
TINY = [
    *("--latent-dim", "4", "--encoder-hidden", "16", "--decoder-hidden", "16"),
    *("--mixture-order", "2", "--add-every", "0", "--iaf-hidden", "8", "--iaf-context-dim", "4"),
    *("--samples", "8", "--num-images", "8", "--gap-images", "4", "--svi-steps", "3"),
    *("--svi-eval-samples", "4", "--timing-repeats", "4", "--timing-rounds", "2"),
    *("--threads", "1", "--no-progress", "--epoch-eval-images", "0"),
]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", "bench", *TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_end_to_end_on_a_tiny_budget(tmp_path):
    out = bench("--epochs", "1", "--limit-batches", "2", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "a" / "benchmark.json").read_text())
    assert list(result["methods"]) == METHODS
    for name, r in result["methods"].items():
        assert r["epochs"] == 1 and not r["reused"], name
        assert r["num_test_images"] == 8 and r["num_samples"] == 8
        assert r["test_log_likelihood"] > -2000 and r["test_elbo"] > -2000
        assert r["gap_images"] == 4 and abs(r["amortization_gap"]) < 1000
        assert r["inference_seconds_per_image"] > 0 and r["inference_seconds_per_batch_128"] > 0
        assert r["timing_measurements"] == {"batch_1": 4, "batch_128": 2}
    assert result["methods"]["recmix"]["active_components"] == 2
    assert {"recmix_over_vae_batch_1", "recmix_over_savae_batch_128"} <= set(result["ratios"])
    assert result["command"].startswith("recmix-train bench ")
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["nproc"] >= 1
    table = (tmp_path / "a" / "benchmark.md").read_text()
    assert all(f"| {label} |" in table for label in ("VAE", "SA-VAE", "IAF", "ME", "RecMix"))
    assert (tmp_path / "a" / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses the first one's checkpoints instead of training.
    out = bench(
        "--methods",
        "vae",
        "recmix",
        "--checkpoints",
        str(tmp_path / "a"),
        "--out",
        str(tmp_path / "b"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert list(result["methods"]) == ["vae", "recmix"]
    assert all(r["reused"] for r in result["methods"].values())
    assert not (tmp_path / "b" / "vae").exists()
