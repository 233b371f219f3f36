"""Turn uploaded images into the model's input exactly as training fed it, and images back out.

The steps, in order, each driven by the manifest's ``input`` spec:

1. decode (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM; the first frame of an animation), after checking
   the size in the header against ``max_pixels`` so that a decompression bomb is never decoded;
   or take a pixel array (``H x W`` or ``H x W x C``, values in [0, 1]);
2. convert to the model's channels (ITU-R 601-2 luma for colour to grayscale, as Pillow's ``L``;
   gray repeated for RGB); alpha is dropped; intensities become floats in [0, 1];
3. resize to ``height x width`` with the manifest's filter (Pillow, on float pixels), or refuse
   when the ``resize`` setting says so;
4. binarize: a pixel is 1 where its intensity is above ``threshold`` and 0 elsewhere (training
   fed binarized MNIST); then map [0, 1] linearly onto ``value_range``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.model.errors import (
    InvalidInput,
    RecmixError,
    TooManyPixels,
    UndecodableImage,
    UnsupportedMediaType,
)
from service.model.manifest import InputSpec

ImageInput = bytes | np.ndarray  # encoded image file, or a pixel array (H, W) / (H, W, C)


@dataclass(frozen=True)
class Prepared:
    """Images already in the model's input form, float32 ``(B, C, H, W)``."""

    x: np.ndarray


_WANTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int  # of one image
    resize: Literal["allow", "refuse"] = "allow"
    max_request_pixels: int | None = None  # of all the images of a request


@cache
def supported_formats() -> tuple[str, ...]:
    """The image formats this Pillow build can open, of those the service accepts."""
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


def preprocess(
    inputs: Sequence[ImageInput],
    spec: InputSpec,
    limits: ImageLimits,
    pixel_budget: int | None = None,
) -> np.ndarray | None:
    """A batch of images to the model's input, float32 ``(B, C, H, W)``.

    Every image's header is read (and its size checked) before any is decoded. With a
    ``pixel_budget``, nothing is decoded and None is returned when the images hold more pixels
    than that in all, so that the caller can do the work elsewhere (off the event loop).
    """
    opened: list[Image.Image | np.ndarray | None] = []
    pixels = 0
    for i, item in enumerate(inputs):
        try:
            if isinstance(item, bytes | bytearray):
                image = open_image(bytes(item), limits)
                pixels += image.size[0] * image.size[1]
                opened.append(image)
            else:
                pixels += item.shape[0] * item.shape[1] if item.ndim >= 2 else item.size
                opened.append(item)
        except RecmixError as exc:
            _name(exc, i, len(inputs))
            raise
    if limits.max_request_pixels is not None and pixels > limits.max_request_pixels:
        raise TooManyPixels(
            f"the {len(inputs)} images hold {pixels} pixels in all, more than the limit of "
            f"{limits.max_request_pixels} per request; send them in several requests",
            pixels=pixels,
            max_request_pixels=limits.max_request_pixels,
        )
    if pixel_budget is not None and pixels > pixel_budget:
        return None
    batch = np.empty((len(inputs), spec.channels, spec.height, spec.width), dtype=np.float32)
    for i, source in enumerate(opened):
        assert source is not None
        try:
            batch[i] = _model_input(source, spec, limits)
        except RecmixError as exc:
            _name(exc, i, len(inputs))
            raise
        opened[i] = None  # one decoded image held at a time, not all of them
    return batch


def _name(exc: RecmixError, index: int, count: int) -> None:
    """Name the image at fault in an error, when a request holds several."""
    if count > 1:
        exc.message = f"image {index}: {exc.message}"
        exc.details["image"] = index


def _model_input(
    source: Image.Image | np.ndarray, spec: InputSpec, limits: ImageLimits
) -> np.ndarray:
    """One opened image, or a pixel array, as the model's input: float32 ``(C, H, W)``."""
    if isinstance(source, np.ndarray):
        return _fit(_intensities_of_array(source, spec.channels, limits), spec, limits)
    image = load_image(source)
    if image.size == (spec.width, spec.height):
        levels = _levels_of_image(image, spec.channels)
        if levels is not None:  # 8-bit at the model's size: a table look-up
            return _level_table(spec.binarize, spec.threshold, spec.value_range)[levels]
    return _fit(_intensities_of_image(image, spec.channels), spec, limits)


