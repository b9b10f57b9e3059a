"""The checkpoints users bring, as diffusers writes them (random weights, a few MB): a folder whose own scheduler
has no sampler in sdrt, distilled (LCM) U-Nets. Each is exported through the CLI and held against diffusers' own
pipeline on the same folder, seed, size and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.pipeline import Pipeline
from tests.helpers.images import check, sdrt_images
from tests.helpers.models import SIZES, build_pipeline
from tests.helpers.reference import diffusers_images

pytestmark = pytest.mark.xdist_group("checkpoints")
KW = dict(prompt="a watercolor fox in the snow", negative_prompt="blurry", num_inference_steps=4, height=64,
          width=64, seed=21)  # fmt: skip


def _export(pipe, tmp_path, name: str, capfd) -> tuple:
    """Save ``pipe`` as a diffusers folder and export it fp32; returns (folder, engine directory, export log)."""
    folder, out = tmp_path / name, tmp_path / f"{name}-fp32"
    pipe.save_pretrained(folder)
    capfd.readouterr()
    assert main(["export", str(folder), str(out), "--precision", "fp32", *SIZES]) == 0
    return folder, out, capfd.readouterr().err


def test_a_scheduler_without_its_own_sampler_is_no_dead_end(tmp_path, capfd):
    """A folder whose scheduler (here DDPMScheduler) has no sampler in sdrt: the export says so in one line and
    succeeds; generating without --sampler is one line naming the samplers that run on this schedule; with one,
    the picture is diffusers' with that scheduler made from the folder's config."""
    import diffusers

    pipe = build_pipeline("sd1")
    pipe.scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    folder, out, log = _export(pipe, tmp_path, "ddpm", capfd)
    notes = [line for line in log.splitlines() if "note:" in line]
    assert len(notes) == 1 and "DDPMScheduler has no matching sampler" in notes[0] and "--sampler: ddim" in notes[0]
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        with pytest.raises(SdrtError, match="choose one with --sampler: ddim, euler, euler_a") as err:
            sdrt("a fox", num_inference_steps=2, height=64, width=64)
        assert err.value.field == "sampler"
        ours = sdrt_images(sdrt, sampler="dpmpp_2m", **KW)
    check(ours, diffusers_images(folder, "dpmpp_2m", **KW))
    capfd.readouterr()
    assert main(["generate", str(out), "a fox", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "--sampler" in err and not (tmp_path / "x.png").exists()
    assert main(["generate", str(out), "a fox", "--steps", "2", "--sampler", "euler", "--height", "64", "--width",
                 "64", "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert (tmp_path / "x.png").is_file()


def test_a_unipc_folder_runs_its_own_scheduler(tmp_path, capfd):
    """A folder saved with UniPC (third order, Karras sigmas): exported without a note, generated with UniPC by
    default, the picture diffusers' with the folder's own scheduler."""
    import diffusers

    pipe = build_pipeline("sd1")
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3,
                                                                   use_karras_sigmas=True)  # fmt: skip
    folder, out, log = _export(pipe, tmp_path, "unipc", capfd)
    assert "note:" not in log
    kw = dict(KW, num_inference_steps=6)
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        assert sdrt.default_sampler == "unipc"
        ours = sdrt_images(sdrt, **kw)
    print(f"UniPC folder: {check(ours, diffusers_images(folder, 'unipc', **kw)):.1f} dB")


def _distilled(kind: str):
    """The test pipeline of ``kind`` with an LCM-distilled U-Net (time_cond_proj_dim: the guidance scale enters
    as an embedding) and LCMScheduler, as an LCM checkpoint ships."""
    import diffusers

    from tests.helpers.models import UNETS

    pipe = build_pipeline(kind)
    torch.manual_seed(5)
    pipe.unet = diffusers.UNet2DConditionModel(**UNETS[kind], time_cond_proj_dim=32)
    with torch.no_grad():  # a fresh projection is small: weight the embedding as strongly as the timestep's
        pipe.unet.time_embedding.cond_proj.weight.mul_(30)
    pipe.register_modules(unet=pipe.unet, scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config))
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_lcm_distilled_unets_take_the_guidance_embedding_unguided(kind, tmp_path, capfd):
    """An LCM-distilled U-Net saved as the plain pipeline's folder (StableDiffusionPipeline / StableDiffusionXL
    Pipeline, as LCM-Dreamshaper and SDXL LCM checkpoints ship): the U-Net graph takes timestep_cond from the
    guidance scale and no classifier-free guidance runs, as diffusers' LatentConsistencyModelPipeline (SD) and
    StableDiffusionXLPipeline (SDXL) do; the default sampler is the folder's LCM."""
    import diffusers

    folder, out, _ = _export(_distilled(kind), tmp_path, f"{kind}-lcm", capfd)
    kw = dict(prompt="a watercolor fox in the snow", num_inference_steps=4, height=64, width=64,
              guidance_scale=8.0)  # fmt: skip
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        assert sdrt.default_sampler == "lcm"
        ours = sdrt_images(sdrt, seed=3, **kw)
        other = sdrt_images(sdrt, seed=3, **dict(kw, guidance_scale=2.0))
    name = "StableDiffusionXLPipeline" if kind == "sdxl" else "LatentConsistencyModelPipeline"
    load = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    ref_pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True, **load)
    ref_pipe.set_progress_bar_config(disable=True)
    out_ref = ref_pipe(**kw, generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    check(ours, (out_ref.images * 255).round().astype(np.uint8))
    assert np.abs(other.astype(int) - ours).mean() > 1, "the guidance embedding should change the picture"


ZERO_SNR_SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde_karras", "lcm", "unipc"]


def test_zero_terminal_snr_runs_every_sampler_diffusers_runs(tmp_path, capfd):
    """The "terminal SNR" recipe of SD 2.x fine-tunes (Lin et al. 2024): DDIM with rescaled betas, trailing
    spacing, v-prediction, guidance_rescale 0.7. Each sampler against diffusers' pipeline with that scheduler made
    from the folder's config (Euler and DPM-Solver: diffusers' 2^-24 for the last alpha; DDIM and LCM: its 0)."""
    import diffusers

    pipe = build_pipeline("sd2")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                                         timestep_spacing="trailing")  # fmt: skip
    folder, out, _ = _export(pipe, tmp_path, "sd2-zsnr", capfd)
    kw = dict(KW, guidance_rescale=0.7, guidance_scale=7.0)
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        assert sdrt.default_sampler == "ddim"
        ours = {s: sdrt_images(sdrt, sampler=s, **kw) for s in ZERO_SNR_SAMPLERS}
        with pytest.raises(SdrtError, match="pick another --sampler"):  # PNDM: neither warm-up nor the rescale
            sdrt("a fox", sampler="pndm", num_inference_steps=4, height=64, width=64)
    for sampler, image in ours.items():
        print(f"zero terminal SNR, {sampler}: {check(image, diffusers_images(folder, sampler, **kw)):.1f} dB")


