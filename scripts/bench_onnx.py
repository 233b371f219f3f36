"""onnxruntime CPU latency of the shipped encoders: one VAE encoder against the M RecMix components
run one after another, concurrently from threads, and as the fused graph. Interleaved rounds,
medians; prints a Markdown table and writes it (and JSON) under --out.

    python scripts/bench_onnx.py --rounds 30 --out results/onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build_variants(vae_dir, vae_m, mix_dir, mix_m, threads, pool) -> dict:
    vae = session(vae_dir / vae_m.components()[0].path, threads)
    comps = [session(mix_dir / f.path, threads) for f in mix_m.components()]
    fused = session(mix_dir / mix_m.fused().path, threads)
    return {
        "VAE encoder": lambda x: vae.run(None, {"x": x}),
        "RecMix components, one after another": lambda x: [s.run(None, {"x": x}) for s in comps],
        "RecMix components, concurrent threads": lambda x: list(
            pool.map(lambda s: s.run(None, {"x": x}), comps)
        ),
        "RecMix fused graph": lambda x: fused.run(None, {"x": x}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument(
        "--calls", type=int, default=20, help="calls per variant per round (batch 1)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    vae_dir, mix_dir = args.models / "mnist-vae", args.models / "mnist-recmix"
    vae_m, mix_m = Manifest.load(vae_dir), Manifest.load(mix_dir)
    rng = np.random.default_rng(0)
    rows = []
    pool = ThreadPoolExecutor(max_workers=mix_m.mixture_order)
    for threads in args.threads:
        variants = build_variants(vae_dir, vae_m, mix_dir, mix_m, threads, pool)
        for batch in (1, 128):
            x = (rng.random((batch, 1, 28, 28)) > 0.5).astype(np.float32)
            calls = args.calls if batch == 1 else max(2, args.calls // 8)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():  # warm-up
                for _ in range(3):
                    fn(x)
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                    times[name].append((time.perf_counter() - t0) / calls)
            base = statistics.median(times["VAE encoder"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append(
                    {
                        "threads": threads,
                        "batch": batch,
                        "variant": name,
                        "median_ms": med * 1e3,
                        "ratio_to_vae": med / base,
                    }
                )
    pool.shutdown()
    table = "| intra-op threads | batch | variant | median ms per call | × VAE |\n|---|---|---|---|---|\n"
    table += "".join(
        f"| {r['threads']} | {r['batch']} | {r['variant']} | {r['median_ms']:.3f} | {r['ratio_to_vae']:.2f} |\n"
        for r in rows
    )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"
    print(machine)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "onnx_latency.md").write_text(f"Machine: {machine}\n\n{table}")
        (args.out / "onnx_latency.json").write_text(
            json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
