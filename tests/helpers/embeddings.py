"""Textual-inversion embedding files in the layouts users bring (the web UI's, diffusers' concept, SDXL's pair), with
seeded vectors, and diffusers' pipeline with the same files loaded by its own load_textual_inversion."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tests.helpers.prompts import diffusers_pipeline

WIDTHS = {"sd1": (32,), "sd2": (32,), "sdxl": (32, 64)}  # the test text encoders' hidden sizes (models.CLIP)


def vectors(kind: str, n: int, seed: int) -> list[torch.Tensor]:
    """n random vectors per text encoder, at the scale of the test models' token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) * 0.5 for d in WIDTHS[kind]]


def write(path, kind: str, n: int, seed: int, layout: str = "emb_params"):
    """An embedding file in one of the layouts users bring."""
    vs = vectors(kind, n, seed)
    if kind == "sdxl":
        save_file({"clip_l": vs[0], "clip_g": vs[1]}, str(path))
    elif layout == "emb_params":  # the web UI's safetensors (EasyNegative)
        save_file({"emb_params": vs[0]}, str(path))
    elif layout == "string_to_param":  # the web UI's own layout, flattened
        save_file({"string_to_param.*": vs[0], "string_to_token.*": torch.tensor([265])}, str(path))
    else:  # diffusers' concept: {token: vector}
        save_file({"<concept>": vs[0][0] if n == 1 else vs[0]}, str(path))
    return path, vs


def reference_pipe(folder, kind: str, files: dict):
    """diffusers' pipeline with each file loaded by its own load_textual_inversion under ``files``' token."""
    ref = diffusers_pipeline(folder, kind)
    for token, (path, vs) in files.items():
        if kind == "sdxl":  # diffusers loads SDXL's vector sets one text encoder at a time
            ref.load_textual_inversion(vs[0], token=token, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
            ref.load_textual_inversion(vs[1], token=token, text_encoder=ref.text_encoder_2,
                                       tokenizer=ref.tokenizer_2)  # fmt: skip
        else:
            ref.load_textual_inversion(str(path), token=token)
    return ref
