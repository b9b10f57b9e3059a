"""Prompts as the web UI reads them (emphasis, BREAK, 75-token chunks) and clip skip, against independent references:
the web UI's documented parses, chunks cut by hand from its rules, states computed in float64 from the text encoder
modules in PyTorch, and diffusers' own pipelines (its ``clip_skip``, ``prompt_embeds``) for the pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.prompts import parse_attention
from tests.helpers.images import check
from tests.helpers.prompts import CHUNKED, CHUNKED_PARSED, chunk, diffusers_pipeline, reference_states, sdrt_states
from tests.helpers.reference import diffusers_images

pytestmark = pytest.mark.xdist_group("prompts")

# The web UI's own examples (the docstring of its parse_prompt_attention, and its wiki's "Attention/emphasis")
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.573),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641),
            (".", 1.1),
        ],
    ),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(word:abc)", [("word:abc", 1.1)]),  # not a weight: the colon is text, the brackets emphasis
    ("[a:b]", [("a:b", 1 / 1.1)]),  # no step number: not prompt editing, text at 1/1.1
]


@pytest.mark.parametrize("text,expected", DOCUMENTED)
def test_parse_follows_the_web_uis_documented_examples(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert np.allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


@pytest.mark.parametrize("text,field,words", [
    ("a cat AND a dog", "prompt", "AND"),
    ("a [cat:dog:5] in the snow", "prompt", "prompt editing"),
    ("a [cat:0.5] in the snow", "prompt", "prompt editing"),
    ("a [cat|dog] in the snow", "prompt", "alternation"),
    ("a (cat:1.2.3)", "prompt", "not a number"),
])  # fmt: skip
def test_what_the_web_ui_schedules_or_cannot_read_is_refused_in_one_line(text, field, words, exports):
    with Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu") as pipe:
        with pytest.raises(SdrtError) as err:
            pipe.request(Params(prompt=text, steps=2, height=64, width=64, seed=0, prompt_syntax="webui"))
        assert words in str(err.value) and "\n" not in str(err.value) and err.value.field == field
        with pytest.raises(SdrtError) as err:  # the negative prompt is read alike
            pipe.request(Params(prompt="a", negative_prompt=text, steps=2, height=64, width=64, prompt_syntax="webui"))
        assert err.value.field == "negative_prompt"


# -- chunks, cut by hand from the web UI's rules ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_chunks_are_cut_as_the_web_ui_cuts_them(kind, exports):
    with Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") as pipe:
        tok = pipe.tokenizers[0]
        bos, eos, pad = tok.special
        enc = tok.fragments.encode
        # 40 words of 3 characters (a token each, the last with its end of word): 120 tokens, no comma -> 75 + 45
        words = " ".join(["abc"] * 40)
        got = tok.webui(words)
        flat = enc(words, add_special_tokens=False).ids
        assert len(flat) == 120
        assert got.ids.tolist() == [chunk(flat[:75], bos, eos, pad), chunk(flat[75:], bos, eos, pad)]
        # a comma 6 tokens before the chunk fills: the words after it move to the next chunk
        text = " ".join(["abc"] * 23) + ", " + " ".join(["cde"] * 4)  # 69 tokens, the comma, 12 more
        flat = enc(text, add_special_tokens=False).ids
        comma = flat.index(tok.comma)
        assert comma == 69
        got = tok.webui(text)
        assert got.ids.tolist() == [chunk(flat[:70], bos, eos, pad), chunk(flat[70:], bos, eos, pad)]
        # BREAK: a new chunk; weights per token; the empty prompt is one chunk
        got = tok.webui("(ab:1.5) BREAK cd")
        assert got.ids.tolist() == [chunk(enc("ab", add_special_tokens=False).ids, bos, eos, pad),
                                    chunk(enc("cd", add_special_tokens=False).ids, bos, eos, pad)]  # fmt: skip
        assert got.weights[0, 1:3].tolist() == [1.5] * 2 and got.weights[0, 3:].tolist() == [1.0] * 74
        assert tok.webui("").ids.tolist() == [chunk([], bos, eos, pad)]


# -- the conditioning and the picture against float64 states and diffusers -----------------------------------

LONG_NEGATIVE = " ".join(["(blurry:0.8) low quality"] * 5)  # 80 tokens: 2 chunks, cut at 75
LONG_NEGATIVE_PARSED = [item for _ in range(5) for item in (("blurry", 0.8), (" low quality ", 1.0))][:-1]
LONG_NEGATIVE_PARSED += [(" low quality", 1.0)]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_webui_prompts_give_the_pictures_of_their_weighted_chunks(kind, exports, folders):
    """Emphasis, BREAK and a 2-chunk negative: sdrt's conditioning equals the float64 states to 1e-5, and its
    picture is diffusers' pipeline given those states as prompt_embeds (>= 40 dB)."""
    ref_pipe = diffusers_pipeline(folders[kind], kind)
    cond, pooled = reference_states(ref_pipe, CHUNKED_PARSED)
    uncond, neg_pooled = reference_states(ref_pipe, LONG_NEGATIVE_PARSED)
    assert cond.shape[1] == uncond.shape[1] == 154
    kw = dict(num_inference_steps=4, height=64, width=64, guidance_scale=7.0)
    with Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") as pipe:
        params = Params(prompt=CHUNKED, negative_prompt=LONG_NEGATIVE, steps=4, height=64, width=64, seed=3,
                        sampler="euler", prompt_syntax="webui")  # fmt: skip
        ours_cond, ours_uncond = sdrt_states(pipe, params)
        for ours, ref in ((ours_cond, cond), (ours_uncond, uncond)):
            assert ours.shape == ref.shape
            assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-5
        ours = np.stack([np.asarray(im) for im in pipe(CHUNKED, LONG_NEGATIVE, seed=3, sampler="euler",
                                                       prompt_syntax="webui", **kw)])  # fmt: skip
    embeds = dict(prompt_embeds=cond.float(), negative_prompt_embeds=uncond.float())
    if kind == "sdxl":
        embeds.update(pooled_prompt_embeds=pooled.float(), negative_pooled_prompt_embeds=neg_pooled.float())
    pipeline = "StableDiffusionXLPipeline" if kind == "sdxl" else None
    ref = diffusers_images(folders[kind], "euler", pipeline=pipeline, seed=3, **embeds, **kw)
    check(ours, ref)
    with Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") as pipe:
        plain = np.stack([np.asarray(im) for im in pipe(CHUNKED, LONG_NEGATIVE, seed=3, sampler="euler", **kw)])
    assert np.abs(plain.astype(int) - ours).mean() > 1, "the web-UI reading should change this picture"


