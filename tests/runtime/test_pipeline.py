"""Fidelity: sdrt's image against diffusers' own pipelines on the same folder, prompt, seed, sampler and size."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import Layout
from tests.helpers.images import check, sdrt_images
from tests.helpers.reference import NEGATIVE, PROMPT, SCHEDULERS, diffusers_images


@pytest.fixture(scope="module")
def pipes(exports):
    out = {
        kind: Pipeline.load(exports.get(kind, "fp32"), backend="onnxruntime", device="cpu") for kind in ("sd1", "sd2")
    }
    yield out
    for p in out.values():
        p.close()


# (DPM++ SDE: its Brownian tree costs ms a query, here and in diffusers; its own tests follow)
SDE = ("dpmpp_sde", "dpmpp_sde_karras")
CASES = [("sd1", s) for s in SCHEDULERS if s not in SDE] + [("sd2", s) for s in SCHEDULERS if s not in ("pndm", *SDE)]


@pytest.mark.parametrize("kind,sampler", CASES)
def test_txt2img_matches_diffusers(kind, sampler, pipes, folders):
    steps = 4 if sampler == "lcm" else 6
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0,
              height=64, width=128, seed=1234)  # fmt: skip
    ours = sdrt_images(pipes[kind], sampler=sampler, **kw)
    ref = diffusers_images(folders[kind], sampler, **kw)
    check(ours, ref)


@pytest.mark.parametrize(
    "kind,sampler,prompts,n",
    [("sd1", "euler_a", [PROMPT, "a city at night"], 1), ("sd2", "dpmpp_2m", [PROMPT], 2)],
)
def test_batches_match_diffusers(kind, sampler, prompts, n, pipes, folders):
    """Several prompts (with their own negatives), and several images per prompt: the exported engines take 2."""
    kw = dict(prompt=prompts, negative_prompt=[NEGATIVE, ""][: len(prompts)], num_inference_steps=5,
              guidance_scale=7.5, height=128, width=64, num_images_per_prompt=n, seed=7)  # fmt: skip
    ours = sdrt_images(pipes[kind], sampler=sampler, **kw)
    ref = diffusers_images(folders[kind], sampler, **kw)
    assert ours.shape[0] == 2
    check(ours, ref)


@pytest.mark.parametrize(
    "kind,sampler",
    [
        ("sd1", "ddim"),
        ("sd1", "euler_a"),
        ("sd1", "pndm"),
        ("sd2", "euler"),
        ("sd1", "heun"),
        ("sd1", "dpmpp_sde_karras"),
    ],
)
def test_img2img_matches_diffusers(kind, sampler, pipes, folders, record_property):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:128]
    init = np.stack([xx * 2, yy * 4, (xx + yy) % 256], -1).astype(np.uint8) // 2 + rng.integers(0, 64, (64, 128, 3))
    image = Image.fromarray(init.astype(np.uint8))
    kw = dict(prompt=PROMPT, num_inference_steps=8, guidance_scale=5.0, strength=0.6, seed=99)
    ours = sdrt_images(pipes[kind], sampler=sampler, image=image, **kw)
    ref = diffusers_images(folders[kind], sampler, img2img=True, image=image, **kw)
    record_property("img2img_psnr_db", round(check(ours, ref), 1))


@pytest.fixture(scope="module")
def sde_sd1(exports, folders, tmp_path_factory):
    """sd1 saved with DPMSolverSDEScheduler(noise_sampler_seed=31) as its own scheduler, and its engine directory:
    the sd1 export with the scheduler entry `sdrt export` writes for that folder (the graphs do not read it)."""
    import diffusers

    root = tmp_path_factory.mktemp("sde")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"], local_files_only=True)
    pipe.scheduler = diffusers.DPMSolverSDEScheduler.from_config(pipe.scheduler.config, noise_sampler_seed=31)
    pipe.save_pretrained(root / "model")
    sched = diffusers.DPMSolverSDEScheduler.from_pretrained(root / "model", subfolder="scheduler")
    shutil.copytree(exports.get("sd1", "fp32"), root / "engine")
    manifest = json.loads((root / "engine" / "manifest.json").read_text())
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(sched.config).items()}
    manifest["scheduler"] = {"class": "DPMSolverSDEScheduler", "config": config, "betas": sched.betas.tolist()}
    (root / "engine" / "manifest.json").write_text(json.dumps(manifest))
    return root / "model", root / "engine"


def test_dpmpp_sde_folder_matches_diffusers(sde_sd1, record_property):
    """The folder's own DPMSolverSDEScheduler is the default sampler, its Brownian tree seeded with the folder's
    noise_sampler_seed as diffusers seeds it: one tree over the batch of two images, two U-Net calls a step."""
    folder, engine = sde_sd1
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=6.0, height=64,
              width=128, num_images_per_prompt=2, seed=1234)  # fmt: skip
    with Pipeline.load(engine, backend="onnxruntime", device="cpu") as pipe:
        assert pipe.default_sampler == "dpmpp_sde"
        ours = sdrt_images(pipe, **kw)
    db = check(ours, diffusers_images(folder, "dpmpp_sde", **kw))
    record_property("dpmpp_sde_psnr_db", round(db, 1))


def test_no_guidance_and_same_seed_same_picture(pipes, folders):
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, seed=5)
    ours = sdrt_images(pipes["sd1"], sampler="euler", **kw)
    check(ours, diffusers_images(folders["sd1"], "euler", **kw))
    assert np.array_equal(ours, sdrt_images(pipes["sd1"], sampler="euler", **kw))
    assert not np.array_equal(ours, sdrt_images(pipes["sd1"], sampler="euler", **{**kw, "seed": 6}))


def test_fp16_export_on_cpu_psnr(exports, folders, record_property):
    """The fp16 graphs on the CPU provider against diffusers fp32: reported, with a floor well below fp32's."""
    pipe = Pipeline.load(exports.get("sd1", "fp16"), backend="onnxruntime", device="cpu")
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0,
              height=64, width=128, seed=1234)  # fmt: skip
    db = check(sdrt_images(pipe, sampler="euler", **kw), diffusers_images(folders["sd1"], "euler", **kw), 25.0)
    record_property("fp16_cpu_psnr_db", round(float(db), 1))
    print(f"fp16 export on the CPU: PSNR {db:.1f} dB against diffusers fp32")


