"""Preprocessing follows the manifest's input spec, as training fed the model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_support import digit, encoded

from service.model.errors import InvalidInput, TooManyPixels, UndecodableImage, UnsupportedMediaType
from service.model.manifest import InputSpec
from service.model.preprocess import ImageLimits, preprocess, to_png

GRAY = InputSpec(channels=1, height=28, width=28, color="grayscale", description="test")
LIMITS = ImageLimits(max_pixels=1 << 22)


def _expected(pixels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """What training fed: uint8 / 255, binarized at the threshold, (1, 1, H, W)."""
    return (pixels.astype(np.float32) / 255.0 > threshold).astype(np.float32)[None, None]


def test_png_is_binarized_like_training() -> None:
    pixels = digit(0)
    x = preprocess([encoded(pixels)], GRAY, LIMITS)
    assert x.dtype == np.float32 and x.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(x, _expected(pixels))
    assert set(np.unique(x).tolist()) == {0.0, 1.0}


def test_pixel_array_gives_the_same_input_as_the_file() -> None:
    pixels = digit(1)
    from_file = preprocess([encoded(pixels)], GRAY, LIMITS)
    from_array = preprocess([pixels / 255.0], GRAY, LIMITS)
    np.testing.assert_array_equal(from_file, from_array)
    as_hwc = preprocess([(pixels / 255.0)[:, :, None]], GRAY, LIMITS)
    np.testing.assert_array_equal(from_file, as_hwc)


@pytest.mark.parametrize(
    ("fmt", "lossless"),
    [("PNG", True), ("BMP", True), ("GIF", True), ("TIFF", True), ("JPEG", False)],
)
def test_formats(fmt: str, lossless: bool) -> None:
    pixels = digit(2)
    x = preprocess([encoded(pixels, fmt)], GRAY, LIMITS)
    agreement = np.mean(x == _expected(pixels))
    assert agreement == 1.0 if lossless else agreement > 0.97


def test_colour_and_alpha_become_gray_luma() -> None:
    pixels = digit(3)
    rgb = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1).astype(np.uint8)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    x = preprocess([encoded(rgb)], GRAY, LIMITS)
    np.testing.assert_array_equal(x, _expected(luma))
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(preprocess([encoded(rgba)], GRAY, LIMITS), x)
    # a colour pixel array uses the same luma weights (up to Pillow's integer rounding)
    from_array = preprocess([rgb / 255.0], GRAY, LIMITS)
    assert np.mean(from_array == x) > 0.99


def test_sixteen_bit_png() -> None:
    pixels = digit(4)
    wide = pixels.astype(np.uint16) * 257  # the same intensities on 16 bits
    out = io.BytesIO()
    Image.fromarray(wide).save(out, format="PNG")
    np.testing.assert_array_equal(preprocess([out.getvalue()], GRAY, LIMITS), _expected(pixels))


def test_rgb_model_gets_three_channels() -> None:
    spec = InputSpec(channels=3, height=28, width=28, color="rgb", description="test")
    pixels = digit(5)
    x = preprocess([encoded(pixels)], spec, LIMITS)
    assert x.shape == (1, 3, 28, 28)
    for c in range(3):
        np.testing.assert_array_equal(x[:, c : c + 1], _expected(pixels))


def test_resize_uses_the_manifest_filter() -> None:
    big = np.kron(digit(6), np.ones((2, 2), dtype=np.uint8))  # 56x56, each pixel doubled
    nearest = GRAY.model_copy(update={"resize": "nearest"})
    np.testing.assert_array_equal(preprocess([encoded(big)], nearest, LIMITS), _expected(digit(6)))
    # bilinear (the default) on float intensities, as Pillow computes it
    smooth = Image.fromarray(big.astype(np.float32) / 255.0).resize((28, 28), Image.BILINEAR)
    reference = (np.asarray(smooth) > 0.5).astype(np.float32)[None, None]
    np.testing.assert_array_equal(preprocess([encoded(big)], GRAY, LIMITS), reference)
    refusing = ImageLimits(max_pixels=1 << 22, resize="refuse")
    with pytest.raises(InvalidInput, match="56x56"):
        preprocess([encoded(big)], GRAY, refusing)


def test_threshold_none_and_value_range() -> None:
    spec = InputSpec(
        channels=1,
        height=28,
        width=28,
        color="grayscale",
        binarize="none",
        value_range=(-1.0, 1.0),
        description="test",
    )
    pixels = digit(7)
    x = preprocess([encoded(pixels)], spec, LIMITS)
    np.testing.assert_allclose(x[0, 0], pixels / 255.0 * 2 - 1, atol=1e-6)
    high = GRAY.model_copy(update={"threshold": 0.9})
    np.testing.assert_array_equal(
        preprocess([encoded(pixels)], high, LIMITS), _expected(pixels, 0.9)
    )


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("binarize", "value_range"), [("threshold", (0.0, 1.0)), ("none", (-1.0, 1.0))]
)
def test_an_8_bit_image_at_the_models_size_gets_what_the_float_path_gives(
    mode: str, channels: int, binarize: str, value_range: tuple[float, float]
) -> None:
    """Such images go through a 256-level table instead: the same values, every level."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([levels, levels.T, 255 - levels], axis=-1)
    image = Image.fromarray(rgb).convert(mode)
    spec = InputSpec(
        channels=channels,
        height=16,
        width=16,
        color="grayscale" if channels == 1 else "rgb",
        binarize=binarize,  # type: ignore[arg-type]
        value_range=value_range,
        description="test",
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    x = preprocess([out.getvalue()], spec, LIMITS)
    # the float32 operations of any other image, written out
    decoded = Image.open(io.BytesIO(out.getvalue())).convert("L" if channels == 1 else "RGB")
    intensities = np.asarray(decoded, dtype=np.float32).reshape(16, 16, channels) / 255.0
    if binarize == "threshold":
        intensities = (intensities > 0.5).astype(np.float32)
    else:
        intensities = -1.0 + 2.0 * intensities
    assert x.dtype == np.float32 and x.shape == (1, channels, 16, 16)
    np.testing.assert_array_equal(x[0], intensities.transpose(2, 0, 1))


def test_refusals() -> None:
    with pytest.raises(UnsupportedMediaType):
        preprocess([b"\x00\x01 not an image"], GRAY, LIMITS)
    with pytest.raises(UnsupportedMediaType):
        preprocess([b""], GRAY, LIMITS)
    data = encoded(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))
    with pytest.raises(UndecodableImage):
        preprocess([data[:-40]], GRAY, LIMITS)
    with pytest.raises(TooManyPixels):
        preprocess([encoded(np.zeros((30, 30), np.uint8))], GRAY, ImageLimits(max_pixels=899))
    with pytest.raises(InvalidInput, match="finite"):
        preprocess([np.full((28, 28), np.nan)], GRAY, LIMITS)
    with pytest.raises(InvalidInput, match="shape"):
        preprocess([np.zeros((28, 28, 2))], GRAY, LIMITS)
    with pytest.raises(InvalidInput, match="empty"):
        preprocess([np.zeros((0, 28))], GRAY, LIMITS)


