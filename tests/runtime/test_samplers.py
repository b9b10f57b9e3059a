"""Samplers against diffusers' own schedulers, step by step, with a deterministic fake U-Net.

The reference is diffusers itself, driven as its pipelines drive it: `Cls.from_config(checkpoint config)`,
`set_timesteps`, `init_noise_sigma` / `add_noise` at the first timestep (img2img's `get_timesteps` and
`set_begin_index`), `scale_model_input`, `step(..., generator=g)`. sdrt's side gets the same fake model through the
denoiser contract (c_in, timesteps, to_x0) and the same seed, drawing its noise buffer in diffusers' order.
"""

from __future__ import annotations

import inspect
import sys

import diffusers
import pytest
import torch
from torch.overrides import TorchFunctionMode

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.noise import step_noise
from sdrt.runtime.samplers import SAMPLERS, Plan, make_plan, sample, start_latents, to_x0
from sdrt.runtime.schedule import DEFAULTS, SCHEDULERS, NoiseSchedule, default_sampler

SHAPE = (2, 4, 8, 8)  # [B, 4, h, w]
SEED = 7
_SCALED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# Checkpoint scheduler configs, as their scheduler_config.json files state them (missing keys: class defaults).
CONFIGS = {
    # SD 1.5: PNDM, "leading" only by PNDM's default (so Euler / DPM fall back to their "linspace")
    "sd15": ("PNDMScheduler", dict(_SCALED, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                    clip_sample=False, trained_betas=None)),
    # SD 2.x 768: DDIM with v-prediction
    "sd2v": ("DDIMScheduler", dict(_SCALED, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, skip_prk_steps=True)),
    # SDXL: Euler, explicit "leading" spacing
    "sdxl": ("EulerDiscreteScheduler", dict(_SCALED, steps_offset=1, timestep_spacing="leading",
                                             interpolation_type="linear", use_karras_sigmas=False,
                                             prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                                             skip_prk_steps=True, sample_max_value=1.0)),
    # SD-Turbo-like: Euler ancestral with "trailing" spacing
    "turbo": ("EulerAncestralDiscreteScheduler", dict(_SCALED, timestep_spacing="trailing", skip_prk_steps=True)),
    # "linspace" spacing with DDIM's x0 clipping (DDIM/PNDM then step off their own timestep grid); default betas
    "linspace": ("DDIMScheduler", dict(beta_schedule="linear", timestep_spacing="linspace", clip_sample=True,
                                        clip_sample_range=1.5, set_alpha_to_one=True, skip_prk_steps=True)),
    # DPM-Solver++ checkpoint with Karras sigmas ending at sigma_min (Euler honours both keys too)
    "dpm_karras": ("DPMSolverMultistepScheduler", dict(_SCALED, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                       steps_offset=1, skip_prk_steps=True)),
    # an LCM checkpoint with its own distillation schedule
    "lcm": ("LCMScheduler", dict(_SCALED, original_inference_steps=40, timestep_scaling=5.0, set_alpha_to_one=True,
                                  steps_offset=1, skip_prk_steps=True)),
    # a model predicting x0 ("sample"), DDIM's default clipping
    "x0": ("DDIMScheduler", dict(_SCALED, prediction_type="sample", skip_prk_steps=True)),
    # zero terminal SNR (Lin et al. 2024): rescaled betas, "trailing" spacing, v-prediction, as SD 2.x fine-tunes ship
    "zsnr": ("DDIMScheduler", dict(_SCALED, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, skip_prk_steps=True)),
    # exponential sigmas, as Euler, Heun, DPM-Solver and UniPC read them
    "exp": ("EulerDiscreteScheduler", dict(_SCALED, use_exponential_sigmas=True, timestep_spacing="trailing",
                                           skip_prk_steps=True)),
}  # fmt: skip
# Configs run by the listed samplers only (their options are ones the other classes do not take or refuse).
_UNIPC = "UniPCMultistepScheduler"
ONLY = {
    # B(h) = h, the corrector skipped after step 1, landing on sigma_min (diffusers' bh1 to sigma 0 draws NaN)
    "unipc_bh1": (_UNIPC, dict(_SCALED, solver_type="bh1", final_sigmas_type="sigma_min", disable_corrector=[1],
                               timestep_spacing="trailing", prediction_type="v_prediction"), ("unipc",)),
    "unipc3_karras": (_UNIPC, dict(_SCALED, solver_order=3, use_karras_sigmas=True), ("unipc",)),
    "unipc3_exp_x0": (_UNIPC, dict(_SCALED, solver_order=3, use_exponential_sigmas=True, prediction_type="sample",
                                   final_sigmas_type="sigma_min"), ("unipc",)),
    "unipc1_leading": (_UNIPC, dict(_SCALED, solver_order=1, timestep_spacing="leading", steps_offset=1),
                       ("unipc",)),
    # its Karras "sigma_min" is the last sigma again: a last step of h = 0, taken at order 2
    "unipc_karras_min": (_UNIPC, dict(_SCALED, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                      lower_order_final=False), ("unipc",)),
    "deis3_karras": ("DEISMultistepScheduler", dict(_SCALED, solver_order=3, use_karras_sigmas=True), ("deis",)),
    "deis3_v": ("DEISMultistepScheduler", dict(_SCALED, solver_order=3, prediction_type="v_prediction",
                                               timestep_spacing="trailing"), ("deis",)),
    "deis1_exp": ("DEISMultistepScheduler", dict(_SCALED, solver_order=1, use_exponential_sigmas=True), ("deis",)),
    "unipc_zsnr": (_UNIPC, dict(CONFIGS["zsnr"][1], solver_order=3), ("unipc",)),
}  # fmt: skip
SDE = ("dpmpp_sde", "dpmpp_sde_karras")
# Configs run in a few cases only (`FEW_CASES`): DPM++ SDE's Brownian tree costs ms a query (here and in diffusers),
# and diffusers' KDPM2 / UniPC classes build beta sigmas for 1000 steps when made
FEW = {
    # a checkpoint's own DPMSolverSDEScheduler stating its noise_sampler_seed: one tree over the batch, as diffusers
    "sde_seeded": ("DPMSolverSDEScheduler", dict(_SCALED, noise_sampler_seed=1234, timestep_spacing="leading",
                                                 steps_offset=1), SDE),
    # beta sigmas (Lee et al. 2024), in every class that takes them (DPM2 a builds them as DPM2: one of the two)
    "beta": ("EulerDiscreteScheduler", dict(_SCALED, use_beta_sigmas=True, timestep_spacing="trailing"),
             ("euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde", "deis", "unipc", "dpmpp_sde")),
    "unipc3_beta_min": (_UNIPC, dict(_SCALED, solver_order=3, use_beta_sigmas=True, final_sigmas_type="sigma_min",
                                     prediction_type="v_prediction"), ("unipc",)),
}  # fmt: skip
# Pairs sdrt refuses: LCM, Heun, DPM2 and DPM++ SDE would build other betas than the checkpoint's (their defaults
# differ); PNDM, Heun, DPM2, DPM++ SDE and DEIS have no zero-SNR rescale (their betas would differ too); diffusers'
# PNDM, Euler ancestral, DPM2 and DPM++ SDE raise on x0-prediction, and every class on Karras and exponential (or
# beta) sigmas at once.
BETAS_DIFFER = {(c, s) for c in ("linspace", "zsnr") for s in ("heun", "dpm2", "dpm2_a", *SDE)} | {
    ("linspace", "lcm"), ("zsnr", "pndm"), ("zsnr", "deis")}  # fmt: skip
