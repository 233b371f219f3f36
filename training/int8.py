"""int8 copies of the encoder graphs, and what they cost against float32.

At batch 1 a CPU encoder waits on reading its weights; onnxruntime's weight-only ``MatMulNBits``
(8 bits, symmetric, a scale per block of 128 inputs) reads a quarter of the bytes. The copies are
measured against float32 on the parity images (the posterior's parameters, and the shift of the
importance-sampled log-likelihood with the same draws and the same float32 decoder) and not
shipped when they lose more than ``INT8_MAX_LOSS`` nats per image.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.model.manifest import FileEntry, Manifest, Quantization
from service.model.mixture import log_weights
from service.model.repository import sha256_of
from training.model import RecMixVAE
from training.parity import PARITY_TOLERANCE, ExportError, run_graph

log = logging.getLogger("recmix.export")

INT8_METHOD = (
    "onnxruntime MatMulNBits: matmul weights int8, symmetric, one scale per block of 128 inputs; "
    "activations quantized per row and block at run time (accuracy level 4); float32 inputs and "
    "outputs. Per row, so an image's result does not depend on the others in its batch"
)
INT8_BLOCK = 128
INT8_SAMPLES_PER_COMPONENT = 250  # importance samples per component for the log-likelihood shift
INT8_MAX_LOSS = 0.1  # nats per image: int8 encoders that lose more are not shipped


def _posterior(folder: Path, manifest: Manifest, entries: list[FileEntry], xs: np.ndarray):
    """(means, logvars, log_weights) of the mixture from the component graphs ``entries``."""
    outs = [run_graph(folder, e, xs) for e in entries]
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
                    "sha256": sha256_of(dst),
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
            for a, b in zip(run_graph(folder, int8_fused, xs), quantized, strict=True)
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
