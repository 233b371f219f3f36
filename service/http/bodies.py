"""What an inference request carries besides its parameters: its images, and its API key."""

from __future__ import annotations

import hmac

from pydantic import SecretStr, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from service.http import schemas
from service.http.errors import BadRequest, Unauthorized
from service.model.errors import InvalidInput, TooManyImages, UnsupportedMediaType
from service.model.preprocess import ImageInput


async def read_images(request: Request, max_images: int) -> list[ImageInput]:
    """The images of a request body: multipart files, JSON, or one raw image."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        images = await _read_multipart(request, max_images)
    elif media == "application/json" or media.endswith("+json"):
        images = _read_json(await request.body())
    elif media.startswith("image/") or media == "application/octet-stream":
        images = [await request.body()]
    else:
        raise UnsupportedMediaType(
            f"unsupported request body type {media or '(none)'!r}: send multipart/form-data "
            "files, application/json with an 'images' list, or one image/* body"
        )
    if not images:
        raise InvalidInput("the request holds no image")
    if len(images) > max_images:
        raise TooManyImages(f"{len(images)} images in one request; the limit is {max_images}")
    return images


async def _read_multipart(request: Request, max_files: int) -> list[ImageInput]:
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except (MultiPartException, HTTPException) as exc:  # Starlette wraps the first in the second
        message = str(getattr(exc, "detail", exc))
        if "Too many files" in message:
            raise TooManyImages(f"too many files; the limit is {max_files}") from exc
        raise BadRequest(f"malformed multipart body: {message}") from exc
    try:
        return [
            await value.read() for _, value in form.multi_items() if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


def _read_json(body: bytes) -> list[ImageInput]:
    try:
        payload = schemas.ImagesRequest.model_validate_json(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise BadRequest("the body is not valid JSON") from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(
            f"expected {{'images': [{{'base64' | 'pixels': ...}}]}}: {problems}"
        ) from exc
    return [item.to_input() for item in payload.images]


def require_api_key(request: Request, api_key: SecretStr | None) -> None:
    """With an API key set, inference needs it as ``X-API-Key`` or ``Authorization: Bearer``."""
    if api_key is None:
        return
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    expected = api_key.get_secret_value()
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized(
            "missing or wrong API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
        )
