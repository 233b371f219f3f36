"""The manifest schema, the mixture-weight recursion and the model-folder check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service.model.manifest import MANIFEST_FILENAME, Manifest, WeightSpec
from service.model.mixture import log_weights
from service.model.repository import ModelRepositoryError, discover, load_model_dir


def _tensor(name: str, *shape: int | str) -> dict[str, Any]:
    return {"name": name, "shape": list(shape)}


def _manifest_dict(
    files: dict[str, bytes], m_order: int = 3, epsilon: str = "amortized"
) -> dict[str, Any]:
    """A valid recmix manifest for ``files`` (name -> content), M components and a decoder."""

    def entry(path: str, role: str, component: int | None, outputs: list[dict[str, Any]]):
        data = files[path]
        return {
            "path": path,
            "role": role,
            "component": component,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "inputs": [_tensor("z" if role == "decoder" else "x", "batch", 1, 28, 28)],
            "outputs": outputs,
        }

    enc_out = [_tensor("mean", "batch", 2), _tensor("logvar", "batch", 2)]
    if epsilon == "amortized":
        enc_out.append(_tensor("eps_logit", "batch"))
    entries = [
        entry(f"encoder_{m}.onnx", "encoder_component", m, enc_out) for m in range(1, m_order + 1)
    ]
    entries.append(entry("decoder.onnx", "decoder", None, [_tensor("logits", "batch", 1, 28, 28)]))
    return {
        "schema_version": 1,
        "name": "tiny-recmix",
        "version": "0.1.0",
        "method": "recmix",
        "mixture_order": m_order,
        "latent_dim": 2,
        "likelihood": "bernoulli",
        "input": {
            "channels": 1,
            "height": 28,
            "width": 28,
            "color": "grayscale",
            "description": "grayscale, bilinear to 28x28, scaled to [0, 1], threshold 0.5",
        },
        "architecture": {"encoder_hidden": [8], "decoder_hidden": [8], "activation": "relu"},
        "weights": {
            "form": "recursive",
            "epsilon": epsilon,
            "eps_logits": [0.0] * m_order if epsilon == "global" else None,
            "description": "RecMix recursion",
        },
        "files": entries,
        "versions": {"torch": "2.13.0", "onnx": "1.17.0", "opset": 17, "recmix": "0.1.0"},
        "created": "2025-01-01T00:00:00+00:00",
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo" / "tiny-recmix"
    folder.mkdir(parents=True)
    files = {f"encoder_{m}.onnx": f"component {m}".encode() * 10 for m in (1, 2, 3)}
    files["decoder.onnx"] = b"decoder" * 10
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / MANIFEST_FILENAME).write_text(json.dumps(_manifest_dict(files)))
    return folder


def _raw(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILENAME).read_text())


def test_valid_manifest_round_trips(model_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(model_dir)
    out = manifest.dump(tmp_path / "copy.json")
    again = Manifest.load(out)
    assert again == manifest
    text = out.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert [f.component for f in manifest.components()] == [1, 2, 3]
    assert manifest.decoder().path == "decoder.onnx"
    assert manifest.fused() is None


def test_unknown_field_is_rejected(model_dir: Path) -> None:
    raw = _raw(model_dir)
    raw["learning_rate"] = 1e-3
    with pytest.raises(ValidationError, match="learning_rate"):
        Manifest.model_validate(raw)
    raw = _raw(model_dir)
    raw["input"]["mean"] = 0.5
    with pytest.raises(ValidationError):
        Manifest.model_validate(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r.update(mixture_order=4), id="too-few-components"),
        pytest.param(lambda r: r.update(mixture_order=2), id="too-many-components"),
        pytest.param(lambda r: r["files"][1].update(component=1), id="duplicate-component"),
        pytest.param(lambda r: r["files"].pop(), id="no-decoder"),
        pytest.param(lambda r: r["files"].append(dict(r["files"][-1])), id="two-decoders"),
        pytest.param(lambda r: r["files"][0].update(component=None), id="component-missing"),
        pytest.param(lambda r: r["files"][-1].update(component=1), id="decoder-with-component"),
        pytest.param(lambda r: r["files"][0]["outputs"].pop(), id="amortized-no-eps-logit"),
        pytest.param(lambda r: r.update(method="vae"), id="vae-with-three-components"),
        pytest.param(
            lambda r: r["weights"].update(epsilon="global", eps_logits=[0.0, 0.0]),
            id="eps-logits-wrong-count",
        ),
        pytest.param(
            lambda r: r.update(
                weights={"form": "softmax", "logits": [0.0], "description": "joint"}
            ),
            id="softmax-logits-wrong-count",
        ),
        pytest.param(lambda r: r["files"][0].update(path="../x.onnx"), id="path-escapes"),
        pytest.param(lambda r: r["files"][0].update(path="/abs.onnx"), id="path-absolute"),
        pytest.param(lambda r: r["files"][0].update(sha256="ABC"), id="bad-sha"),
        pytest.param(lambda r: r["files"][0].update(size_bytes=0), id="empty-file"),
        pytest.param(lambda r: r.update(name="Bad Name"), id="bad-name"),
        pytest.param(lambda r: r.update(schema_version=2), id="schema-version"),
        pytest.param(lambda r: r.update(created="yesterday"), id="created-not-iso"),
        pytest.param(lambda r: r["input"].update(channels=2), id="two-channels"),
    ],
)
def test_inconsistent_manifest_is_rejected(model_dir: Path, mutate: Any) -> None:
    raw = _raw(model_dir)
    mutate(raw)
    with pytest.raises(ValidationError):
        Manifest.model_validate(raw)


def _with_int8(raw: dict[str, Any], components: list[int]) -> dict[str, Any]:
    for m in components:
        entry = dict(raw["files"][m - 1], path=f"encoder_{m}.int8.onnx", precision="int8")
        raw["files"].append(entry)
    raw["quantization"] = {
        "method": "int8 weights",
        "num_images": 8,
        "max_abs_diff": {"mean": 0.01},
        "mean_abs_diff": {"mean": 0.001},
        "num_samples": 30,
        "log_likelihood_shift": -0.01,
        "log_likelihood_shift_stderr": 0.01,
    }
    return raw


def test_int8_files_are_a_second_complete_encoder(model_dir: Path) -> None:
    manifest = Manifest.model_validate(_with_int8(_raw(model_dir), [3, 1, 2]))
    assert manifest.precisions() == ["float32", "int8"]
    assert [f.path for f in manifest.components("int8")] == [
        f"encoder_{m}.int8.onnx" for m in (1, 2, 3)
    ]
    assert [f.path for f in manifest.components()] == [f"encoder_{m}.onnx" for m in (1, 2, 3)]
    assert manifest.fused("int8") is None
    with pytest.raises(ValidationError, match="int8 encoder_component files"):
        Manifest.model_validate(_with_int8(_raw(model_dir), [1, 2]))
    raw = _with_int8(_raw(model_dir), [1, 2, 3])
    del raw["quantization"]
    with pytest.raises(ValidationError, match="quantization"):
        Manifest.model_validate(raw)
    raw = _raw(model_dir)
    raw["files"][-1]["precision"] = "int8"
    with pytest.raises(ValidationError, match="decoder must be float32"):
        Manifest.model_validate(raw)
    raw = _raw(model_dir)
    for entry in raw["files"][:3]:  # int8 only, no float32 encoder
        entry["precision"] = "int8"
    with pytest.raises(ValidationError, match="float32 encoder_component"):
        Manifest.model_validate(_with_int8(raw, []))


def test_file_paths_must_be_unique(model_dir: Path) -> None:
    raw = _raw(model_dir)
    raw["files"][1]["path"] = raw["files"][0]["path"]
    with pytest.raises(ValidationError, match="unique"):
        Manifest.model_validate(raw)


@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_recursive_weights_sum_to_one(M: int) -> None:
    rng = np.random.default_rng(M)
    spec = WeightSpec(form="recursive", epsilon="amortized", description="")
    logits = np.concatenate(
        [
            rng.normal(0, 3, size=(64, M)),
            rng.choice([-1e4, 1e4], size=(64, M)),
            np.full((1, M), 1e4),
            np.full((1, M), -1e4),
        ]
    )
    log_w = log_weights(spec, M, logits)
    assert log_w.shape == (logits.shape[0], M)
    assert not np.any(np.isnan(log_w))
    assert np.all(log_w <= 1e-12)
    np.testing.assert_allclose(np.exp(log_w).sum(axis=1), 1.0, rtol=1e-12)
    # the logsumexp of the log-weights is 0 (what a log-space consumer relies on)
    peak = log_w.max(axis=1, keepdims=True)
    np.testing.assert_allclose(peak[:, 0] + np.log(np.exp(log_w - peak).sum(axis=1)), 0, atol=1e-12)


def test_recursive_weights_match_the_product_form() -> None:
    logits = np.array([3.0, -0.5, 1.2, -2.0])
    eps = 1 / (1 + np.exp(-logits))
    eps[0] = 1.0
    expected = [eps[m] * np.prod(1 - eps[m + 1 :]) for m in range(4)]
    spec = WeightSpec(form="recursive", epsilon="global", eps_logits=list(logits), description="")
    np.testing.assert_allclose(np.exp(log_weights(spec, 4)), expected, rtol=1e-12)
    # the first component's logit never matters
    moved = WeightSpec(
        form="recursive", epsilon="global", eps_logits=[-50.0, *logits[1:]], description=""
    )
    np.testing.assert_allclose(log_weights(moved, 4), log_weights(spec, 4))


def test_softmax_and_single_weights() -> None:
    spec = WeightSpec(form="softmax", logits=[1e4, -1e4, 0.0], description="")
    log_w = log_weights(spec, 3)
    assert np.all(~np.isnan(log_w))
    np.testing.assert_allclose(np.exp(log_w).sum(), 1.0)
    np.testing.assert_allclose(np.exp(log_w), [1.0, 0.0, 0.0])
    assert log_weights(WeightSpec(form="single", description=""), 1).tolist() == [0.0]


def test_discover_and_load(model_dir: Path) -> None:
    repo = model_dir.parent
    (repo / "not-a-model").mkdir()
    assert discover(repo) == [model_dir]
    assert discover(repo / "absent") == []
    loaded = load_model_dir(model_dir)
    assert loaded.manifest.name == "tiny-recmix"
    assert all(p.is_absolute() and p.is_file() for p in loaded.paths.values())
    assert loaded.path_of(loaded.manifest.decoder()) == model_dir.resolve() / "decoder.onnx"


def test_folder_name_may_differ_from_model_name(model_dir: Path) -> None:
    renamed = model_dir.rename(model_dir.parent / "elsewhere")
    assert load_model_dir(renamed).manifest.name == "tiny-recmix"


def test_tampered_file_is_refused(model_dir: Path) -> None:
    data = bytearray((model_dir / "encoder_2.onnx").read_bytes())
    data[3] ^= 0xFF  # same size, different content
    (model_dir / "encoder_2.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=r"encoder_2\.onnx.*SHA-256") as info:
        load_model_dir(model_dir)
    assert str(model_dir.resolve()) in str(info.value)


def test_truncated_file_is_refused(model_dir: Path) -> None:
    data = (model_dir / "decoder.onnx").read_bytes()
    (model_dir / "decoder.onnx").write_bytes(data[:-5])
    with pytest.raises(ModelRepositoryError, match=r"decoder\.onnx.*size"):
        load_model_dir(model_dir)


def test_missing_file_is_refused(model_dir: Path) -> None:
    (model_dir / "encoder_3.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"encoder_3\.onnx.*missing"):
        load_model_dir(model_dir)


def test_invalid_or_missing_manifest_is_refused(model_dir: Path) -> None:
    raw = _raw(model_dir)
    raw["mixture_order"] = 5
    (model_dir / MANIFEST_FILENAME).write_text(json.dumps(raw))
    with pytest.raises(ModelRepositoryError, match=r"invalid manifest\.json"):
        load_model_dir(model_dir)
    (model_dir / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(ModelRepositoryError, match=r"invalid manifest\.json"):
        load_model_dir(model_dir)
    (model_dir / MANIFEST_FILENAME).unlink()
    with pytest.raises(ModelRepositoryError, match=r"no manifest\.json"):
        load_model_dir(model_dir)


def test_symlink_leading_outside_is_refused(model_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((model_dir / "decoder.onnx").read_bytes())
    (model_dir / "decoder.onnx").unlink()
    (model_dir / "decoder.onnx").symlink_to(outside)
    with pytest.raises(ModelRepositoryError, match="outside"):
        load_model_dir(model_dir)


SHIPPED = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("folder", discover(SHIPPED), ids=lambda p: p.name)
def test_shipped_models_pass_the_check(folder: Path, tmp_path: Path) -> None:
    loaded = load_model_dir(folder)
    assert loaded.manifest.name == folder.name
    assert loaded.manifest.evaluation is not None, "shipped models record their evaluation"
    # and a corrupted copy of each is refused
    copy = tmp_path / folder.name
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    victim = copy / loaded.manifest.decoder().path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match="SHA-256"):
        load_model_dir(copy)
