"""Conformance sweep: seeded random model configurations, each exported fp32 and generated at drawn valid sizes
against diffusers' own pipeline on the same folder.

The default run checks a small fixed set of draws; ``SDRT_SWEEP=N`` adds N more (seeds 1000..1000+N-1). A draw
names everything it chose, so a failure is reproduced by its seed alone. A configuration sdrt does not support
must be refused at export with a one-line error naming what is unsupported, never give a wrong picture.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIP, tokenizer
from test_pipeline import PROMPT, check, diffusers_images, sdrt_images

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline

FIXED = [0, 1]  # the default run's draws: an SD-like and an SDXL-like configuration
SEEDS = FIXED + [1000 + i for i in range(int(os.environ.get("SDRT_SWEEP", "0")))]


@dataclass
class Draw:
    seed: int
    sdxl: bool
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    sizes: list[tuple[int, int]]  # (height, width) px to generate at

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def draw(seed: int) -> Draw:
    """One configuration: U-Net down blocks (2-4), widths, heads, projections, upcast attention, cross-attention
    width, VAE depth (factor 2/4/8), latent channels, scaling factor, epsilon / v-prediction, SD / SDXL."""
    rng = random.Random(seed)
    sdxl = seed % 2 == 1 if seed in FIXED else rng.random() < 0.5
    blocks = rng.choice([2, 3, 4]) if seed not in FIXED else 2 + seed
    base = rng.choice([16, 32])
    channels = tuple(base * min(2**i, 4) for i in range(blocks))
    attn = [rng.random() < 0.7 for _ in range(blocks)]
    attn[rng.randrange(blocks)] = True  # at least one cross-attention block
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    heads = tuple(rng.choice([1, 2, 4]) for _ in range(blocks))
    latent = rng.choice([4, 4, 6])
    unet: dict[str, Any] = dict(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=rng.choice([8, 12, 16]),
        down_block_types=down, up_block_types=up, attention_head_dim=heads, in_channels=latent, out_channels=latent,
        use_linear_projection=rng.random() < 0.5, upcast_attention=rng.random() < 0.3,
    )  # fmt: skip
    if sdxl:
        unet.update(cross_attention_dim=32 + 64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=8 * 6 + 32,
                    transformer_layers_per_block=tuple(rng.choice([1, 2]) for _ in range(blocks)))  # fmt: skip
    else:
        unet["cross_attention_dim"] = 32
    vae_blocks = rng.choice([2, 3, 4])
    vae = dict(
        block_out_channels=(16, 16, 32, 32)[:vae_blocks], layers_per_block=1, norm_num_groups=8, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        scaling_factor=rng.choice([0.18215, 0.13025, 0.5]),
    )  # fmt: skip
    prediction = rng.choice(["epsilon", "v_prediction"])
    scheduler = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                     timestep_spacing="leading", prediction_type=prediction)  # fmt: skip
    d = Draw(seed, sdxl, unet, vae, scheduler, [])
    down_factor, step = 2 ** (blocks - 1), max(8, d.factor)
    lo = -(-max(2 * down_factor * d.factor, 32) // step) * step  # a 2x2 deepest feature map at least
    d.sizes = [(lo + step * rng.randrange(0, 4), lo + step * rng.randrange(1, 5)) for _ in range(2)]
    return d


def build(d: Draw, folder: Path) -> None:
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(d.seed)
    ids = dict(bos_token_id=512, eos_token_id=513)
    unet = diffusers.UNet2DConditionModel(**d.unet)
    vae = diffusers.AutoencoderKL(**d.vae)
    sched = diffusers.EulerDiscreteScheduler(**d.scheduler)
    te = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="quick_gelu", pad_token_id=513, **ids))
    if d.sdxl:
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**dict(CLIP, hidden_size=64), hidden_act="gelu", pad_token_id=0, **ids)
        )
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=te, text_encoder_2=te2,
                                                   tokenizer=tokenizer("<|endoftext|>"), tokenizer_2=tokenizer("!"),
                                                   scheduler=sched)  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer("<|endoftext|>"),
                                                 unet=unet, scheduler=sched, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)


@pytest.mark.parametrize("seed", SEEDS)
def test_drawn_configuration_matches_diffusers(seed, tmp_path, record_property):
    from sdrt.export.directory import Progress, export_model
    from sdrt.export.graphs import Dims

    d = draw(seed)
    record_property("draw", repr(d))
    build(d, tmp_path / "model")
    lo = min(min(s) for s in d.sizes)
    hi = max(max(s) for s in d.sizes)
    try:
        export_model(str(tmp_path / "model"), tmp_path / "engine", precision="fp32", dims=Dims(lo, hi, 1),
                     progress=Progress(io.StringIO()))  # fmt: skip
    except SdrtError as err:  # a refusal is allowed: one line naming what is unsupported
        assert "\n" not in str(err) and "unsupported" in str(err)
        pytest.skip(f"refused: {err}")
    pipe = Pipeline.load(tmp_path / "engine", backend="onnxruntime", device="cpu")
    name = "StableDiffusionXLPipeline" if d.sdxl else "StableDiffusionPipeline"
    for height, width in d.sizes:
        kw = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=height, width=width, seed=seed)
        db = check(sdrt_images(pipe, sampler="euler", **kw),
                   diffusers_images(tmp_path / "model", "euler", pipeline=name, **kw))  # fmt: skip
        record_property(f"psnr_{height}x{width}", round(float(db), 1))  # xdist sends plain floats only
    pipe.close()