REFUSED = (
    BETAS_DIFFER
    | {(c, s) for c in ("exp", "beta") for s in SAMPLERS if s.startswith("dpm") and s.endswith("karras")}
    | {("x0", s) for s in ("pndm", "euler_a", "dpm2", "dpm2_a", *SDE)}
)
CASES = [
    (c, s, n, st)
    for c in CONFIGS
    for s in SAMPLERS
    for n in (1, 4, 25)
    for st in (1.0, 0.6)
    if n * st >= 1
    and (c, s) not in REFUSED
    and s not in SDE
    and (c, n, s.endswith("karras") and s.startswith("dpm")) != ("zsnr", 25, True)
]
CASES += [("sd15", s, 50, 1.0) for s in SAMPLERS if s not in SDE]
CASES += [(c, s, n, st) for c, (_, _, ss) in ONLY.items() for s in ss for n in (1, 4, 25) for st in (1.0, 0.6)
          if n * st >= 1]  # fmt: skip
# DPM++ SDE with sdrt's seeding (a tree per image from the request's seed; diffusers given those seeds) on the
# configs' spacings, predictions and sigma kinds, and with the checkpoint's own noise_sampler_seed; beta sigmas
FEW_CASES = [("sd15", "dpmpp_sde", 1, 1.0), ("sd15", "dpmpp_sde", 4, 1.0), ("sd15", "dpmpp_sde", 6, 0.6),
             ("sd15", "dpmpp_sde_karras", 4, 1.0), ("sd2v", "dpmpp_sde", 4, 1.0), ("sdxl", "dpmpp_sde_karras", 6, 0.6),
             ("turbo", "dpmpp_sde", 4, 1.0), ("exp", "dpmpp_sde", 6, 0.6), ("sde_seeded", "dpmpp_sde", 4, 1.0),
             ("sde_seeded", "dpmpp_sde_karras", 6, 0.6), ("sde_seeded", "dpmpp_sde_karras", 5, 1.0),
             ("unipc3_beta_min", "unipc", 6, 0.6)]  # fmt: skip
