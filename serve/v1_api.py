"""``POST /v1/images``: sdrt's own request body (`ImagesRequest`, its hires fix `HiresSpec`) -> `Params` (what
`Pipeline.request` checks).

sdrt's own names (``guidance``, ``sampler``, ``n``, ``image``, ``strength``); ``n`` images come from one seed, as
`sdrt generate --batch n` and diffusers' ``num_images_per_prompt`` give them. LoRA adapters (added with `sdrt lora
add`) come as ``loras: {NAME: scale}`` and become ``Params.loras``; ControlNets come as ``controlnets: [...]``
(`sdrt.serve.control`) and become ``Params.controlnets``.

Problems are `ApiError`s that name the offending field as the client spelled it: `ImagesRequest.fields` maps the
engine's `SdrtError.field` to its spelling.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdrt.runtime.params import DEFAULT_GUIDANCE, DEFAULT_STEPS, Hires, Params
from sdrt.serve.control import ControlNetSpec, v1_controlnets, v1_fields
from sdrt.serve.inputs import decode_image
from sdrt.serve.sampler_names import sampler_name

# `SdrtError.field` (the Python argument at fault) -> this endpoint's spelling of it (the web UI's: `SDAPI_FIELDS`);
# a ControlNet's own fields (controlnets.K.name, ...) are added per request (`control`)
V1_FIELDS = {
    name: name
    for name in (
        "prompt",
        "negative_prompt",
        "steps",
        "guidance",
        "height",
        "width",
        "n",
        "seed",
        "sampler",
        "image",
        "strength",
        "mask",
        "loras",
        "controlnets",
        "clip_skip",
        "eta",
        "guidance_rescale",
        "prompt_syntax",
        "emphasis",
        "hires",
        "refiner",
        "refiner_switch_at",
    )
}
V1_FIELDS.update({f"hires.{name}": f"hires.{name}" for name in Hires.__dataclass_fields__})


class HiresSpec(BaseModel):
    """``hires`` of ``/v1/images``: the web UI's hires fix (`Hires`), its fields named as sdrt names them."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(2.0, description="upscale factor (the web UI's hr_scale)")
    width: int = Field(0, description="upscale to this width instead (hr_resize_x; 0: from scale)")
    height: int = Field(0, description="upscale to this height instead (hr_resize_y; 0: from scale)")
    upscaler: str = Field(
        "Latent", description="a latent upscaler (Latent, Latent (bicubic), ...) or Lanczos, Nearest, None"
    )
    steps: int = Field(0, description="second-pass steps (0: the first pass's)")
    strength: float = Field(0.7, description="second-pass denoising strength in (0, 1]")
    sampler: str | None = Field(None, description="second-pass sampler (default: the first's)")
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None

    def hires(self) -> Hires:
        return Hires(**dict(self.model_dump(), sampler=sampler_name(self.sampler, None, "hires.sampler")))


class ImagesRequest(BaseModel):
    """``POST /v1/images``. Unknown fields are refused, so a misspelt option never silently does nothing."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    sampler: str | None = Field(None, description="an sdrt sampler name, or its web-UI name")
    n: int = 1
    image: str | None = Field(None, description="img2img: the init image, base64 (or a data: URL)")
    mask: str | None = Field(None, description="inpainting, with image: white is repainted, base64")
    strength: float | None = Field(None, description="img2img default 0.8, inpainting default 1")
    loras: dict[str, Any] | None = Field(None, description="{adapter added with `sdrt lora add`: scale}; they add up")
    controlnets: list[ControlNetSpec] | None = Field(
        None, description="ControlNets exported with `sdrt export --controlnet`; their residuals add up"
    )
    clip_skip: int = Field(0, description="diffusers' clip_skip: the prompt's states this many layers earlier")
    eta: float | None = Field(None, description="DDIM's eta in [0, 1] (default 0)")
    guidance_rescale: float = Field(0.0, description="diffusers' guidance_rescale in [0, 1]")
    prompt_syntax: str = Field("plain", description="plain (diffusers') or webui: (word:1.3), BREAK, long prompts")
    emphasis: str = Field("original", description="with webui: original, no_norm, ignore or none")
    hires: HiresSpec | None = Field(None, description="txt2img: the web UI's hires fix, a second pass at a larger size")
    refiner_switch_at: float | None = Field(
        None,
        description="SDXL with `sdrt serve --refiner`: the fraction of "
        "the schedule the base runs (diffusers' denoising_end)",
    )
    timeout_s: float | None = Field(None, gt=0, description="answer 504 and drop the work after this long")

    def calls(self, max_pixels: int, model: str = "") -> list[Params]:
        image = decode_image(self.image, "image", max_pixels) if self.image is not None else None
        mask = decode_image(self.mask, "mask", max_pixels) if self.mask is not None else None
        sampler = sampler_name(self.sampler, None, "sampler")
        controlnets = v1_controlnets(self.controlnets or [], max_pixels)
        return [
            Params(
                prompt=self.prompt,
                negative_prompt=self.negative_prompt,
                steps=self.steps,
                guidance=self.guidance,
                height=self.height,
                width=self.width,
                n=self.n,
                seed=self.seed,
                sampler=sampler,
                image=image,
                strength=self.strength,
                mask=mask,
                loras=self.loras,
                controlnets=controlnets,
                clip_skip=self.clip_skip,
                eta=self.eta,
                guidance_rescale=self.guidance_rescale,
                prompt_syntax=self.prompt_syntax,
                emphasis=self.emphasis,
                hires=self.hires.hires() if self.hires else None,
                refiner_switch_at=self.refiner_switch_at,
            )
        ]

    def fields(self) -> dict[str, str]:
        """`SdrtError.field` -> this body's field."""
        return {**V1_FIELDS, **v1_fields(len(self.controlnets or ()))}
