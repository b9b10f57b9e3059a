"""LDM single-file checkpoints written by ``tests/helpers/ldm_checkpoint`` load back exactly through diffusers.

Tiny random-weight SD 1.x-, SD 2.x- and SDXL-like models are saved as one LDM-layout safetensors
file and read back with ``from_single_file``; every tensor must come back bit-identical.  The
diffusers config folder passed as ``config=`` holds configs only (weights deleted), so a component
missing from the single file fails instead of being loaded silently from the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.helpers.ldm_checkpoint import (
    SD_CLIP_PREFIX,
    SD_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    ldm_state_dict,
    save_ldm_checkpoint,
)

pytestmark = pytest.mark.xdist_group("ldm")  # its fixtures are made once per process: keep it in one

CASES = ("sd1", "sd2", "sdxl")
BOS, EOS = 512, 513  # ids of <|startoftext|> / <|endoftext|> in the tiny vocabulary below
POOLED_DIM = 16


def _byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP ordering)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def make_tokenizer() -> CLIPTokenizer:
    """Offline CLIP tokenizer: byte-level vocabulary, no merges."""
    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    return CLIPTokenizer(vocab=vocab, merges=[])


def _text_config(hidden: int, act: str, **kwargs: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        **kwargs,
    )


def _vae(blocks: int = 2, layers: int = 1) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64, 64)[:blocks],
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def sd1_components() -> dict[str, Any]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
    return {"unet": unet, "vae": _vae(), "text_encoder": text_encoder}


def sd2_components() -> dict[str, Any]:
    """Three levels, two attention levels, linear projections, OpenCLIP text encoder."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(32, "gelu"))
    return {"unet": unet, "vae": _vae(blocks=3, layers=2), "text_encoder": text_encoder}