FEW_CASES += [("beta", s, *[(4, 1.0), (6, 0.6)][k % 2]) for k, s in enumerate(FEW["beta"][2])]
CASES += FEW_CASES


def entry(cls: str, cfg: dict) -> dict:
    """The manifest's scheduler entry, as `sdrt export` writes it from the checkpoint's scheduler."""
    sched = getattr(diffusers, cls).from_config(cfg)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(sched.config).items()}
    return {"class": cls, "config": config, "betas": [float(b) for b in sched.betas]}


def entry_for(name: str) -> dict:
    return entry(*CONFIGS[name]) if name in CONFIGS else entry(*{**ONLY, **FEW}[name][:2])


def fake_unet(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for the U-Net (its output read as eps, v or x0)."""
    t = torch.as_tensor(t).float()
    return 0.6 * torch.tanh(x_in) + 0.1 * torch.sin(x_in * 3 + t / 150) + 0.02 * (t / 1000)


def init_latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * 0.8


def run_diffusers(name: str, sampler: str, steps: int, strength: float):
    """The reference: the scheduler as StableDiffusion(Img2Img)Pipeline drives it. -> ([(t, x_in)], latents)."""
    cls, fixed = SCHEDULERS[sampler]
    config = entry_for(name)["config"]
    if cls == "DPMSolverSDEScheduler" and config.get("noise_sampler_seed") is None:  # sdrt: the seed per image
        fixed = dict(fixed, noise_sampler_seed=[SEED + j for j in range(SHAPE[0])])
    sched = getattr(diffusers, cls).from_config(config, **fixed)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(SEED)
    timesteps = sched.timesteps
    if strength == 1.0:
        latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(init_latents(), torch.randn(SHAPE, generator=g), timesteps[:1])
    extra = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    calls = []
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t)
        calls.append((float(torch.as_tensor(t).float()), x_in))  # (the U-Net reads float32)
        latents = sched.step(fake_unet(x_in, t), t, latents, **extra, return_dict=False)[0]
    return calls, latents


def run_sdrt(name: str, sampler: str, steps: int, strength: float):
    schedule = NoiseSchedule.from_manifest(entry_for(name))
    plan = make_plan(sampler, schedule, steps, strength)
    g = torch.Generator().manual_seed(SEED)
    x = start_latents(plan, torch.randn(SHAPE, generator=g), None if strength == 1.0 else init_latents())
    noise = step_noise(plan, SHAPE, g, SEED)  # after noise0, in diffusers' order (or the Brownian tree's)
    calls = []

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        x_in = x * plan.c_in[i]
        calls.append((float(plan.timesteps[i]), x_in))
        return to_x0(x, fake_unet(x_in, plan.timesteps[i]), plan.sigmas[i], schedule.prediction_type)

    return calls, sample(plan, denoise, x, noise)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,sampler,steps,strength", CASES, ids=[f"{c}-{s}-{n}-{st}" for c, s, n, st in CASES])
def test_matches_diffusers(name, sampler, steps, strength):
    ref_calls, ref = run_diffusers(name, sampler, steps, strength)
    calls, out = run_sdrt(name, sampler, steps, strength)
    assert [t for t, _ in calls] == [t for t, _ in ref_calls]  # same number of U-Net calls, same timesteps exactly
    for i, ((_, x_in), (_, ref_in)) in enumerate(zip(calls, ref_calls, strict=True)):
        atol = 1e-5 * max(1.0, float(ref_in.abs().max()))  # float32 rounding scales with the values (SDE noise)
        torch.testing.assert_close(x_in, ref_in, rtol=1e-4, atol=atol, msg=lambda m, i=i: f"model input {i}: {m}")
    assert torch.isfinite(ref).all()
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("name,sampler", sorted(REFUSED))
def test_refuses_what_diffusers_cannot_match(name, sampler):
    cls, fixed = SCHEDULERS[sampler]
    if (name, sampler) in BETAS_DIFFER:  # diffusers runs, but on other betas than the checkpoint was trained with
        reference = getattr(diffusers, cls).from_config(entry_for(name)["config"], **fixed)
        assert not torch.equal(reference.betas, torch.tensor(entry_for(name)["betas"]))
    else:
        with pytest.raises((ValueError, NotImplementedError)):
            run_diffusers(name, sampler, 4, 1.0)
    with pytest.raises(ValueError, match=sampler):
        make_plan(sampler, NoiseSchedule.from_manifest(entry_for(name)), 4)


@pytest.mark.parametrize(
    "sampler,steps,strength,match",
    [
        ("dpm_fast", 4, 1.0, "unknown sampler 'dpm_fast'; choose one of ddim"),
        ("euler", 0, 1.0, "steps"),
        ("euler", -2, 1.0, "steps"),
        ("euler", 2.5, 1.0, "steps"),
        ("euler", True, 1.0, "steps"),
        ("euler", 1001, 1.0, "cannot exceed"),
        ("euler", 4, 0.0, "strength"),
        ("euler", 4, 1.5, "strength"),
        ("euler", 4, -0.5, "strength"),
        ("euler", 4, 0.2, "runs no step; raise --strength"),  # int(4 * 0.2) == 0: diffusers would run nothing
        ("lcm", 41, 1.0, r"steps \(41\) <= original_inference_steps \(40\)"),
    ],
)
def test_bad_requests_raise(sampler, steps, strength, match):
    schedule = NoiseSchedule.from_manifest(entry_for("lcm"))
    with pytest.raises(ValueError, match=match) as err:
        make_plan(sampler, schedule, steps, strength)
    assert isinstance(err.value, SdrtError) and "\n" not in str(err.value)  # the CLI prints it on one line


@pytest.mark.parametrize(
    "cls,cfg,sampler,key",
    [
        ("DDIMScheduler", dict(thresholding=True), "ddim", "thresholding"),
        ("DDIMScheduler", dict(rescale_betas_zero_snr=True, skip_prk_steps=True), "pndm", "rescale_betas_zero_snr"),
        ("UniPCMultistepScheduler", dict(predict_x0=False), "unipc", "predict_x0"),
        ("UniPCMultistepScheduler", dict(solver_order=4), "unipc", "solver_order"),
        ("UniPCMultistepScheduler", dict(use_flow_sigmas=True), "unipc", "use_flow_sigmas"),
        ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), "euler", "interpolation_type"),
        ("DPMSolverMultistepScheduler", dict(solver_order=3), "dpmpp_2m", "solver_order"),
        (
            "DPMSolverMultistepScheduler",
            dict(algorithm_type="sde-dpmsolver++", solver_type="heun"),
            "dpmpp_2m_sde",
            "solver_type",
        ),
        ("DDPMScheduler", dict(variance_type="learned_range"), "dpmpp_2m", "variance_type"),  # variance channels
        # a config that never states skip_prk_steps (like sdrt's own random-weight SDXL preset): PNDM's default
        # is the Runge-Kutta warm-up, which is not implemented
        ("EulerDiscreteScheduler", dict(_SCALED, timestep_spacing="leading"), "pndm", "skip_prk_steps"),
    ],
)
def test_unsupported_options_raise(cls, cfg, sampler, key):
    schedule = NoiseSchedule.from_manifest(entry(cls, cfg))
    with pytest.raises(ValueError, match=f"{key}="):
        make_plan(sampler, schedule, 4)


@pytest.mark.parametrize("module,name,sampler", [("scipy", "beta", "euler"), ("torchsde", "sd15", "dpmpp_sde")])
def test_a_missing_optional_dependency_is_one_line_naming_the_install(monkeypatch, module, name, sampler):
    """Beta sigmas need scipy, DPM++ SDE's Brownian tree torchsde: imported only where used (sdrt[samplers])."""
    schedule = NoiseSchedule.from_manifest(entry_for(name))
    monkeypatch.setitem(sys.modules, module, None)  # its import fails, as where it is not installed
    with pytest.raises(SdrtError, match=f"pip install {module}, or sdrt\\[samplers\\]") as err:
        step_noise(make_plan(sampler, schedule, 4), SHAPE, torch.Generator(), SEED)
    assert "\n" not in str(err.value)


def test_sde_noise_of_image_j_is_the_one_image_request_with_seed_plus_j():
    """Without the checkpoint's noise_sampler_seed, each image has its own tree, seeded as the web UI seeds them."""
    plan = make_plan("dpmpp_sde", NoiseSchedule.from_manifest(entry_for("sd15")), 3)
    batch = step_noise(plan, SHAPE, torch.Generator(), SEED)
    assert batch.shape == (4, *SHAPE)
    for j in range(SHAPE[0]):
        assert torch.equal(batch[:, j : j + 1], step_noise(plan, (1, *SHAPE[1:]), torch.Generator(), SEED + j))
    seeded = make_plan("dpmpp_sde", NoiseSchedule.from_manifest(entry_for("sde_seeded")), 3)
    assert torch.equal(step_noise(seeded, SHAPE, torch.Generator(), 1), step_noise(seeded, SHAPE, torch.Generator(), 2))
    cfg = dict(entry_for("sde_seeded")["config"], noise_sampler_seed=[1, 2])  # diffusers' per-image list: refused
    with pytest.raises(ValueError, match="noise_sampler_seed \\[1, 2\\] is not a whole number"):
        make_plan("dpmpp_sde", NoiseSchedule.from_manifest(dict(entry_for("sde_seeded"), config=cfg)), 3)


@pytest.mark.parametrize(
    "cls,cfg,expected",
    [
        ("PNDMScheduler", dict(skip_prk_steps=True), "pndm"),
        ("DDIMScheduler", {}, "ddim"),
        ("EulerDiscreteScheduler", {}, "euler"),
        ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), "euler"),  # Euler's plan honours the key itself
        ("EulerAncestralDiscreteScheduler", {}, "euler_a"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), "dpmpp_2m_karras"),
        ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
        (
            "DPMSolverMultistepScheduler",
            dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
            "dpmpp_2m_sde_karras",
        ),
        ("DPMSolverMultistepScheduler", dict(algorithm_type="deis", final_sigmas_type="sigma_min"), "dpmpp_2m"),
        ("LCMScheduler", {}, "lcm"),
        ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3), "unipc"),
        ("DEISMultistepScheduler", {}, "deis"),
        ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True), "dpm2"),
        ("KDPM2AncestralDiscreteScheduler", {}, "dpm2_a"),
        ("DPMSolverSDEScheduler", dict(noise_sampler_seed=3), "dpmpp_sde"),
        ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True), "dpmpp_sde_karras"),
    ],
)
def test_default_sampler(cls, cfg, expected):
    schedule = NoiseSchedule.from_manifest(entry(cls, dict(_SCALED, **cfg)))
    assert default_sampler(schedule) == expected
    make_plan(expected, schedule, 4)  # and it runs on the checkpoint's own config


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "dpmpp_2m_sde_karras"])
def test_karras_sigmas_that_repeat_timesteps_are_refused_where_diffusers_loses_count(sampler):
    """Zero SNR: sigma_max ~4096, and at 25 steps Karras sigmas round to repeated timesteps; diffusers' scheduler
    then indexes past its sigmas."""
    with pytest.raises(IndexError):
        run_diffusers("zsnr", sampler, 25, 1.0)
    with pytest.raises(ValueError, match="first timestep repeats"):
        make_plan(sampler, NoiseSchedule.from_manifest(entry_for("zsnr")), 25)


