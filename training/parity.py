"""The export's check that onnxruntime reproduces PyTorch: every graph of a model folder run on
real test images and compared with the model, within ``PARITY_TOLERANCE``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from service.model.manifest import FileEntry, Manifest
from service.model.mixture import log_weights
from training.model import RecMixVAE

PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graphs do not reproduce the PyTorch model."""


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a - b.detach().cpu().numpy()))) if a.size else 0.0


def run_graph(folder: Path, entry: FileEntry, feed: np.ndarray) -> list[np.ndarray]:
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
        return run_graph(folder, entry, feed)

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
