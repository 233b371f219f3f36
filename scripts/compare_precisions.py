"""What the int8 encoder graphs cost against float32 on the MNIST test set, through the service.

Loads each model twice as the service does (``service.model.runner.ModelRunner``, float32 and int8
encoder graphs, the same float32 decoder) and estimates log p(x) by stratified importance sampling
with the same random draws for both, on the first ``--images`` test images (binarized once, seed 0,
as in evaluation). Prints and writes the paired differences: a precise figure for a small shift.

    python scripts/compare_precisions.py --images 2000 --samples 1000 --out results/int8
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.model.likelihood import Estimate, log_likelihoods
from service.model.repository import load_model_dir
from service.model.runner import ModelRunner
from service.model.sessions import SessionFactory
from training.data import binarize_once, load_mnist, to_float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=["mnist-recmix", "mnist-vae"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1000, help="importance samples S")
    parser.add_argument("--batch", type=int, default=100, help="images per call")
    parser.add_argument("--data-dir", default=None, help="MNIST folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    images, _ = load_mnist("test", args.data_dir)
    x = binarize_once(to_float(images)).numpy()[: args.images].astype(np.float32)
    factory = SessionFactory.choose("cpu", 1)

    class Quiet:  # no metrics
        def observe_stage(self, *a: Any) -> None:
            pass

    report: dict[str, Any] = {}
    for name in args.models:
        folder = load_model_dir(args.model_dir / name)
        results = {}
        for precision in ("float32", "int8"):
            runner = ModelRunner(
                folder, factory, "fused", None, Quiet(), encoder_precision=precision
            )  # type: ignore[arg-type]
            if runner.precision != precision:
                raise SystemExit(f"{name}: no {precision} encoder graphs")
            ll, elbo, means = [], [], []
            for start in range(0, len(x), args.batch):
                part = x[start : start + args.batch]
                posterior = runner.encode(part)
                rng = np.random.default_rng(start)  # the same draws for both precisions
                (estimate,) = log_likelihoods(
                    runner, [Estimate(part, posterior, args.samples, rng)]
                )
                ll.append(estimate.log_likelihood)
                elbo.append(estimate.elbo)
                means.append(posterior.means)
            results[precision] = (np.concatenate(ll), np.concatenate(elbo), np.concatenate(means))
        (ll32, elbo32, mu32), (ll8, elbo8, mu8) = results["float32"], results["int8"]
        shift, elbo_shift = ll8 - ll32, elbo8 - elbo32
        n = len(shift)
        report[name] = {
            "log_likelihood_float32": float(ll32.mean()),
            "log_likelihood_int8": float(ll8.mean()),
            "log_likelihood_shift": float(shift.mean()),
            "log_likelihood_shift_stderr": float(shift.std(ddof=1) / np.sqrt(n)),
            "elbo_float32": float(elbo32.mean()),
            "elbo_int8": float(elbo8.mean()),
            "elbo_shift": float(elbo_shift.mean()),
            "elbo_shift_stderr": float(elbo_shift.std(ddof=1) / np.sqrt(n)),
            "max_abs_mean_diff": float(np.abs(mu8 - mu32).max()),
            "mean_abs_mean_diff": float(np.abs(mu8 - mu32).mean()),
        }
    command = shlex.join(["python", "scripts/compare_precisions.py", *sys.argv[1:]])
    lines = [
        f"Made by `{command}`: {args.images} MNIST test images, S = {args.samples}, the same "
        "draws and float32 decoder for both precisions; ± one standard error of the paired mean.",
        "",
        "| model | log p(x) float32 | log p(x) int8 | shift | ELBO float32 | ELBO int8 | shift | "
        "max / mean \\|Δ mean\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['log_likelihood_float32']:.3f} | {r['log_likelihood_int8']:.3f} | "
            f"{r['log_likelihood_shift']:+.4f} ± {r['log_likelihood_shift_stderr']:.4f} | "
            f"{r['elbo_float32']:.3f} | {r['elbo_int8']:.3f} | "
            f"{r['elbo_shift']:+.4f} ± {r['elbo_shift_stderr']:.4f} | "
            f"{r['max_abs_mean_diff']:.3f} / {r['mean_abs_mean_diff']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "precisions.md").write_text(text)
        (args.out / "precisions.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
