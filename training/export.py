"""Export a trained model to a model folder: one ONNX graph per encoder component, the decoder, a
fused graph of all components, and `manifest.json` (schema in `service/manifest.py`).

Right after export, onnxruntime must reproduce PyTorch on real test images (max abs difference at
most 1e-4 for means, log-variances, log-weights and logits); the export fails otherwise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.manifest import (
    MANIFEST_FILENAME,
    SCHEMA_VERSION,
    Architecture,
    Evaluation,
    FileEntry,
    InputSpec,
    Manifest,
    TensorSpec,
    Versions,
    WeightSpec,
)
from training.model import ACTIVATIONS, RecMixVAE

log = logging.getLogger("recmix.export")

OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 256


class ExportError(RuntimeError):
    """The exported graphs do not reproduce the PyTorch model."""


class ComponentGraph(nn.Module):
    """Encoder component m: x -> mean, logvar (and eps_logit when eps is amortized)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        mean, logvar, eps_logit = self.encoder(x)
        if eps_logit is None:
            return mean, logvar
        return mean, logvar, eps_logit


class DecoderGraph(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def _linears(seq: nn.Module) -> list[nn.Linear]:
    return [m for m in seq.modules() if isinstance(m, nn.Linear)]


class FusedEncoder(nn.Module):
    """All M components in one pass with stacked weights.

    The shared input goes through one matmul with the M first layers stacked ((M*H1) x in); the
    later layers are batched matmuls over the component axis. Outputs means (B, M, D), log-variances
    (B, M, D) and the recursion's log-weights (B, M).
    """

    def __init__(self, model: RecMixVAE):
        super().__init__()
        encoders = list(model.encoders[: model.num_active])
        self.M = len(encoders)
        self.act = ACTIVATIONS[model.cfg.activation]()
        layers = [[*_linears(e.trunk), e.head] for e in encoders]  # per component: trunk..., head
        first = [ls[0] for ls in layers]
        self.w0 = nn.Parameter(
            torch.cat([f.weight for f in first], 0).detach().clone()
        )  # (M*H1, in)
        self.b0 = nn.Parameter(torch.cat([f.bias for f in first], 0).detach().clone())  # (M*H1,)
        self.ws = nn.ParameterList()
        self.bs = nn.ParameterList()
        for i in range(1, len(layers[0])):
            # (M, in, out) and (M, 1, out) for x @ W + b per component
            self.ws.append(
                nn.Parameter(torch.stack([ls[i].weight.T for ls in layers]).detach().clone())
            )
            self.bs.append(
                nn.Parameter(torch.stack([ls[i].bias[None] for ls in layers]).detach().clone())
            )
        self.amortized = model.amortized
        if self.amortized:
            self.eps_w = nn.Parameter(
                torch.stack([e.eps_head.weight.T for e in encoders]).detach().clone()
            )
            self.eps_b = nn.Parameter(
                torch.stack([e.eps_head.bias[None] for e in encoders]).detach().clone()
            )
        else:
            self.register_buffer("eps_logits", model.eps_logits[: self.M].detach().clone())

    def forward(self, x: torch.Tensor):
        B = x.shape[0]
        h = self.act(x.flatten(1) @ self.w0.T + self.b0)  # (B, M*H1)
        h = h.reshape(B, self.M, -1).transpose(0, 1)  # (M, B, H1)
        n = len(self.ws)
        for i in range(n):
            out = torch.bmm(h, self.ws[i]) + self.bs[i]  # (M, B, H_next)
            if i < n - 1:
                h = self.act(out)
        mean, logvar = out.chunk(2, dim=-1)  # (M, B, D) each
        if self.amortized:
            eps_logits = (torch.bmm(h, self.eps_w) + self.eps_b).squeeze(-1).T  # (B, M)
        else:
            eps_logits = self.eps_logits.expand(B, self.M)  # (B, M)
        return mean.transpose(0, 1), logvar.transpose(0, 1), _recursive_log_weights(eps_logits)


def _recursive_log_weights(eps_logits: torch.Tensor) -> torch.Tensor:
    """log w_m = log eps_m + sum_{j>m} log(1 - eps_j), eps_1 = 1; unrolled over the small M."""
    M = eps_logits.shape[-1]
    log_eps = torch.nn.functional.logsigmoid(eps_logits)
    log_keep = torch.nn.functional.logsigmoid(-eps_logits)
    cols = []
    tail = torch.zeros_like(eps_logits[:, 0])
    for m in range(M - 1, -1, -1):
        head = log_eps[:, m] if m > 0 else torch.zeros_like(tail)
        cols.append(head + tail)
        tail = tail + log_keep[:, m]
    return torch.stack(cols[::-1], dim=-1)


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, outputs: list[str]
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    _strip_debug_info(path)


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node stack traces and doc strings: they name source files, not the model."""
    import onnx

    proto = onnx.load(str(path))
    graphs = [proto.graph, *proto.functions]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for info in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        del info.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]
    del proto.graph.metadata_props[:]
    proto.doc_string = ""
    onnx.save(proto, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path, role: str, component: int | None, inputs, outputs) -> FileEntry:
    return FileEntry(
        path=path.name,
        role=role,  # type: ignore[arg-type]
        component=component,
        sha256=_sha256(path),
        size_bytes=path.stat().st_size,
        inputs=[TensorSpec(name=n, shape=s) for n, s in inputs],
        outputs=[TensorSpec(name=n, shape=s) for n, s in outputs],
    )


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a - b.detach().cpu().numpy()))) if a.size else 0.0


def check_parity(
    model: RecMixVAE, folder: Path, manifest: Manifest, x: torch.Tensor
) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch for every graph; raises ExportError."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    def run(entry: FileEntry, feed: np.ndarray) -> list[np.ndarray]:
        sess = ort.InferenceSession(
            str(folder / entry.path), opts, providers=["CPUExecutionProvider"]
        )
        return sess.run(None, {entry.inputs[0].name: feed})

    xs = x.numpy().astype(np.float32)
    diffs: dict[str, float] = {}
    with torch.no_grad():
        mean, logvar, eps_logits = model.encode_components(x)
        log_w = model.encode(x).log_weights
        ort_eps = []
        for entry in manifest.components():
            m = entry.component - 1  # type: ignore[operator]
            outs = run(entry, xs)
            diffs[f"component_{m + 1}.mean"] = _max_diff(outs[0], mean[:, m])
            diffs[f"component_{m + 1}.logvar"] = _max_diff(outs[1], logvar[:, m])
            if model.amortized:
                diffs[f"component_{m + 1}.eps_logit"] = _max_diff(outs[2], eps_logits[:, m])
                ort_eps.append(outs[2])
        from service.manifest import log_weights

        lw = log_weights(
            manifest.weights, manifest.mixture_order, np.stack(ort_eps, 1) if ort_eps else None
        )
        diffs["log_weights(components)"] = _max_diff(np.broadcast_to(lw, log_w.shape), log_w)
        fused = manifest.fused()
        if fused is not None:
            f_mean, f_logvar, f_lw = run(fused, xs)
            diffs["fused.means"] = _max_diff(f_mean, mean)
            diffs["fused.logvars"] = _max_diff(f_logvar, logvar)
            diffs["fused.log_weights"] = _max_diff(f_lw, log_w)
        z = mean[:, 0]
        diffs["decoder.logits"] = _max_diff(run(manifest.decoder(), z.numpy())[0], model.decode(z))
    worst = max(diffs, key=diffs.get)  # type: ignore[arg-type]
    if not all(math.isfinite(v) and v <= PARITY_TOLERANCE for v in diffs.values()):
        raise ExportError(
            f"onnxruntime differs from PyTorch by {diffs[worst]:.3g} on {worst} "
            f"(tolerance {PARITY_TOLERANCE}); all: {json.dumps(diffs)}"
        )
    return diffs


def _parity_images(model: RecMixVAE, dataset: str, data_dir: str | None) -> torch.Tensor:
    from training.data import load_dataset

    _, test_x = load_dataset(dataset, data_dir, tuple(model.cfg.image_shape))
    return test_x[:PARITY_IMAGES].float()


def export_model(
    model: RecMixVAE,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    description: str = "",
    evaluation: dict[str, Any] | None = None,
    parity_images: torch.Tensor,
    fused: bool = True,
) -> Path:
    """Write the model folder `out` (replacing it only once every check has passed)."""
    model = model.cpu().eval()
    out = Path(out)
    name = name or out.name
    cfg = model.cfg
    M, D = model.num_active, cfg.latent_dim
    C, H, W = cfg.image_shape
    x_spec = [("x", ["batch", C, H, W])]
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent if out.parent.exists() else None)
    )
    try:
        example = parity_images[:2].float()
        files = []
        for m in range(M):
            path = tmp / f"encoder_{m + 1}.onnx"
            outputs = [("mean", ["batch", D]), ("logvar", ["batch", D])]
            if model.amortized:
                outputs.append(("eps_logit", ["batch"]))
            _export(ComponentGraph(model.encoders[m]), example, path, "x", [o[0] for o in outputs])
            files.append(_entry(path, "encoder_component", m + 1, x_spec, outputs))
        path = tmp / "decoder.onnx"
        _export(DecoderGraph(model.decoder), torch.zeros(2, D), path, "z", ["logits"])
        files.append(
            _entry(path, "decoder", None, [("z", ["batch", D])], [("logits", ["batch", C, H, W])])
        )
        if fused and M > 1:
            path = tmp / "encoder_fused.onnx"
            outputs = [
                ("means", ["batch", M, D]),
                ("logvars", ["batch", M, D]),
                ("log_weights", ["batch", M]),
            ]
            _export(FusedEncoder(model), example, path, "x", [o[0] for o in outputs])
            files.append(_entry(path, "fused_encoder", None, x_spec, outputs))

        if M == 1:
            weights = WeightSpec(form="single", description="one encoder: weight 1")
        elif model.amortized:
            weights = WeightSpec(
                form="recursive",
                epsilon="amortized",
                description="Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m with eps_m(x) = sigmoid(eps_logit "
                "output of component m); eps_1 = 1",
            )
        else:
            weights = WeightSpec(
                form="recursive",
                epsilon="global",
                eps_logits=[float(v) for v in model.eps_logits[:M].detach()],
                description="Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m with eps_m = sigmoid(eps_logits[m]); "
                "eps_1 = 1",
            )
        import onnx

        try:
            recmix_version = metadata.version("recmix")
        except metadata.PackageNotFoundError:
            recmix_version = "0+unknown"
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=name,
            version=version,
            method=cfg.method,  # type: ignore[arg-type]
            description=description,
            mixture_order=M,
            latent_dim=D,
            likelihood="bernoulli",
            input=InputSpec(
                channels=C,  # type: ignore[arg-type]
                height=H,
                width=W,
                color="grayscale" if C == 1 else "rgb",
                resize="bilinear",
                binarize="threshold",
                threshold=0.5,
                description=f"decode; convert to {'grayscale (L)' if C == 1 else 'RGB'}; resize to "
                f"{W}x{H} (bilinear) if needed; scale pixels by 1/255 into [0, 1]; binarize at 0.5 "
                "(the model was trained on binarized pixels); layout NCHW float32",
            ),
            architecture=Architecture(
                encoder_hidden=list(cfg.encoder_hidden),
                decoder_hidden=list(cfg.decoder_hidden),
                activation=cfg.activation,
            ),
            weights=weights,
            files=files,
            evaluation=Evaluation(**evaluation) if evaluation else None,
            versions=Versions(
                torch=torch.__version__, onnx=onnx.__version__, opset=OPSET, recmix=recmix_version
            ),
            created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        )
        manifest.dump(tmp / MANIFEST_FILENAME)
        diffs = check_parity(model, tmp, manifest, parity_images.float())
        log.info(
            "parity on %d images, max abs difference per output: %s",
            len(parity_images),
            json.dumps(diffs),
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        out.chmod(0o755)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def evaluation_from_results(results: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The manifest's evaluation block from a results.json written by `train` or `evaluate`."""
    return {
        "dataset": dataset,
        "num_test_images": int(results["num_test_images"]),
        "num_samples": int(results["num_samples"]),
        "sampling": results["sampling"],
        "test_log_likelihood": float(results["test_log_likelihood"]),
        "test_elbo": float(results["test_elbo"]),
        "epochs": int(results["epochs"]),
        "training_time_seconds": float(results["train_seconds"]),
        "seed": int(results.get("seed", 0)),
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    description: str = "",
    results_path: str | Path | None = None,
    data_dir: str | None = None,
    fused: bool = True,
) -> Path:
    """Export a checkpoint written by `train`; records its results.json evaluation when present."""
    from training.trainer import load_model

    model, state = load_model(checkpoint, "cpu")
    if not isinstance(model, RecMixVAE):
        raise ValueError(
            f"{checkpoint}: method {model.cfg.method!r} cannot be exported: its inference is not a "
            "feed-forward mixture of Gaussian encoders (SA-VAE takes gradient steps, IAF a flow); "
            "export supports vae, me and recmix"
        )
    dataset = state["train_config"]["dataset"]
    results_path = (
        Path(results_path) if results_path else Path(checkpoint).with_name("results.json")
    )
    evaluation = None
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        results.setdefault("train_seconds", state.get("train_seconds", 0.0))
        results.setdefault("epochs", state["epoch"])
        label = (
            "MNIST, dynamically binarized for training; test set binarized once (seed 0)"
            if dataset == "mnist"
            else dataset
        )
        evaluation = evaluation_from_results(results, label)
    return export_model(
        model,
        out,
        name=name,
        version=version,
        description=description,
        evaluation=evaluation,
        parity_images=_parity_images(model, dataset, data_dir),
        fused=fused,
    )