def test_prompt_and_negative_of_different_lengths_run_as_the_web_ui_runs_them(exports, folders):
    """2 chunks against 1: two U-Net calls a step (the web UI's default), against a sampling loop written with
    diffusers' scheduler and U-Net; with pad_chunks (its pad_cond_uncond) the negative gets the empty prompt's
    chunk and equals diffusers' pipeline on the padded states."""
    import diffusers

    ref_pipe = diffusers_pipeline(folders["sd1"], "sd1")
    cond, _ = reference_states(ref_pipe, CHUNKED_PARSED)
    uncond, _ = reference_states(ref_pipe, [("blurry", 1.3)])
    kw = dict(num_inference_steps=4, height=64, width=64, guidance_scale=7.0, seed=5, sampler="euler")
    with Pipeline.load(exports.get("sd1", "fp32"), backend="onnxruntime", device="cpu") as pipe:
        ours = np.asarray(pipe(CHUNKED, "(blurry:1.3)", prompt_syntax="webui", **kw)[0])[None]
        padded = np.asarray(pipe.generate(pipe.request(Params(prompt=CHUNKED, negative_prompt="(blurry:1.3)", steps=4,
                            height=64, width=64, guidance=7.0, seed=5, sampler="euler", prompt_syntax="webui",
                            pad_chunks=True))))  # fmt: skip
    sched = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    sched.set_timesteps(4)
    gen = torch.Generator("cpu").manual_seed(5)
    x = torch.randn((1, 4, 8, 8), generator=gen) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            u = ref_pipe.unet(x_in, t, uncond.float()).sample  # each side alone, at its own length
            c = ref_pipe.unet(x_in, t, cond.float()).sample
            x = sched.step(u + 7.0 * (c - u), t, x).prev_sample
        image = ref_pipe.vae.decode(x / ref_pipe.vae.config.scaling_factor).sample
    ref = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    check(ours, ref)
    empty, _ = reference_states(ref_pipe, [])
    embeds = dict(prompt_embeds=cond.float(), negative_prompt_embeds=torch.cat([uncond, empty], 1).float())
    check(padded, diffusers_images(folders["sd1"], "euler", seed=5, num_inference_steps=4, height=64, width=64,
                                   guidance_scale=7.0, **embeds))  # fmt: skip


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_clip_skip_matches_diffusers(kind, exports, folders):
    """diffusers' own clip_skip (SD 1.x: the layer before the last through the final norm; SDXL: two before)."""
    import diffusers

    kw = dict(prompt="a watercolor fox", negative_prompt="blurry", num_inference_steps=4, height=64, width=64,
              guidance_scale=7.0, clip_skip=1)  # fmt: skip
    with Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") as pipe:
        ours = np.stack([np.asarray(im) for im in pipe(**kw, seed=4, sampler="euler")])
        without = np.stack([np.asarray(im) for im in pipe(**dict(kw, clip_skip=0), seed=4, sampler="euler")])
        with pytest.raises(SdrtError, match="clip_skip 9 is past"):
            pipe(**dict(kw, clip_skip=9), seed=4)
    name = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    ref_pipe = getattr(diffusers, name).from_pretrained(folders[kind], local_files_only=True)
    if kind != "sdxl":  # diffusers 0.42 reads text_encoder.text_model, which transformers 5's CLIPTextModel lacks
        object.__setattr__(ref_pipe.text_encoder, "text_model", ref_pipe.text_encoder)
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    out = ref_pipe(**kw, generator=torch.Generator("cpu").manual_seed(4), output_type="np")
    ref = (out.images * 255).round().astype(np.uint8)
    check(ours, ref)
    assert np.abs(without.astype(int) - ours).mean() > 1


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_eta_and_guidance_rescale_match_diffusers(kind, exports, folders):
    """DDIM with eta (its noise drawn after each step's model call, from the seed's generator, as diffusers draws
    it) and guidance_rescale (SD 2.x: v-prediction), against diffusers' own pipeline."""
    from tests.helpers.images import sdrt_images

    kw = dict(prompt="a watercolor fox", negative_prompt="blurry", num_inference_steps=5, height=64, width=64,
              guidance_scale=7.0, eta=0.7, guidance_rescale=0.6)  # fmt: skip
    with Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") as pipe:
        ours = sdrt_images(pipe, **kw, seed=6, sampler="ddim")
        plain = sdrt_images(pipe, **dict(kw, eta=0.0, guidance_rescale=0.0), seed=6, sampler="ddim")
        with pytest.raises(SdrtError) as err:
            pipe(**dict(kw, eta=1.5), seed=6, sampler="ddim")
        assert err.value.field == "eta"
    check(ours, diffusers_images(folders[kind], "ddim", seed=6, **kw))
    assert np.abs(plain.astype(int) - ours).mean() > 1
