"""The checkpoint's noise schedule, and the timesteps/sigmas diffusers' schedulers derive from it.

Everything here runs on the host, once per request shape. The functions mirror `set_timesteps` of the diffusers
scheduler each sampler agrees with (diffusers 0.42), operation for operation in numpy / torch float32 where that
decides the bits, so that the timesteps fed to the U-Net are the same numbers. diffusers is never imported.

A checkpoint's scheduler config is honoured the way `TargetScheduler.from_config(config)` honours it: keys the
config states explicitly win, everything else (including keys listed in `_use_default_values`, which the
checkpoint never stated) takes the target class's own default. Options no sampler here implements raise
`ScheduleError` naming the option, instead of being silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdrt.runtime.errors import SdrtError


class ScheduleError(SdrtError, ValueError):
    """A sampler / schedule request that cannot be honoured (a `ValueError` and a one-line `SdrtError`)."""


# Every __init__ argument of the diffusers schedulers the samplers mirror, with its default (diffusers 0.42).
_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_SIGMA_KINDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
# fmt: off
DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _BETAS, **_THRESHOLD, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False,
    ),
    "PNDMScheduler": dict(
        _BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    ),
    "EulerDiscreteScheduler": dict(
        _BETAS, **_SIGMA_KINDS, prediction_type="epsilon", interpolation_type="linear", sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero",
    ),
    "EulerAncestralDiscreteScheduler": dict(
        _BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    ),
    "DPMSolverMultistepScheduler": dict(
        _BETAS, **_THRESHOLD, **_SIGMA_KINDS, solver_order=2, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True, euler_at_final=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    ),
    "HeunDiscreteScheduler": dict(
        _BETAS, **_SIGMA_KINDS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    ),
    "LCMScheduler": dict(
        _BETAS, **_THRESHOLD, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
        steps_offset=0, prediction_type="epsilon", timestep_spacing="leading", timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    ),
    **dict.fromkeys(("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"), dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, **_SIGMA_KINDS, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )),
    "DPMSolverSDEScheduler": dict(
        _BETAS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", **_SIGMA_KINDS,
        noise_sampler_seed=None, timestep_spacing="linspace", steps_offset=0,
    ),
    "DEISMultistepScheduler": dict(
        _BETAS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, algorithm_type="deis", solver_type="logrho",
        lower_order_final=True, **_SIGMA_KINDS, use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace",
        steps_offset=0, use_dynamic_shifting=False, time_shift_type="exponential",
    ),
    "UniPCMultistepScheduler": dict(
        _BETAS, **_SIGMA_KINDS, solver_order=2, prediction_type="epsilon", **_THRESHOLD, predict_x0=True,
        solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None, use_flow_sigmas=False,
        flow_shift=1.0, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
        sigma_max=None, shift_terminal=None,
    ),
}
# fmt: on

# sampler -> (diffusers class it agrees with, config keys the sampler's name fixes)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=False, algorithm_type="dpmsolver++")),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, algorithm_type="dpmsolver++")),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=False, algorithm_type="sde-dpmsolver++")),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
    ),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", dict(use_karras_sigmas=False)),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True)),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}

_SPACINGS = ("leading", "trailing", "linspace")
# DDPM's variance types: DPM-Solver reads only "learned" / "learned_range" (a model output with variance channels)
_FIXED_VARIANCE = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_COMMON = {"thresholding": (False,), "timestep_spacing": _SPACINGS}
# Options each class accepts, with the values the samplers implement. Anything else is refused by name.
# fmt: off
SUPPORTED: dict[str, dict[str, tuple]] = {
    "DDIMScheduler": dict(_COMMON, prediction_type=_PREDICTIONS),
    "PNDMScheduler": dict(_COMMON, prediction_type=("epsilon", "v_prediction"), skip_prk_steps=(True,)),
    "EulerDiscreteScheduler": dict(
        _COMMON, prediction_type=_PREDICTIONS, interpolation_type=("linear",), timestep_type=("discrete",),
        final_sigmas_type=("zero", "sigma_min"),
    ),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, prediction_type=("epsilon", "v_prediction")),
    "DPMSolverMultistepScheduler": dict(
        _COMMON, prediction_type=_PREDICTIONS, solver_order=(2,), algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
        solver_type=("midpoint", "logrho", "bh1", "bh2"), use_lu_lambdas=(False,), use_flow_sigmas=(False,),
        variance_type=_FIXED_VARIANCE, final_sigmas_type=("zero", "sigma_min"),
    ),
    "HeunDiscreteScheduler": dict(_COMMON, prediction_type=_PREDICTIONS),
    "LCMScheduler": dict(_COMMON, prediction_type=_PREDICTIONS),
    **dict.fromkeys(("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"),
                    dict(_COMMON, prediction_type=("epsilon", "v_prediction"))),
    "DPMSolverSDEScheduler": dict(_COMMON, prediction_type=("epsilon", "v_prediction")),
    # DPM-Solver's algorithm and solver types are read as DEIS's own ("deis", "logrho"), as diffusers does
    "DEISMultistepScheduler": dict(
        _COMMON, prediction_type=_PREDICTIONS, solver_order=(1, 2, 3),
        algorithm_type=("deis", "dpmsolver", "dpmsolver++"), solver_type=("logrho", "midpoint", "heun", "bh1", "bh2"),
        use_flow_sigmas=(False,), use_dynamic_shifting=(False,),
    ),
    # solver types other than bh1 / bh2 are DPM-Solver's, which diffusers' UniPC reads as bh2
    "UniPCMultistepScheduler": dict(
        _COMMON, prediction_type=_PREDICTIONS, solver_order=(1, 2, 3), predict_x0=(True,),
        solver_type=("bh1", "bh2", "midpoint", "heun", "logrho"), solver_p=(None,), use_flow_sigmas=(False,),
        use_dynamic_shifting=(False,), final_sigmas_type=("zero", "sigma_min"),
    ),
}
# fmt: on
_WHY = {
    "skip_prk_steps": "PNDM's Runge-Kutta warm-up is not implemented (every Stable Diffusion config sets "
    "skip_prk_steps=True)",
    "thresholding": "dynamic thresholding is meant for pixel-space models, not latent diffusion",
    "predict_x0": "UniPC's noise-prediction form is not implemented; its default predict_x0=True is",
}


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The checkpoint's training noise schedule and scheduler settings, read from the engine manifest."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32: cumprod(1 - betas), as diffusers computes it
    config: dict  # the checkpoint's scheduler config, diffusers keys (may hold `_use_default_values`)
    scheduler_class: str  # the checkpoint's own scheduler, e.g. "PNDMScheduler"

    @classmethod
    def from_manifest(cls, entry: dict) -> NoiseSchedule:
        """`entry` = manifest["scheduler"]: {"class": ..., "config": {...}, "betas": [float] * num_train_timesteps}."""
        try:
            name, config, betas = str(entry["class"]), dict(entry["config"]), entry["betas"]
        except (KeyError, TypeError) as err:
            raise ScheduleError(f"the manifest's scheduler entry lacks {err}; re-run `sdrt export`") from None
        betas = torch.tensor(betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ScheduleError("the manifest's scheduler betas are not a list of numbers in (0, 1]; re-run export")
        return cls(torch.cumprod(1.0 - betas, dim=0), config, name)

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts: "epsilon" | "v_prediction" | "sample" (the same default in every class)."""
        kind = self.config_for(self.scheduler_class).get("prediction_type", "epsilon")
        if kind not in _PREDICTIONS:
            raise ScheduleError(f"prediction_type {kind!r} is not supported (one of {', '.join(_PREDICTIONS)})")
        return kind

    def config_for(self, scheduler_class: str, **overrides: Any) -> dict[str, Any]:
        """The config `scheduler_class.from_config(self.config, **overrides)` ends up with.

        Defaults of the class, then every key the checkpoint stated explicitly (kept even when the class does not
        take it, as diffusers keeps such "hidden" keys in `.config`), then `overrides`.
        """
        implicit = set(self.config.get("_use_default_values", ()))
        stated = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in implicit}
        return {**DEFAULTS.get(scheduler_class, {}), **stated, **overrides}


