"""What every request body's values go through: the one error a client is told (`ApiError`, naming the field at
fault as the client spelt it; `field_of` for an engine's `SdrtError`) and the checked decoding of the images it
sends (`decode_image`)."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sdrt.runtime.errors import SdrtError

# the formats an init image or mask may come in, by the bytes that start the file (WebP: RIFF....WEBP)
IMAGE_FORMATS = {b"\x89PNG\r\n\x1a\n": PngImagePlugin.PngImageFile, b"\xff\xd8\xff": JpegImagePlugin.JpegImageFile}


class ApiError(Exception):
    """A request the server will not run: HTTP ``status``, a metrics ``kind`` (and ``reason``, for the limits:
    ``image_size``, ``prompt_length``, ...), the ``field`` at fault."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
        reason: str = "",
    ):
        super().__init__(status, kind, message, field, retry_after, reason)
        self.status, self.kind, self.message, self.field, self.retry_after = status, kind, message, field, retry_after
        self.reason = reason


def bad_request(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_request", message, field)


def field_of(err: SdrtError, names: dict[str, str]) -> str:
    """The request field an engine error is about, in the endpoint's own spelling ("body" when no one field is)."""
    return names.get(err.field, "body") if err.field else "body"


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 PNG, JPEG or WebP (raw or as a ``data:image/...;base64,`` URL), its size checked from its header
    against ``max_pixels`` and only then decoded; 400 naming ``field`` if not."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _image_error(field, f"is not base64 ({err})", "image_data") from None
    plugin = next((p for magic, p in IMAGE_FORMATS.items() if raw.startswith(magic)), None)
    if plugin is None and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        plugin = WebPImagePlugin.WebPImageFile
    if plugin is None:
        raise _image_error(field, "is not a PNG, JPEG or WebP image", "image_format")
    try:
        img = plugin(io.BytesIO(raw))  # reads the header only; Image.open's bomb check is never reached
    except (OSError, ValueError, SyntaxError) as err:
        raise _image_error(field, f"has a damaged header: {str(err).splitlines()[0]}", "image_data") from None
    if img.width * img.height > max_pixels:
        raise _image_error(
            field,
            f"is {img.width}x{img.height}, over the {max_pixels} pixels this server takes "
            "(4 times the engine's largest side, squared); scale it down",
            "image_size",
        )
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _image_error(field, f"cannot be decoded: {str(err).splitlines()[0]}", "image_data") from None
    return img


def _image_error(field: str, problem: str, reason: str) -> ApiError:
    fix = "" if reason == "image_size" else "; send a base64 PNG, JPEG or WebP (or a data: URL)"
    return ApiError(400, "bad_request", f"{field} {problem}{fix}", field, reason=reason)