def test_threads_share_one_pipeline(pipes):
    """Concurrent calls on one Pipeline each get exactly the image they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = pipes["sd1"]
    args = [dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, seed=s, sampler="euler") for s in range(4)]
    alone = [sdrt_images(pipe, **a) for a in args]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda a: sdrt_images(pipe, **a), args * 2))
    for i, img in enumerate(together):
        assert np.array_equal(img, alone[i % 4])


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(height=100), "not a multiple of 8"),
        (dict(height=56), "is outside the 64-192 px"),
        (dict(width=512), "is outside the 64-192 px"),
        (dict(num_inference_steps=0), "steps must be"),
        (dict(guidance_scale=float("nan")), "guidance must be a finite number"),
        (dict(sampler="dpm_fast"), "unknown sampler"),
        (dict(seed=-1), "seed must be"),
        (dict(image="/nonexistent.png"), "cannot read init image"),
        (dict(image=Image.new("RGB", (64, 64)), strength=0.0), "strength must be in (0, 1]"),
        (dict(image=Image.new("RGB", (64, 64)), strength=1.5), "strength must be in (0, 1]"),
        (dict(num_images_per_prompt=3), "images per call"),
    ],
)
def test_bad_requests_name_the_fix(pipes, kw, msg):
    with pytest.raises(SdrtError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pipes["sd1"](**{"prompt": "x", "num_inference_steps": 2, **kw})


def test_long_prompt_is_truncated_with_a_warning(pipes, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sdrt"):
        pipes["sd1"](" ".join(["word"] * 100), num_inference_steps=1, height=64, width=64, seed=0)
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_pndm_on_a_config_without_skip_prk_steps_is_refused(pipes):
    with pytest.raises(SdrtError, match="skip_prk_steps"):
        pipes["sd2"]("x", num_inference_steps=2, sampler="pndm")


def test_cli_generate_writes_pngs_with_parameters(exports, tmp_path, capsys):
    from sdrt.cli import main

    out = tmp_path / "fox.png"
    args = ["generate", str(exports.get("sd1", "fp32")), "a fox", "--steps", "2", "--seed", "3", "--batch", "2"]
    assert main([*args, "--height", "64", "--width", "128", "--out", str(out), "--verbose", "--quiet"]) == 0
    for i in range(2):
        img = Image.open(tmp_path / f"fox-{i}.png")
        assert img.size == (128, 64)
        text = img.text["parameters"]
        assert text.startswith("a fox\n") and "Steps: 2" in text and "Seed: 3" in text and "Size: 128x64" in text
        assert f"Batch pos: {i}" in text
    assert "denoise_ms" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--height", "100"], "not a multiple of 8"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--init-image", "/nonexistent.png"], "cannot read init image"),
        (["--sampler", "nope"], "unknown sampler"),
    ],
)
def test_cli_generate_bad_input_is_one_line(exports, tmp_path, capsys, extra, msg):
    from sdrt.cli import main

    rc = main(
        ["generate", str(exports.get("sd1", "fp32")), "x", "--steps", "1", "--out", str(tmp_path / "o.png"), *extra]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0]
    assert not (tmp_path / "o.png").exists()


def test_damaged_engine_file_is_refused_at_load(exports, tmp_path):
    import shutil

    root = tmp_path / "engine"
    shutil.copytree(exports.get("sd1", "fp32"), root)
    data = bytearray((root / "vae_decoder.onnx").read_bytes())
    data[100] ^= 0x01
    (root / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(SdrtError, match="vae_decoder.onnx: SHA-256 differs"):
        Pipeline.load(root, backend="onnxruntime", device="cpu")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(SdrtError, match="damaged"):
        Pipeline.load(root, backend="onnxruntime", device="cpu")


def test_capture_key_separates_what_changes_the_captured_graph(pipes):
    """A captured graph is reused only for requests with the same buffers and the same body."""
    pipe = pipes["sd1"]
    args = dict(negative_prompt=None, steps=4, guidance=7.5, height=64, width=64, seed=0, sampler="euler")

    def key(prompt, n, image=None, strength=1.0):
        return Layout.of([pipe.request(Params(prompt=prompt, n=n, image=image, strength=strength, **args))]).key

    assert key(["a", "b"], 1) != key(["a"], 2)  # same batch of 2, different input_ids rows
    assert key("a", 1) != key("a", 1, image=Image.new("RGB", (64, 64)))  # img2img at strength 1 adds the encoder
    assert key("a", 1) == key("b", 1)  # the prompt's text is data, not shape


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_joined_requests_give_exactly_their_images_alone(pipes, kind):
    """Dynamic batching's guarantee: requests run as one engine batch, each with its own seed, prompt, negative,
    guidance (and init image), come out byte-identical to the same requests run alone."""
    pipe = pipes[kind]
    common = dict(steps=4, height=64, width=128, sampler="euler_a")
    a = pipe.request(Params(prompt="a red fox", negative_prompt="blurry", guidance=7.5, seed=11, **common))
    b = pipe.request(Params(prompt="a boat at dusk", guidance=3.0, seed=12, **common))
    assert a.join_key == b.join_key
    joined = pipe.generate_batch([a, b]).pixels
    alone = [pipe.generate(r) for r in (a, b)]
    for j, s in zip(joined, alone, strict=True):
        assert j.shape == s.shape == (1, 64, 128, 3) and torch.equal(j, s)
    assert not torch.equal(joined[0], joined[1])
    rng = np.random.default_rng(0)
    inits = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    reqs = [
        pipe.request(Params(prompt=p, steps=4, guidance=6.0, height=64, width=64, seed=s, sampler="ddim", image=im,
                            strength=0.5))
        for p, s, im in zip("xy", (1, 2), inits, strict=True)
    ]  # fmt: skip
    for j, r in zip(pipe.generate_batch(reqs).pixels, reqs, strict=True):
        assert torch.equal(j, pipe.generate(r))


def test_requests_that_differ_in_shape_do_not_join(pipes):
    pipe = pipes["sd1"]
    base = Params(prompt="x", steps=4, height=64, width=64, seed=0, sampler="euler")
    a = pipe.request(base)
    for other in (
        pipe.request(replace(base, width=128)),  # size
        pipe.request(replace(base, steps=5)),  # steps
        pipe.request(replace(base, sampler="ddim")),  # sampler
        pipe.request(replace(base, guidance=1.0)),  # no guidance: no uncond rows
    ):
        assert other.join_key != a.join_key
        with pytest.raises(ValueError, match="join keys"):
            pipe.generate_batch([a, other])
    with pytest.raises(SdrtError, match="at most 2"):
        pipe.generate_batch([a, a, a])
