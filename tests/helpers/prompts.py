"""Prompts read as the web UI reads them, computed independently: 77-token chunks cut by hand from its rules, and
each text encoder's states in float64 from the PyTorch modules (weights, the mean rescaling, clip skip), beside
sdrt's own conditioning for the same request."""

from __future__ import annotations

import copy

import torch

from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import host_inputs


def chunk(tokens: list[int], bos: int, eos: int, pad: int) -> list[int]:
    """One 77-token chunk as the web UI fills it: BOS, the tokens, EOS, then the pad token."""
    ids = [bos, *tokens, *[eos] * (76 - len(tokens))]
    first = ids.index(eos)
    return ids[: first + 1] + [pad] * (76 - first)


CHUNKED = "a (red:1.5) fox [sitting] on a ((mat)) BREAK in the snow"
CHUNKED_PARSED = [("a ", 1.0), ("red", 1.5), (" fox ", 1.0), ("sitting", 1 / 1.1), (" on a ", 1.0), ("mat", 1.21),
                  None, ("in the snow", 1.0)]  # fmt: skip  # None: BREAK


def reference_chunks(tokenizer, parsed) -> tuple[list[list[int]], list[list[float]]]:
    """Chunks from a parse written out by hand: fragments tokenized alone by transformers' tokenizer, cut every 75
    tokens (the prompts here have no comma) and at each BREAK."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    groups, cur = [], []
    for item in parsed:
        if item is None:
            groups.append(cur)
            cur = []
            continue
        text, weight = item
        assert "," not in text
        for t in tokenizer(text, add_special_tokens=False).input_ids:
            if len(cur) == 75:
                groups.append(cur)
                cur = []
            cur.append((t, weight))
    groups.append(cur)
    ids = [chunk([t for t, _ in g], bos, eos, pad) for g in groups]
    weights = [[1.0, *[w for _, w in g], *[1.0] * (76 - len(g))] for g in groups]
    return ids, weights


def reference_states(pipe, parsed, skip: int = 0, renorm: bool = True):
    """Per text encoder, in float64: each chunk's states (diffusers' layer choice with clip skip), each token's
    states times its weight, rescaled to the chunk's mean before weighting; chunks joined along the tokens; the
    pooled embedding of the first chunk. Returns (states [1, 77 k, D], pooled or None)."""
    sdxl = hasattr(pipe, "text_encoder_2")
    states, pooled = [], None
    for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))[: 1 + sdxl]:
        model = copy.deepcopy(getattr(pipe, enc_name)).double()
        ids, weights = reference_chunks(getattr(pipe, tok_name), parsed)
        zs = []
        with torch.no_grad():
            for c, (i, w) in enumerate(zip(ids, weights, strict=True)):
                out = model(torch.tensor([i]), output_hidden_states=True)
                if sdxl:
                    z = out.hidden_states[-(skip + 2)]
                else:
                    z = getattr(model, "text_model", model).final_layer_norm(out.hidden_states[-(skip + 1)])
                before = z.mean()
                z = z * torch.tensor(w, dtype=torch.float64)[None, :, None]
                zs.append(z * (before / z.mean()) if renorm else z)
                if c == 0 and enc_name == "text_encoder_2":
                    pooled = out.text_embeds
        states.append(torch.cat(zs, dim=1))
    return torch.cat(states, dim=-1), pooled


def sdrt_states(pipe: Pipeline, params: Params) -> torch.Tensor:
    req = pipe.request(params)
    host = host_inputs([req], pipe.plan(req.sampler, req.steps, req.strength), (4, 8), False, pipe.model.zero_negatives)
    return pipe._encode_text("prompt", host)[0].double(), pipe._encode_text("negative", host)[0].double()


def diffusers_pipeline(folder, kind: str):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    return cls.from_pretrained(folder, local_files_only=True, **extra)