def default_sampler(schedule: NoiseSchedule) -> str:
    """The sampler matching the checkpoint's own scheduler class (an explicit table). A class without one raises,
    naming the samplers that do run on this schedule: the directory stays usable with an explicit sampler."""
    name = schedule.scheduler_class
    if name == "DPMSolverMultistepScheduler":
        cfg = schedule.config_for(name)
        algorithm = cfg.get("algorithm_type")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++", "deis"):  # diffusers reads "deis" as dpmsolver++
            raise ScheduleError(
                f"the checkpoint's {name} uses algorithm_type={algorithm!r}, which no sampler in sdrt implements; "
                f"choose one with --sampler: {', '.join(runnable_samplers(schedule))}",
                field="sampler",
            )
        sde = "_sde" if algorithm == "sde-dpmsolver++" else ""
        return f"dpmpp_2m{sde}{'_karras' if cfg.get('use_karras_sigmas') else ''}"
    if name == "DPMSolverSDEScheduler":
        return f"dpmpp_sde{'_karras' if schedule.config_for(name).get('use_karras_sigmas') else ''}"
    table = {cls: sampler for sampler, (cls, fixed) in SCHEDULERS.items() if not fixed}
    if name not in table:
        usable = ", ".join(runnable_samplers(schedule)) or "none: re-export with another scheduler"
        raise ScheduleError(
            f"the checkpoint's scheduler {name} has no matching sampler in sdrt (it has samplers for "
            f"{', '.join(sorted(table))}); choose one with --sampler: {usable}",
            field="sampler",
        )
    return table[name]


