"""The training loop: schedule, checkpoints that can be resumed, per-epoch metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ModelConfig, TrainConfig
from training.data import dynamic_binarize, load_dataset
from training.distributions import GaussianMixture
from training.methods import build_model
from training.model import RecMixVAE
from training.objectives import importance_sampled_loglik, training_loss

CHECKPOINT_NAME = "last.pt"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads if threads > 0 else os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def active_components(model_cfg: ModelConfig, train_cfg: TrainConfig, epoch: int) -> int:
    """RecMix adds component m at epoch add_every*(m-1); the other methods use all from the start."""
    if model_cfg.method != "recmix" or train_cfg.add_every <= 0:
        return model_cfg.mixture_order
    return min(model_cfg.mixture_order, 1 + epoch // train_cfg.add_every)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[RecMixVAE, dict]:
    """Rebuild a model from a checkpoint's stored configuration and weights."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    model = build_model(ModelConfig(**state["model_config"])).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


@torch.no_grad()
def quick_test_elbo(
    model: RecMixVAE, test_x: torch.Tensor, n_images: int, batch: int = 500
) -> float:
    """Mixture ELBO of the first n test images, one sample per component: a cheap progress figure."""
    model.eval()
    total = 0.0
    xs = test_x[:n_images]
    for i in range(0, len(xs), batch):
        x = xs[i : i + batch]
        _, elbo = importance_sampled_loglik(model, x, model.num_active, "stratified")
        total += elbo.sum().item()
    model.train()
    return total / len(xs)


def train(model_cfg: ModelConfig, cfg: TrainConfig) -> Path:
    """Train a model; writes OUT/last.pt every epoch, OUT/metrics.jsonl, and OUT/results.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    train_x, test_x = load_dataset(cfg.dataset, cfg.data_dir, model_cfg.image_shape)
    train_x, test_x = train_x.to(device), test_x.to(device)

    model = build_model(model_cfg).to(device)
    # The fused kernel updates every parameter in one launch on a GPU; same update rule.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    start_epoch, elapsed = 0, 0.0
    ckpt_path = out / CHECKPOINT_NAME
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["model_config"] != dataclasses.asdict(model_cfg):
            raise ValueError(f"{ckpt_path} was trained with a different model configuration")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, elapsed = state["epoch"], state["train_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    metrics_path = out / "metrics.jsonl"
    if start_epoch == 0 and metrics_path.exists():
        metrics_path.unlink()
    n_batches = math.ceil(len(train_x) / cfg.batch_size)
    if cfg.limit_batches:
        n_batches = min(n_batches, cfg.limit_batches)

    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm
    for epoch in range(start_epoch, cfg.epochs):
        model.set_active(active_components(model_cfg, cfg, epoch))
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train_x), device=device)
        sums: dict[str, torch.Tensor] = {}
        batches = range(n_batches)
        if progress is not None:
            batches = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for b in batches:
            x = dynamic_binarize(train_x[perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]])
            loss, stats = training_loss(
                model, x, model_cfg.method, cfg.lam, cfg.kl_form, cfg.kl_clip, cfg.refine
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            # Statistics stay on the device until the epoch ends: no synchronisation per step.
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v
            if progress is not None and b % 50 == 0:
                batches.set_postfix(elbo=f"{stats['elbo'].item():.2f}")  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        elapsed += epoch_seconds
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "active_components": model.num_active,
            "epoch_seconds": round(epoch_seconds, 3),
            **{f"train_{k}": v.item() / n_batches for k, v in sums.items()},
        }
        if not all(math.isfinite(v) for k, v in row.items() if k.startswith("train_")):
            raise FloatingPointError(f"non-finite training objective in epoch {epoch + 1}: {row}")
        with torch.no_grad():
            posterior = model.encode(test_x[:500])
            if isinstance(posterior, GaussianMixture):  # IAF's posterior has no weights
                row["weights"] = posterior.log_weights.exp().mean(0).tolist()
        if cfg.epoch_eval_images:
            row["test_elbo_subset"] = quick_test_elbo(model, test_x, cfg.epoch_eval_images)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        save_checkpoint(
            ckpt_path,
            {
                "model_config": dataclasses.asdict(model_cfg),
                "train_config": dataclasses.asdict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "train_seconds": elapsed,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
                "versions": {"torch": torch.__version__},
            },
        )

    # The trained model alone (no optimizer state): what `evaluate` and `export` read.
    save_checkpoint(
        out / "model.pt",
        {
            "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "epoch": cfg.epochs,
            "train_seconds": elapsed,
            "versions": {"torch": torch.__version__},
        },
    )
    if cfg.eval_samples > 0:
        from training.evaluate import evaluate

        results = evaluate(model, test_x, num_samples=cfg.eval_samples, num_images=cfg.eval_images)
        results.update(
            epochs=cfg.epochs,
            train_seconds=elapsed,
            seconds_per_epoch=elapsed / max(1, cfg.epochs),
            method=model_cfg.method,
            mixture_order=model_cfg.mixture_order,
            device=str(device),
            seed=cfg.seed,
        )
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results), flush=True)
    return out