def test_unipc_bh1_lands_on_x0_where_diffusers_draws_nan():
    """bh1's B(h) = h is infinite on the step to sigma 0; that first-order step's weight on it multiplies nothing,
    and its limit is the data prediction itself. diffusers computes inf * 0 there. The reference: diffusers' own
    steps up to the last call, then its own x0 of that call (`convert_model_output`)."""
    cfg = dict(_SCALED, solver_type="bh1")
    sched = diffusers.UniPCMultistepScheduler.from_config(entry(_UNIPC, cfg)["config"])
    sched.set_timesteps(6)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    for k, t in enumerate(sched.timesteps):
        out = fake_unet(sched.scale_model_input(latents, t), t)
        if k == len(sched.timesteps) - 1:
            sched._step_index = k  # (its counter, as step() would have it)
            reference = sched.convert_model_output(out, sample=latents)
            assert torch.isnan(sched.step(out, t, latents).prev_sample).all()
        else:
            latents = sched.step(out, t, latents).prev_sample
    schedule = NoiseSchedule.from_manifest(entry(_UNIPC, cfg))
    plan = make_plan("unipc", schedule, 6)
    x = start_latents(plan, torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)))

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        return to_x0(x, fake_unet(x * plan.c_in[i], plan.timesteps[i]), plan.sigmas[i], "epsilon")

    assert rel(sample(plan, denoise, x, torch.empty(0)), reference) < 1e-4


