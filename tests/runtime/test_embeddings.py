"""Textual-inversion embeddings (`sdrt embedding add`) against diffusers' own ``load_textual_inversion`` (the same
file, folder, seed and size), float64 states for the web UI's reading, chunks cut by hand from the web UI's rules,
the real ``webuiapi`` client, and the one-line refusals of what is not an embedding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdrt.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.embeddings import reference_pipe, write
from tests.helpers.images import check
from tests.helpers.prompts import chunk, reference_states, sdrt_states
from tests.helpers.reference import diffusers_images

pytestmark = pytest.mark.xdist_group("embeddings")


@pytest.fixture
def directory(exports, tmp_path):
    """A copy of a shared export, so that adding embeddings leaves the other modules' directories as they are."""

    def copy(kind: str):
        dest = tmp_path / f"{kind}-fp32"
        shutil.copytree(exports.get(kind, "fp32"), dest)
        return dest

    return copy


CASES = [("sd1", "emb_params", 3), ("sd2", "concept", 1), ("sdxl", "pair", 2)]


@pytest.mark.parametrize("kind,layout,n", CASES)
def test_embeddings_give_diffusers_load_textual_inversion_picture(kind, layout, n, directory, folders, tmp_path):
    """A multi-vector embedding in the prompt and another in the negative prompt (the common "EasyNegative" use),
    read by sdrt from `sdrt embedding add` and by diffusers from the same files: >= 40 dB, plain syntax."""
    root = directory(kind)
    style, style_vs = write(tmp_path / "fox-style.safetensors", kind, n, seed=1, layout=layout)
    neg, neg_vs = write(tmp_path / "badthing.safetensors", kind, 2, seed=2)
    assert main(["embedding", "add", str(root), str(style)]) == 0
    assert main(["embedding", "add", str(root), str(neg)]) == 0
    kw = dict(prompt="a fox-style watercolor fox", negative_prompt="badthing, blurry", num_inference_steps=4,
              height=64, width=64, guidance_scale=7.0)  # fmt: skip
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as pipe:
        ours = np.stack([np.asarray(im) for im in pipe(**kw, seed=8, sampler="euler")])
        without = np.stack([np.asarray(im) for im in pipe(**dict(kw, prompt="a fox style watercolor fox",
                                                                  negative_prompt="bad thing, blurry"),
                                                          seed=8, sampler="euler")])  # fmt: skip
    ref_pipe = reference_pipe(folders[kind], kind, {"fox-style": (style, style_vs), "badthing": (neg, neg_vs)})
    import diffusers

    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    out = ref_pipe(**kw, generator=torch.Generator("cpu").manual_seed(8), output_type="np")
    check(ours, (out.images * 255).round().astype(np.uint8))
    assert np.abs(without.astype(int) - ours).mean() > 1, "the embeddings should change this picture"


def test_embeddings_in_the_web_ui_syntax_are_weighted_and_kept_in_one_chunk(directory, folders, tmp_path, exports):
    """An emphasised name, "(name:1.3)", weights the embedding's vectors like any tokens (float64 states of
    diffusers' text encoder with the file loaded, to 1e-5; the picture vs diffusers on those states >= 40 dB); an
    embedding that does not fit in the rest of a chunk starts the next one, as the web UI places it; a name that is
    also a word replaces that word only as a whole token sequence."""
    root = directory("sd1")
    path, vs = write(tmp_path / "fox-style.safetensors", "sd1", 3, seed=3)
    assert main(["embedding", "add", str(root), str(path)]) == 0
    word, word_vs = write(tmp_path / "cat.safetensors", "sd1", 1, seed=4)
    assert main(["embedding", "add", str(root), str(word)]) == 0
    prompt = "a (fox-style:1.3) fox [on a] mat"
    ref_pipe = reference_pipe(folders["sd1"], "sd1", {"fox-style": (path, vs)})
    expanded = "fox-style fox-style_1 fox-style_2"  # diffusers' tokens for the three vectors
    cond, _ = reference_states(ref_pipe, [("a ", 1.0), (expanded, 1.3), (" fox ", 1.0), ("on a", 1 / 1.1),
                                          (" mat", 1.0)])  # fmt: skip
    uncond, _ = reference_states(ref_pipe, [("blurry", 1.0)])
    kw = dict(num_inference_steps=4, height=64, width=64, guidance_scale=7.0)
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as pipe:
        params = Params(prompt=prompt, negative_prompt="blurry", steps=4, height=64, width=64, seed=3,
                        sampler="euler", prompt_syntax="webui")  # fmt: skip
        ours_cond, ours_uncond = sdrt_states(pipe, params)
        for ours, ref in ((ours_cond, cond), (ours_uncond, uncond)):
            assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-5
        ours = np.stack([np.asarray(im) for im in pipe(prompt, "blurry", seed=3, sampler="euler",
                                                       prompt_syntax="webui", **kw)])  # fmt: skip
        tok = pipe.tokenizers[0]
        bos, eos, pad = tok.special
        letters = tok.fragments.encode("a" * 73, add_special_tokens=False).ids  # 73 tokens of this test tokenizer
        vocab = pipe.embeddings.vocab[0]
        first, _ = pipe.embeddings.rows["fox-style"]
        style_ids = [vocab + first + i for i in range(3)]
        got = tok.webui("a" * 73 + " fox-style")  # 73 + 3 > 75: the three vectors open the second chunk
        assert got.ids.tolist() == [chunk(letters, bos, eos, pad), chunk(style_ids, bos, eos, pad)]
        cat = vocab + pipe.embeddings.rows["cat"][0]
        a, cats = (tok.fragments.encode(t, add_special_tokens=False).ids for t in ("a", "cats"))
        assert tok.webui("a cat").ids.tolist() == tok.plain("a cat").ids.tolist() == [chunk([*a, cat], bos, eos, pad)]
        assert tok.webui("cats").ids.tolist() == [chunk(cats, bos, eos, pad)]  # "cats" is not "cat"
    embeds = dict(prompt_embeds=cond.float(), negative_prompt_embeds=uncond.float())
    check(ours, diffusers_images(folders["sd1"], "euler", seed=3, **embeds, **kw))


