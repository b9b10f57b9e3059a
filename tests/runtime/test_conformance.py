"""Conformance sweep: seeded random model configurations, each exported fp32 once and compared against diffusers'
own pipelines on the same folder: txt2img, img2img and inpainting, at drawn sizes, strengths and image counts.

Each draw also draws the folder's own scheduler (class and options: spacing, prediction, Karras / exponential
sigmas, DPM-Solver's SDE, UniPC's and DEIS's orders, zero terminal SNR), possibly an LCM-distilled U-Net or an
SDXL refiner, and for some cases another sampler that runs on that schedule (diffusers' class of it, made from the
folder's config). The default run checks a small fixed set of draws that together cover SD and SDXL txt2img,
img2img, inpainting with a 4-channel U-Net (diffusers blends the kept region) and with a 9-channel inpainting
U-Net, every scheduler family, a distilled U-Net, zero SNR and a refiner; ``SDRT_SWEEP=N`` adds N more (seeds
1000..1000+N-1). A draw names everything it chose, so a failure is reproduced by its seed
alone. A configuration sdrt does not support must be refused at export with a one-line error naming what is
unsupported, never give a wrong picture. Every case runs on ONNX Runtime and, where it is installed, on OpenVINO at
f32 (its graph rewrites at each drawn shape), both against the one diffusers picture.
"""

from __future__ import annotations

import importlib.util
import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, psnr, sdrt_images
from tests.helpers.models import CLIP, tokenizer
from tests.helpers.reference import PROMPT, diffusers_images

# The default run's draws: what each pins (the rest is drawn from its seed as usual). One export per draw costs far
# more than its comparisons (a U-Net trace: ~45 s; a comparison: ~5-10 s), so three small exports, each compared
# at every kind it can run: SD and SDXL txt2img, img2img and 4-channel inpainting, and an SD 9-channel U-Net.
# Their schedulers and extra samplers pin one folder per scheduler family the samplers mirror.
FIXED: dict[int, dict[str, Any]] = {
    0: dict(sdxl=False, blocks=2, latent=4, nine=False, lcm=False,
            scheduler=("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3,
                                                       final_sigmas_type="sigma_min", use_karras_sigmas=True)),
            samplers=("dpm2_a", "deis", "ddim")),
    1: dict(sdxl=True, blocks=2, latent=4, nine=False, refiner=False, lcm=False,
            scheduler=("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
            samplers=("heun", "dpm2", "euler_a")),
    2: dict(sdxl=False, blocks=2, latent=4, nine=True, lcm=False,
            scheduler=("DDIMScheduler", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                             prediction_type="v_prediction")), samplers=("unipc",)),
    3: dict(sdxl=False, blocks=2, latent=4, nine=False, lcm=True, samplers=()),
    4: dict(sdxl=True, blocks=2, latent=4, nine=False, refiner=True, lcm=False,
            scheduler=("DPMSolverSDEScheduler", dict(use_exponential_sigmas=True, noise_sampler_seed=4)),
            samplers=()),
}  # fmt: skip
BACKENDS = ("onnxruntime", "openvino") if importlib.util.find_spec("openvino") else ("onnxruntime",)
SEEDS = list(FIXED) + [1000 + i for i in range(int(os.environ.get("SDRT_SWEEP", "0")))]
STEPS = 3  # every case: enough for img2img at strength >= 0.4 to run a step (diffusers: int(steps * strength))
PIPELINES = {  # (family, kind) -> diffusers' pipeline class that is the reference
    ("sd", "txt2img"): "StableDiffusionPipeline",
    ("sd", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}


@dataclass(frozen=True)
class Case:
    """One comparison: ``kind`` (txt2img, img2img, inpaint) at height x width px, ``images`` per prompt."""

    kind: str
    height: int
    width: int
    images: int
    strength: float | None = None  # img2img and inpainting
    sampler: str | None = None  # None: the folder's own scheduler

    def key(self, d: Draw) -> str:
        """The record_property key: psnr_<kind>[_4ch|_9ch][_sdxl]_<H>x<W>_n<images>_<sampler>."""
        kind = self.kind + (f"_{d.unet['in_channels']}ch" if self.kind == "inpaint" else "")
        family = "_refiner" if d.refiner else "_sdxl" if d.sdxl else ""
        return f"psnr_{kind}{family}_{self.height}x{self.width}_n{self.images}_{self.sampler or 'own'}"


@dataclass
class Draw:
    seed: int
    sdxl: bool
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: tuple[str, dict[str, Any]]  # the folder's own: diffusers class name, its config
    refiner: bool = False  # SDXL's refiner: the OpenCLIP encoder alone, aesthetic-score time ids, img2img only
    cases: list[Case] = field(default_factory=list)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.unet["block_out_channels"]) - 1)

    @property
    def nine(self) -> bool:  # an inpainting U-Net: latents + mask + masked-image latents
        return self.unet["in_channels"] != self.unet["out_channels"]