def sdxl_components() -> dict[str, Any]:
    """Two text encoders of different widths (32 + 48), text_time embedding, 2 transformer layers."""
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + POOLED_DIM,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(32, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(48, "gelu", projection_dim=POOLED_DIM))
    return {"unet": unet, "vae": _vae(), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


BUILDERS = {"sd1": sd1_components, "sd2": sd2_components, "sdxl": sdxl_components}


def save_config_folder(case: str, components: dict[str, Any], folder: Path) -> type:
    """Save a diffusers pipeline folder, then delete its weights so only configs remain."""
    if case == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {"tokenizer_2": make_tokenizer()}
        scheduler = EulerDiscreteScheduler()
    else:
        cls, scheduler = StableDiffusionPipeline, PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    cls(**components, tokenizer=make_tokenizer(), scheduler=scheduler, **extra).save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return cls


@pytest.fixture(scope="module", params=CASES)
def round_trip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    case = request.param
    tmp = tmp_path_factory.mktemp(case)
    components = BUILDERS[case]()
    for model in components.values():
        model.eval()
    checkpoint, config = tmp / "model.safetensors", tmp / "config"
    save_ldm_checkpoint(checkpoint, **components)
    cls = save_config_folder(case, components, config)
    torch.manual_seed(12345)  # anything not loaded from the file would be re-initialised differently
    pipe = cls.from_single_file(str(checkpoint), config=str(config), local_files_only=True)
    return {"case": case, "components": components, "file": load_file(checkpoint), "pipe": pipe}


def _hf_text_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder state dict keyed without the (version-dependent) ``text_model.`` prefix."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


def test_from_single_file_restores_every_tensor(round_trip: dict[str, Any]) -> None:
    for name, original in round_trip["components"].items():
        loaded = getattr(round_trip["pipe"], name)
        assert type(loaded) is type(original)
        assert_same_tensors(loaded.state_dict(), original.state_dict())


def test_loaded_unet_forward_is_identical(round_trip: dict[str, Any]) -> None:
    original, loaded = round_trip["components"]["unet"], round_trip["pipe"].unet
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, original.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if round_trip["case"] == "sdxl":
        text_embeds, time_ids = torch.randn(2, POOLED_DIM, generator=gen), torch.randn(2, 6, generator=gen)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        want = original(sample, torch.tensor([10, 500]), context, **kwargs).sample
        got = loaded(sample, torch.tensor([10, 500]), context, **kwargs).sample
    assert torch.equal(got, want)


def _expected_key_count(components: dict[str, Any], case: str) -> int:
    """One LDM tensor per diffusers tensor, except OpenCLIP's fused q/k/v (3 -> 1, weight and bias)."""
    count = sum(len(_hf_text_keys(m.state_dict())) for m in components.values())
    open_clip = {"sd1": None, "sd2": "text_encoder", "sdxl": "text_encoder_2"}[case]
    if open_clip:
        count -= 4 * components[open_clip].config.num_hidden_layers
    return count


def test_diffusers_converters_consume_every_key(round_trip: dict[str, Any]) -> None:
    """Call diffusers' converters directly: exact key sets both ways, and no LDM key left unused."""
    case, file, parts = round_trip["case"], round_trip["file"], round_trip["components"]
    assert len(file) == _expected_key_count(parts, case)
    unet, vae = parts["unet"], parts["vae"]
    assert_same_tensors(sfu.convert_ldm_unet_checkpoint(file, unet.config), unet.state_dict())
    assert_same_tensors(sfu.convert_ldm_vae_checkpoint(file, vae.config), vae.state_dict())
    clip_prefix = {"sd1": SD_CLIP_PREFIX, "sd2": None, "sdxl": SDXL_CLIP_PREFIX}[case]
    if clip_prefix:
        clip = {k: v for k, v in file.items() if k.startswith(clip_prefix)}
        converted = sfu.convert_ldm_clip_checkpoint(clip)
        assert_same_tensors(_hf_text_keys(converted), _hf_text_keys(parts["text_encoder"].state_dict()))
    if case != "sd1":
        open_name = "text_encoder_2" if case == "sdxl" else "text_encoder"
        open_prefix = SDXL_OPEN_CLIP_PREFIX if case == "sdxl" else SD_OPEN_CLIP_PREFIX
        converted = sfu.convert_open_clip_checkpoint(parts[open_name], file, prefix=open_prefix)
        assert_same_tensors(_hf_text_keys(converted), _hf_text_keys(parts[open_name].state_dict()))


# LDM keys each case must contain (block indices follow layers_per_block: 1 for sd1/sd2, 2 for sdxl).
LAYOUT_KEYS = {
    "sd1": [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of a block without attention
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        SD_CLIP_PREFIX + "text_model.encoder.layers.1.self_attn.q_proj.weight",
    ],
    "sd2": [
        "model.diffusion_model.input_blocks.4.0.op.weight",
        "model.diffusion_model.output_blocks.3.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.middle_block.1.proj_out.weight",
        SD_OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight",
        SD_OPEN_CLIP_PREFIX + "transformer.resblocks.1.mlp.c_proj.bias",
    ],
    "sdxl": [
        "model.diffusion_model.label_emb.0.2.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        SDXL_CLIP_PREFIX + "text_model.final_layer_norm.weight",
        SDXL_OPEN_CLIP_PREFIX + "text_projection",
    ],
}
TOP_LEVEL = ("model", "first_stage_model", "cond_stage_model", "conditioner")


def test_layout_matches_original_checkpoints(round_trip: dict[str, Any]) -> None:
    """Spot checks against key names of the released SD checkpoints."""
    case, file = round_trip["case"], round_trip["file"]
    assert all(k.split(".")[0] in TOP_LEVEL for k in file)
    assert [k for k in LAYOUT_KEYS[case] if k not in file] == []
    assert file["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert file["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in file
    if case == "sd1":
        assert sfu.is_clip_model(file) and not sfu.is_open_clip_model(file)
    elif case == "sd2":
        assert sfu.is_open_clip_model(file) and not sfu.is_clip_model(file)
        assert file[SD_OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    else:
        assert sfu.is_clip_sdxl_model(file) and sfu.is_open_clip_sdxl_model(file)
        assert file[SDXL_OPEN_CLIP_PREFIX + "text_projection"].shape == (48, POOLED_DIM)


def test_text_encoder_layout_override_and_errors() -> None:
    parts = sd2_components()
    forced = ldm_state_dict(**parts, text_encoder_layout="clip")
    assert sfu.is_clip_model(forced) and not sfu.is_open_clip_model(forced)
    with pytest.raises(ValueError, match="text_encoder_layout"):
        ldm_state_dict(**parts, text_encoder_layout="t5")
    xl = sdxl_components()
    xl["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=POOLED_DIM))
    with pytest.raises(ValueError, match="hidden_size"):
        ldm_state_dict(**xl)