def test_embedding_files_and_names_are_checked_in_one_line(directory, tmp_path, capsys):
    """What is not an embedding for this model, and names that cannot be triggers, are one-line errors that
    change nothing; a replaced or damaged embedding file is found when the directory is opened; remove and list."""
    root, xl = directory("sd1"), tmp_path / "xl.safetensors"
    capsys.readouterr()  # the shared export's progress, if this process made it
    write(xl, "sdxl", 2, seed=5)
    ok, _ = write(tmp_path / "good.safetensors", "sd1", 2, seed=6, layout="string_to_param")
    two = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, str(two))
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 48)}, str(wide))
    pickle = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}}, pickle)
    lora = tmp_path / "lora.safetensors"
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{module}.lora_down.weight": torch.zeros(4, 32), f"{module}.lora_up.weight": torch.zeros(32, 4)},
              str(lora))  # fmt: skip
    before = (root / "manifest.json").read_text()
    for args, words in [
        ([str(xl)], "32 (an embedding for another model family"),
        ([str(wide)], "48-wide vectors for text_encoder, which takes 32"),
        ([str(two)], "is not a textual-inversion embedding: its keys are a, b"),
        ([str(lora)], "(a LoRA? add it with `sdrt lora add`)"),
        ([str(pickle)], "only .safetensors embeddings are read"),
        ([str(tmp_path / "missing.safetensors")], "no such file"),
        ([str(ok), "--name", "bad name"], "use letters, digits"),
    ]:
        assert main(["embedding", "add", str(root), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert (root / "manifest.json").read_text() == before and not (root / "embeddings").exists()
    assert main(["embedding", "add", str(root), str(ok), "--name", "Good"]) == 0
    assert main(["embedding", "add", str(root), str(ok)]) == 2  # "good" reads as the tokens "Good" does
    assert "same tokens as the embedding 'Good'" in capsys.readouterr().err
    assert main(["embedding", "list", str(root)]) == 0
    assert "Good\t2 vectors\tfrom good.safetensors" in capsys.readouterr().out
    (root / "embeddings" / "Good.safetensors").write_bytes(xl.read_bytes())
    with pytest.raises(SdrtError, match="embeddings/Good.safetensors: SHA-256 differs"):
        Pipeline.load(root, backend="onnxruntime", device="cpu")
    assert main(["embedding", "remove", str(root), "Good"]) == 0
    assert not (root / "embeddings" / "Good.safetensors").exists()
    assert main(["embedding", "remove", str(root), "Good"]) == 2
    assert "has no embedding 'Good'" in capsys.readouterr().err
    # an embedding given where a LoRA is expected: one line naming the command that takes it, before any work
    for args in (["lora", "add", str(root), str(ok)], ["export", str(root), str(tmp_path / "x"), "--lora", str(ok)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is a textual-inversion embedding, not a LoRA" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_webuiapi_prompts_name_embeddings_as_in_the_web_ui(directory, tmp_path):
    """The real webuiapi client: its embeddings list, and a prompt naming one gives the pipeline's picture of the
    web-UI reading."""
    import webuiapi

    from tests.helpers.server import LiveServer, alone

    root = directory("sd1")
    path, _ = write(tmp_path / "EasyNeg.safetensors", "sd1", 3, seed=7)
    assert main(["embedding", "add", str(root), str(path)]) == 0
    with Pipeline.load(root, backend="onnxruntime", device="cpu") as pipe:
        server = LiveServer(pipe)
        try:
            host, port = server.url.removeprefix("http://").split(":")
            api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
            assert api.get_embeddings()["loaded"]["EasyNeg"]["vectors"] == 3
            r = api.txt2img(prompt="a red fox", negative_prompt="(easyneg:1.2), blurry", seed=9, cfg_scale=7.0,
                            width=64, height=64)  # fmt: skip
            req = dict(prompt="a red fox", negative_prompt="(easyneg:1.2), blurry", steps=3, seed=9, height=64,
                       width=64, sampler="euler", guidance=7.0, prompt_syntax="webui")  # fmt: skip
            assert np.array_equal(np.asarray(r.image), alone(pipe, req)[0])
            plain = alone(pipe, dict(req, negative_prompt="(easy neg:1.2), blurry"))[0]
            assert np.abs(plain.astype(int) - np.asarray(r.image)).mean() > 1
        finally:
            server.stop()