_SCALED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
_SIGMA_KINDS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler",
                "UniPCMultistepScheduler", "DEISMultistepScheduler")  # fmt: skip
_ZERO_SNR = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
             "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler")  # fmt: skip


def draw_scheduler(rng: random.Random, lcm: bool) -> tuple[str, dict[str, Any]]:
    """A scheduler as a checkpoint ships it: a class the samplers mirror, its spacing and prediction type, and
    the class's own options (Karras / exponential sigmas, SDE, solver orders and types, zero terminal SNR)."""
    if lcm:
        return "LCMScheduler", dict(_SCALED, timestep_spacing="leading")
    cls = rng.choice(["EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler", *_SIGMA_KINDS])
    cfg: dict[str, Any] = dict(_SCALED, timestep_spacing=rng.choice(["leading", "trailing", "linspace"]),
                               prediction_type=rng.choice(["epsilon", "v_prediction"]))  # fmt: skip
    if cls in _ZERO_SNR and rng.random() < 0.25:  # the terminal-SNR recipe
        return cls, dict(cfg, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    if cls in _SIGMA_KINDS:
        kind = rng.choice([None, None, "karras", "exponential", "beta"])
        if kind:
            cfg[f"use_{kind}_sigmas"] = True
    if cls == "DDIMScheduler":
        cfg.update(clip_sample=False, set_alpha_to_one=False)
    elif cls == "PNDMScheduler":
        cfg.update(skip_prk_steps=True, set_alpha_to_one=False)
    elif cls == "DPMSolverMultistepScheduler":
        cfg["algorithm_type"] = rng.choice(["dpmsolver++", "sde-dpmsolver++"])
    elif cls == "UniPCMultistepScheduler":
        cfg.update(solver_type=rng.choice(["bh1", "bh2"]), solver_order=rng.choice([1, 2, 3]))
        if cfg["solver_type"] == "bh1":  # (its step to sigma 0 is inf x 0 in diffusers)
            cfg["final_sigmas_type"] = "sigma_min"
    elif cls == "DEISMultistepScheduler":
        cfg["solver_order"] = rng.choice([1, 2, 3])
    elif cls == "DPMSolverSDEScheduler":  # its Brownian tree's seed, as a folder may pin it
        cfg["noise_sampler_seed"] = rng.choice([None, rng.randrange(1 << 16)])
    return cls, cfg


def runnable(scheduler: tuple[str, dict[str, Any]], strength: float) -> list[str]:
    """The samplers sdrt runs on this scheduler's schedule at STEPS steps and ``strength``."""
    import diffusers

    from sdrt.runtime.samplers import make_plan
    from sdrt.runtime.schedule import NoiseSchedule, ScheduleError, runnable_samplers

    sched = getattr(diffusers, scheduler[0])(**scheduler[1])
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(sched.config).items()}
    schedule = NoiseSchedule.from_manifest({"class": scheduler[0], "config": config, "betas": sched.betas.tolist()})
    out = []
    for sampler in runnable_samplers(schedule):
        try:
            make_plan(sampler, schedule, STEPS, strength)
        except ScheduleError:
            continue
        out.append(sampler)
    return out