def test_unipc_refuses_a_high_order_last_step_to_sigma_zero():
    cfg = dict(_SCALED, lower_order_final=False)
    sched = diffusers.UniPCMultistepScheduler.from_config(entry(_UNIPC, cfg)["config"])
    sched.set_timesteps(4)
    x = torch.randn(SHAPE)
    for t in sched.timesteps:
        x = sched.step(fake_unet(x, t), t, x).prev_sample
    assert not torch.isfinite(x).all()
    with pytest.raises(ValueError, match="lower_order_final=True"):
        make_plan("unipc", NoiseSchedule.from_manifest(entry(_UNIPC, cfg)), 4)


def test_zero_snr_alpha_space_samplers_refuse_epsilon_models():
    cfg = dict(CONFIGS["zsnr"][1], prediction_type="epsilon")
    for sampler in ("ddim", "lcm"):
        with pytest.raises(ValueError, match="epsilon-predicting model"):
            make_plan(sampler, NoiseSchedule.from_manifest(entry("DDIMScheduler", cfg)), 4)
    make_plan("euler", NoiseSchedule.from_manifest(entry("DDIMScheduler", cfg)), 4)  # diffusers' 2^-24: finite


def test_default_sampler_refuses_a_dpm_algorithm_it_does_not_implement():
    cfg = dict(_SCALED, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    schedule = NoiseSchedule.from_manifest(entry("DPMSolverMultistepScheduler", cfg))
    with pytest.raises(ValueError, match="algorithm_type='dpmsolver', which no sampler .*--sampler: ddim"):
        default_sampler(schedule)


def test_default_sampler_refuses_unknown_classes():
    schedule = NoiseSchedule.from_manifest(entry("DDPMScheduler", _SCALED))
    with pytest.raises(ValueError, match="DDPMScheduler has no matching sampler .*PNDMScheduler.*--sampler"):
        default_sampler(schedule)


@pytest.mark.parametrize("cls", sorted(DEFAULTS))
def test_defaults_table_is_diffusers_signature(cls):
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    assert DEFAULTS[cls] == {k: p.default for k, p in params.items() if k != "self"}


def test_schedule_from_manifest():
    schedule = NoiseSchedule.from_manifest(entry_for("sd2v"))
    assert schedule.prediction_type == "v_prediction"
    assert NoiseSchedule.from_manifest(entry_for("sd15")).prediction_type == "epsilon"
    reference = diffusers.DDIMScheduler.from_config(entry_for("sd2v")["config"]).alphas_cumprod
    assert torch.equal(schedule.alphas_cumprod, reference)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_manifest({"class": "DDIMScheduler", "config": {}})
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_manifest({"class": "DDIMScheduler", "config": {}, "betas": [0.5, 1.5]})


# ------------------------------------------------------------------------------------------ graph safety
_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}
_FACTORIES = {"randn", "randn_like", "rand", "rand_like", "normal", "normal_", "tensor", "as_tensor", "from_numpy"}


