"""Every default of training, evaluation and export, in one commented place.

The command line (`recmix-train`) is generated from these dataclasses: each field becomes a flag
(`latent_dim` -> `--latent-dim`) whose help text is the field's `help` metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

METHODS = ("vae", "me", "recmix", "savae", "iaf")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """What rebuilds a model: stored in every checkpoint."""

    method: str = _f(
        "recmix",
        "inference model: vae (one encoder), me (M encoders trained jointly "
        "by the mixture ELBO), recmix (recursive mixture), savae (one encoder refined by "
        "savae_steps gradient steps on the ELBO), iaf (one encoder and iaf_steps flow steps)",
        choices=METHODS,
    )
    image_shape: tuple[int, ...] = _f((1, 28, 28), "input shape C H W")
    latent_dim: int = _f(50, "latent dimension d")
    encoder_hidden: tuple[int, ...] = _f((500, 500), "hidden layer sizes of every encoder")
    decoder_hidden: tuple[int, ...] = _f((500, 500), "hidden layer sizes of the decoder")
    activation: str = _f("relu", "hidden activation", choices=("relu", "softplus", "tanh", "elu"))
    mixture_order: int = _f(4, "M, the number of encoder components (forced to 1 for vae)")
    eps_mode: str = _f(
        "global",
        "eps_m as one learned scalar per component (global) or "
        "amortized per input by a head on component m's encoder",
        choices=("global", "amortized"),
    )
    eps_init: float = _f(
        0.1, "initial mixing proportion eps_m of a component when it joins (recmix)"
    )
    # SA-VAE (Kim et al. 2018): the encoder's (mean, logvar) refined at training and test time.
    savae_steps: int = _f(4, "k, gradient-ascent steps on the ELBO refining the encoder's output")
    savae_step_size: float = _f(0.02, "step size of each refinement step (savae)")
    savae_clip: float = _f(
        5.0, "clip each image's refinement gradient to this norm (0: off) (savae)"
    )
    # IAF (Kingma et al. 2016): T masked autoregressive steps with the encoder's context h.
    iaf_steps: int = _f(2, "T, inverse autoregressive flow steps (iaf)")
    iaf_hidden: tuple[int, ...] = _f((320, 320), "hidden layer sizes of each MADE network (iaf)")
    iaf_context_dim: int = _f(50, "size of the encoder's context h fed to every flow step (iaf)")


@dataclass
class TrainConfig:
    """How a model is trained."""

    # data
    data_dir: str | None = _f(
        None,
        "folder with the MNIST IDX files (default: $RECMIX_DATA_DIR, "
        "../shared/data/mnist beside the repository, then the user cache)",
    )
    dataset: str = _f("mnist", "mnist, or folder:PATH for a folder of PNG/JPEG images")
    # optimisation (matches the public peer VAE: ReLU, Kaiming-uniform init, Adam 5e-4, batch 128)
    epochs: int = _f(50, "training epochs")
    batch_size: int = _f(128, "mini-batch size")
    lr: float = _f(5e-4, "Adam learning rate")
    grad_clip: float = _f(0.0, "clip the global gradient norm at this value (0: off)")
    # RecMix
    lam: float = _f(
        0.5, "lambda, weight of the diversity term KL(q_m || Q) in the component criterion"
    )
    kl_form: str = _f(
        "bounded",
        "KL term of the component criterion: bounded = KL(q_m || Q_m) with the "
        "new mixture (at most log 1/eps_m), literal = KL(q_m || Q_{m-1}) (unbounded above), "
        "clipped = literal with the log-ratio clipped to +-kl_clip",
        choices=("bounded", "literal", "clipped"),
    )
    kl_clip: float = _f(10.0, "clip for kl_form=clipped (nats per sample)")
    refine: str = _f(
        "own",
        "what trains the components: own = each only by its criterion (the paper's "
        "loop), joint = their criteria plus the mixture ELBO's gradient",
        choices=("own", "joint"),
    )
    add_every: int = _f(
        5, "recmix schedule: component m joins at epoch add_every*(m-1); 0 = all from the start"
    )
    # run
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "auto, cpu or cuda")
    threads: int = _f(0, "torch CPU threads (0: all cores)")
    limit_batches: int = _f(
        0, "stop each epoch after this many batches (0: the whole epoch); for smoke runs"
    )
    out: str = _f("runs/recmix", "run folder: checkpoints, metrics.jsonl, results.json")
    resume: bool = _f(False, "resume from OUT/last.pt when it exists")
    progress: bool = _f(True, "show a progress bar")
    epoch_eval_images: int = _f(1000, "test images for the cheap per-epoch test ELBO (0: off)")
    # final evaluation, written to OUT/results.json
    eval_samples: int = _f(
        5000, "importance samples S per test image for the final evaluation (0: skip)"
    )
    eval_images: int = _f(0, "test images for the final evaluation (0: all 10,000)")


@dataclass
class EvalConfig:
    """How a checkpoint is evaluated."""

    samples: int = _f(5000, "importance samples S per image (0: only time the inference)")
    sampling: str = _f(
        "stratified",
        "stratified: S/M samples from every component, weighted by w_m; "
        "mixture: S ancestral samples from Q",
        choices=("stratified", "mixture"),
    )
    num_images: int = _f(0, "test images to evaluate (0: the whole test set)")
    batch_size: int = _f(100, "images per evaluation batch")
    chunk_rows: int = _f(65536, "decoder rows per chunk (images x samples), bounds memory")
    seed: int = _f(1234, "random seed for the importance samples")
    device: str = _f("auto", "auto, cpu or cuda")
    data_dir: str | None = _f(None, "folder with the MNIST IDX files")
    timing_repeats: int = _f(
        200, "repetitions when timing inference per image and per batch of 128"
    )
    out: str | None = _f(None, "write the results as JSON here (default: print only)")
    # amortization gap: per-image SVI (Adam) in the method's own family, on the first images
    gap_images: int = _f(0, "test images for the amortization gap by SVI (0: skip)")
    svi_init: str = _f(
        "encoder",
        "start SVI from the encoder's output (in the method's own posterior family), or from "
        "scratch (one Gaussian from the prior N(0, I))",
        choices=("encoder", "scratch"),
    )
    svi_steps: int = _f(300, "SVI optimization steps per image")
    svi_lr: float = _f(1e-2, "SVI Adam learning rate")
    svi_samples: int = _f(4, "samples per step (per component for mixtures) in SVI's ELBO gradient")
    svi_eval_samples: int = _f(
        500, "samples (per component for mixtures) estimating the ELBO before and after SVI"
    )


@dataclass
class BenchConfig:
    """What `recmix-train bench` compares, besides the model, training and evaluation settings."""

    methods: tuple[str, ...] = _f(
        ("vae", "savae", "iaf", "me", "recmix"),
        "methods to compare, in table order",
        choices=METHODS,
    )
    checkpoints: str | None = _f(
        None,
        "folder of trained models to reuse: METHOD/model.pt or METHOD.pt in it "
        "(methods without one are trained into OUT/METHOD)",
    )
    timing_rounds: int = _f(5, "interleaved timing rounds; each round times every method in turn")
    out: str = _f(
        "runs/bench",
        "folder for the trained models (OUT/METHOD) and benchmark.json, .md and .png",
    )


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()
) -> None:
    """Expose every field of a config dataclass as a command-line flag, with its default and help.

    Fields named in `exclude` get no flag (they keep their default, see `dataclass_from_args`).
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        typ = hints[f.name]
        meta = f.metadata
        kwargs: dict[str, Any] = {
            "default": default,
            "dest": f.name,
            "help": f"{meta.get('help', '')} (default: {default})",
        }
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(typ) is tuple:
            kwargs.update(nargs="+", type=get_args(typ)[0])
        else:
            args = [a for a in get_args(typ) if a is not type(None)]
            kwargs["type"] = args[0] if args else typ
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type, ns: argparse.Namespace) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name):
            continue  # a field without a flag keeps its default
        v = getattr(ns, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)
