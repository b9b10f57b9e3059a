"""The web UI's hires fix, sdrt's and a reference built from diffusers' own pieces as the web UI composes them:
diffusers' txt2img, its latents upscaled with ``torch.nn.functional.interpolate`` in the web UI's mode (or its
picture resized with PIL's filter), then diffusers' img2img at the larger size, a generator seeded afresh for each
pass."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.params import Hires
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.reference import SCHEDULERS

# the web UI's latent upscalers as it defines them (modules/shared.py): (interpolate mode, antialias)
LATENT = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
# SD 1.x runs every upscaler; SDXL and the torch programs one of each kind, every one with SDRT_HIRES_ALL=1
ALL = bool(os.environ.get("SDRT_HIRES_ALL"))
SOME = [*LATENT, *IMAGE] if ALL else ["Latent (bicubic antialiased)", "Lanczos"]
KW = dict(prompt="a watercolor fox in the snow, detailed", negative_prompt="blurry", num_inference_steps=6,
          guidance_scale=6.0, height=64, width=96, seed=11)  # fmt: skip


def reference(folder, sdxl: bool, upscaler: str, size: tuple[int, int], sampler: str = "euler",
              hr_sampler: str | None = None, steps: int = 0, strength: float = 0.6, n: int = 1,
              hr_prompt: str | None = None, hr_cfg: float | None = None, **kw) -> np.ndarray:  # fmt: skip
    """diffusers' txt2img, the upscale, diffusers' img2img: uint8 [n, H, W, 3]. ``size``: (width, height)."""
    import diffusers

    kw = dict(KW, **kw)
    seed = kw.pop("seed")
    prompt = [kw.pop("prompt")] * n
    negative = [kw.pop("negative_prompt")] * n
    load = dict(local_files_only=True) if sdxl else dict(local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)  # fmt: skip
    names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") if sdxl else (
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # fmt: skip
    txt = getattr(diffusers, names[0]).from_pretrained(folder, **load)
    cls, extra = SCHEDULERS[sampler]
    txt.scheduler = getattr(diffusers, cls).from_config(txt.scheduler.config, **extra)
    txt.set_progress_bar_config(disable=True)
    latent = upscaler in LATENT
    first = txt(prompt=prompt, negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent" if latent else "pil", **kw).images  # fmt: skip
    if latent:
        mode, antialias = LATENT[upscaler]
        factor = txt.vae_scale_factor
        init = torch.nn.functional.interpolate(first, size=(size[1] // factor, size[0] // factor), mode=mode,
                                               antialias=antialias)  # fmt: skip
    else:
        init = [im.resize(size, resample=IMAGE[upscaler]) for im in first]
    img2img = getattr(diffusers, names[1]).from_pipe(txt)
    cls, extra = SCHEDULERS[hr_sampler or sampler]
    img2img.scheduler = getattr(diffusers, cls).from_config(txt.scheduler.config, **extra)
    out = img2img(prompt=[hr_prompt] * n if hr_prompt else prompt, negative_prompt=negative, image=init,
                  strength=strength, num_inference_steps=steps or kw["num_inference_steps"],
                  guidance_scale=kw["guidance_scale"] if hr_cfg is None else hr_cfg,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images  # fmt: skip
    return np.stack([np.asarray(im) for im in out])


def ours(pipe: Pipeline, sampler: str = "euler", n: int = 1, **hires) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe(sampler=sampler, num_images_per_prompt=n, hires=Hires(**hires),
                                                     **KW)])  # fmt: skip
