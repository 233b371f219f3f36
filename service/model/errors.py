"""The errors of serving a model, with no transport in them.

Each has a stable ``code`` (for machines) and a message that says what to fix; ``details`` adds
structured facts (the image at fault, a limit). Which HTTP status each becomes is decided in one
table of the HTTP layer (:mod:`service.http.errors`).
"""

from __future__ import annotations

from typing import Any


class RecmixError(Exception):
    """Base of every error reported to a client; ``code`` is stable, for machines."""

    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ModelNotFound(RecmixError):
    code = "model_not_found"


class NotReady(RecmixError):
    """The runtime is starting or stopping."""

    code = "not_ready"


class UnsupportedMediaType(RecmixError):
    """Not an image in a supported format, or a request body type the endpoint does not take."""

    code = "unsupported_media_type"


class UndecodableImage(RecmixError):
    """The bytes claim a supported image format but cannot be decoded (truncated, corrupt)."""

    code = "undecodable_image"


class InvalidInput(RecmixError):
    """A decoded input the model cannot take: wrong shape, values out of range, wrong size."""

    code = "invalid_input"


class TooManyPixels(RecmixError):
    """An image larger than the pixel limit (a decompression-bomb guard), refused undecoded."""

    code = "too_many_pixels"


class TooManyImages(RecmixError):
    code = "too_many_images"


class InvalidParameter(RecmixError):
    """A parameter outside the range the model or the settings allow."""

    code = "invalid_parameter"


class OverBudget(RecmixError):
    """A request whose cost (its work, or the size of its answer) is over the server's budget;
    the message says the limit and how to split the request."""

    code = "over_budget"


class BatchFailed(RecmixError):
    """The batched run a request joined failed: every request of that batch gets this."""

    code = "batch_failed"
