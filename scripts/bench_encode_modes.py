"""How fast the service's encode is in each ``--encode-mode``, at the batch sizes batching makes.

Loads the models as the service does (``service.model.runner.ModelRunner``: same session options, and
the mixture weights and post-processing included) and times ``encode`` on binarized MNIST-like
inputs for the RecMix model in each mode (the fused graph, the components concurrently from
threads, one after another) beside the VAE's single encoder. Two cache states:

- ``warm``: calls back to back, the weights stay in the CPU caches;
- ``cold``: a 64 MiB buffer is written before each call, evicting the weights from the caches,
  as happens in a server between requests (HTTP work, other processes): the state a request at
  low load meets. The buffer write itself is not timed.

Interleaved rounds (every variant once per round), medians per call. Writes a Markdown table and
JSON under --out.

    python scripts/bench_encode_modes.py --out results/load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.model.repository import load_model_dir
from service.model.runner import ModelRunner
from service.model.sessions import SessionFactory

EVICT_BYTES = 64 * 1024 * 1024  # twice this machine's L3 cache


def runners(
    model_dir: Path, recmix: str, vae: str, threads: int, precision: Any
) -> dict[str, ModelRunner]:
    factory = SessionFactory.choose("cpu", threads)
    pool = ThreadPoolExecutor(8, thread_name_prefix="component")
    mix, single = load_model_dir(model_dir / recmix), load_model_dir(model_dir / vae)

    class Quiet:  # no metrics
        def observe_stage(self, *args: Any) -> None:
            pass

    def runner(folder: Any, mode: Any) -> ModelRunner:
        made = ModelRunner(folder, factory, mode, pool, Quiet(), encoder_precision=precision)  # type: ignore[arg-type]
        if made.precision != precision:
            raise SystemExit(f"{folder.root}: no {precision} encoder graphs")
        return made

    out = {"VAE": runner(single, "sequential")}
    for mode in ("fused", "concurrent", "sequential"):
        out[f"RecMix {mode}"] = runner(mix, mode)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Example: python scripts/bench_encode_modes.py --out results/load",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs=2, default=["mnist-recmix", "mnist-vae"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="per variant, batch and round")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per session")
    parser.add_argument(
        "--precisions", nargs="+", default=["float32", "int8"], choices=["float32", "int8"]
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    variants = {
        f"{name} {precision}": runner
        for precision in args.precisions
        for name, runner in runners(args.model_dir, *args.models, args.threads, precision).items()
    }
    spec = next(iter(variants.values())).manifest.input
    rng = np.random.default_rng(0)
    evict = np.zeros(EVICT_BYTES // 8)
    times: dict[tuple[str, int, str], list[float]] = {}
    for batch in args.batch_sizes:
        # MNIST digits light about a fifth of the pixels
        x = (rng.random((batch, spec.channels, spec.height, spec.width)) < 0.2).astype(np.float32)
        for runner in variants.values():
            runner.encode(x)  # warm-up
        for round_index in range(args.rounds):
            order = list(variants.items())
            if round_index % 2:
                order.reverse()
            for name, runner in order:
                for state in ("warm", "cold"):
                    elapsed = 0.0
                    for _ in range(args.calls):
                        if state == "cold":
                            evict += 1.0
                        start = time.perf_counter()
                        runner.encode(x)
                        elapsed += time.perf_counter() - start
                    times.setdefault((name, batch, state), []).append(elapsed / args.calls)

    rows = []
    for (name, batch, state), values in times.items():
        median = statistics.median(values)
        vae = statistics.median(times[f"VAE {name.rsplit(' ', 1)[1]}", batch, state])
        rows.append(
            {
                "variant": name,
                "batch": batch,
                "cache": state,
                "median_ms": median * 1e3,
                "ms_per_image": median * 1e3 / batch,
                "ratio_to_vae": median / vae,
            }
        )
    command = shlex.join(["python", "scripts/bench_encode_modes.py", *sys.argv[1:]])
    lines = [
        f"Made by `{command}` on {platform.machine()}, {os.cpu_count()} cores, onnxruntime "
        f"{ort.__version__}, {args.threads} intra-op thread(s) per session; medians of "
        f"{args.rounds} interleaved rounds, ms per `encode` call (× the VAE's).",
        "",
    ]
    for precision in args.precisions:
        names = [n for n in variants if n.endswith(f" {precision}")]
        for state in ("cold", "warm"):
            lines += [
                f"**{precision} encoders, {state} cache**",
                "",
                "| batch | "
                + " | ".join(n.removesuffix(f" {precision}") for n in names)
                + " | fastest RecMix mode |",
                "|---:|" + "---:|" * len(names) + "---|",
            ]
            for batch in args.batch_sizes:
                cells = []
                for name in names:
                    row = next(
                        r
                        for r in rows
                        if (r["variant"], r["batch"], r["cache"]) == (name, batch, state)
                    )
                    cells.append(f"{row['median_ms']:.3f} ({row['ratio_to_vae']:.1f}×)")
                recmix = {n: statistics.median(times[n, batch, state]) for n in names[1:]}
                best = min(recmix, key=lambda n: recmix[n]).split(" ")[1]
                lines.append(f"| {batch} | " + " | ".join(cells) + f" | {best} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encode_modes.md").write_text(text)
        (args.out / "encode_modes.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
