"""`recmix-train bench`: test log-likelihood against inference time (the authors' blog, Fig. 7).

Kim & Pavlovic, *Recursive Inference for Variational Autoencoders*, NeurIPS 2020, compare RecMix
with the VAE (Kingma & Welling 2014), SA-VAE (Kim et al. 2018), IAF (Kingma et al. 2016) and a
jointly trained mixture of encoders (ME). Here every method gets the same decoder architecture and
the same training settings (or a checkpoint is reused), then on this machine:
  - test log-likelihood by importance sampling with the method's own posterior as proposal, and
    the test ELBO from the same samples;
  - the amortization gap on the first test images (svi.py);
  - the median time of one posterior inference at batch 1 and at batch 128, measured in rounds
    that interleave the methods, so that a slow spell of a shared machine hits them all alike.
Writes OUT/benchmark.json, OUT/benchmark.md (the table) and OUT/benchmark.png (the plot).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from training.config import BenchConfig, EvalConfig, ModelConfig, TrainConfig
from training.data import load_dataset
from training.evaluate import evaluate, inference_times
from training.svi import gap_summary
from training.trainer import load_model, pick_device, set_threads, train

LABELS = {"vae": "VAE", "savae": "SA-VAE", "iaf": "IAF", "me": "ME", "recmix": "RecMix"}


def machine_description(threads: int) -> dict[str, Any]:
    """CPU model, core count and library versions: what the timings depend on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def find_checkpoint(folder: str | None, method: str) -> Path | None:
    """FOLDER/METHOD/model.pt or FOLDER/METHOD.pt, if either exists."""
    if folder is None:
        return None
    for path in (Path(folder) / method / "model.pt", Path(folder) / f"{method}.pt"):
        if path.exists():
            return path
    return None


def train_or_reuse(
    method: str, model_cfg: ModelConfig, train_cfg: TrainConfig, bench: BenchConfig
) -> tuple[Path, bool]:
    """The checkpoint of `method`, trained into OUT/METHOD unless one is found to reuse."""
    found = find_checkpoint(bench.checkpoints, method)
    if found is not None:
        print(f"{method}: reusing {found}", flush=True)
        return found, True
    out = Path(bench.out) / method
    print(f"{method}: training into {out}", flush=True)
    # The benchmark evaluates every model itself, with the same settings for all.
    cfg = dataclasses.replace(train_cfg, out=str(out), eval_samples=0)
    train(dataclasses.replace(model_cfg, method=method), cfg)
    return out / "model.pt", False


