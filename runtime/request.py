"""One validated request (`Request`, made from `Params` by `Pipeline.request`), and the host tensors a batch of
them reads, drawn in diffusers' order.

Requests with the same `Request.join_key` (size, steps, sampler, strength, guidance on or off, init image, mask,
LoRA adapters)
can run as one engine batch: the host lays their rows out one request after another, and each request's random
draws come from its own ``torch.Generator("cpu").manual_seed(seed)``, so every request gets exactly the images it
gets alone. The layout's counts (`Layout`) are what a captured CUDA graph depends on; the rest is data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.control import Control, control_host
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.noise import step_noise
from sdrt.runtime.params import Hires, ImageArg
from sdrt.runtime.prompts import Chunks
from sdrt.runtime.samplers import Plan


class JoinKey(NamedTuple):
    """What requests must share to run as one engine batch: everything that shapes the graph body."""

    height: int
    width: int
    steps: int
    sampler: str
    strength: float
    cfg: bool
    image: bool
    mask: bool
    loras: tuple[tuple[str, float], ...] = ()  # one adapter set per engine batch (not part of a capture key)
    controlnets: tuple[str, ...] = ()  # the ControlNet graphs the body runs (their scales and images are data)
    chunks: tuple[int, int] = (1, 1)  # 77-token chunks of the prompts and of the negatives (the text axis)
    clip_skip: tuple[int, int] = (0, 0)  # of the prompts and of the negatives
    eta: float = 0.0  # DDIM's eta (the plan's coefficients and noise draws)
    rescale: bool = False  # guidance_rescale > 0 somewhere in the batch (its value per request is data)
    latents: bool = False  # a second pass: from the first pass's latents (upscaled: hires fix; as they are: refiner)
    to_latents: bool = False  # a first pass: it ends with the latents, not the VAE's picture
    hires: tuple = ()  # the hires fix: its upscaler and the second pass's join key
    end: float | None = None  # diffusers' denoising_end: the plan stops where the refiner takes over
    begin: float | None = None  # denoising_start: a refiner's pass, from the base's latents as they are
    refine: tuple = ()  # the refiner's pass's join key


@dataclass(frozen=True)
class Texts:
    """A request's prompts and negatives, tokenized: per text, one `Chunks` per tokenizer (SDXL: two)."""

    prompts: tuple[tuple[Chunks, ...], ...]
    negatives: tuple[tuple[Chunks, ...], ...]
    syntax: str = "plain"  # how the texts were read (runtime/prompts.py)
    emphasis: str = "original"  # the web UI's emphasis mode ("original": each weighted chunk rescaled to its mean)

    @property
    def renorm(self) -> bool:
        return self.emphasis == "original"

    @property
    def chunks(self) -> tuple[int, int]:
        return self.prompts[0][0].count, self.negatives[0][0].count


@dataclass(frozen=True)
class Request:
    """One call: prompts x images per prompt, one seed. A negative of None is "not given" (SDXL zeroes it)."""

    prompts: tuple[str, ...]
    negatives: tuple[str | None, ...]
    steps: int
    guidance: float
    height: int
    width: int
    images_per_prompt: int
    seed: int
    sampler: str
    strength: float  # 1.0 for txt2img
    image: Image.Image | None = None  # RGB at (width, height)
    mask: Image.Image | None = None  # L at (width, height): white is repainted, black is kept
    loras: tuple[tuple[str, float], ...] = ()  # (adapter, scale), sorted by name (runtime/lora.py)
    control: tuple[Control, ...] = ()  # ControlNets: name, control image at (width, height), scale, start, end
    clip_skip: tuple[int, int] = (0, 0)  # of the prompts and of the negatives (diffusers skips the prompt's only)
    texts: Texts | None = field(default=None, compare=False)  # tokenized by `Pipeline.request`
    eta: float = 0.0  # DDIM: diffusers' eta (0: deterministic)
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (Lin et al. 2023, sec. 3.4)
    distilled: bool = False  # the U-Net takes the guidance scale as an embedding (LCM): no classifier-free guidance
    aesthetic: tuple[float, float] | None = None  # SDXL refiner: aesthetic scores of the prompt and the negative
    hires: HiresPass | None = None  # the web UI's hires fix: this request is its first pass
    images: tuple[Image.Image, ...] = field(default=(), compare=False)  # img2img: an init image per image row
    end: float | None = None  # SDXL base: the fraction of the schedule it runs (diffusers' denoising_end)
    begin: float | None = None  # SDXL refiner: where it takes over (denoising_start), from `latents`
    refine: Request | None = None  # the refiner's pass of this request (another engine directory's)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def cfg(self) -> bool:  # diffusers: guidance only when guidance_scale > 1, and never for a distilled U-Net
        return self.guidance > 1.0 and not self.distilled

    @property
    def join_key(self) -> JoinKey:
        """Requests with equal join keys run through the same graph body and may share one engine batch."""
        chunks = self.texts.chunks if self.texts is not None else (1, 1)
        hires = (self.hires.upscaler, self.hires.second.join_key) if self.hires else ()
        return JoinKey(
            self.height,
            self.width,
            self.steps,
            self.sampler,
            self.strength,
            self.cfg,
            self.image is not None,
            self.mask is not None,
            self.loras,
            tuple(c.name for c in self.control),
            chunks if self.cfg else (chunks[0], 0),
            self.clip_skip,
            self.eta,
            self.cfg and self.guidance_rescale > 0,
            hires=hires,
            end=self.end,
            begin=self.begin,
            refine=self.refine.join_key if self.refine else (),
        )

    @property
    def init_images(self) -> tuple[Image.Image, ...]:
        """The init images the VAE encodes: one for the request, or one per image row."""
        return self.images or ((self.image,) if self.image is not None else ())