def runnable_samplers(schedule: NoiseSchedule) -> list[str]:
    """The samplers whose scheduler class can honour this checkpoint's schedule and options (`resolve`)."""
    out = []
    for sampler in SCHEDULERS:
        try:
            resolve(schedule, sampler)
        except ScheduleError:
            continue
        out.append(sampler)
    return out


def resolve(schedule: NoiseSchedule, sampler: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class, its config) for `sampler` on this checkpoint; refuses options no sampler implements."""
    cls, fixed = SCHEDULERS[sampler]
    cfg = schedule.config_for(cls, **fixed)
    for key, allowed in SUPPORTED[cls].items():
        if key in DEFAULTS[cls] and cfg[key] not in allowed:  # (a key the class does not take is ignored)
            why = _WHY.get(key, f"supported: {', '.join(map(repr, allowed))}")
            raise ScheduleError(
                f"sampler {sampler!r}: {cls} option {key}={cfg[key]!r} is not supported ({why}); "
                "pick another --sampler",
                field="sampler",
            )
    kinds = [key for key in _SIGMA_KINDS if key in DEFAULTS[cls] and cfg[key]]
    if len(kinds) > 1:  # diffusers' schedulers refuse the pair too
        raise ScheduleError(
            f"sampler {sampler!r}: {cls} takes one of {' and '.join(kinds)}, not both; pick another "
            "--sampler (one without Karras in its name, for a checkpoint with exponential or beta "
            "sigmas)",
            field="sampler",
        )
    # the betas in the manifest are the checkpoint class's; a class that would build different ones cannot agree
    own = schedule.config_for(schedule.scheduler_class) if schedule.scheduler_class in DEFAULTS else cfg
    for key in _BETAS:
        if cfg[key] != own.get(key, cfg[key]):
            raise ScheduleError(
                f"sampler {sampler!r}: {cls} would use {key}={cfg[key]!r}, but the checkpoint's betas "
                f"come from {key}={own[key]!r}; pick another --sampler"
            )
    # zero terminal SNR: a class without the option (PNDM) builds its betas without the rescale
    rescales = bool(cfg["rescale_betas_zero_snr"]) if "rescale_betas_zero_snr" in DEFAULTS[cls] else False
    if rescales != bool(own.get("rescale_betas_zero_snr", False)):
        raise ScheduleError(
            f"sampler {sampler!r}: the checkpoint's betas are rescaled to zero terminal SNR "
            f"(rescale_betas_zero_snr=True), which {cls} does not do (diffusers' would use other betas); pick another "
            "--sampler",
            field="sampler",
        )
    if cfg["num_train_timesteps"] != len(schedule.alphas_cumprod):
        raise ScheduleError(
            f"the config's num_train_timesteps ({cfg['num_train_timesteps']}) differs from the "
            f"{len(schedule.alphas_cumprod)} betas in the manifest; re-run `sdrt export`"
        )
    return cls, cfg


ZERO_SNR_ALPHA = 2.0**-24  # diffusers' stand-in for a zero terminal alpha_bar (Euler, DPM): the first sigma ~4096
ALPHA_SPACE_ZERO = 2.0**-60  # DDIM's and LCM's exact 0, as near as sigma space holds it: the first sigma ~2^30


def sampling_alphas(schedule: NoiseSchedule, sampler: str) -> torch.Tensor:
    """alpha_bar as ``sampler`` reads it. A zero-terminal-SNR schedule's last alpha_bar is exactly 0 (an infinite
    sigma; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.1): diffusers'
    Euler and DPM-Solver schedulers replace it by 2^-24, and so do their samplers here; DDIM and LCM keep the 0 in
    diffusers (alpha space), here 2^-60, whose x0 and eps at that step equal the exact ones to float32 precision
    (c_in = 2^-30 and the start scale 2^30 are exact). Such a step needs a v-prediction model (`check_zero_snr`)."""
    ac = schedule.alphas_cumprod
    if float(ac[-1]) > 0:
        return ac
    ac = ac.clone()
    ac[-1] = ALPHA_SPACE_ZERO if sampler in ("ddim", "lcm") else ZERO_SNR_ALPHA
    return ac


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, float32 as diffusers has it."""
    return np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def spaced_timesteps(cfg: dict[str, Any], steps: int) -> np.ndarray:
    """DDIM / PNDM / Euler `timestep_spacing`, descending, as float64 (integral except Euler's "linspace")."""
    n_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (n_train // steps))[::-1].astype(np.float64) + cfg["steps_offset"]
    return np.round(np.arange(n_train, 0, -n_train / steps)) - 1  # trailing


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating log-sigma (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigma.shape)


def sigma_kind(cfg: dict[str, Any]) -> str | None:
    """The spacing of sigmas the config asks for: "karras", "exponential", "beta"; or None."""
    return next((k for k in ("karras", "exponential", "beta") if cfg.get(f"use_{k}_sigmas")), None)


def spaced_sigmas(cfg: dict[str, Any], kind: str, sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """`steps` sigmas from sigma_max down to sigma_min (a config's own sigma_min / sigma_max win): Karras et al.
    2022 (EDM), eq. 5 with rho = 7; evenly spaced in log sigma ("exponential"); or at the quantiles of a
    Beta(0.6, 0.6) distribution ("beta": Lee et al. 2024, "Beta Sampling is All You Need"), as diffusers'
    `_convert_to_*`. Beta sigmas need scipy (`scipy.stats.beta.ppf`, as diffusers computes them)."""
    lo = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else sigma_min
    hi = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else sigma_max
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    if kind == "beta":
        try:
            from scipy import stats
        except ImportError:
            raise ScheduleError(
                "beta sigmas (use_beta_sigmas=True) need scipy: pip install scipy, or sdrt[samplers]", field="sampler"
            ) from None
        return lo + stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6) * (hi - lo)
    ramp, rho = np.linspace(0, 1, steps), 7.0
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _final_sigma(cfg: dict[str, Any], alphas_cumprod: torch.Tensor) -> Any:
    if cfg["final_sigmas_type"] == "sigma_min":
        return ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    return 0


def euler_schedule(
    cfg: dict[str, Any], alphas_cumprod: torch.Tensor, steps: int, ancestral: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 [n], sigmas float32 [n+1]) of EulerDiscreteScheduler (or EulerAncestralDiscreteScheduler,
    which has neither Karras / exponential / beta sigmas nor final_sigmas_type, whatever the config says)."""
    timesteps = spaced_timesteps(cfg, steps).astype(np.float32)
    train = train_sigmas(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    kind = None if ancestral else sigma_kind(cfg)
    if kind:
        sigmas = spaced_sigmas(cfg, kind, sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).astype(np.float32)
    final = 0.0 if ancestral else _final_sigma(cfg, alphas_cumprod)
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


def dpm_schedule(
    cfg: dict[str, Any], alphas_cumprod: torch.Tensor, steps: int, variant: str = "dpm"
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 [n], sigmas float32 [n+1]) of DPMSolverMultistepScheduler.set_timesteps, or of its
    relatives' (`variant` "unipc", "deis": no lambda_min_clipped, Karras timesteps rounded whatever the betas;
    UniPC's "sigma_min" and DEIS's Karras / exponential / beta ending repeat the last sigma; DEIS otherwise
    always ends at the training sigma_min)."""
    n_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = cfg["lambda_min_clipped"] if variant == "dpm" else -float("inf")
    last = n_train - int(torch.searchsorted(torch.flip(lambda_t, [0]), clipped))
    if spacing == "linspace":
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg["steps_offset"]
    else:
        timesteps = np.arange(last, 0, -n_train / steps).round().copy().astype(np.int64) - 1
    train = train_sigmas(alphas_cumprod)
    kind = sigma_kind(cfg)
    if kind:
        sigmas = spaced_sigmas(cfg, kind, float(train[0]), float(train[-1]), steps)
        timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
        if kind == "karras" and (variant != "dpm" or cfg["beta_schedule"] != "squaredcos_cap_v2"):
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)  # (diffusers' int64 tensor: truncated where not rounded)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    if variant == "deis":
        final = sigmas[-1] if kind else ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
    elif variant == "unipc" and kind and cfg["final_sigmas_type"] == "sigma_min":
        final = sigmas[-1]
    else:
        final = _final_sigma(cfg, alphas_cumprod)
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