def interleaved_timing(
    models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Medians over `rounds` rounds; in each, every method in turn (order rotated) is timed
    repeats/rounds times at batch 1 and repeats/(4 rounds) times at batch 128."""
    names = list(models)
    per_round_1 = max(1, repeats // rounds)
    per_round_128 = max(1, repeats // (4 * rounds))
    times: dict[str, dict[int, list[float]]] = {n: {1: [], 128: []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for batch, n in ((1, per_round_1), (128, per_round_128)):
                times[name][batch] += inference_times(models[name], x, batch, n, warmup=3)
    return {
        n: {
            "inference_seconds_per_image": statistics.median(t[1]),
            "inference_seconds_per_batch_128": statistics.median(t[128]),
            "timing_measurements": {"batch_1": len(t[1]), "batch_128": len(t[128])},
        }
        for n, t in times.items()
    }


def ratios(methods: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Inference-time ratios of RecMix (and every method) to the VAE and to SA-VAE."""
    out: dict[str, float] = {}
    for base in ("vae", "savae"):
        if base not in methods:
            continue
        for name, r in methods.items():
            if name == base:
                continue
            for key, tag in (
                ("inference_seconds_per_image", "batch_1"),
                ("inference_seconds_per_batch_128", "batch_128"),
            ):
                out[f"{name}_over_{base}_{tag}"] = r[key] / methods[base][key]
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The benchmark as a Markdown table, one row per method."""
    ev = result["config"]["eval"]
    s = ev["samples"]
    header = (
        f"| method | epochs | train s/epoch | test LL (S={s}) | test ELBO | amortization gap "
        "| inference ms/image (batch 1) | ms per batch of 128 | time / VAE (batch 1) "
        "| time / VAE (batch 128) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    methods = result["methods"]
    vae = methods.get("vae")
    for name, r in methods.items():

        def rel(key: str, r: dict = r) -> str:
            return f"{r[key] / vae[key]:.2f}x" if vae else "n/a"

        gap = r.get("amortization_gap")
        lines.append(
            f"| {LABELS.get(name, name)} | {r['epochs']} | {r['seconds_per_epoch']:.1f} "
            f"| {r['test_log_likelihood']:.2f} | {r['test_elbo']:.2f} "
            f"| {'n/a' if gap is None else f'{gap:.2f}'} "
            f"| {1e3 * r['inference_seconds_per_image']:.3f} "
            f"| {1e3 * r['inference_seconds_per_batch_128']:.2f} "
            f"| {rel('inference_seconds_per_image')} | {rel('inference_seconds_per_batch_128')} |"
        )
    n = next(iter(methods.values()))["num_test_images"] if methods else 0
    g = ev["gap_images"]
    lines.append("")
    lines.append(
        f"Test LL and ELBO: mean over the first {n} MNIST test images (nats). Amortization gap: "
        f"ELBO after SVI ({ev['svi_steps']} Adam steps, init {ev['svi_init']}) minus the "
        f"inference model's ELBO, mean over the first {g} images. Times: medians, "
        f"{result['machine']['torch_threads']} torch thread(s), {result['machine']['cpu']}."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Test LL against inference time at batch 1 and 128, as in the authors' blog (Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    methods = result["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in (
        (axes[0], "inference_seconds_per_image", "one image (batch 1)"),
        (axes[1], "inference_seconds_per_batch_128", "a batch of 128 images"),
    ):
        for name, r in methods.items():
            t, ll = 1e3 * r[key], r["test_log_likelihood"]
            ax.scatter(t, ll, s=60, zorder=3)
            ax.annotate(LABELS.get(name, name), (t, ll), textcoords="offset points", xytext=(6, 4))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"inference time for {title} (ms, log scale)")
        ax.set_ylabel(f"test log-likelihood (S={result['config']['eval']['samples']})")
        ax.margins(x=0.15, y=0.12)
        ax.grid(True, which="both", alpha=0.3)
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in methods.values()}))
    machine = result["machine"]
    where = machine["cuda"] if result["device"].startswith("cuda") else machine["cpu"]
    fig.suptitle(
        f"MNIST, {epochs} epochs each; inference on {where}, {machine['torch_threads']} torch "
        "thread(s); upper left is better"
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    ev: EvalConfig,
    bench: BenchConfig,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Train or reuse every method, evaluate, time, and write the JSON, table and plot."""
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoints = {m: train_or_reuse(m, model_cfg, train_cfg, bench) for m in bench.methods}

    set_threads(train_cfg.threads)
    threads = torch.get_num_threads()
    device = pick_device(train_cfg.device)
    _, test_x = load_dataset(train_cfg.dataset, train_cfg.data_dir, model_cfg.image_shape)
    test_x = test_x.to(device)
    models: dict[str, torch.nn.Module] = {}
    methods: dict[str, dict[str, Any]] = {}
    for m, (path, reused) in checkpoints.items():
        model, state = load_model(path, device)
        models[m] = model
        print(f"{m}: evaluating {path}", flush=True)
        r = evaluate(
            model,
            test_x,
            num_samples=ev.samples,
            num_images=ev.num_images,
            sampling=ev.sampling,
            batch_size=ev.batch_size,
            chunk_rows=ev.chunk_rows,
            seed=ev.seed,
            timing_repeats=1,  # timed below, interleaved with the other methods
        )
        r = {k: v for k, v in r.items() if not k.startswith("inference_seconds")}
        if ev.gap_images > 0:
            r.update(gap_summary(model, test_x[: ev.gap_images], ev))
        r.update(
            checkpoint=str(path),
            reused=reused,
            epochs=state["epoch"],
            train_seconds=state["train_seconds"],
            seconds_per_epoch=state["train_seconds"] / max(1, state["epoch"]),
            batches_per_epoch_limit=state["train_config"].get("limit_batches", 0),
            parameters=sum(p.numel() for p in model.parameters()),
            model_config=state["model_config"],
        )
        methods[m] = r
        print(json.dumps({m: {k: v for k, v in r.items() if k != "model_config"}}), flush=True)

    print("timing inference, interleaved", flush=True)
    timing = interleaved_timing(models, test_x[:128], ev.timing_repeats, bench.timing_rounds)
    for m, t in timing.items():
        methods[m].update(t)
    result = {
        "command": "recmix-train bench " + shlex.join(argv or []),
        "machine": machine_description(threads),
        "device": str(device),
        "config": {
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(train_cfg),
            "eval": dataclasses.asdict(ev),
            "bench": dataclasses.asdict(bench),
        },
        "methods": methods,
        "ratios": ratios(methods),
        "best_log_likelihood": max(methods, key=lambda m: methods[m]["test_log_likelihood"]),
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown_table(result))
    plot(result, out / "benchmark.png")
    print((out / "benchmark.md").read_text(), flush=True)
    return result