def _refiner():
    """An SDXL refiner as diffusers ships one: StableDiffusionXLImg2ImgPipeline with the OpenCLIP encoder alone,
    a U-Net conditioned on its states (width 64 here) and on 5 time ids ending in the aesthetic score."""
    import diffusers

    from tests.helpers.models import UNETS

    base = build_pipeline("sdxl")
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**dict(UNETS["sdxl"], cross_attention_dim=64,
                                                 projection_class_embeddings_input_dim=8 * 5 + 32))  # fmt: skip
    with torch.no_grad():  # weight the aesthetic score's embedding as strongly as the sizes'
        unet.add_embedding.linear_1.weight[:, 32:].mul_(5)
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def refiner(tmp_path_factory) -> tuple:
    """(the refiner's diffusers folder, its fp32 engine directory), exported once for this module's tests."""
    root = tmp_path_factory.mktemp("refiner")
    folder, out = root / "refiner", root / "refiner-fp32"
    _refiner().save_pretrained(folder)
    assert main(["export", str(folder), str(out), "--precision", "fp32", *SIZES]) == 0
    return folder, out


def test_an_sdxl_refiner_folder_is_img2img_with_its_aesthetic_score(refiner):
    """The refiner exports (one text encoder, 5 time ids); img2img equals diffusers' StableDiffusionXLImg2ImgPipeline
    on the folder at the default aesthetic scores and at others; txt2img is refused in one line naming the image."""
    from PIL import Image

    folder, out = refiner
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(KW, image=image, strength=0.5, num_inference_steps=6, guidance_scale=6.0)
    scores = dict(aesthetic_score=8.0, negative_aesthetic_score=1.0)
    with Pipeline.load(out, backend="onnxruntime", device="cpu") as sdrt:
        assert sdrt.model.text_encoders == ("text_encoder_2",) and sdrt.model.aesthetics
        ours = sdrt_images(sdrt, sampler="euler", **kw)
        ours_scored = sdrt_images(sdrt, sampler="euler", **kw, **scores)
        with pytest.raises(SdrtError, match="SDXL refiner .*give an init image") as err:
            sdrt("a fox", num_inference_steps=2, height=64, width=64)
        assert err.value.field == "image"
    refiner = "StableDiffusionXLImg2ImgPipeline"
    print(f"refiner: {check(ours, diffusers_images(folder, 'euler', pipeline=refiner, **kw)):.1f} dB")
    ref = diffusers_images(folder, "euler", pipeline=refiner, **kw, **scores)
    print(f"refiner, aesthetic 8 / 1: {check(ours_scored, ref):.1f} dB")
    assert not np.array_equal(ours, ours_scored)  # the scores reach the U-Net


