"""Small random-weight diffusers pipelines (SD 1.x-, SD 2.x-, SDXL-like, inpainting, other VAE scales): the models
every fidelity test exports and compares against.

The configurations are written out here with diffusers' and transformers' own classes, not taken from
sdrt's presets, so the references the tests compare against do not come from the code under test.
"""

from __future__ import annotations

import torch

CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
VAE = dict(
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=16,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
)
UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    # SD 2.x: v-prediction (scheduler), linear projections, upcast attention, per-block head counts
    "sd2": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
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
}
# inpainting checkpoints: the same U-Nets reading 4 latent + 1 mask + 4 masked-image channels
UNETS["sd1-inpaint"] = dict(UNETS["sd1"], in_channels=9)
UNETS["sdxl-inpaint"] = dict(UNETS["sdxl"], in_channels=9)
# VAEs with fewer blocks: diffusers' vae_scale_factor = 2 ** (len(block_out_channels) - 1) is 4 and 2
VAES = {
    "sd1-vae4": dict(
        VAE,
        block_out_channels=(16, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "sd1-vae2": dict(
        VAE,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ),
}
UNETS.update({kind: UNETS["sd1"] for kind in VAES})
# a U-Net trained at 12 latents: native 96 px, which is neither SD's 512 nor this test set's 64
UNETS["sd1-native96"] = dict(UNETS["sd1"], sample_size=12)
SIZES = ["--min-size", "64", "--max-size", "192", "--max-batch", "2"]  # small ranges keep the checks fast


def tokenizer(pad_token: str):
    """A CLIP tokenizer over CLIP's 512 byte-level symbols (no merges), as transformers builds it."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def biased(*encoders) -> None:
    """Give each text encoder's final layer norm the bias a trained CLIP has (a fresh one has none, so its states
    have a mean of 0 and the web UI's emphasis, which rescales a chunk to its mean, would divide by ~0)."""
    for te in encoders:
        norm = getattr(te, "text_model", te).final_layer_norm
        with torch.no_grad():
            norm.bias.copy_(0.5 + 0.1 * torch.randn(norm.bias.shape))


def build_pipeline(kind: str, seed: int = 0):
    """A diffusers pipeline of the given kind (a key of UNETS) with seeded random weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    ids = dict(bos_token_id=512, eos_token_id=513)
    unet = diffusers.UNet2DConditionModel(**UNETS[kind])
    vae = diffusers.AutoencoderKL(**VAES.get(kind, VAE), scaling_factor=0.13025 if kind.startswith("sdxl") else 0.18215)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind.startswith("sdxl"):
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="quick_gelu", pad_token_id=513, **ids))
        # diffusers tells SDXL's two encoders apart in single files by their width: they must differ
        wide = dict(CLIP, hidden_size=64)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**wide, hidden_act="gelu", pad_token_id=0, **ids))
        biased(te1, te2)
        cls = (
            diffusers.StableDiffusionXLInpaintPipeline
            if kind.endswith("inpaint")
            else diffusers.StableDiffusionXLPipeline
        )
        return cls(
            vae=vae,
            unet=unet,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer("<|endoftext|>"),
            tokenizer_2=tokenizer("!"),
            scheduler=diffusers.EulerDiscreteScheduler(**betas, timestep_spacing="leading"),
        )
    v2 = kind == "sd2"
    te = CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act="gelu" if v2 else "quick_gelu", pad_token_id=0, **ids))
    biased(te)
    sched = (
        diffusers.DDIMScheduler(**betas, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
        if v2
        else diffusers.PNDMScheduler(**betas, skip_prk_steps=True, set_alpha_to_one=False)
    )
    cls = diffusers.StableDiffusionInpaintPipeline if kind.endswith("inpaint") else diffusers.StableDiffusionPipeline
    return cls(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer("!" if v2 else "<|endoftext|>"),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