class HiresPass(NamedTuple):
    """The hires fix of a request: the web UI's upscaler name, the second pass (an img2img `Request` at the larger
    size, from the first pass's latents, or its images when an image upscaler has run) and the settings asked."""

    upscaler: str
    second: Request
    settings: Hires


@dataclass(frozen=True)
class Layout:
    """Row counts of a batch of joined requests: prompts, images, init images. With the join key, the capture key."""

    join_key: JoinKey
    prompts: int  # text-encoder rows per side (negatives and prompts)
    images: int  # latent rows
    inits: int  # init images (one per request with an image)

    @classmethod
    def of(cls, reqs: list[Request]) -> Layout:
        keys = {r.join_key for r in reqs}
        if len(keys) != 1:
            raise ValueError(f"requests with different join keys cannot share a batch: {sorted(keys)}")
        inits = sum(len(r.init_images) for r in reqs)
        return cls(keys.pop(), sum(len(r.prompts) for r in reqs), sum(r.batch for r in reqs), inits)

    @property
    def key(self) -> tuple:
        # adapters change weights in place, not the captured graph: requests with any adapters replay one capture
        return (*self.join_key._replace(loras=()), self.prompts, self.images, self.inits)


def time_ids(r: Request, negative: bool) -> list[float]:
    """SDXL's size conditioning of one image: original size, crop top-left, then the target size, or for the
    refiner its aesthetic score (the negative's on the negative rows), as diffusers' `_get_add_time_ids`."""
    end = (r.height, r.width) if r.aesthetic is None else (r.aesthetic[negative],)
    return [r.height, r.width, 0, 0, *end]


def host_inputs(
    reqs: list[Request],
    plan: Plan,
    latent: tuple[int, int],
    encodes_init: bool,
    zero_negatives: bool,
    guidance_embedding: int = 0,
    posterior: bool = True,
) -> dict[str, torch.Tensor]:
    """Everything a batch reads, on the host. Per request, from its own generator, in diffusers' order: the init
    image's posterior sample (where `encodes_init`: img2img, or inpainting with a 4-channel U-Net or strength < 1),
    the initial latents, the masked image's posterior sample (inpainting), then each ancestral step's noise (or
    DPM++ SDE's Brownian increments, which take nothing from the generator: runtime/noise.py).

    prompt_ids[_2] [k, P, 77] and prompt_weights[_2] [P, k, 77]: every request's prompts, chunk by chunk, with
    their per-token weights, and (under guidance) negative_ids[_2] / negative_weights[_2] alike;
    prompt_renorm / negative_renorm [P]: 1 where a text's weighted chunks are rescaled to their mean;
    prompt_clip_skip / negative_clip_skip [1]. keep_negative [P]: 0 where a negative was not given and the model
    zeroes those (SDXL), else 1.
    rows [B]: the prompt each image row is conditioned on (a prompt's images are consecutive, as diffusers has them).
    ``latent``: (channels, VAE scale factor) of the model. ``guidance_embedding``: a distilled U-Net's
    time_cond_proj_dim, for timestep_cond [B, dim] (`guidance_scale_embedding` of each row's guidance - 1).
    ``posterior``: False where the VAE encoder gives latents, not a distribution (TAESD): diffusers draws no
    noise for the init or masked image then.
    """
    first = reqs[0]
    latent_channels, factor = latent
    h, w = first.height // factor, first.width // factor
    host = _text_inputs(reqs, zero_negatives)
    host["guidance"] = torch.tensor([r.guidance for r in reqs for _ in range(r.batch)], dtype=torch.float32)
    host["guidance_rescale"] = torch.tensor([r.guidance_rescale for r in reqs for _ in range(r.batch)])
    if guidance_embedding:
        scales = torch.tensor([r.guidance - 1 for r in reqs for _ in range(r.batch)])
        host["timestep_cond"] = guidance_scale_embedding(scales, guidance_embedding)
    images = [r for r in reqs for _ in range(r.batch)]
    for key, negative in (("time_ids", False), ("negative_time_ids", True)):
        host[key] = torch.tensor([time_ids(r, negative) for r in images], dtype=torch.float32)
    draws: dict[str, list[torch.Tensor]] = {"posterior_noise": [], "noise0": [], "masked_noise": [], "noise": []}
    for r in reqs:
        gen = torch.Generator("cpu").manual_seed(r.seed)
        shape = (r.batch, latent_channels, h, w)
        if encodes_init and posterior:  # one draw over the request's init images, as diffusers' latent_dist.sample
            draws["posterior_noise"].append(torch.randn((len(r.init_images), *shape[1:]), generator=gen))
        # a refiner's pass takes the base's latents as they are: diffusers draws no initial noise there
        draws["noise0"].append(torch.randn(shape, generator=gen) if r.begin is None else torch.zeros(shape))
        if r.mask is not None and posterior:  # drawn even for a 4-channel U-Net, unused: later draws depend on it
            draws["masked_noise"].append(torch.randn((1, *shape[1:]), generator=gen))
        draws["noise"].append(step_noise(plan, shape, gen, r.seed))  # randn, or DPM++ SDE's Brownian tree
    host["noise0"] = torch.cat(draws["noise0"])  # [B, 4, h, w]
    host["noise"] = torch.cat(draws["noise"], dim=1)  # [draws, B, 4, h, w]
    if first.image is not None:
        host["image"] = torch.cat([_pixels(im) for r in reqs for im in r.init_images])  # [inits, 3, H, W], [-1, 1]
        if encodes_init and posterior:
            host["posterior_noise"] = torch.cat(draws["posterior_noise"])
        rows, start = [], 0  # each image row's init image: its request's one, or its own
        for r in reqs:
            count = len(r.init_images)
            rows.append(torch.arange(start, start + count) if count > 1 else torch.full((r.batch,), start))
            start += count
        host["image_rows"] = torch.cat(rows)
    if first.control:
        host.update(control_host(reqs, len(plan.timesteps)))
    if first.mask is not None:
        masks = torch.cat([_mask(r.mask) for r in reqs])  # [R, 1, H, W], 1 = repaint
        host["masked_image"] = host["image"] * (masks < 0.5)
        host["mask"] = torch.nn.functional.interpolate(masks, size=(h, w))  # nearest, as diffusers
        if posterior:
            host["masked_noise"] = torch.cat(draws["masked_noise"])
    return host