def handoff_reference(base, refiner, sampler: str, switch: float, n: int = 1, **kw) -> np.ndarray:
    """diffusers' documented base + refiner pair: the base with ``denoising_end`` and ``output_type="latent"``,
    the refiner (StableDiffusionXLImg2ImgPipeline) with ``denoising_start`` on those latents, each with a
    generator seeded afresh with the request's seed and the scheduler `sampler` agrees with."""
    import diffusers

    from tests.helpers.reference import SCHEDULERS

    cls, extra = SCHEDULERS[sampler]
    seed, steps = kw.pop("seed"), kw.pop("num_inference_steps")
    pipes = []
    for name, folder in (("StableDiffusionXLPipeline", base), ("StableDiffusionXLImg2ImgPipeline", refiner)):
        pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    prompts = dict(prompt=[kw.pop("prompt")] * n, negative_prompt=[kw.pop("negative_prompt")] * n)
    latents = pipes[0](**prompts, **kw, num_inference_steps=steps, denoising_end=switch, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(seed)).images  # fmt: skip
    scores = {k: kw[k] for k in ("aesthetic_score", "negative_aesthetic_score", "guidance_scale") if k in kw}
    out = pipes[1](**prompts, **scores, image=latents, num_inference_steps=steps, denoising_start=switch,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images  # fmt: skip
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "sampler,switch,n", [("euler", 0.8, 1), ("euler_a", 0.7, 2), ("dpmpp_2m_karras", 0.75, 1), ("ddim", 0.6, 1)]
)
def test_base_to_refiner_handoff_matches_diffusers_pair(sampler, switch, n, refiner, exports, folders):
    """SDXL base for the first ``refiner_switch_at`` of the schedule, the refiner for the rest on the same latents,
    against diffusers' denoising_end / denoising_start pair: Euler (sigma-space latents), Euler a and DDIM (noise
    drawn in both passes), DPM++ 2M Karras (alpha-space latents, a multistep history the refiner restarts)."""
    kw = dict(KW, num_inference_steps=10, guidance_scale=6.0, height=64, width=96, aesthetic_score=7.0)
    with Pipeline.load(exports.get("sdxl", "fp32"), backend="onnxruntime", device="cpu", refiner=refiner[1]) as sdrt:
        ours = sdrt_images(sdrt, sampler=sampler, refiner_switch_at=switch, num_images_per_prompt=n, **kw)
        base_only = sdrt_images(sdrt, sampler=sampler, num_images_per_prompt=n,
                                **{k: v for k, v in kw.items() if k != "aesthetic_score"})  # fmt: skip
    ref = handoff_reference(folders["sdxl"], refiner[0], sampler, switch, n=n, **kw)
    print(f"base -> refiner, {sampler} at {switch}: {check(ours, ref):.1f} dB")
    assert not np.array_equal(ours, base_only)  # the refiner's pass changed the picture


