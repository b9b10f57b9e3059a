"""Named presets: the real Stable Diffusion architectures (and small ones for tests) with seeded random weights.

Latency does not depend on weight values and parity with diffusers holds for any weights, so a preset is a
complete stand-in for a downloaded checkpoint: same modules, same shapes, same schedule. A model family is
data (`Family`), never an `if` chain in the export code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import Geometry


@dataclass(frozen=True)
class Family:
    """What differs between SD 1.x/2.x and SDXL, as data."""

    name: str
    pipeline_classes: tuple[str, ...]  # diffusers' model_index.json `_class_name` values we accept
    text_encoders: tuple[str, ...]  # component names, in conditioning order
    penultimate_hidden_states: bool  # SDXL conditions on the penultimate layer (no final norm)
    pooled_from: str | None  # which text encoder also yields `pooled_embeddings`
    vae_fp16: bool  # False where the VAE overflows in fp16 (SDXL's)


SD = Family(
    name="sd",
    pipeline_classes=(
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "LatentConsistencyModelPipeline",  # an LCM-distilled U-Net (its guidance embedding) with LCMScheduler
    ),
    text_encoders=("text_encoder",),
    penultimate_hidden_states=False,
    pooled_from=None,
    vae_fp16=True,
)
SDXL = Family(
    name="sdxl",
    pipeline_classes=(
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    text_encoders=("text_encoder", "text_encoder_2"),
    penultimate_hidden_states=True,
    pooled_from="text_encoder_2",
    vae_fp16=False,
)
# SDXL's refiner: StableDiffusionXLImg2ImgPipeline with the OpenCLIP encoder alone (model_index.json states
# `text_encoder: [null, null]`); its U-Net reads the aesthetic score in its time ids (`requires_aesthetics_score`)
SDXL_REFINER = Family(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLImg2ImgPipeline",),
    text_encoders=("text_encoder_2",),
    penultimate_hidden_states=True,
    pooled_from="text_encoder_2",
    vae_fp16=False,
)
FAMILIES = (SD, SDXL)
SUPPORTED = "SD 1.x and 2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline)"

MAX_IMAGES = 4  # default batch range: 1..4 images, so 2..8 rows under classifier-free guidance
MAX_PROMPT_CHUNKS = 3  # default text range: prompts of up to 3 x 75 tokens (web-UI chunks, BREAK)


def geometry_of(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> Geometry:
    """The sizes a U-Net and VAE config decide, as diffusers computes them: vae_scale_factor =
    2 ** (len(block_out_channels) - 1); every U-Net down block but the last halves the size."""
    sample = unet.get("sample_size")
    if not isinstance(sample, int) or isinstance(sample, bool):
        raise SdrtError(f"unsupported U-Net sample_size {sample!r}: sdrt needs one integer (square native size)")
    return Geometry(2 ** (len(vae["block_out_channels"]) - 1), 2 ** (len(unet["down_block_types"]) - 1), sample)


def family_of_index(index: Mapping[str, Any]) -> Family:
    """The family of a diffusers folder's model_index.json: its pipeline class, and for SDXL whether the first
    text encoder is there (a refiner folder states it as null)."""
    family = family_of_pipeline(index.get("_class_name", "?"))
    if family is SDXL and not any(index.get("text_encoder") or ()):
        return SDXL_REFINER
    return family


def family_of_pipeline(class_name: str) -> Family:
    for fam in FAMILIES:
        if class_name in fam.pipeline_classes:
            return fam
    raise SdrtError(f"architecture not supported: {class_name}; sdrt supports {SUPPORTED}")


@dataclass(frozen=True)
class TextEncoderSpec:
    config: dict[str, Any]
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)
    pad_token: str = "<|endoftext|>"  # SD 2.x and SDXL's OpenCLIP encoders pad with "!"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: Family
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: tuple[str, dict[str, Any]]
    size_range: tuple[int, int] | None = None  # overrides the model's default range (small presets)
    seed: int = 0

    @property
    def geometry(self) -> Geometry:
        return geometry_of(self.unet, self.vae)

    @property
    def sizes(self) -> tuple[int, int]:
        return self.size_range or self.geometry.default_range()


_SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
_PNDM = ("PNDMScheduler", dict(_SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1))
_DDIM_V = (
    "DDIMScheduler",
    dict(_SCALED_LINEAR, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
)
_EULER = (
    "EulerDiscreteScheduler",
    # skip_prk_steps as SDXL's published config has it: what PNDM uses when a user picks --sampler pndm
    dict(_SCALED_LINEAR, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", skip_prk_steps=True),
)

_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)
_KL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
_OPENCLIP_H = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
_OPENCLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
_TINY_CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=16,
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
_TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "sd15",
            "Stable Diffusion 1.5 architecture (860M U-Net, CLIP ViT-L/14), random weights",
            SD,
            unet=dict(_SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
            vae=dict(_KL_VAE, sample_size=512, scaling_factor=0.18215),
            text_encoders=(TextEncoderSpec(_CLIP_L),),
            scheduler=_PNDM,
        ),
        Preset(
            "sd21",
            "Stable Diffusion 2.1 architecture (v-prediction, OpenCLIP ViT-H), random weights",
            SD,
            unet=dict(
                _SD_BLOCKS,
                sample_size=96,
                cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True,
                upcast_attention=True,
            ),
            vae=dict(_KL_VAE, sample_size=768, scaling_factor=0.18215),
            text_encoders=(TextEncoderSpec(_OPENCLIP_H, pad_token="!"),),
            scheduler=_DDIM_V,
        ),
        Preset(
            "sdxl",
            "Stable Diffusion XL base 1.0 architecture (2.6B U-Net, two text encoders), random weights",
            SDXL,
            unet=dict(
                sample_size=128,
                layers_per_block=2,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            vae=dict(_KL_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
            text_encoders=(TextEncoderSpec(_CLIP_L), TextEncoderSpec(_OPENCLIP_BIGG, True, pad_token="!")),
            scheduler=_EULER,
        ),
        Preset(
            "tiny-sd1",
            "a few-MB SD 1.x-shaped model for tests and CPU demos",
            SD,
            unet=dict(_TINY_UNET, sample_size=8, cross_attention_dim=32, attention_head_dim=8),
            vae=dict(_TINY_VAE, sample_size=64, scaling_factor=0.18215),
            text_encoders=(TextEncoderSpec(dict(_TINY_CLIP, hidden_act="quick_gelu")),),
            scheduler=_PNDM,
            size_range=(64, 256),
        ),
        Preset(
            "tiny-sd2",
            "a few-MB SD 2.x-shaped model (v-prediction, linear projections, upcast attention)",
            SD,
            unet=dict(
                _TINY_UNET,
                sample_size=8,
                cross_attention_dim=32,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                upcast_attention=True,
            ),
            vae=dict(_TINY_VAE, sample_size=64, scaling_factor=0.18215),
            text_encoders=(TextEncoderSpec(dict(_TINY_CLIP, hidden_act="gelu"), pad_token="!"),),
            scheduler=_DDIM_V,
            size_range=(64, 256),
        ),
        Preset(
            "tiny-sdxl",
            "a few-MB SDXL-shaped model (two text encoders, text_time conditioning)",
            SDXL,
            unet=dict(
                sample_size=8,
                layers_per_block=1,
                block_out_channels=(32, 64),
                norm_num_groups=16,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                cross_attention_dim=32 + 64,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=8 * 6 + 32,
            ),
            vae=dict(_TINY_VAE, sample_size=64, scaling_factor=0.13025, force_upcast=True),
            text_encoders=(
                TextEncoderSpec(dict(_TINY_CLIP, hidden_act="quick_gelu")),
                TextEncoderSpec(dict(_TINY_CLIP, hidden_act="gelu", hidden_size=64), True, pad_token="!"),
            ),
            scheduler=_EULER,
            size_range=(64, 256),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SdrtError(f"unknown preset {name!r}; presets are: {', '.join(PRESETS)}")
    return PRESETS[name]
