"""Export a trained model to a model folder: one ONNX graph per encoder component, the decoder, a
fused graph of all components, and `manifest.json` (schema in `service/model/manifest.py`).

Right after export, onnxruntime must reproduce PyTorch on real test images (max abs difference at
most 1e-4 for means, log-variances, log-weights and logits); the export fails otherwise.

It also writes int8 copies of the encoder graphs (onnxruntime dynamic quantization of the matmul
weights: a quarter of the bytes to read per image, which is what batch-1 CPU inference waits on)
and records what they cost against float32 on the same images: the largest and mean differences of
the posterior's parameters, and the shift of the importance-sampled log-likelihood with the same
draws and the same float32 decoder. If that loss exceeds 0.1 nats per image the int8 copies are
not shipped. The decoder stays float32.
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

from service.model.manifest import (
    MANIFEST_FILENAME,
    SCHEMA_VERSION,
    Architecture,
    Evaluation,
    FileEntry,
    InputSpec,
    Manifest,
    Quantization,
    TensorSpec,
    Versions,
    WeightSpec,
)
from service.model.mixture import log_weights
from training.distributions import recursive_log_weights
from training.model import RecMixVAE

log = logging.getLogger("recmix.export")

OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 256
INT8_METHOD = (
    "onnxruntime MatMulNBits: matmul weights int8, symmetric, one scale per block of 128 inputs; "
    "activations quantized per row and block at run time (accuracy level 4); float32 inputs and "
    "outputs. Per row, so an image's result does not depend on the others in its batch"
)
INT8_BLOCK = 128
INT8_SAMPLES_PER_COMPONENT = 250  # importance samples per component for the log-likelihood shift
INT8_MAX_LOSS = 0.1  # nats per image: int8 encoders that lose more are not shipped


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


class FusedEncoder(nn.Module):
    """All M components in one graph: M independent branches, each the component's own layers.

    One onnxruntime call instead of M (and no stacking afterwards), with the same matmul kernels
    the per-component graphs use. (Stacking the weights into one matmul and batched matmuls over
    the component axis was slower on CPU at every batch size, and cannot be quantized per layer.)
    Outputs means (B, M, D), log-variances (B, M, D) and the recursion's log-weights (B, M).

    The branches' heads are concatenated and reshaped once, and fixed log-weights are a constant
    row, rather than stacking per-component outputs and computing the recursion in the graph: 11
    nodes besides the layers instead of 46 (M = 4), which at batch 1 in onnxruntime on one CPU
    thread takes the int8 graph from 0.093 to 0.077 ms and the float32 one from 0.198 to 0.179.
    """

    def __init__(self, model: RecMixVAE):
        super().__init__()
        self.encoders = nn.ModuleList(model.encoders[: model.num_active])
        self.M = len(self.encoders)
        self.D = model.cfg.latent_dim
        self.amortized = model.amortized
        if not self.amortized:
            eps_logits = model.eps_logits[: self.M].detach().clone()
            self.register_buffer("fixed_log_weights", recursive_log_weights(eps_logits[None]))

    def forward(self, x: torch.Tensor):
        flat = x.flatten(1)
        features = [encoder.trunk(flat) for encoder in self.encoders]  # (B, H) each
        heads = torch.cat([e.head(h) for e, h in zip(self.encoders, features, strict=True)], 1)
        # each head is [mean | logvar], as GaussianEncoder splits it
        mean, logvar = heads.reshape(-1, self.M, 2, self.D).unbind(2)  # (B, M, D) each
        if self.amortized:
            eps_logits = torch.cat(
                [e.eps_head(h) for e, h in zip(self.encoders, features, strict=True)], 1
            )  # (B, M)
            return mean, logvar, recursive_log_weights(eps_logits)
        return mean, logvar, self.fixed_log_weights + torch.zeros_like(mean[:, :, 0])


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


def _run(folder: Path, entry: FileEntry, feed: np.ndarray) -> list[np.ndarray]:
    """Every output of one graph of the folder on ``feed``, in onnxruntime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / entry.path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {entry.inputs[0].name: feed})