def draw(seed: int) -> Draw:
    """One configuration: U-Net down blocks (2-4), widths, heads, projections, upcast attention, cross-attention
    width, 4- or 9-channel input, an LCM-distilled U-Net, VAE depth (factor 2/4/8), latent channels, scaling
    factor, SD / SDXL / SDXL refiner, the folder's scheduler; and its cases: txt2img, img2img and inpainting
    (diffusers' inpainting pipelines take 4 latent channels only; a refiner is img2img only), each at a drawn
    size, strength, 1 or 2 images per prompt, and the folder's own sampler or another that runs on its schedule."""
    rng = random.Random(seed)
    pin = FIXED.get(seed, {})
    sdxl = pin.get("sdxl", rng.random() < 0.5)
    refiner = sdxl and pin.get("refiner", rng.random() < 0.25)
    blocks = pin.get("blocks", rng.choice([2, 3, 4]))
    base = rng.choice([16, 32])
    channels = tuple(base * min(2**i, 4) for i in range(blocks))
    attn = [rng.random() < 0.7 for _ in range(blocks)]
    attn[rng.randrange(blocks)] = True  # at least one cross-attention block
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    heads = tuple(rng.choice([1, 2, 4]) for _ in range(blocks))
    latent = pin.get("latent", rng.choice([4, 4, 6]))
    nine = pin.get("nine", latent == 4 and not refiner and rng.random() < 0.3)
    lcm = pin.get("lcm", not (nine or refiner) and rng.random() < 0.15)
    unet: dict[str, Any] = dict(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=rng.choice([8, 12, 16]),
        down_block_types=down, up_block_types=up, attention_head_dim=heads, in_channels=2 * latent + 1 if nine
        else latent, out_channels=latent, use_linear_projection=rng.random() < 0.5,
        upcast_attention=rng.random() < 0.3, time_cond_proj_dim=16 if lcm else None,
    )  # fmt: skip
    if sdxl:  # the refiner: the 64-wide OpenCLIP states alone, and 5 time ids (the last: the aesthetic score)
        unet.update(cross_attention_dim=64 if refiner else 32 + 64, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * (5 if refiner else 6) + 32,
                    transformer_layers_per_block=tuple(rng.choice([1, 2]) for _ in range(blocks)))  # fmt: skip
    else:
        unet["cross_attention_dim"] = 32
    vae_blocks = rng.choice([2, 3, 4])
    vae = dict(
        block_out_channels=(16, 16, 32, 32)[:vae_blocks], layers_per_block=1, norm_num_groups=8, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        scaling_factor=rng.choice([0.18215, 0.13025, 0.5]),
    )  # fmt: skip
    scheduler = pin.get("scheduler")
    scheduler = (scheduler[0], dict(_SCALED, **scheduler[1])) if scheduler else draw_scheduler(rng, lcm)
    d = Draw(seed, sdxl, unet, vae, scheduler, refiner)
    if refiner:
        kinds: tuple[str, ...] = ("img2img", "img2img")
    else:
        kinds = ("inpaint", "inpaint") if nine else ("txt2img", "img2img") + (("inpaint",) if latent == 4 else ())
    step = max(8, d.factor)
    lo = -(-max(2 * d.downsampling * d.factor, 32) // step) * step  # a 2x2 deepest feature map at least
    extra = list(pin.get("samplers", ()))
    for i, kind in enumerate(kinds):
        height, width = lo + step * rng.randrange(0, 4), lo + step * rng.randrange(1, 5)
        if pin and i == 0:  # a pinned draw's first case: a latent width the U-Net's downsampling does not divide
            odd = [w for w in range(lo + step, lo + 5 * step, step) if (w // d.factor) % d.downsampling]
            width = odd[0] if odd else width
        images = rng.choice([1, 2])
        strengths = {"img2img": round(rng.uniform(0.4, 0.95), 2), "inpaint": rng.choice([1.0, 0.75, 0.5])}
        strength = strengths.get(kind)
        sampler = None
        if "samplers" in pin:  # the pinned ones, on the cases after the first
            sampler = extra.pop(0) if i and extra else None
        elif i and rng.random() < 0.5:
            sampler = rng.choice(runnable(scheduler, strength or 1.0))
        d.cases.append(Case(kind, height, width, images, strength, sampler))
    for sampler in extra:  # pinned samplers left over: txt2img (img2img for a refiner) at the first case's size
        first = d.cases[0]
        d.cases.append(Case(first.kind, first.height, first.width, 1, first.strength, sampler))
    return d


def build(d: Draw, folder: Path) -> None:
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(d.seed)
    ids = dict(bos_token_id=512, eos_token_id=513)
    unet = diffusers.UNet2DConditionModel(**d.unet)
    vae = diffusers.AutoencoderKL(**d.vae)
    sched = getattr(diffusers, d.scheduler[0])(**d.scheduler[1])
    te = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="quick_gelu", pad_token_id=513, **ids))
    if d.sdxl:
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**dict(CLIP, hidden_size=64), hidden_act="gelu", pad_token_id=0, **ids)
        )
        if d.refiner:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                vae=vae, unet=unet, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                tokenizer_2=tokenizer("!"), scheduler=sched, requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False)  # fmt: skip
        else:
            cls = diffusers.StableDiffusionXLInpaintPipeline if d.nine else diffusers.StableDiffusionXLPipeline
            pipe = cls(vae=vae, unet=unet, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer("<|endoftext|>"),
                       tokenizer_2=tokenizer("!"), scheduler=sched)  # fmt: skip
    else:
        cls = diffusers.StableDiffusionInpaintPipeline if d.nine else diffusers.StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=te, tokenizer=tokenizer("<|endoftext|>"), unet=unet, scheduler=sched,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)


