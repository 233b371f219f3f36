"""ONNX export: parity with PyTorch, the fused graph, the manifest, and the shipped models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.model.manifest import Manifest
from service.model.mixture import log_weights
from service.model.repository import ModelRepositoryError, discover, load_model_dir
from tests.conftest import make_tiny_model
from training.export import export_model
from training.parity import ExportError, check_parity

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["mnist-recmix", "mnist-vae"]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_tiny_export_round_trips(tiny_model_repo, mnist_test_images):
    model = make_tiny_model("recmix", 3, "amortized")
    folder = tiny_model_repo / "tiny-recmix"
    manifest = Manifest.load(folder)
    x = mnist_test_images[64:96]
    mean, logvar, eps = model.encode_components(x)
    for entry in manifest.components():
        m = entry.component - 1
        outs = _session(folder / entry.path).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(outs[0], mean[:, m].detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(outs[1], logvar[:, m].detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(outs[2], eps[:, m].detach().numpy(), atol=1e-4)
    z = torch.randn(5, 4)
    logits = _session(folder / "decoder.onnx").run(None, {"z": z.numpy()})[0]
    assert logits.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(logits, model.decode(z).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 7, 128])
def test_fused_graph_equals_the_component_graphs(tiny_model_repo, mnist_test_images, batch):
    folder = tiny_model_repo / "tiny-recmix"
    manifest = Manifest.load(folder)
    x = mnist_test_images[:batch].numpy()
    means, logvars, fused_lw = _session(folder / manifest.fused().path).run(None, {"x": x})
    eps = []
    for entry in manifest.components():
        mean, logvar, eps_logit = _session(folder / entry.path).run(None, {"x": x})
        np.testing.assert_allclose(means[:, entry.component - 1], mean, atol=1e-5)
        np.testing.assert_allclose(logvars[:, entry.component - 1], logvar, atol=1e-5)
        eps.append(eps_logit)
    lw = log_weights(manifest.weights, manifest.mixture_order, np.stack(eps, 1))
    np.testing.assert_allclose(fused_lw, lw, atol=1e-5)
    # The recursion's weights, from the ONNX outputs, sum to one for every image.
    np.testing.assert_allclose(np.exp(fused_lw).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.exp(lw).sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-recmix", "tiny-vae"])
def test_int8_copies_are_listed_measured_and_close(tiny_model_repo, mnist_test_images, name):
    folder = tiny_model_repo / name
    manifest = Manifest.load(folder)
    assert manifest.precisions() == ["float32", "int8"]
    int8 = manifest.components("int8")
    assert [e.component for e in int8] == list(range(1, manifest.mixture_order + 1))
    assert all(e.path.endswith(".int8.onnx") for e in int8)
    # a quarter of the weight bytes, give or take the graph
    assert sum(e.size_bytes for e in int8) < 0.4 * sum(e.size_bytes for e in manifest.components())
    q = manifest.quantization
    assert q is not None and q.num_images == 64 and q.num_samples % manifest.mixture_order == 0
    assert 0 < q.max_abs_diff["mean"] < 0.5 and q.mean_abs_diff["mean"] <= q.max_abs_diff["mean"]
    assert abs(q.log_likelihood_shift) < 0.1
    # the figures hold on images the export did not measure them on
    x = mnist_test_images[100:164].numpy()
    for f32, i8 in zip(manifest.components(), int8, strict=True):
        a = _session(folder / f32.path).run(None, {"x": x})
        b = _session(folder / i8.path).run(None, {"x": x})
        assert np.abs(a[0] - b[0]).max() < 2 * q.max_abs_diff["mean"] + 1e-3
        assert np.abs(a[0] - b[0]).max() > 0  # quantized: not the same graph
        # an image's answer does not depend on the other images in its batch (the activations
        # are quantized per row), so batching requests together leaves each answer alone
        alone = _session(folder / i8.path).run(None, {"x": x[5:6]})
        np.testing.assert_allclose(alone[0][0], b[0][5], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alone[1][0], b[1][5], rtol=1e-5, atol=1e-5)
    if manifest.mixture_order > 1:
        fused = manifest.fused("int8")
        assert fused is not None
        means = _session(folder / fused.path).run(None, {"x": x})[0]
        for i8 in int8:
            mean = _session(folder / i8.path).run(None, {"x": x})[0]
            np.testing.assert_allclose(means[:, i8.component - 1], mean, atol=1e-5)


def test_int8_copies_can_be_skipped_or_refused(tmp_path, mnist_test_images, monkeypatch):
    import training.int8 as int8

    model = make_tiny_model("recmix", 2)
    folder = export_model(
        model, tmp_path / "plain", parity_images=mnist_test_images[:16], int8=False
    )
    manifest = Manifest.load(folder)
    assert manifest.precisions() == ["float32"] and manifest.quantization is None
    assert not list(folder.glob("*.int8.onnx"))
    # a limit no quantization can meet (it would have to gain a nat per image): not shipped
    monkeypatch.setattr(int8, "INT8_MAX_LOSS", -1.0)
    folder = export_model(model, tmp_path / "refused", parity_images=mnist_test_images[:16])
    manifest = Manifest.load(folder)
    assert manifest.precisions() == ["float32"] and manifest.quantization is None
    assert not list(folder.glob("*.int8.onnx"))
    load_model_dir(folder)  # and the folder is still a valid model


def test_export_fails_loudly_when_onnxruntime_disagrees(tmp_path, mnist_test_images):
    model = make_tiny_model("recmix", 2)
    folder = export_model(model, tmp_path / "m", parity_images=mnist_test_images[:16])
    manifest = Manifest.load(folder)
    with torch.no_grad():
        model.decoder.net[0].weight.add_(0.01)  # PyTorch now differs from the written graph
    with pytest.raises(ExportError, match=r"decoder\.logits"):
        check_parity(model, folder, manifest, mnist_test_images[:16])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_validate_and_checksums_hold(name):
    folder = load_model_dir(ROOT / "models" / name)
    m = folder.manifest
    assert m.name == name and m.evaluation is not None
    assert m.evaluation.num_samples == 5000 and m.evaluation.num_test_images == 10000
    assert m.evaluation.test_log_likelihood < m.evaluation.test_elbo + 20
    assert {p.name for p in discover(ROOT / "models")} >= set(SHIPPED)


def test_fused_graph_with_fixed_weights(tmp_path, mnist_test_images):
    """Global eps: the fused graph's log-weights are the manifest's row for every image, and the
    service's fused encode (which uses the manifest's float64 row) equals the sequential one."""
    from service.serving.runtime import Runtime
    from service.settings import Settings

    model = make_tiny_model("recmix", 3, "global", seed=1)
    folder = export_model(model, tmp_path / "fixed", parity_images=mnist_test_images[:32])
    manifest = Manifest.load(folder)
    assert manifest.weights.epsilon == "global"
    expected = log_weights(manifest.weights, manifest.mixture_order)
    for batch in (1, 7):
        x = mnist_test_images[:batch].numpy()
        means, logvars, fused_lw = _session(folder / manifest.fused().path).run(None, {"x": x})
        assert fused_lw.shape == (batch, 3)
        np.testing.assert_allclose(fused_lw, np.broadcast_to(expected, (batch, 3)), atol=1e-6)
        for entry in manifest.components():
            mean, logvar = _session(folder / entry.path).run(None, {"x": x})
            np.testing.assert_allclose(means[:, entry.component - 1], mean, atol=1e-5)
            np.testing.assert_allclose(logvars[:, entry.component - 1], logvar, atol=1e-5)
    x = mnist_test_images[:5].numpy()
    posteriors = {}
    for mode in ("fused", "sequential"):
        runtime = Runtime(
            Settings(model_dir=tmp_path, encode_mode=mode, encoder_precision="float32")
        )
        runtime.load()
        try:
            runner = runtime.model("fixed")
            assert runner.encode_mode == mode
            posteriors[mode] = runner.encode(x)
        finally:
            runtime.close()
    fused, sequential = posteriors["fused"], posteriors["sequential"]
    np.testing.assert_allclose(fused.means, sequential.means, atol=1e-5)
    np.testing.assert_allclose(fused.logvars, sequential.logvars, atol=1e-5)
    np.testing.assert_array_equal(fused.log_weights, sequential.log_weights)
    np.testing.assert_allclose(fused.weights.sum(1), 1.0, atol=1e-12)


def test_shipped_recmix_beats_shipped_vae_and_repository_is_small():
    ll = {n: Manifest.load(ROOT / "models" / n).evaluation.test_log_likelihood for n in SHIPPED}
    assert ll["mnist-recmix"] > ll["mnist-vae"]
    size = sum(p.stat().st_size for p in (ROOT / "models").rglob("*") if p.is_file())
    assert size < 40 * 2**20


def test_shipped_recmix_weights_sum_to_one(mnist_test_images):
    folder = ROOT / "models" / "mnist-recmix"
    manifest = Manifest.load(folder)
    lw = _session(folder / manifest.fused().path).run(None, {"x": mnist_test_images[:32].numpy()})[
        2
    ]
    np.testing.assert_allclose(np.exp(lw).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.exp(log_weights(manifest.weights, 4)).sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize("damage", ["tamper", "truncate", "remove", "manifest"])
def test_corrupted_copy_is_refused(tmp_path, damage):
    copy = tmp_path / "mnist-vae"
    shutil.copytree(ROOT / "models" / "mnist-vae", copy)
    target = copy / "decoder.onnx"
    if damage == "tamper":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "remove":
        target.unlink()
    else:
        doc = json.loads((copy / "manifest.json").read_text())
        doc["mixture_order"] = 2
        (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ModelRepositoryError):
        load_model_dir(copy)


def test_export_refuses_a_method_it_cannot_serve(tmp_path):
    from tests.test_training_cli import TINY, run_cli

    train = run_cli(
        "train",
        "--method",
        "iaf",
        *TINY,
        "--epochs",
        "1",
        "--limit-batches",
        "2",
        "--eval-samples",
        "0",
        "--epoch-eval-images",
        "0",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert train.returncode == 0, train.stderr[-2000:]
    out = run_cli("export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "m"))
    assert out.returncode == 2 and "cannot be exported" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "m").exists()


def test_exported_graphs_carry_no_source_paths(tiny_model_repo):
    import onnx

    for path in [*tiny_model_repo.rglob("*.onnx"), *(ROOT / "models").rglob("*.onnx")]:
        proto = onnx.load(str(path), load_external_data=False)
        assert not any(n.metadata_props or n.doc_string for n in proto.graph.node), path
        assert b'File "' not in path.read_bytes(), path
