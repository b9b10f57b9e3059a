"""What a caller asks for: `Params`, the one request type of the Python call, `sdrt generate`, the server and the
benchmarks, with sdrt's defaults. Light on purpose (no torch): the command line reads the defaults at start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL import Image

# the samplers by name (runtime/samplers.py implements them; the server's schemas read the names without torch)
SAMPLERS = (
    "ddim",
    "euler",
    "euler_a",
    "heun",
    "dpm2",
    "dpm2_a",
    "dpmpp_sde",
    "dpmpp_sde_karras",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "deis",
    "lcm",
    "pndm",
    "unipc",
)
# fresh noise every step at eta 1 (diffusers')
ANCESTRAL = ("euler_a", "dpm2_a", "dpmpp_sde", "dpmpp_sde_karras", "dpmpp_2m_sde", "dpmpp_2m_sde_karras")
# the runtime's backends (runtime/backends.py opens them; the command lines offer them without importing torch)
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "openvino", "onnxruntime", "torch")
DEFAULT_BACKEND = "auto"


def load_options(args) -> dict:
    """`Pipeline.load`'s keyword arguments from the flags `sdrt generate` and `sdrt serve` share (--backend,
    --device, --no-cuda-graph, --cpu-precision, --cpu-int8, --refiner)."""
    return {
        "backend": args.backend,
        "device": args.device,
        "cuda_graph": not args.no_cuda_graph,
        "cpu_precision": args.cpu_precision,
        "cpu_int8": args.cpu_int8,
        "refiner": args.refiner,
    }


DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
IMG2IMG_STRENGTH = 0.8  # inpainting: 1.0

ImageArg = Union["Image.Image", str, Path]


@dataclass(frozen=True)
class ControlNetArg:
    """One ControlNet of a request: a name given at `sdrt export --controlnet DIR=NAME`, its control image (taken
    as given: an edge map, a depth map, ...), diffusers' controlnet_conditioning_scale and the fraction of the steps
    it acts in (control_guidance_start / _end)."""

    name: str
    image: ImageArg
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Hires:
    """The web UI's hires fix, a second pass on a txt2img request: its picture (width x height) upscaled by
    ``scale`` (or to ``width`` x ``height``, one of them 0: kept in proportion) with ``upscaler`` (a latent
    upscaler, "Latent", "Latent (bicubic)", ..., or an image one, "Lanczos" / "Nearest" / "None"), then img2img at
    ``strength`` (the web UI's denoising_strength) for ``steps`` (0: the first pass's) with ``sampler``, ``prompt``,
    ``negative_prompt`` and ``guidance`` (None: the first pass's). Names and defaults as the web UI's ``hr_*``."""

    scale: float = 2.0
    width: int = 0  # hr_resize_x
    height: int = 0  # hr_resize_y
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None


@dataclass(frozen=True, kw_only=True)
class Params:
    """One generation as a caller asks for it, by keyword: the Python call, `sdrt generate`, every server endpoint
    and the benchmarks build one, and `Pipeline.request` checks it into a `Request`. sdrt's defaults live here; None
    means "the model's or the image's": the native size (or the init image's, else the first control image's), the
    checkpoint's sampler, a random seed, strength 0.8 for img2img and 1 for inpainting."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str | None] | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance only above 1, as diffusers
    height: int | None = None  # px
    width: int | None = None  # px
    n: int = 1  # images per prompt, all from the one seed (diffusers' num_images_per_prompt)
    seed: int | None = None
    sampler: str | None = None
    image: ImageArg | None = None  # img2img / inpainting: the init image
    strength: float | None = None
    mask: ImageArg | None = None  # inpainting, with image: white is repainted, black kept
    loras: Mapping[str, float] | None = None  # {adapter added with `sdrt lora add`: scale}; they add up
    controlnets: Sequence[ControlNetArg] = ()  # ControlNets exported with `sdrt export --controlnet`; they add up
    prompt_syntax: str = "plain"  # "webui": the web UI's (x:1.2), BREAK and 75-token chunks (runtime/prompts.py)
    emphasis: str = "original"  # with "webui": the web UI's "Original" emphasis, or "no_norm", "ignore", "none"
    clip_skip: int = 0  # diffusers' clip_skip: condition on the states this many layers before the usual one
    eta: float | None = None  # DDIM's eta (default 0); Euler ancestral's is 1; the other samplers have none
    webui_clip_skip: int | None = None  # the web UI's "Clip skip" setting, as it reads it (1: none; SD 1.x only)
    guidance_rescale: float = 0.0  # diffusers' rescale of the guided prediction (zero-SNR / v-prediction models)
    aesthetic_score: float = 6.0  # SDXL refiner: the score its time ids condition on (diffusers' default)
    negative_aesthetic_score: float = 2.5  # ... and the negative side's
    pad_chunks: bool = False  # with "webui": pad the shorter of prompt and negative with empty chunks (pad_cond_uncond)
    hires: Hires | None = None  # txt2img: the web UI's hires fix, a second img2img pass at a larger size
    refiner_switch_at: float | None = None  # SDXL: the base runs to here (diffusers' denoising_end), the refiner on
    refiner: str | None = None  # with refiner_switch_at: the refiner asked for by name (None: the one loaded)