def _text_inputs(reqs: list[Request], zero_negatives: bool) -> dict[str, torch.Tensor]:
    """The text side of `host_inputs`: token ids and weights per tokenizer, renorm and clip-skip flags,
    keep_negative and the rows each image is conditioned on."""
    first = reqs[0]
    prompts = [p for r in reqs for p in r.prompts]
    negatives = [n for r in reqs for n in r.negatives]
    sides = {"prompt": [(r, t) for r in reqs for t in r.texts.prompts]}
    if first.cfg:
        sides["negative"] = [(r, t) for r in reqs for t in r.texts.negatives]
    host = {}
    for side, texts in sides.items():
        for j in range(len(texts[0][1])):  # per tokenizer
            suffix = "_2" if j else ""
            host[f"{side}_ids{suffix}"] = torch.from_numpy(np.stack([t[j].ids for _, t in texts], axis=1))
            host[f"{side}_weights{suffix}"] = torch.from_numpy(np.stack([t[j].weights for _, t in texts]))
        host[f"{side}_renorm"] = torch.tensor([float(r.texts.renorm) for r, _ in texts])
    for side, skip in zip(("prompt", "negative"), first.clip_skip, strict=True):
        host[f"{side}_clip_skip"] = torch.tensor([skip], dtype=torch.int32)
    host["keep_negative"] = torch.tensor([0.0 if n is None and zero_negatives else 1.0 for n in negatives])  # [P]
    host["rows"] = torch.arange(len(prompts)).repeat_interleave(
        torch.tensor([r.images_per_prompt for r in reqs for _ in r.prompts])
    )
    return host


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(w), dim]: the sinusoidal embedding of 1000 w (VDM, Kingma et al. 2021; the LCM paper's guidance
    embedding, Luo et al. 2023 sec. 4.1), sin then cos of geometric frequencies 10000^(-k / (dim/2 - 1)), in float32
    as diffusers' get_guidance_scale_embedding computes it; an odd dim ends with a zero."""
    half = dim // 2
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    angles = (w * 1000.0).float()[:, None] * freqs[None, :]
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(out, (0, dim % 2))


def _pixels(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0 * 2 - 1
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def _mask(mask: Image.Image) -> torch.Tensor:
    """[1, 1, H, W] of 0 / 1: diffusers' mask processor (grayscale, [0, 1], binarised at 0.5)."""
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (values >= 0.5).float()


def open_image(image: ImageArg, field: str = "image", what: str | None = None) -> Image.Image:
    """A PIL image, read fully (a damaged file is a one-line error about ``field``, calling the image ``what``)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as err:
        what = what or ("init image" if field == "image" else field)
        raise SdrtError(f"cannot read {what} {image}: {str(err).splitlines()[0]}", field=field) from None
