"""What one request may cost the server: its body's bytes, its images' pixels, its prompts' characters.

Each limit is checked before the work it bounds is done, so a hostile or careless client gets a 4xx and costs
the server nearly nothing:
- the body (`BodyLimit`, ASGI): a declared ``Content-Length`` over the limit is answered 413 before a byte of the
  body is read; a body without one (chunked) is counted as it streams, and answered 413 the moment it passes the
  limit. So are its JSON values, counted from the bytes before any parsing. The rest is never read: the
  connection is closed.
- an image (`inputs.decode_image`): format and size are read from its header (PIL's plugin reads only the header, and
  ``Image.open``'s decompression-bomb check is not reached); only an image within the engine's pixel budget is
  decoded.
- a prompt (`check_prompts`): CLIP reads 77 tokens (75 of the prompt) and sdrt, as diffusers, drops the rest; a
  prompt longer than ``max_prompt_chars`` characters is refused before it is tokenised (refused, not cut: a cut
  could change the last tokens kept, and a clear error beats a silent fix). In ordinary text a token spans a word
  or part of one, so 75 tokens span a few hundred characters: a prompt over the default 8192 is one whose tail
  CLIP would drop anyway (short of thousands of spaces between words), and the echo in the answer and the PNG
  stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sdrt.serve import openai_api
from sdrt.serve.cli import MAX_BODY_MB, MAX_JSON_VALUES, MAX_PROMPT_CHARS
from sdrt.serve.inputs import ApiError
from sdrt.serve.metrics import Metrics

MB = 1 << 20
IMAGE_SCALE = 4  # an init image or mask may have this many times the engine's largest side, each way


@dataclass(frozen=True)
class Limits:
    """`sdrt serve`'s per-request limits. An image may have up to ``IMAGE_SCALE``^2 times the pixels of the
    largest image the engine makes (``max_px`` squared): it is resized to the requested size before use."""

    max_body_mb: float = MAX_BODY_MB
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_json_values: int = MAX_JSON_VALUES

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)

    def max_image_pixels(self, max_px: int) -> int:
        return (IMAGE_SCALE * max_px) ** 2

    def check(self) -> None:
        if not self.max_body_mb > 0:
            raise ValueError(f"--max-body-mb must be > 0, got {self.max_body_mb}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"--max-prompt-chars must be >= 1, got {self.max_prompt_chars}")
        if self.max_json_values < 64:
            raise ValueError(f"--max-json-values must be >= 64, got {self.max_json_values}")


def check_prompts(prompts: dict[str, str | list[str] | None], most: int) -> None:
    """400 naming the field (``prompt``, ``prompt.1``, ``negative_prompt``) of the first prompt over ``most``
    characters; nothing has been tokenised yet."""
    for name, value in prompts.items():
        items = [(name, value)] if not isinstance(value, list) else [(f"{name}.{i}", v) for i, v in enumerate(value)]
        for field, text in items:
            if isinstance(text, str) and len(text) > most:
                raise ApiError(
                    400,
                    "bad_request",
                    f"{field} has {len(text)} characters, over the server's "
                    f"{most} (--max-prompt-chars); CLIP reads only the first 75 tokens: shorten it",
                    field,
                    reason="prompt_length",
                )


class BodyLimit:
    """ASGI middleware: a request body over ``limits.max_body_bytes``, or with more than ``limits.max_json_values``
    JSON values, is answered 413 (``{"error": "too_large", "field": "body", ...}``, ``Connection: close``)
    without reading the rest; the app under it sees the client leave.

    JSON values are counted from the bytes as they stream, without parsing: each value after the first in an array
    or object follows a comma, and each array or object opens with a bracket, so the count of ``,``, ``[`` and
    ``{`` bounds them (commas and brackets inside strings count too: an over-count, never an under-count). It
    bounds what parsing costs: a body of short values (``{},{},...``) is 10-20 times its size as Python objects.
    """

    def __init__(self, app, limits: Limits, metrics: Metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            return await self._refuse(send, "body", scope["path"])
        state = {"bytes": 0, "values": 0, "refused": False, "started": False}

        async def counted() -> dict:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                state["bytes"] += len(chunk)
                state["values"] += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
                over = "body" if state["bytes"] > self.limits.max_body_bytes else None
                over = over or ("json_values" if state["values"] > self.limits.max_json_values else None)
                if over:
                    state["refused"] = True
                    if not state["started"]:
                        await self._refuse(send, over, scope["path"])
                    return {"type": "http.disconnect"}  # to the app, the client has gone
            return message

        async def guarded(message: dict) -> None:
            if state["refused"]:  # the 413 is the answer; whatever the app says after it is dropped
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, send, reason: str, path: str) -> None:
        self.metrics.errors.labels("too_large", reason).inc()
        if reason == "body":
            detail = (
                f"the request body is over the server's {self.limits.max_body_mb:g} MB limit "
                "(--max-body-mb); send a smaller one"
            )
        else:
            detail = (
                f"the request body has over {self.limits.max_json_values} JSON values (--max-json-values; "
                "commas and brackets in strings count); send fewer"
            )
        body = {"error": "too_large", "field": "body", "detail": detail}
        if path in openai_api.PATHS:  # in the shape that endpoint's clients read
            body = openai_api.error_body(ApiError(413, "too_large", detail, "body", reason=reason))
        content = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": content})