class NoHostSync(TorchFunctionMode):
    """Fails on any call that reads a device value on the host or makes a tensor from host data / fresh noise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS | _FACTORIES:
            raise AssertionError(f"not graph-safe: {name}")
        return func(*args, **(kwargs or {}))


def run_on_meta(fn, plan: Plan, prediction: str) -> torch.Tensor:
    """Run `fn(plan, denoise, x, noise)` on meta tensors (no data: any host read raises) under NoHostSync."""
    plan = plan.to("meta")
    x, noise = torch.empty(SHAPE, device="meta"), torch.empty((plan.noise_draws, *SHAPE), device="meta")

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        out = 0.6 * torch.tanh(x * plan.c_in[i]) + plan.timesteps[i] / 1000
        return to_x0(x, out, plan.sigmas[i], prediction)

    with NoHostSync():
        return fn(plan, denoise, x, noise)


@pytest.mark.parametrize(
    "name,sampler", [(c, s) for c in ("sd2v", "linspace") for s in SAMPLERS if (c, s) not in REFUSED]
)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sample_never_syncs(name, sampler, strength):
    schedule = NoiseSchedule.from_manifest(entry_for(name))
    plan = make_plan(sampler, schedule, 6, strength)
    out = run_on_meta(sample, plan, schedule.prediction_type)
    assert out.shape == SHAPE and out.device.type == "meta"


@pytest.mark.parametrize(
    "bad",
    [
        lambda x, s: x * s.item(),
        lambda x, s: x * float(s),
        lambda x, s: x if s > 0 else -x,
        lambda x, s: x * s.tolist(),
        lambda x, s: x + torch.randn(SHAPE),
        lambda x, s: x * torch.tensor([1.0, 2.0])[0],
    ],
)
def test_sync_check_catches_host_reads(bad):
    """The check above fails for the things a graph-captured loop must not do."""
    plan = make_plan("euler", NoiseSchedule.from_manifest(entry_for("sd15")), 2)
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
        run_on_meta(lambda p, d, x, n: bad(d(x, 0), p.sigmas[0]), plan, "epsilon")