def test_png_out() -> None:
    probabilities = np.linspace(0, 1, 28 * 28).reshape(1, 28, 28)
    image = Image.open(io.BytesIO(to_png(probabilities)))
    assert image.mode == "L" and image.size == (28, 28)
    np.testing.assert_allclose(np.asarray(image) / 255.0, probabilities[0], atol=0.5 / 255 + 1e-9)
    rgb = Image.open(io.BytesIO(to_png(np.zeros((3, 4, 5)))))
    assert rgb.mode == "RGB" and rgb.size == (5, 4)


@pytest.mark.filterwarnings("ignore")  # Pillow warns about the corrupt metadata it skips
def test_corrupted_files_are_refused_never_crash() -> None:
    """Random byte flips and cuts of valid files: each decodes or gets a documented error."""
    from service.model.errors import RecmixError as ServiceError

    rng = np.random.default_rng(0)
    bases = [encoded(digit(1), fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF")]
    outcomes = set()
    for i in range(500):
        data = bytearray(bases[i % len(bases)])
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        if rng.random() < 0.3:
            data = data[: rng.integers(1, len(data))]
        try:
            preprocess([bytes(data)], GRAY, LIMITS)
            outcomes.add("decoded")
        except ServiceError as exc:
            outcomes.add(exc.code)
    assert outcomes <= {
        "decoded",
        "undecodable_image",
        "unsupported_media_type",
        "too_many_pixels",
        "invalid_input",
    }
    assert {"decoded", "undecodable_image"} <= outcomes
