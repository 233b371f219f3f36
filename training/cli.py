"""`recmix-train`: train, evaluate and export RecMix VAEs and their baselines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import (
    BenchConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_arguments,
    dataclass_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recmix-train",
        description="Train, evaluate and export VAEs with recursive mixture inference (RecMix).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model (vae, me, recmix, savae or iaf)")
    add_dataclass_arguments(p_train.add_argument_group("model"), ModelConfig)
    add_dataclass_arguments(p_train.add_argument_group("training"), TrainConfig)

    p_eval = sub.add_parser(
        "evaluate", help="test log-likelihood (importance sampling) of a checkpoint"
    )
    p_eval.add_argument("checkpoint", type=Path, help="a checkpoint written by `train` (last.pt)")
    add_dataclass_arguments(p_eval, EvalConfig)

    p_bench = sub.add_parser(
        "bench",
        help="train (or reuse) every method, then compare test log-likelihood, ELBO, "
        "amortization gap and inference time; writes JSON, a Markdown table and a plot",
    )
    # One flag per setting: the methods come from --methods, the output folder and the
    # evaluation's device, data and batch from the bench and training groups.
    add_dataclass_arguments(p_bench.add_argument_group("model"), ModelConfig, exclude=("method",))
    add_dataclass_arguments(
        p_bench.add_argument_group("training"),
        TrainConfig,
        exclude=("out", "eval_samples", "eval_images"),
    )
    add_dataclass_arguments(
        p_bench.add_argument_group("evaluation"),
        EvalConfig,
        exclude=("device", "data_dir", "out", "seed", "batch_size"),
    )
    add_dataclass_arguments(p_bench.add_argument_group("benchmark"), BenchConfig)

    p_export = sub.add_parser("export", help="export a checkpoint to ONNX with a manifest")
    p_export.add_argument("checkpoint", type=Path, help="a checkpoint written by `train` (last.pt)")
    p_export.add_argument(
        "--out", type=Path, required=True, help="model folder to write, e.g. models/NAME"
    )
    p_export.add_argument("--name", default=None, help="model name (default: the folder's name)")
    p_export.add_argument("--version", default="1", help="model version string")
    p_export.add_argument("--description", default="", help="one line shown by GET /models")
    p_export.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results.json of the evaluation to record in the manifest "
        "(default: results.json beside the checkpoint, if any)",
    )
    p_export.add_argument("--data-dir", default=None, help="MNIST folder for the parity check")
    p_export.add_argument(
        "--no-fused", action="store_true", help="skip the fused all-components graph"
    )
    p_export.add_argument(
        "--no-int8",
        action="store_true",
        help="skip the int8 copies of the encoder graphs (by default written, measured against "
        "float32 and recorded in the manifest)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by `bench`
    from training.data import DataNotFoundError

    try:
        return _run(args)
    except (DataNotFoundError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        parser.exit(2, f"recmix-train {args.command}: error: {exc}\n")


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from training.trainer import train

        out = train(dataclass_from_args(ModelConfig, args), dataclass_from_args(TrainConfig, args))
        print(f"run folder: {out}")
        return 0
    if args.command == "evaluate":
        import torch

        from training.data import load_dataset
        from training.evaluate import evaluate
        from training.trainer import load_model, pick_device

        cfg: EvalConfig = dataclass_from_args(EvalConfig, args)
        device = pick_device(cfg.device)
        model, state = load_model(args.checkpoint, device)
        _, test_x = load_dataset(
            state["train_config"]["dataset"],
            cfg.data_dir,
            tuple(state["model_config"]["image_shape"]),
        )
        torch.set_grad_enabled(False)
        results = evaluate(
            model,
            test_x.to(device),
            num_samples=cfg.samples,
            num_images=cfg.num_images,
            sampling=cfg.sampling,
            batch_size=cfg.batch_size,
            chunk_rows=cfg.chunk_rows,
            seed=cfg.seed,
            timing_repeats=cfg.timing_repeats,
        )
        if cfg.gap_images > 0:
            from training.svi import gap_summary

            results.update(gap_summary(model, test_x[: cfg.gap_images].to(device), cfg))
        results.update(checkpoint=str(args.checkpoint), epochs=state["epoch"], device=str(device))
        text = json.dumps(results, indent=2)
        print(text)
        if cfg.out:
            Path(cfg.out).write_text(text + "\n")
        return 0
    if args.command == "bench":
        from training.bench import run_bench

        run_bench(
            dataclass_from_args(ModelConfig, args),
            dataclass_from_args(TrainConfig, args),
            dataclass_from_args(EvalConfig, args),
            dataclass_from_args(BenchConfig, args),
            argv=args.argv[1:],
        )
        return 0
    if args.command == "export":
        import logging

        from training.export import export_checkpoint

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("recmix.export").setLevel(logging.INFO)

        folder = export_checkpoint(
            args.checkpoint,
            args.out,
            name=args.name,
            version=args.version,
            description=args.description,
            results_path=args.results,
            data_dir=args.data_dir,
            fused=not args.no_fused,
            int8=not args.no_int8,
        )
        print(f"exported to {folder}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
