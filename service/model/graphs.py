"""The ONNX contract, checked against the graphs themselves when a model is loaded.

The manifest says what each graph takes and gives (``service.model.manifest``); a folder whose
graphs disagree with it (another latent dimension, mixture order or image size, a renamed
tensor) would be served with answers that contradict ``/models``. So every session's inputs and
outputs are compared with what the manifest's top-level fields require: names, element type,
and every fixed dimension (a symbolic dimension, the batch, matches a symbolic one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.model.manifest import FileEntry, Manifest
from service.model.repository import ModelRepositoryError

Dims = list[int | str]


def expected_tensors(
    manifest: Manifest, entry: FileEntry
) -> tuple[dict[str, Dims], dict[str, Dims]]:
    """What a file's graph must take and give, from the manifest's top-level fields."""
    spec = manifest.input
    image: Dims = ["batch", spec.channels, spec.height, spec.width]
    d, m = manifest.latent_dim, manifest.mixture_order
    if entry.role == "decoder":
        return {"z": ["batch", d]}, {"logits": image}
    if entry.role == "fused_encoder":
        fused: dict[str, Dims] = {
            "means": ["batch", m, d],
            "logvars": ["batch", m, d],
            "log_weights": ["batch", m],
        }
        return {"x": image}, fused
    outputs: dict[str, Dims] = {"mean": ["batch", d], "logvar": ["batch", d]}
    if manifest.weights.epsilon == "amortized":
        outputs["eps_logit"] = ["batch"]
    return {"x": image}, outputs


def check_session(folder: Path, manifest: Manifest, entry: FileEntry, session: Any) -> None:
    """Refuse a graph whose tensors are not what the manifest says, naming file and field."""
    inputs, outputs = expected_tensors(manifest, entry)
    for kind, expected, found in (
        ("input", inputs, session.get_inputs()),
        ("output", outputs, session.get_outputs()),
    ):
        actual = {t.name: t for t in found}
        for name, dims in expected.items():
            tensor = actual.get(name)
            if tensor is None:
                raise ModelRepositoryError(
                    folder,
                    f"file {entry.path}: the graph has no {kind} {name!r} "
                    f"(its {kind}s: {', '.join(sorted(actual)) or 'none'})",
                )
            if tensor.type != "tensor(float)":
                raise ModelRepositoryError(
                    folder, f"file {entry.path}: {kind} {name!r} is {tensor.type}, not float32"
                )
            if not _agree(list(tensor.shape), dims):
                raise ModelRepositoryError(
                    folder,
                    f"file {entry.path}: {kind} {name!r} has shape {_show(tensor.shape)} in the "
                    f"graph, but the manifest (input, latent_dim {manifest.latent_dim}, "
                    f"mixture_order {manifest.mixture_order}) says {_show(dims)}",
                )


def _agree(actual: list[Any], expected: Dims) -> bool:
    if len(actual) != len(expected):
        return False
    for got, want in zip(actual, expected, strict=True):
        if isinstance(want, int) and got != want:
            return False
        if isinstance(want, str) and isinstance(got, int):
            return False
    return True


def _show(dims: Any) -> str:
    return "[" + ", ".join(str(x) if x is not None else "?" for x in dims) + "]"