def lcm_timesteps(cfg: dict[str, Any], steps: int) -> np.ndarray:
    """LCMScheduler.set_timesteps: `steps` evenly skipped from the distillation schedule (int64, descending)."""
    n_train, original = cfg["num_train_timesteps"], cfg["original_inference_steps"]
    if steps > original or original > n_train:
        raise ScheduleError(
            f"lcm needs steps ({steps}) <= original_inference_steps ({original}) <= num_train_timesteps ({n_train})"
        )
    origin = (np.arange(1, original + 1) * (n_train // original) - 1)[::-1].copy()
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[index]


def lcm_scalings(cfg: dict[str, Any], timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consistency-model boundary condition c_skip(t), c_out(t) with sigma_data = 0.5 (Song et al. 2023, eq. 3)."""
    t = torch.from_numpy(timesteps) * cfg["timestep_scaling"]
    c_skip = 0.5**2 / (t**2 + 0.5**2)
    c_out = t / (t**2 + 0.5**2) ** 0.5
    return c_skip.double().numpy(), c_out.double().numpy()


def alpha_at(alphas_cumprod: torch.Tensor, final: float, t: int) -> float:
    """alpha_bar at an integer timestep; negative timesteps (past the end) take the final alpha, as DDIM/PNDM do."""
    if t >= len(alphas_cumprod):  # e.g. 1000 "leading" steps with steps_offset 1 (diffusers fails with IndexError)
        raise ScheduleError(f"timestep {t} lies past the {len(alphas_cumprod)} training timesteps; use fewer steps")
    return float(alphas_cumprod[t]) if t >= 0 else final


def sigma_of(alpha: float) -> float:
    return math.sqrt((1.0 - alpha) / alpha)