def preprocess_tensor(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A tensor of images ``(B, C, H, W)`` at the model's size to the model's input, float32.

    ``uint8``: 8-bit levels, which become exactly what an 8-bit image file of these levels
    becomes; floating point: intensities in [0, 1]. Then binarized and mapped as the manifest
    says. No resizing or channel conversion: a tensor must have the model's shape.
    """
    expected = (spec.channels, spec.height, spec.width)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise InvalidInput(
            f"input has shape {list(x.shape)}; the model takes [batch, {', '.join(map(str, expected))}]"
        )
    if x.shape[0] == 0:
        raise InvalidInput("the input holds no image (batch size 0)")
    if x.dtype == np.uint8:
        return _level_table(spec.binarize, spec.threshold, spec.value_range)[x]
    if x.dtype.kind != "f":
        raise InvalidInput(f"input of type {x.dtype}: send uint8 levels or float intensities")
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise InvalidInput("input values must be finite intensities in [0, 1]")
    return _binarize_and_map(
        x.astype(np.float32, copy=False), spec.binarize, spec.threshold, spec.value_range
    )


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open an image, refuse it unread if it has too many pixels, then decode its first frame."""
    return load_image(open_image(data, limits))


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Read an image's header and check its size; nothing is decoded yet."""
    if not data:
        raise UnsupportedMediaType("empty image file")
    try:
        image = Image.open(io.BytesIO(data), formats=supported_formats())
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            "not an image in a supported format "
            f"({', '.join(f.lower() for f in supported_formats())})"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"image too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UndecodableImage(f"cannot decode the image: {exc}") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limits.max_pixels}; send a smaller image",
            width=width,
            height=height,
            max_pixels=limits.max_pixels,
        )
    if width == 0 or height == 0:
        raise InvalidInput(f"image is {width}x{height}: empty")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode the first frame of an opened image."""
    try:
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UndecodableImage(
            f"cannot decode the {image.format} image (truncated or corrupt): {exc}"
        ) from exc
    return image


def _levels_of_image(image: Image.Image, channels: int) -> np.ndarray | None:
    """A decoded image's 8-bit levels, uint8 ``(C, h, w)``; None for 16/32-bit or float pixels."""
    mode = image.mode
    if mode == "F" or mode.startswith("I"):
        return None
    target = "L" if channels == 1 else "RGB"
    if mode != target:  # convert() copies even an image already in the target mode
        image = image.convert(target)
    # tobytes() and a view: the same bytes as np.asarray(image), for less
    levels = np.frombuffer(image.tobytes(), dtype=np.uint8)
    return levels.reshape(image.height, image.width, channels).transpose(2, 0, 1)


def _intensities_of_image(image: Image.Image, channels: int) -> np.ndarray:
    """A decoded image as float32 ``(C, h, w)`` intensities in [0, 1]."""
    levels = _levels_of_image(image, channels)
    if levels is not None:
        return np.ascontiguousarray(levels, dtype=np.float32) / 255.0
    if image.mode == "F":
        return _intensities_of_array(np.asarray(image, dtype=np.float64), channels, None)
    # 16- or 32-bit integer grayscale
    gray = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    return np.repeat(gray[None], channels, axis=0)


def _intensities_of_array(
    array: np.ndarray, channels: int, limits: ImageLimits | None
) -> np.ndarray:
    """A pixel array ``(h, w)`` or ``(h, w, c)``, c in {1, 3}, as float32 ``(C, h, w)``."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise InvalidInput(
            f"pixel array has shape {list(array.shape)}; expected [height, width] or "
            "[height, width, channels] with 1 or 3 channels"
        )
    h, w, c = array.shape
    if h == 0 or w == 0:
        raise InvalidInput(f"pixel array has shape {list(array.shape)}: empty")
    if limits is not None and h * w > limits.max_pixels:
        raise TooManyPixels(
            f"pixel array is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_pixels}"
        )
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
        raise InvalidInput("pixel values must be finite intensities in [0, 1]")
    pixels = array.astype(np.float32).transpose(2, 0, 1)  # (c, h, w)
    if c == channels:
        return np.ascontiguousarray(pixels)
    if channels == 1:  # colour to gray, the weights of Pillow's "L"
        return np.tensordot(_LUMA, pixels, axes=1)[None]
    return np.repeat(pixels, channels, axis=0)


def _fit(pixels: np.ndarray, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """Resize ``(C, h, w)`` intensities to the model's size, binarize, map onto value_range."""
    _, h, w = pixels.shape
    if (h, w) != (spec.height, spec.width):
        if limits.resize == "refuse":
            raise InvalidInput(
                f"image is {w}x{h} but the model takes {spec.width}x{spec.height}, and this "
                "server does not resize; send an image of the model's size",
                width=w,
                height=h,
            )
        resample = _RESAMPLE[spec.resize]
        pixels = np.stack(
            [
                np.asarray(
                    Image.fromarray(channel).resize((spec.width, spec.height), resample),
                    dtype=np.float32,
                )
                for channel in pixels
            ]
        )
        np.clip(pixels, 0.0, 1.0, out=pixels)  # bicubic overshoots
    return _binarize_and_map(pixels, spec.binarize, spec.threshold, spec.value_range)


def _binarize_and_map(
    pixels: np.ndarray, binarize: str, threshold: float, value_range: tuple[float, float]
) -> np.ndarray:
    """Binarize float32 intensities (or not) and map [0, 1] onto value_range, element-wise."""
    if binarize == "threshold":
        pixels = (pixels > threshold).astype(np.float32)
    low, high = value_range
    if (low, high) != (0.0, 1.0):
        pixels = low + (high - low) * pixels
    return pixels


@cache
def _level_table(binarize: str, threshold: float, value_range: tuple[float, float]) -> np.ndarray:
    """The model input each 8-bit level becomes. An 8-bit image at the model's size would go
    through these very float32 operations, element by element, so looking its levels up in the
    table gives exactly their results, in a quarter of the time."""
    intensities = np.arange(256, dtype=np.float32) / 255.0
    table = np.array(_binarize_and_map(intensities, binarize, threshold, value_range))
    table.flags.writeable = False  # shared by every request
    return table


def to_png(probabilities: np.ndarray) -> bytes:
    """Pixel probabilities ``(C, H, W)`` in [0, 1] as an 8-bit PNG (gray or RGB)."""
    pixels = np.clip(np.rint(probabilities * 255.0), 0, 255).astype(np.uint8)
    # uint8 (H, W) is mode "L", (H, W, 3) is "RGB"
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