def check_parity(
    model: RecMixVAE, folder: Path, manifest: Manifest, x: torch.Tensor
) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch for every graph; raises ExportError."""

    def run(entry: FileEntry, feed: np.ndarray) -> list[np.ndarray]:
        return _run(folder, entry, feed)

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


def _posterior(folder: Path, manifest: Manifest, entries: list[FileEntry], xs: np.ndarray):
    """(means, logvars, log_weights) of the mixture from the component graphs ``entries``."""
    outs = [_run(folder, e, xs) for e in entries]
    means = np.stack([o[0] for o in outs], 1)
    logvars = np.stack([o[1] for o in outs], 1)
    eps = np.stack([o[2] for o in outs], 1) if manifest.weights.epsilon == "amortized" else None
    log_w = np.broadcast_to(
        log_weights(manifest.weights, manifest.mixture_order, eps), means.shape[:2]
    )
    return means, logvars, log_w.astype(np.float32)


def _loglik(
    model: RecMixVAE, x: torch.Tensor, posterior, num_samples: int, seed: int
) -> np.ndarray:
    """Stratified importance-sampled log p(x) with a given mixture as the proposal."""
    from types import SimpleNamespace

    from training.distributions import GaussianMixture
    from training.objectives import importance_sampled_loglik

    mixture = GaussianMixture(*(torch.from_numpy(np.ascontiguousarray(a)) for a in posterior))
    proposal = SimpleNamespace(encode=lambda _: mixture, decoder=model.decoder)
    torch.manual_seed(seed)
    with torch.no_grad():
        ll, _ = importance_sampled_loglik(proposal, x, num_samples)  # type: ignore[arg-type]
    return ll.numpy().astype(np.float64)


def _gemm_to_matmul(model: Any) -> Any:
    """Gemm with constant weights -> MatMul + Add (the weight-only quantizer takes MatMul only)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "Gemm" or node.input[1] not in constants:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA"):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        if attrs.get("transB"):
            weight = np.ascontiguousarray(weight.T)  # (in, out)
        name = f"{node.input[1]}.in_out"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        product = f"{node.output[0]}.matmul"
        nodes.append(
            helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul")
        )
        if len(node.input) > 2 and node.input[2]:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"
                )
            )
        else:
            nodes.append(
                helper.make_node("Identity", [product], [node.output[0]], name=f"{node.name}.out")
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


def _quantize(src: Path, dst: Path) -> None:
    """Weight-only int8 copy of a float32 graph (see ``INT8_METHOD``)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    options = {"block_size": INT8_BLOCK, "is_symmetric": True, "accuracy_level": 4, "bits": 8}
    quantizer = MatMulNBitsQuantizer(
        _gemm_to_matmul(onnx.load(str(src))),
        algo_config=DefaultWeightOnlyQuantConfig(**options),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every node it quantizes
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    quantizer.model.save_model_to_file(str(dst), False)


def quantize_encoders(
    model: RecMixVAE, folder: Path, manifest: Manifest, x: torch.Tensor
) -> Manifest | None:
    """Write int8 copies of the encoder graphs and measure them; the manifest that lists them.

    None (and no int8 file left behind) when they lose more than ``INT8_MAX_LOSS`` nats per image.
    """
    sources = manifest.components()
    fused = manifest.fused()
    if fused is not None:
        sources.append(fused)
    added = []
    for entry in sources:
        src = folder / entry.path
        dst = src.with_name(f"{src.stem}.int8.onnx")
        _quantize(src, dst)
        added.append(
            entry.model_copy(
                update={
                    "path": dst.name,
                    "precision": "int8",
                    "sha256": _sha256(dst),
                    "size_bytes": dst.stat().st_size,
                }
            )
        )
    xs = x.numpy().astype(np.float32)
    reference = _posterior(folder, manifest, manifest.components(), xs)
    int8_entries = [e for e in added if e.role == "encoder_component"]
    quantized = _posterior(folder, manifest, int8_entries, xs)
    names = ["mean", "logvar", "log_weights"]
    max_diff = {
        n: float(np.abs(a - b).max()) for n, a, b in zip(names, quantized, reference, strict=True)
    }
    mean_diff = {
        n: float(np.abs(a - b).mean()) for n, a, b in zip(names, quantized, reference, strict=True)
    }
    int8_fused = next((e for e in added if e.role == "fused_encoder"), None)
    if int8_fused is not None:  # the fused int8 graph must agree with the int8 components
        worst = max(
            float(np.abs(a - b).max())
            for a, b in zip(_run(folder, int8_fused, xs), quantized, strict=True)
        )
        if not worst <= PARITY_TOLERANCE:
            raise ExportError(
                f"the int8 fused graph differs from the int8 components by {worst:.3g} "
                f"(tolerance {PARITY_TOLERANCE})"
            )
    num_samples = INT8_SAMPLES_PER_COMPONENT * manifest.mixture_order
    shift = _loglik(model, x, quantized, num_samples, 0) - _loglik(
        model, x, reference, num_samples, 0
    )
    record = Quantization(
        method=INT8_METHOD,
        num_images=len(xs),
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        num_samples=num_samples,
        log_likelihood_shift=float(shift.mean()),
        log_likelihood_shift_stderr=float(shift.std(ddof=1) / math.sqrt(len(shift)))
        if len(shift) > 1
        else 0.0,
    )
    log.info("int8 encoders: %s", record.model_dump_json())
    if record.log_likelihood_shift < -INT8_MAX_LOSS:
        log.warning(
            "int8 encoders not shipped: they lose %.3f nats per image (limit %s)",
            -record.log_likelihood_shift,
            INT8_MAX_LOSS,
        )
        for entry in added:
            (folder / entry.path).unlink()
        return None
    return manifest.model_copy(update={"files": [*manifest.files, *added], "quantization": record})


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
    int8: bool = True,
) -> Path:
    """Write the model folder `out` (replacing it only once every check has passed)."""
    model = model.cpu().eval()
    out = Path(out)
    name = name or out.name
    cfg = model.cfg
    M, D = model.num_active, cfg.latent_dim
    C, H, W = cfg.image_shape
    x_spec = [("x", ["batch", C, H, W])]
    out.parent.mkdir(parents=True, exist_ok=True)  # the work folder beside it: one rename
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
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
        if int8:
            quantized = quantize_encoders(model, tmp, manifest, parity_images.float())
            if quantized is not None:
                # validate the whole manifest again (the int8 files and the record together)
                manifest = Manifest.model_validate(quantized.model_dump())
                manifest.dump(tmp / MANIFEST_FILENAME)
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
    int8: bool = True,
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
        int8=int8,
    )
