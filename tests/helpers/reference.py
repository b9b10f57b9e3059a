"""diffusers as the reference: its own pipeline on the same folder, with the scheduler that an sdrt sampler agrees
with, a CPU generator seeded as sdrt seeds, and the prompts the fidelity tests share."""

from __future__ import annotations

import numpy as np
import torch

SCHEDULERS = {  # sdrt sampler -> (diffusers scheduler class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    ),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
PROMPT, NEGATIVE = "a watercolor fox in the snow, detailed", "blurry, low quality"


def diffusers_images(
    folder, sampler: str, img2img: bool = False, pipeline: str | None = None, load: dict | None = None, **kw
) -> np.ndarray:
    """diffusers' own pipeline (``pipeline``: a class name; default SD txt2img or img2img) with the scheduler
    `sampler` agrees with, called with ``kw`` and a CPU generator seeded with kw["seed"]."""
    import diffusers

    name = pipeline or ("StableDiffusionImg2ImgPipeline" if img2img else "StableDiffusionPipeline")
    load = dict(load or {}, local_files_only=True)
    if "XL" not in name:
        load.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, name).from_pretrained(folder, **load)
    name, extra = SCHEDULERS[sampler]
    seed = kw.pop("seed")
    if name == "DPMSolverSDEScheduler" and pipe.scheduler.config.get("noise_sampler_seed") is None:
        # sdrt's Brownian trees where the folder sets no seed: image j's seeded seed + j (diffusers would draw one)
        prompts = 1 if isinstance(kw["prompt"], str) else len(kw["prompt"])
        images = prompts * kw.get("num_images_per_prompt", 1)
        extra = dict(extra, noise_sampler_seed=[seed + j for j in range(images)])
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return np.stack([np.asarray(im) for im in out.images])