def test_handoff_from_the_cli_and_the_server(refiner, exports, tmp_path):
    """`sdrt generate --refiner DIR --refiner-switch-at X`, ``/v1/images`` with ``refiner_switch_at`` and the web
    UI's ``refiner_checkpoint`` / ``refiner_switch_at`` on ``/sdapi/v1/txt2img``: the Python call's picture, byte
    for byte, and the PNG's refiner entries."""
    import base64
    import io

    from PIL import Image

    from tests.helpers.server import LiveServer

    base_dir = exports.get("sdxl", "fp32")
    kw = dict(KW, num_inference_steps=6, guidance_scale=6.0, seed=4)
    with Pipeline.load(base_dir, backend="onnxruntime", device="cpu", refiner=refiner[1]) as pipe:
        want = sdrt_images(pipe, sampler="euler", refiner_switch_at=0.7, **kw)[0]
        webui = sdrt_images(pipe, sampler="euler", refiner_switch_at=0.7, prompt_syntax="webui", **kw)[0]
        name = pipe.refiner.model.name
        out = tmp_path / "handoff.png"
        rc = main(["generate", str(base_dir), kw["prompt"], "--negative-prompt", "blurry", "--steps", "6",
                   "--guidance", "6", "--height", "64", "--width", "64", "--seed", "4", "--sampler", "euler",
                   "--backend", "onnxruntime", "--device", "cpu", "--refiner", str(refiner[1]),
                   "--refiner-switch-at", "0.7", "--out", str(out), "--quiet"])  # fmt: skip
        assert rc == 0
        with Image.open(out) as png:
            assert np.array_equal(np.asarray(png), want)
            assert f"Refiner: {name}, Refiner switch at: 0.7" in png.text["parameters"]
        server = LiveServer(pipe)
        try:
            body = dict(prompt=kw["prompt"], negative_prompt="blurry", steps=6, height=64, width=64, seed=4)
            r = server.post("/v1/images", dict(body, guidance=6.0, sampler="euler", refiner_switch_at=0.7))
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
            assert np.array_equal(got, want)
            sdapi = dict(body, cfg_scale=6.0, sampler_name="Euler", refiner_checkpoint=name, refiner_switch_at=0.7)
            r = server.post("/sdapi/v1/txt2img", sdapi)
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
            assert np.array_equal(got, webui)
            r = server.post("/sdapi/v1/txt2img", dict(sdapi, refiner_checkpoint="sd_xl_refiner_1.0"))
            assert r.status_code == 400 and r.json()["field"] == "refiner_checkpoint", r.text
        finally:
            server.stop()


def test_bad_handoffs_are_one_line_naming_the_field(refiner, exports, folders):
    from PIL import Image

    base_dir = exports.get("sdxl", "fp32")
    with Pipeline.load(base_dir, backend="onnxruntime", device="cpu") as alone:
        with pytest.raises(SdrtError, match="needs a refiner loaded") as err:
            alone(**KW, refiner_switch_at=0.8)
        assert err.value.field == "refiner_switch_at"
    with pytest.raises(SdrtError, match="not an SDXL refiner|no aesthetic-score") as err:
        Pipeline.load(base_dir, backend="onnxruntime", device="cpu", refiner=base_dir)
    assert err.value.field == "refiner"
    with Pipeline.load(base_dir, backend="onnxruntime", device="cpu", refiner=refiner[1]) as sdrt:
        cases = [(dict(refiner_switch_at=1.0), "refiner_switch_at", "(0, 1)"),
                 (dict(refiner_switch_at=0.01), "refiner_switch_at", "no step"),
                 (dict(refiner_switch_at=0.8, sampler="heun"), "sampler", "cannot hand over"),
                 (dict(refiner_switch_at=0.8, image=Image.new("RGB", (64, 64))), "image", "txt2img")]  # fmt: skip
        for extra, field, words in cases:
            with pytest.raises(SdrtError) as err:
                sdrt(**dict(KW, **extra))
            assert err.value.field == field and words in str(err.value) and "\n" not in str(err.value), extra


def test_aesthetic_scores_are_refused_where_the_unet_has_none(exports):
    with Pipeline.load(exports.get("sdxl", "fp32"), backend="onnxruntime", device="cpu") as sdrt:
        with pytest.raises(SdrtError, match="aesthetic_score applies to SDXL refiner") as err:
            sdrt("a fox", num_inference_steps=2, height=64, width=64, aesthetic_score=7.0)
        assert err.value.field == "aesthetic_score"


def test_a_refiner_whose_options_disagree_with_its_unet_is_refused(tmp_path, capfd):
    pipe = _refiner()
    pipe.register_to_config(requires_aesthetics_score=False)
    folder = tmp_path / "refiner-6"
    pipe.save_pretrained(folder)
    capfd.readouterr()
    assert main(["export", str(folder), str(tmp_path / "out"), "--precision", "fp32", *SIZES]) == 2
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]  # after the load's progress lines
    assert "requires_aesthetics_score=False" in last and "Traceback" not in err and not (tmp_path / "out").exists()
