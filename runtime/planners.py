"""Plans: all host-side work of a request shape, done once before the sampling loop (runtime/samplers.py).

`make_plan` mirrors `set_timesteps` and the per-step arithmetic of the diffusers scheduler each sampler agrees with
(`Cls.from_config(checkpoint_config)`): the U-Net timestep and sigma of every model call, the model-input scale,
the start and end scales, the solver orders, and each sampler's per-step coefficients, as host tensors that are
moved to the device once (`Plan.to`). What the loop may branch on (orders, counts) is host structure, fixed here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sdrt.runtime import schedule as sch
from sdrt.runtime.noise import Brownian
from sdrt.runtime.schedule import NoiseSchedule, ScheduleError


@dataclass
class Plan:
    """Everything a sampler needs for one (schedule, sampler, steps, strength), fixed before the loop runs."""

    sampler: str
    timesteps: torch.Tensor  # [n_calls] float32: the U-Net `timestep` of each model call, as diffusers feeds it
    sigmas: torch.Tensor  # [n_calls + 1] float32: sigma at each call, then the final sigma
    c_in: torch.Tensor  # [n_calls] float32: model input scale, x_in = x * c_in[i] = x / sqrt(sigma^2 + 1)
    init_sigma: float  # txt2img: x_start = noise * init_sigma (reproduces diffusers' `latents * init_noise_sigma`)
    noise_draws: int  # randn(latent shape) draws after the initial latents, in diffusers' order (or `brownian`'s)
    out_scale: float = 1.0  # latents diffusers hands to the VAE = x_final * out_scale (1/sqrt(sigma_last^2+1);
    #                         1 for Euler-family schedulers, which keep their latents in sigma space)
    clip: float | None = None  # clamp x0 to [-clip, clip] where diffusers clips it (clip_sample), else None
    orders: tuple[int, ...] = ()  # DPM++ 2M, UniPC: solver order of each step (host structure, fixed per plan)
    corrections: tuple[int, ...] = ()  # UniPC: the corrector's order before each step (0: none)
    coef: dict[str, torch.Tensor] = field(default_factory=dict)  # sampler-specific per-step scalars, [n_calls] each
    brownian: Brownian | None = None  # DPM++ SDE: the noise draws are a Brownian tree's increments
    in_scale: float = 1.0  # a hand-off's start (denoising_start): x = diffusers' latents * in_scale

    def to(self, device: torch.device | str) -> Plan:
        move = {k: getattr(self, k).to(device) for k in ("timesteps", "sigmas", "c_in")}
        return dataclasses.replace(self, **move, coef={k: v.to(device) for k, v in self.coef.items()})


# where diffusers' latents are the sigma-space state itself (the Euler family); the others keep alpha space
SIGMA_SPACE = ("euler", "euler_a", "heun", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_sde_karras")
# the samplers whose schedule a hand-off may cut (one U-Net call a step; LCM's steps end in its boundary condition)
HANDOFF = (
    "ddim",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "deis",
    "unipc",
)


def make_plan(
    sampler: str,
    schedule: NoiseSchedule,
    steps: int,
    strength: float = 1.0,
    eta: float = 0.0,
    end: float | None = None,
    begin: float | None = None,
) -> Plan:
    """The host-side plan for `steps` steps (img2img: `strength` < 1, as StableDiffusionImg2ImgPipeline cuts it);
    ``eta``: DDIM's (diffusers' ``eta``: 0 is deterministic DDIM, 1 the DDPM variance); other samplers ignore it, as
    diffusers' pipelines do. ``end``: diffusers' ``denoising_end``, the plan stops where a refiner takes over and
    hands its latents over as diffusers' scheduler holds them; ``begin``: ``denoising_start``, the refiner's plan,
    from those latents (no noise added, as SDXL's img2img pipeline takes them)."""
    if end is None and begin is None:
        return _make_plan(sampler, schedule, steps, strength, eta)
    if sampler not in HANDOFF:
        raise ScheduleError(
            f"sampler {sampler!r} cannot hand over to a refiner here (two U-Net calls a step, or "
            f"LCM's boundary steps); use one of: {', '.join(HANDOFF)}",
            field="sampler",
        )
    full = _make_plan(sampler, schedule, steps, 1.0, eta)
    train = len(schedule.alphas_cumprod)  # num_train_timesteps
    cutoff = int(round(train - (begin if end is None else end) * train))
    if end is not None:  # SDXL's pipeline: the calls at timesteps >= the cutoff
        k = int((full.timesteps >= cutoff).sum())
        if not 0 < k < len(full.timesteps):
            raise ScheduleError(
                f"the refiner switch at {end:g} of {steps} steps leaves no step to the "
                f"{'refiner' if k else 'base'}; move it or use more steps",
                field="refiner_switch_at",
            )
        out = 1.0 if sampler in SIGMA_SPACE else 1 / math.sqrt(float(full.sigmas[k]) ** 2 + 1)
        cut = dict(
            timesteps=full.timesteps[:k],
            sigmas=full.sigmas[: k + 1],
            c_in=full.c_in[:k],
            out_scale=out,
            coef={n: v[:k] for n, v in full.coef.items()},
            orders=full.orders[:k],
            corrections=full.corrections[:k],
            noise_draws=min(full.noise_draws, k),
        )
        return dataclasses.replace(full, **cut)
    # SDXL's img2img pipeline with denoising_start: the calls at timesteps < the cutoff, the scheduler begun there
    n = int((full.timesteps < cutoff).sum())
    if n < 1:
        raise ScheduleError(
            f"the refiner switch at {begin:g} of {steps} steps leaves the refiner no step; move it or use more steps",
            field="refiner_switch_at",
        )
    plan = _make_plan(sampler, schedule, steps, 1.0, eta, start=steps - n)
    scale = 1.0 if sampler in SIGMA_SPACE else math.sqrt(float(plan.sigmas[0]) ** 2 + 1)
    return dataclasses.replace(plan, in_scale=scale)


def check_plan_args(sampler: str, steps: object, strength: object = 1.0) -> None:
    """The sampler's name, the steps and the strength of a request, checked where the request is made and where its
    plan is: one line naming the field."""
    if sampler not in _PLANNERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {', '.join(_PLANNERS)}", field="sampler")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ScheduleError(f"steps must be a whole number >= 1, got {steps!r}", field="steps")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ScheduleError(f"strength must be in (0, 1], got {strength!r}", field="strength")


def _make_plan(
    sampler: str, schedule: NoiseSchedule, steps: int, strength: float, eta: float, start: int | None = None
) -> Plan:
    check_plan_args(sampler, steps, strength)
    _, cfg = sch.resolve(schedule, sampler)
    if steps > cfg["num_train_timesteps"]:
        raise ScheduleError(
            f"steps ({steps}) cannot exceed the {cfg['num_train_timesteps']} training timesteps", field="steps"
        )
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ScheduleError(
            f"strength {strength} of {steps} steps runs no step; raise --strength to at least "
            f"{1 / steps:.3g} or use more steps",
            field="strength",
        )
    if start is None:  # diffusers' t_start * scheduler.order; every scheduler mirrored has order 1
        start = steps - init_timestep
    if sampler in ("ddim", "lcm") and float(schedule.alphas_cumprod[-1]) == 0 and schedule.prediction_type == "epsilon":
        raise ScheduleError(
            f"sampler {sampler!r} on a zero-terminal-SNR schedule with an epsilon-predicting model: x0 "
            "is undefined at the last timestep (diffusers divides by 0 there); use euler or dpmpp_2m, "
            "or a v-prediction model",
            field="sampler",
        )
    if sampler == "ddim":
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta <= 1:
            raise ScheduleError(f"eta must be a number in [0, 1], got {eta!r}", field="eta")
        return _plan_ddim(sampler, cfg, sch.sampling_alphas(schedule, sampler), steps, start, float(eta))
    return _PLANNERS[sampler](sampler, cfg, sch.sampling_alphas(schedule, sampler), steps, start)


def _f32(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float64).float()


def _plan_sigma_space(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """Euler, Euler ancestral, DPM++ 2M (and its SDE): diffusers' own sigmas; Euler's latents live in sigma space,
    DPM's do not."""
    if sampler.startswith("dpmpp"):
        timesteps, sigmas = sch.dpm_schedule(cfg, ac, steps)
    else:
        timesteps, sigmas = sch.euler_schedule(cfg, ac, steps, ancestral=sampler == "euler_a")
    full = torch.from_numpy(sigmas)  # float32, as diffusers holds them
    sigmas, timesteps, n_all = full[start:], torch.from_numpy(timesteps[start:].astype(np.float32)), len(timesteps)
    if not sampler.startswith("dpmpp"):
        c_in, init = 1 / (sigmas[:-1] ** 2 + 1) ** 0.5, _euler_init_sigma(cfg, full)
        return Plan(sampler, timesteps, sigmas, c_in, init, len(timesteps) if sampler == "euler_a" else 0)
    if start == 0 and int((timesteps == timesteps[0]).sum()) > 1:  # Karras sigmas past the end (zero SNR)
        # diffusers finds its first step by timestep, takes the second of repeated ones and runs past its sigmas
        raise ScheduleError(
            f"sampler {sampler!r}: at {steps} steps its first timestep repeats on this schedule, "
            "where diffusers' scheduler loses count of its steps; use fewer steps or dpmpp_2m "
            "without Karras",
            field="sampler",
        )
    final = cfg["euler_at_final"] or (cfg["lower_order_final"] and n_all < 15) or cfg["final_sigmas_type"] == "zero"
    orders = tuple(1 if j == start or (j == n_all - 1 and final) else 2 for j in range(start, n_all))
    plan = _dpm_family_plan(sampler, timesteps, sigmas, orders=orders)
    if "_sde" not in sampler:
        return plan
    # the SDE solver: per step (sigma_to / sigma) * exp(-h) = (sigma_to / sigma)^2, 1 - exp(-2h), and the noise std
    # sigma_to * sqrt(1 - exp(-2h)); noise drawn at every step, the last too (its std is 0 there)
    s = sigmas.double()
    ratio = s[1:] / s[:-1]
    coef = {"decay": ratio**2, "kept": 1 - ratio**2, "std": s[1:] * (1 - ratio**2).sqrt()}
    return dataclasses.replace(plan, noise_draws=len(timesteps), coef={k: v.float() for k, v in coef.items()})


def _dpm_family_plan(sampler: str, timesteps: torch.Tensor, sigmas: torch.Tensor, **kw) -> Plan:
    """A plan of DPM-Solver's family (DPM++, UniPC, DEIS) from the calls' timesteps and sigmas (float32, the last
    the final sigma): diffusers keeps their latents in alpha space, from plain noise (init_noise_sigma 1)."""
    c_in = 1 / (sigmas[:-1] ** 2 + 1) ** 0.5
    init, out = math.sqrt(float(sigmas[0]) ** 2 + 1), 1 / math.sqrt(float(sigmas[-1]) ** 2 + 1)
    return Plan(sampler, timesteps, sigmas, c_in, init, 0, out_scale=out, **kw)


def _euler_init_sigma(cfg: dict, sigmas: torch.Tensor) -> float:
    """init_noise_sigma of the Euler-family schedulers (Euler, Euler a, Heun): the largest sigma, or
    sqrt(max^2 + 1) with "leading" spacing."""
    top = sigmas.max()
    return float(top if cfg["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5)


def _plan_heun(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """HeunDiscreteScheduler: Euler's timesteps and sigmas (Karras where the config asks), each after the first
    called twice (calls [t0, t1, t1, ..., t_last, t_last], sigmas [s0, s1, s1, ..., s_last, 0]); img2img starts at
    call 2 x start (its order is 2)."""
    own = dict(cfg, final_sigmas_type="zero", sigma_min=None, sigma_max=None)  # Heun has neither option
    timesteps, sigmas = sch.euler_schedule(own, ac, steps, ancestral=False)
    calls = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])[2 * start :]
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])[2 * start :]
    full = torch.from_numpy(sigmas)
    c_in = 1 / (full[:-1] ** 2 + 1) ** 0.5
    timesteps = torch.from_numpy(calls.astype(np.float32))
    return Plan(sampler, timesteps, full, c_in, _euler_init_sigma(cfg, full), 0, clip=_clip(cfg))


def _plan_dpm2(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """KDPM2(Ancestral)DiscreteScheduler: Euler's timesteps and sigmas (Karras timesteps rounded), each step's
    midpoint sigma in log space as diffusers computes it (float32), its timestep by log-sigma interpolation; calls
    [t0, tm0, t1, tm1, ..., t_last] from call 2 x start. Ancestral: the midpoint lies between sigma and sigma_down,
    noise drawn after each second call."""
    own = dict(cfg, final_sigmas_type="zero", sigma_min=None, sigma_max=None)  # neither option in these classes
    timesteps, s = sch.euler_schedule(own, ac, steps, ancestral=False)
    if sch.sigma_kind(cfg) == "karras":
        timesteps = timesteps.round()
    s, n = torch.from_numpy(s), steps
    if sampler == "dpm2_a":
        s_next = torch.cat([s[1:], s.new_zeros(1)])
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        to = (s_next**2 - up**2) ** 0.5
        to[-1] = 0.0
        mid = s.log().lerp(to.log(), 0.5).exp()
        mid[-2:] = 0.0  # (the last step's midpoint is 0: it is Euler's, to sigma 0)
    else:  # the geometric mean of each sigma and the next (diffusers' sigmas.log().lerp(sigmas.roll(1).log()))
        mid = s.log().lerp(s.roll(1).log(), 0.5).exp()[1:]
        to, up = s[1:], torch.zeros(n)
    log_train = torch.from_numpy(np.log(sch.train_sigmas(ac)))  # per sigma, on tensors, as diffusers computes it
    t_mid = np.array([sch.sigma_to_t(m, log_train) for m in mid[: n - 1]], dtype=np.float32).reshape(-1)
    calls = np.stack([timesteps[:-1], t_mid], axis=1).reshape(-1)
    calls = np.concatenate([calls, timesteps[-1:]])[2 * start :].astype(np.float32)
    per_call = torch.stack([s[:n], mid[:n]], dim=1).reshape(-1)  # [s0, mid0, s1, ..., s_last, mid_last = 0]
    sigmas = per_call[2 * start :]
    step_of = torch.arange(2 * start, 2 * n - 1) // 2
    coef = {"to": to[step_of], "up": up[step_of], "blend": s[step_of + 1]}  # blend: diffusers' self.sigmas[i + 1]
    c_in = 1 / (sigmas[:-1] ** 2 + 1) ** 0.5
    draws = n - start - 1 if sampler == "dpm2_a" else 0
    init = _euler_init_sigma(cfg, s)
    return Plan(sampler, torch.from_numpy(calls), sigmas, c_in, init, draws, coef=coef)


def _plan_dpmpp_sde(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """DPMSolverSDEScheduler: each step but the last called twice, at its sigma and at its midpoint in log sigma
    (calls [t0, tm0, t1, ..., t_last], sigmas [s0, mid0, s1, ..., s_last, 0], from call 2 x start); per call but the
    last, its update's coefficients and its noise's Brownian interval (`_sde_update`), the last call Euler's."""
    seed = cfg["noise_sampler_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ScheduleError(
            f"sampler {sampler!r}: noise_sampler_seed {seed!r} is not a whole number; set one, or "
            "null for a tree per image from the request's seed",
            field="sampler",
        )
    timesteps, s = _sde_schedule(cfg, ac, steps)
    sig = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))  # [n + 1], as diffusers holds them
    sigmas, coef, intervals = [], {"decay": [], "kept": [], "up": []}, []
    for k in range(steps - 1):  # 0-d float32 tensors, operation for operation as diffusers' step()
        t, t_next = sig[k].log().neg(), sig[k + 1].log().neg()
        t_mid = t + (t_next - t) * 0.5
        sigmas += [sig[k], t_mid.neg().exp()]
        for to in (t_mid, t_next):  # the first call's update, to the midpoint; the second's, over the whole step
            *update, interval = _sde_update(t, to)
            for key, value in zip(coef, update, strict=True):
                coef[key].append(value)
            intervals.append(interval)
    calls = slice(2 * start, None)
    coef = {k: torch.stack([*v, torch.tensor(0.0)])[calls] for k, v in coef.items()}  # (the last call: Euler's)
    coef["blend"] = sig[torch.arange(2 * start, 2 * steps - 1) // 2 + 1]  # diffusers' add_noise: the step's end
    sigmas = torch.stack([*sigmas, sig[-2], sig[-1]])[calls]
    noise = Brownian((float(sig[-2]), float(sig[0])), tuple(intervals[calls]), seed)  # smallest nonzero, largest
    c_in, init = 1 / (sigmas[:-1] ** 2 + 1) ** 0.5, _euler_init_sigma(cfg, sig)
    ts = torch.from_numpy(timesteps[calls].astype(np.float32))
    return Plan(sampler, ts, sigmas, c_in, init, len(noise.intervals), coef=coef, brownian=noise)


def _sde_schedule(cfg: dict, ac: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverSDEScheduler.set_timesteps -> (every call's timestep [2n - 1], the steps' sigmas [n]), float64:
    Euler's interpolation at unrounded timesteps, Karras / exponential / beta sigmas where the config asks (its
    Karras sigmas read no sigma_min / sigma_max), each midpoint's timestep from its float64 sigma."""
    train = sch.train_sigmas(ac)
    timesteps = sch.spaced_timesteps(cfg, steps)
    s = np.interp(timesteps, np.arange(len(train)), train)
    if kind := sch.sigma_kind(cfg):
        own = dict(cfg, sigma_min=None, sigma_max=None) if kind == "karras" else cfg
        s = sch.spaced_sigmas(own, kind, s[-1].item(), s[0].item(), steps)
        timesteps = np.array([sch.sigma_to_t(v, np.log(train)) for v in s])
    lam = -np.log(s)
    t_mid = np.array([sch.sigma_to_t(v, np.log(train)) for v in np.exp(-(lam[:-1] + np.diff(lam) * 0.5))])
    return np.concatenate([np.stack([timesteps[:-1], t_mid.reshape(-1)], axis=1).reshape(-1), timesteps[-1:]]), s


def _sde_update(t: torch.Tensor, to: torch.Tensor) -> tuple:
    """One ancestral DPM-Solver++(1) step from lambda t to lambda `to` at eta 1, as diffusers' DPMSolverSDEScheduler
    and k-diffusion's sample_dpmpp_sde take it: noise of std sigma_up, the exponential integrator down to
    sigma_down, x <- decay * x + kept * x0 + sigma_up * z. -> (decay, kept, sigma_up, (sigma_from, sigma_to))."""
    s_from, s_to = t.neg().exp(), to.neg().exp()
    up = min(s_to, (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    t_down = ((s_to**2 - up**2) ** 0.5).log().neg()
    return t_down.neg().exp() / s_from, -(t - t_down).expm1(), up, (float(s_from), float(s_to))


def _alpha_plan(sampler: str, timesteps: np.ndarray, alphas: list[float], alpha_last: float, **kw) -> Plan:
    """A plan for an alpha-space scheduler (diffusers' latents are x * sqrt(alpha_bar) of the call's timestep)."""
    sigmas = [sch.sigma_of(a) for a in [*alphas, alpha_last]]
    init = 1 / math.sqrt(alphas[0])  # diffusers starts from plain noise in alpha space: init_noise_sigma = 1
    c_in = _f32([math.sqrt(a) for a in alphas])
    return Plan(sampler, _f32(timesteps), _f32(sigmas), c_in, init, out_scale=math.sqrt(alpha_last), **kw)


def _clip(cfg: dict) -> float | None:
    return float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None


def _plan_ddim(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int, eta: float = 0.0) -> Plan:
    """DDIMScheduler: steps from t to t - T // steps (the final alpha past the end); with eta, the variance of
    diffusers' `_get_variance`, std = eta * sqrt((1 - a_to) / (1 - a) * (1 - a / a_to)), in sigma space / sqrt(a_to)."""
    timesteps = sch.spaced_timesteps(cfg, steps).round().astype(np.int64)[start:]
    stride, final = cfg["num_train_timesteps"] // steps, 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
    alphas = [sch.alpha_at(ac, final, t) for t in timesteps]
    alphas_to = [sch.alpha_at(ac, final, t - stride) for t in timesteps]
    rescale = [math.sqrt(a / b) for a, b in zip(alphas_to, [*alphas[1:], alphas_to[-1]], strict=True)]
    std = [eta * math.sqrt((1 - b) / (1 - a) * (1 - a / b)) for a, b in zip(alphas, alphas_to, strict=True)]
    direction = [math.sqrt(max(1 - b - s * s, 0.0) / b) for b, s in zip(alphas_to, std, strict=True)]
    coef = {
        "sigma_to": _f32(direction if eta else [sch.sigma_of(a) for a in alphas_to]),
        "rescale": _f32(rescale),
        "std": _f32([s / math.sqrt(b) for s, b in zip(std, alphas_to, strict=True)]),
    }
    draws = len(timesteps) if eta else 0
    return _alpha_plan(sampler, timesteps, alphas, alphas_to[-1], noise_draws=draws, clip=_clip(cfg), coef=coef)


def _plan_lcm(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """LCMScheduler: boundary-condition scalings per step, noise before every step but the last."""
    timesteps = sch.lcm_timesteps(cfg, steps)[start:]
    alphas = [float(ac[t]) for t in timesteps]
    c_skip, c_out = sch.lcm_scalings(cfg, timesteps)
    coef = {"c_skip": _f32(c_skip * np.sqrt(alphas)), "c_out": _f32(c_out)}  # c_skip acts on x * sqrt(alpha)
    return _alpha_plan(sampler, timesteps, alphas, 1.0, noise_draws=len(timesteps) - 1, clip=_clip(cfg), coef=coef)


def _plan_pndm(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """PNDMScheduler with skip_prk_steps: calls at [t0, t1, t1, t2, ...]; call 1 redoes step 0 (from t1 + stride)."""
    up = sch.spaced_timesteps(cfg, steps)[::-1].round().astype(np.int64)  # ascending, as diffusers' _timesteps
    timesteps = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1][start:]
    stride, final = cfg["num_train_timesteps"] // steps, 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
    alpha = [sch.alpha_at(ac, final, t) for t in timesteps]
    v = cfg["prediction_type"] == "v_prediction"
    coef: dict[str, list[float]] = {"e_x0": [], "e_x": [], "phi_x": [], "phi_e": []}
    for i, t in enumerate(timesteps):
        t_from, t_to, a_src = (t + stride, t, alpha[0]) if i == 1 else (t, t - stride, alpha[i])
        a_f, a_p = sch.alpha_at(ac, final, t_from), sch.alpha_at(ac, final, t_to)
        a_next = alpha[i + 1] if i + 1 < len(timesteps) else a_p
        k = math.sqrt(1 - a_p) - math.sqrt(a_p * (1 - a_f) / a_f)  # DDIM transfer: x_p = sqrt(a_p/a_f) x_f + k eps
        x_gain, e_gain = math.sqrt(a_p / a_f) + (k * math.sqrt(1 - a_f) if v else 0), k * (math.sqrt(a_f) if v else 1)
        coef["phi_x"].append(math.sqrt(a_src / a_next) * x_gain)  # sigma-space x of call i+1 (or the final one)
        coef["phi_e"].append(e_gain / math.sqrt(a_next))
        s = sch.sigma_of(alpha[i])  # e from x0: eps = (x - x0) / s; v = (x / (s^2+1) - x0) * sqrt(s^2+1) / s
        coef["e_x0"].append(-math.sqrt(s * s + 1) / s if v else -1 / s)
        coef["e_x"].append(1 / (s * math.sqrt(s * s + 1)) if v else 1 / s)
    coef = {k: _f32(c) for k, c in coef.items()}
    return _alpha_plan(sampler, timesteps, alpha, a_p, noise_draws=0, coef=coef)  # a_p: where the last step lands


def _plan_unipc(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """UniPCMultistepScheduler: DPM-Solver's timesteps and sigmas; per step the predictor's and the corrector's
    coefficients on the state and the x0 history (`_unipc_update`), at the orders diffusers takes (warm-up from
    img2img's first step, lower_order_final, disable_corrector by absolute step index)."""
    timesteps, sigmas = sch.dpm_schedule(cfg, ac, steps, "unipc")
    n_all, top, bh1 = len(timesteps), int(cfg["solver_order"]), cfg["solver_type"] == "bh1"
    if not cfg["lower_order_final"] and top > 1 and float(sigmas[-1]) == 0:
        raise ScheduleError(
            f"sampler 'unipc': lower_order_final=False takes the last step, to sigma 0, at order "
            f"{top}, where its history weights divide by zero (diffusers draws NaN); set "
            "lower_order_final=True",
            field="sampler",
        )
    s = [float(v) for v in sigmas]  # float32 values, in float64 arithmetic
    orders, corrections = [], []
    p_x, p_m, c_x, c_m = [], [], [], []
    for k, j in enumerate(range(start, n_all)):
        order = min(top, n_all - j) if cfg["lower_order_final"] else top
        orders.append(min(order, k + 1))
        corrector = orders[k - 1] if k > 0 and j - 1 not in cfg["disable_corrector"] else 0
        corrections.append(corrector)
        gain, weights = _unipc_update(s, j, orders[k], bh1)
        p_x.append(gain)
        p_m.append(weights + [0.0] * (top - len(weights)))
        gain, weights = _unipc_update(s, j - 1, corrector, bh1, corrector=True) if corrector else (0.0, [])
        c_x.append(gain)
        c_m.append(weights + [0.0] * (top + 1 - len(weights)))
    coef = {"p_x": _f32(p_x), "p_m": _f32(p_m), "c_x": _f32(c_x), "c_m": _f32(c_m)}
    ts = torch.from_numpy(timesteps[start:].astype(np.float32))
    return _dpm_family_plan(
        sampler, ts, torch.from_numpy(sigmas[start:]), orders=tuple(orders), corrections=tuple(corrections), coef=coef
    )


def _plan_deis(sampler: str, cfg: dict, ac: torch.Tensor, steps: int, start: int) -> Plan:
    """DEISMultistepScheduler: DPM-Solver's timesteps, ending at the training sigma_min (or repeating the last
    Karras / exponential / beta sigma); orders as diffusers takes them (warm-up from the first step run, first and
    second order on the last two steps below 15 steps with lower_order_final)."""
    timesteps, sigmas = sch.dpm_schedule(cfg, ac, steps, "deis")
    n_all, top = len(timesteps), int(cfg["solver_order"])
    s = [float(v) for v in sigmas]
    low = cfg["lower_order_final"] and n_all < 15
    orders, w = [], []
    for k, j in enumerate(range(start, n_all)):
        if top == 1 or k < 1 or (low and j == n_all - 1):
            order = 1
        elif top == 2 or k < 2 or (low and j == n_all - 2):
            order = 2
        else:
            order = 3
        orders.append(order)
        w.append(_deis_weights(s[j + 1], [s[j - m] for m in range(order)]) + [0.0] * (top - order))
    ts = torch.from_numpy(timesteps[start:].astype(np.float32))
    return _dpm_family_plan(sampler, ts, torch.from_numpy(sigmas[start:]), orders=tuple(orders), coef={"w": _f32(w)})


def _deis_weights(to: float, rhos: list[float]) -> list[float]:
    """Weights on eps at rhos[0] (this call), rhos[1], ... for the step from rhos[0] to `to`: the integral over
    [rhos[0], to] of each eps's Lagrange basis polynomial in log rho (diffusers' `ind_fn`, in closed form)."""
    if len(rhos) == 1:
        return [to - rhos[0]]
    if len(rhos) == 2:

        def ind(t: float, b: float, c: float) -> float:
            return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))

        r0, r1 = rhos
        return [ind(to, r0, r1) - ind(r0, r0, r1), ind(to, r1, r0) - ind(r0, r1, r0)]

    def ind3(t: float, b: float, c: float, d: float) -> float:
        lt, lc, ld = math.log(t), math.log(c), math.log(d)
        numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
        return numerator / ((math.log(b) - lc) * (math.log(b) - ld))

    r0, r1, r2 = rhos
    return [
        ind3(to, r0, r1, r2) - ind3(r0, r0, r1, r2),
        ind3(to, r1, r2, r0) - ind3(r0, r1, r2, r0),
        ind3(to, r2, r0, r1) - ind3(r0, r2, r0, r1),
    ]


def _unipc_update(s: list[float], j: int, order: int, bh1: bool, corrector: bool = False) -> tuple[float, list]:
    """One UniP (or UniC) B(h) update from sigma s[j] to s[j + 1] in sigma space, as linear weights: the state's
    gain sigma_to / sigma and the weights on x0 of calls [j, j - 1, ...] (the corrector's: [j + 1, j, j - 1, ...],
    j + 1 being the call that corrects). With lambda = -log sigma, h = lambda_to - lambda and r_k the history's
    lambda offsets / h, the update is -phi_1 x0_j - B(h) sum_k rho_k (x0_{j-k} - x0_j) / r_k (+ rho_last (x0_{j+1}
    - x0_j) for UniC), rho solving R rho = b (the paper's eq. 8; diffusers fixes rho = 1/2 for a second-order
    UniP and a first-order UniC)."""
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    h = lam[j + 1] - lam[j]
    if h == 0:  # a step to the same sigma (UniPC's Karras "sigma_min" ending) leaves the state as it is
        return 1.0, [0.0] * (order + 1 if corrector else order)
    hh = -h
    phi_1 = math.expm1(hh)
    rks = [(lam[j - k] - lam[j]) / h for k in range(1, order)] + [1.0]
    b_h = hh if bh1 else math.expm1(hh)
    size = order if corrector else order - 1
    rhos: list[float] = []
    if size:
        if (corrector and order == 1) or (not corrector and order == 2):
            rhos = [0.5]
        else:
            phi_k, fact, b = phi_1 / hh - 1, 1, []
            for i in range(1, order + 1):
                b.append(phi_k * fact / b_h)
                fact *= i + 1
                phi_k = phi_k / hh - 1 / fact
            r = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
            rhos = list(np.linalg.solve(r[:size, :size], np.array(b[:size])))
    gain = s[j + 1] / s[j]
    weights = [-phi_1] + [0.0] * (order - 1)  # on x0_j, x0_{j-1}, ...
    for k in range(1, order):  # D_k = (x0_{j-k} - x0_j) / r_k, weighted by rho_k
        weights[k] -= b_h * rhos[k - 1] / rks[k - 1]
        weights[0] += b_h * rhos[k - 1] / rks[k - 1]
    if corrector:  # D_t = x0_{j+1} - x0_j, weighted by the last rho
        weights = [-b_h * rhos[-1], weights[0] + b_h * rhos[-1], *weights[1:]]
    return gain, weights


_PLANNERS = {
    "ddim": _plan_ddim,
    "euler": _plan_sigma_space,
    "euler_a": _plan_sigma_space,
    "heun": _plan_heun,
    "dpm2": _plan_dpm2,
    "dpm2_a": _plan_dpm2,
    "dpmpp_sde": _plan_dpmpp_sde,
    "dpmpp_sde_karras": _plan_dpmpp_sde,
    "dpmpp_2m": _plan_sigma_space,
    "dpmpp_2m_karras": _plan_sigma_space,
    "dpmpp_2m_sde": _plan_sigma_space,
    "dpmpp_2m_sde_karras": _plan_sigma_space,
    "deis": _plan_deis,
    "lcm": _plan_lcm,
    "pndm": _plan_pndm,
    "unipc": _plan_unipc,
}  # (in SAMPLERS' order: the refusal of an unknown name lists them)
