"""``POST /v1/images/generations``: OpenAI's image API, so its clients (the ``openai`` package, and tools built on
it) drive sdrt unchanged.

What it takes, as OpenAI's API names it:
- ``prompt`` (a string), ``n`` (1), ``size`` (``"WIDTHxHEIGHT"``, e.g. ``"768x512"`` is landscape; absent or
  ``"auto"``: the model's native size, as the other endpoints).
- ``response_format``: ``"b64_json"`` (the default here); ``"url"`` is refused, since sdrt keeps no images to
  link to. ``output_format``: ``"png"`` only; ``background``: not ``"transparent"``; ``stream``: not true.
- ``model``: any name, ignored. One server serves one model (``GET /readyz`` and each PNG's ``parameters`` text
  name it), and the tools built on OpenAI's API send a model name of their own (``dall-e-3``, ``gpt-image-1``)
  that their users cannot always change; refusing it would turn them away for nothing.
- ``quality``, ``style``, ``moderation``, ``user``, ``safety_identifier``, ``output_compression``: accepted and
  ignored (hints for OpenAI's models; sdrt's own knobs are ``steps`` and ``guidance``).
- sdrt's own fields, as ``/v1/images`` names them (the ``openai`` client sends them in ``extra_body``):
  ``negative_prompt``, ``steps`` (50), ``guidance`` (7.5), ``seed`` (random), ``sampler``, ``timeout_s``.
- anything else is refused, naming it.

The ``n`` images come from one seed, as ``/v1/images`` and `sdrt generate --batch n` give them (diffusers'
``num_images_per_prompt``): the ``n`` images of a request with seed S are those of `sdrt generate --seed S --batch
n`, not the web UI's batch (seeds S, S+1, ...).

The answer is OpenAI's ``ImagesResponse``: ``{"created", "data": [{"b64_json": PNG}], "background": "opaque",
"output_format": "png", "size": "WxH"}``, plus sdrt's ``parameters`` (the resolved request: drawn seed, default
size and sampler) and ``timings_ms``. Errors are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with sdrt's HTTP status: ``param`` is the field at fault (``size`` for a height or width the engine
cannot make), ``code`` sdrt's error kind (``bad_request``, ``too_large``, ``queue_full``, ``deadline``, ...), so the
``openai`` client raises its ``BadRequestError`` (400) with ``.param`` set, and retries a 503 after its
``Retry-After``.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sdrt.runtime.params import DEFAULT_GUIDANCE, DEFAULT_STEPS, Params
from sdrt.serve.answers import b64
from sdrt.serve.inputs import ApiError, bad_request
from sdrt.serve.sampler_names import sampler_name

if TYPE_CHECKING:
    from sdrt.serve.engine import Generated

PATHS = frozenset({"/v1/images/generations"})  # where errors take OpenAI's shape

# `Pipeline.request`'s argument names -> this endpoint's spelling: ``size`` carries both height and width
FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "height": "size",
    "width": "size",
    "n": "n",
    "seed": "seed",
    "sampler": "sampler",
    "image": "image",
    "strength": "strength",
    "mask": "mask",
}

# OpenAI's fields that set the answer's form: the values sdrt honours, and why not the others
_FORM = {
    "response_format": ((None, "b64_json"), "sdrt keeps no images to link to; send 'b64_json'"),
    "output_format": ((None, "png"), "sdrt answers PNG (lossless, the generation parameters inside); send 'png'"),
    "background": ((None, "auto", "opaque"), "Stable Diffusion makes opaque images; send 'opaque' or 'auto'"),
    "stream": ((None, False), "the images come in one answer; send false"),
}
_SIZE = re.compile(r"([1-9]\d{0,4})x([1-9]\d{0,4})")  # WIDTHxHEIGHT


class GenerationsRequest(BaseModel):
    """The body of ``POST /v1/images/generations``. OpenAI's optional fields also take ``null`` (its clients may
    send it): the default."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    n: int | None = None
    size: str | None = Field(None, description='"WIDTHxHEIGHT" in pixels, or "auto": the model\'s native size')
    response_format: str | None = Field(None, description='"b64_json" (default); "url" is not supported')
    model: str | None = Field(None, description="accepted and ignored: the server serves one model")
    output_format: str | None = None
    background: str | None = None
    stream: bool | None = None
    quality: str | None = None  # this and the rest: accepted and ignored
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    output_compression: int | None = None
    # sdrt's own, as /v1/images names them
    negative_prompt: str | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = None
    sampler: str | None = Field(None, description="an sdrt sampler name, or its web-UI name")
    timeout_s: float | None = Field(None, gt=0, description="answer 504 and drop the work after this long")

    def calls(self, max_pixels: int, model: str = "") -> list[Params]:
        self._check_form()
        height, width = image_size(self.size)
        sampler = sampler_name(self.sampler, None, "sampler")
        n = 1 if self.n is None else self.n
        return [
            Params(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt,
                steps=self.steps,
                guidance=self.guidance,
                height=height,
                width=width,
                n=n,
                seed=self.seed,
                sampler=sampler,
            )
        ]

    def fields(self) -> dict[str, str]:
        """`SdrtError.field` -> this body's field."""
        return FIELDS

    def _check_form(self) -> None:
        """Refuse what would change the answer's form in a way sdrt cannot honour."""
        for name, (honoured, why) in _FORM.items():
            value = getattr(self, name)
            if value not in honoured:
                shown = json.dumps(value)  # as the client wrote it: "url", true
                raise bad_request(name, f"{name} {shown} is not supported: {why} (or leave {name} out)")


def image_size(size: str | None) -> tuple[int | None, int | None]:
    """(height, width) for OpenAI's ``"WIDTHxHEIGHT"``; (None, None), the model's native size, for none or
    ``"auto"``. Whether the engine makes that size is `Pipeline.request`'s to say."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise bad_request("size", f"size must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto, got {size!r}")
    return int(match[2]), int(match[1])


def answer(gen: Generated) -> JSONResponse:
    """OpenAI's ``ImagesResponse`` for the one call's PNGs, with sdrt's resolved ``parameters`` and ``timings_ms``."""
    (pngs,), (parameters,), (timings_ms,) = gen.pngs, gen.parameters, gen.timings_ms
    body = {
        "created": int(time.time()),
        "data": [{"b64_json": b64(p)} for p in pngs],
        "background": "opaque",
        "output_format": "png",
        "size": f"{parameters['width']}x{parameters['height']}",
        "parameters": parameters,
        "timings_ms": timings_ms,
    }
    return JSONResponse(body)


def error_body(err: ApiError) -> dict[str, Any]:
    """``err`` in OpenAI's error shape: ``type`` is ``server_error`` for 5xx, else ``invalid_request_error``."""
    kind = "server_error" if err.status >= 500 else "invalid_request_error"
    return {"error": {"message": err.message, "type": kind, "param": err.field, "code": err.kind}}