def init_and_mask(seed: int, height: int, width: int) -> tuple[Image.Image, Image.Image]:
    """A structured init image (gradients, a drawn pattern and noise) and a mask repainting a drawn rectangle that
    leaves a kept border, both exactly height x width so neither side resizes them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [np.sin(2 * np.pi * (f * xx + g * yy)) for f, g in rng.uniform(1, 8, (3, 2))]
    pixels = 128 + 90 * np.stack(waves, -1) + rng.integers(-30, 30, (height, width, 3))
    rows, cols = ([rng.integers(n // 8, n // 3), rng.integers(2 * n // 3, n - n // 8)] for n in (height, width))
    mask = np.zeros((height, width), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 255
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), Image.fromarray(mask)


def compare(pipes: dict[str, Pipeline], d: Draw, folder: Path, case: Case) -> dict[str, tuple[float, str | None]]:
    """sdrt's picture on each backend against diffusers' for one case: {backend: (PSNR, None) or (PSNR, what
    failed)}."""
    kw: dict[str, Any] = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, seed=d.seed,
                              num_images_per_prompt=case.images)  # fmt: skip
    size = dict(height=case.height, width=case.width)
    if case.kind != "txt2img":
        image, mask = init_and_mask(d.seed, case.height, case.width)
        kw.update(image=image, strength=case.strength)
        if case.kind == "inpaint":
            kw["mask_image"] = mask
    ref_kw = kw if case.kind == "img2img" else dict(kw, **size)  # img2img: diffusers takes the image's size
    sampler = case.sampler or pipes[BACKENDS[0]].default_sampler  # diffusers: that sampler's class of the folder
    ref = diffusers_images(folder, sampler, pipeline=PIPELINES["sdxl" if d.sdxl else "sd", case.kind], **ref_kw)
    out = {}
    for backend, pipe in pipes.items():
        ours = None
        try:
            ours = sdrt_images(pipe, sampler=case.sampler, **kw, **size)
            assert ours.shape == (case.images, case.height, case.width, 3), f"shape {ours.shape}"
            out[backend] = check(ours, ref), None
        except (AssertionError, SdrtError) as err:  # the draw's other cases still run and are recorded
            db = psnr(ours, ref) if ours is not None and ours.shape == ref.shape else float("nan")
            out[backend] = db, str(err)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_drawn_configuration_matches_diffusers(seed, tmp_path, record_property):
    from sdrt.export.directory import export_model
    from sdrt.export.graphs import Dims
    from sdrt.runtime.progress import Progress

    d = draw(seed)
    record_property("draw", repr(d))
    build(d, tmp_path / "model")
    lo = min(min(c.height, c.width) for c in d.cases)
    hi = max(max(c.height, c.width) for c in d.cases)
    dims = Dims(lo, hi, max(c.images for c in d.cases))
    try:  # one export serves every case of the draw
        export_model(str(tmp_path / "model"), tmp_path / "engine", precision="fp32", dims=dims,
                     progress=Progress(io.StringIO()))  # fmt: skip
    except SdrtError as err:  # a refusal is allowed: one line naming what is unsupported
        assert "\n" not in str(err) and "unsupported" in str(err)
        pytest.skip(f"refused: {err}")
    precision = {"openvino": dict(cpu_precision="f32")}  # f32: the precision held at >= 40 dB
    pipes = {b: Pipeline.load(tmp_path / "engine", backend=b, device="cpu", **precision.get(b, {})) for b in BACKENDS}
    failures = []
    for case in d.cases:
        for backend, (db, failed) in compare(pipes, d, tmp_path / "model", case).items():
            suffix = "" if backend == "onnxruntime" else f"_{backend}"
            record_property(case.key(d) + suffix, round(float(db), 1))  # xdist sends plain floats only
            if failed:
                failures.append(f"{backend}, {case}: {failed}")
    for pipe in pipes.values():
        pipe.close()
    assert not failures, f"seed {seed}: " + "; ".join(failures)


def test_fixed_draws_cover_every_kind():
    """The default run's draws (no export here) between them hold every kind the sweep checks."""
    draws = [draw(seed) for seed in FIXED]
    cases = [(d, c) for d in draws for c in d.cases]
    assert {(d.sdxl, c.kind) for d, c in cases if c.kind == "txt2img"} == {(False, "txt2img"), (True, "txt2img")}
    assert any(c.kind == "img2img" for _, c in cases)
    assert {d.nine for d, c in cases if c.kind == "inpaint"} == {False, True}
    assert {c.images for _, c in cases} == {1, 2}
    assert any(c.height != c.width for _, c in cases)
    assert any(c.height % 64 or c.width % 64 for _, c in cases)
    assert any((c.height // d.factor) % d.downsampling or (c.width // d.factor) % d.downsampling for d, c in cases)
    assert any(c.strength is not None and c.strength < 1 for _, c in cases)
    own = {d.scheduler[0] for d in draws}  # one folder per scheduler family, or a sampler of it on another folder
    assert {"UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "LCMScheduler"} <= own
    assert {"heun", "dpm2", "dpm2_a", "deis", "unipc"} <= {c.sampler for _, c in cases}
    assert any(d.scheduler[1].get("rescale_betas_zero_snr") for d in draws)
    assert any(d.unet["time_cond_proj_dim"] for d in draws) and any(d.refiner for d in draws)
