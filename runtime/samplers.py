"""Samplers: one short pure tensor function each, over one denoiser contract, agreeing with diffusers step by step.

Everything runs in k-diffusion's sigma space: x = x_alpha / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar),
so x = x0 + sigma * eps. Every sampler calls the same denoiser:

    denoise(x, i) -> x0 estimate, for sigma-space x at model call i

which the pipeline implements as `to_x0(x, unet(x * plan.c_in[i], plan.timesteps[i]), plan.sigmas[i], prediction)`.

`make_plan` (runtime/planners.py, re-exported here) does all host work once per request shape (timesteps, sigmas,
per-step coefficients, mirroring the diffusers scheduler `Cls.from_config(checkpoint_config)` for the sampler). The
sampling loop itself is graph-safe by construction, as it is captured into one CUDA graph: it never reads a device
value on the host, its Python control flow depends only on step indices and on host structure fixed in the plan,
and its noise comes from a buffer pre-drawn with the seed's generator in diffusers' order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sdrt.runtime.params import ANCESTRAL, SAMPLERS  # noqa: F401 (re-exported: the names, light to import)
from sdrt.runtime.planners import Plan, make_plan  # noqa: F401 (make_plan: re-exported)
from sdrt.runtime.schedule import ScheduleError

Denoise = Callable[[torch.Tensor, int], torch.Tensor]  # denoise(x, i) -> x0 estimate for sigma-space x at call i
StepHook = Callable[[torch.Tensor, int], torch.Tensor]  # after(x, i) -> x: the state after step i, changed or not


def to_x0(x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The denoiser adapter (k-diffusion's `external.py`): the U-Net's raw output -> x0, for sigma-space x.

    epsilon: x - sigma * eps (CompVisDenoiser); v_prediction: c_skip * x + c_out * v with sigma_data = 1
    (VDenoiser: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)); sample: the output itself.
    """
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - model_output * sigma / (sigma**2 + 1) ** 0.5
    if prediction_type == "sample":
        return model_output
    raise ScheduleError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def start_latents(plan: Plan, noise0: torch.Tensor, init_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma-space x at the first call: txt2img noise0 * init_sigma; img2img diffusers' `add_noise` at the first
    timestep, which in sigma space is init_latents + sigma_0 * noise0."""
    if init_latents is None:
        return noise0 * plan.init_sigma
    return init_latents + plan.sigmas[0] * noise0


def sample(
    plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook | None = None
) -> torch.Tensor:
    """Run the plan's sampler from sigma-space x ([B, 4, h, w]); `noise`: [plan.noise_draws, B, 4, h, w].

    `after(x, i)`, where given, replaces the state after each step i (diffusers' callback_on_step_end changing the
    latents: inpainting's latent blend). Returns the final latents as diffusers hands them to the VAE (alpha space).
    """
    return _SAMPLERS[plan.sampler](plan, denoise, x, noise, after or _unchanged) * plan.out_scale


def _unchanged(x: torch.Tensor, i: int) -> torch.Tensor:
    return x


def inpaint_blend(plan: Plan, init_latents: torch.Tensor, noise0: torch.Tensor, mask: torch.Tensor) -> StepHook:
    """The latent blend diffusers' inpainting pipelines apply after every step with a 4-channel U-Net: keep the
    init latents, noised to the next call's timestep (`add_noise` with the initial noise; clean after the last
    step), where the mask is 0. In sigma space that target is init + sigma_{i+1} * noise0, and after the last
    step init / out_scale (the blend happens on diffusers' alpha-space latents, which are x * out_scale); where
    diffusers' add_noise reads another sigma than the next call's (DPM2's midpoints), coef["blend"] holds it.
    mask: [B, 1, h, w], 1 where the sampler's result is kept."""
    last, noised = len(plan.timesteps) - 1, plan.coef.get("blend", plan.sigmas[1:])

    def after(x: torch.Tensor, i: int) -> torch.Tensor:
        target = init_latents + noised[i] * noise0 if i < last else init_latents / plan.out_scale
        return (1 - mask) * target + mask * x

    return after


# ---------------------------------------------------------------------------------------------------- samplers
def sample_ddim(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), in sigma space.

    x_{t-1} = x0 + dir_{t-1} * eps + std_{t-1} * z, with eps from the unclipped x0 as diffusers has it; with eta = 0
    dir is sigma_{t-1} and there is no noise, with eta > 0 (`plan.noise_draws` > 0) the step draws fresh noise z of
    std eta * sigma_t(eta = 1) (eq. 16) and takes that variance from the direction. diffusers steps to
    t - T // steps, which is the next call's timestep except with "linspace" or uneven "trailing" spacing; `rescale`
    (1 otherwise) then re-reads the state at the next call's timestep, exactly as diffusers' next step does.
    """
    sigmas, direction, rescale = plan.sigmas, plan.coef["sigma_to"], plan.coef["rescale"]
    for i in range(len(plan.timesteps)):
        x0 = denoise(x, i)
        eps = (x - x0) / sigmas[i]
        if plan.clip is not None:
            x0 = x0.clamp(-plan.clip, plan.clip)
        x = x0 + direction[i] * eps
        if plan.noise_draws:
            x = x + plan.coef["std"][i] * noise[i]
        x = after(x * rescale[i], i)
    return x


def sample_euler(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, "Elucidating the
    Design Space of Diffusion-Based Generative Models", Algorithm 2 without churn; k-diffusion's sample_euler)."""
    sigmas = plan.sigmas
    for i in range(len(plan.timesteps)):
        d = (x - denoise(x, i)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = after(x, i)
    return x


def sample_heun(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn): an Euler step to
    the next sigma, a second U-Net call there, and the step again with the mean of both slopes; the last step, to
    sigma 0, is Euler's. Two U-Net calls a step, as diffusers' HeunDiscreteScheduler lays them out: plan.sigmas are
    per call, [s0, s1, s1, s2, s2, ..., s_last, 0]; `after` runs after each call's update, as diffusers' pipelines
    blend after every scheduler step."""
    sigmas, calls = plan.sigmas, len(plan.timesteps)
    for i in range(0, calls, 2):  # call i: the first-order half at sigmas[i]; i + 1: the correction at sigmas[i + 1]
        x0 = denoise(x, i)
        if plan.clip is not None:
            x0 = x0.clamp(-plan.clip, plan.clip)
        d, dt = (x - x0) / sigmas[i], sigmas[i + 1] - sigmas[i]
        x_next = after(x + d * dt, i)
        if i + 1 == calls:
            return x_next
        x0 = denoise(x_next, i + 1)
        if plan.clip is not None:
            x0 = x0.clamp(-plan.clip, plan.clip)
        d_next = (x_next - x0) / sigmas[i + 1]
        x = after(x + (d + d_next) / 2 * dt, i + 1)
    return x


def sample_dpm2(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """DPM2 (Karras et al. 2022's second-order step at the midpoint; k-diffusion's sample_dpm_2): an Euler step to
    the geometric mean of sigma and the step's end, a second U-Net call there, and the whole step from the start
    with that midpoint's slope; the last step, to sigma 0, is Euler's. With noise draws (dpm2_a, k-diffusion's
    sample_dpm_2_ancestral) the step ends at sigma_down and adds noise of std sigma_up, as Euler a does.
    Two calls a step, as diffusers' KDPM2(Ancestral)DiscreteScheduler lays them out: plan.sigmas per call
    [s0, mid0, s1, mid1, ..., s_last, 0]; per first call coef["to"] (the step's end) and coef["up"]."""
    sigmas, to, calls = plan.sigmas, plan.coef["to"], len(plan.timesteps)
    for i in range(0, calls, 2):  # call i at the step's sigma, call i + 1 at its midpoint
        d = (x - denoise(x, i)) / sigmas[i]
        x_mid = after(x + d * (sigmas[i + 1] - sigmas[i]), i)
        if i + 1 == calls:
            return x_mid
        d_mid = (x_mid - denoise(x_mid, i + 1)) / sigmas[i + 1]
        x = x + d_mid * (to[i] - sigmas[i])
        if plan.noise_draws:
            x = x + plan.coef["up"][i] * noise[i // 2]
        x = after(x, i + 1)
    return x


def sample_dpmpp_sde(
    plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook
) -> torch.Tensor:
    """DPM-Solver++(2S) on the SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 1 with r = 1/2, as ancestral steps at eta 1): k-diffusion's sample_dpmpp_sde,
    diffusers' DPMSolverSDEScheduler. A first-order step to the midpoint in log sigma with noise, a second U-Net
    call there, then the whole step again from its start with the midpoint's x0 and noise over the whole step; the
    last step, to sigma 0, is Euler's. Two calls a step (plan.sigmas per call [s0, mid0, s1, ..., s_last, 0]); call
    i's update is x <- decay[i] * x_start + kept[i] * x0_i + up[i] * noise[i], its noise a Brownian tree's
    increment over the update's sigmas (runtime/noise.py: the checkpoint's noise_sampler_seed, or the request's
    seed + j for image j, as the web UI seeds it)."""
    sigmas, calls = plan.sigmas, len(plan.timesteps)
    decay, kept, up = (plan.coef[k] for k in ("decay", "kept", "up"))
    for i in range(0, calls, 2):  # call i at the step's sigma, call i + 1 at its midpoint
        x0 = denoise(x, i)
        if i + 1 == calls:
            return after(x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i]), i)
        x_mid = after(decay[i] * x + kept[i] * x0 + up[i] * noise[i], i)
        x0_mid = denoise(x_mid, i + 1)
        x = after(decay[i + 1] * x + kept[i + 1] * x0_mid + up[i + 1] * noise[i + 1], i + 1)
    return x


def sample_euler_a(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1): an Euler step down to sigma_down, then fresh
    noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2 (ancestral sampling, Ho et al. 2020)."""
    sigmas = plan.sigmas
    for i in range(len(plan.timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoise(x, i)) / sigma
        x = x + d * (sigma_down - sigma) + noise[i] * sigma_up
        x = after(x, i)
    return x


def sample_dpmpp_2m(
    plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2), in k-diffusion's form with t = lambda = -log sigma. `plan.orders` marks the first-order
    steps diffusers takes (the first, and the last per lower_order_final / final_sigmas_type).

    With noise draws (dpmpp_2m_sde: diffusers' "sde-dpmsolver++", k-diffusion's sample_dpmpp_2m_sde at eta 1) each
    step solves the data-prediction SDE instead: the state decays by exp(-h) more, the update weights the data
    prediction by 1 - exp(-2h), and fresh noise of std sigma_next * sqrt(1 - exp(-2h)) is added."""
    sigmas = plan.sigmas
    t = -sigmas.log()  # +inf for a final sigma of 0: h = inf, the step lands on x0
    old_denoised = None  # orders[0] is always 1: the first step has no history
    for i, order in enumerate(plan.orders):
        denoised = denoise(x, i)
        h = t[i + 1] - t[i]
        denoised_d = denoised
        if order == 2:
            r = (t[i] - t[i - 1]) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        if plan.noise_draws:  # decay, data weight and noise std of the step, from the host (float64)
            decay, kept, std = plan.coef["decay"][i], plan.coef["kept"][i], plan.coef["std"][i]
            x = decay * x + kept * denoised_d + std * noise[i]
        else:
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
        x = after(x, i)
    return x


def sample_lcm(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1):
    the consistency function f(x, t) = c_skip(t) * x + c_out(t) * x0, then re-noised to the next sigma, except at
    the last step. (plan's c_skip includes the alpha-space scale diffusers applies it at.)"""
    sigmas, c_skip, c_out = plan.sigmas, plan.coef["c_skip"], plan.coef["c_out"]
    n = len(plan.timesteps)
    for i in range(n):
        x0 = denoise(x, i)
        if plan.clip is not None:
            x0 = x0.clamp(-plan.clip, plan.clip)
        x = c_skip[i] * x + c_out[i] * x0
        if i < n - 1:
            x = x + sigmas[i + 1] * noise[i]
        x = after(x, i)
    return x


_PLMS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_pndm(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. 12: linear multistep
    on the model output e, moved by the DDIM transfer phi(x, e, t, t - delta)), with diffusers' warm-up in place of
    Runge-Kutta: the first step is taken twice, the second time from the same x with the mean of both outputs.

    e is the U-Net's own output (eps, or v for v-prediction: diffusers extrapolates that), recovered from x0 as
    e = e_x0 * x0 + e_x * x; phi = phi_x * x + phi_e * e is precomputed on the host (with diffusers' timesteps).
    """
    e_x0, e_x, phi_x, phi_e = (plan.coef[k] for k in ("e_x0", "e_x", "phi_x", "phi_e"))
    es, x_first = [], x
    for i in range(len(plan.timesteps)):
        e = e_x0[i] * denoise(x, i) + e_x[i] * x
        if i == 1:
            x, e = x_first, (e + es[0]) / 2
        else:
            es = [*es[-3:], e]
            e = sum(c * e_k for c, e_k in zip(_PLMS[len(es)], reversed(es), strict=True))
        x = phi_x[i] * x + phi_e[i] * e
        x = after(x, i)
    return x


def sample_unipc(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
    Models", Algorithms 2-3, B(h) variants) on the data prediction: each call's x0 first corrects the state the last
    predictor produced (UniC: from that step's start, with this call's x0 added to its history), then the
    predictor (UniP) takes the next step from the corrected state. The model sees the uncorrected state, as in
    diffusers' UniPCMultistepScheduler. Every update is linear in the state and the x0 history, with coefficients
    from the host: x = p_x[i] * x + sum_j p_m[i, j] * x0_{i-j}; corrector c_x, c_m (j = 0: this call's x0)."""
    p_x, p_m, c_x, c_m = (plan.coef[k] for k in ("p_x", "p_m", "c_x", "c_m"))
    keep = p_m.shape[1]  # the solver order: how many x0 the history holds
    history: list[torch.Tensor] = []  # x0 of the latest calls, newest first
    x_start = x  # the state the last predictor started from
    for i, (order, corrector) in enumerate(zip(plan.orders, plan.corrections, strict=True)):
        x0 = denoise(x, i)
        if corrector:
            x = c_x[i] * x_start + sum(c_m[i, j] * m for j, m in enumerate([x0, *history[:corrector]]))
        history = [x0, *history[: keep - 1]]
        x_start = x
        x = p_x[i] * x + sum(p_m[i, j] * m for j, m in enumerate(history[:order]))
        x = after(x, i)
    return x


def sample_deis(plan: Plan, denoise: Denoise, x: torch.Tensor, noise: torch.Tensor, after: StepHook) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the log-rho
    multistep AB-DEIS of diffusers' DEISMultistepScheduler): in sigma space (rho = sigma) each step adds to x a
    combination of the latest eps = (x - x0) / sigma, weighted by the integrals of their Lagrange polynomial in
    log rho over the step (host coefficients coef["w"][i, j] on eps_{i-j}); first order it is Euler's step."""
    sigmas, w = plan.sigmas, plan.coef["w"]
    history: list[torch.Tensor] = []  # eps of the latest calls, newest first
    for i, order in enumerate(plan.orders):
        history = [(x - denoise(x, i)) / sigmas[i], *history[: w.shape[1] - 1]]
        x = x + sum(w[i, j] * e for j, e in enumerate(history[:order]))
        x = after(x, i)
    return x


_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_karras": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_karras": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m,
    "dpmpp_2m_sde_karras": sample_dpmpp_2m,
    "lcm": sample_lcm,
    "pndm": sample_pndm,
    "unipc": sample_unipc,
    "deis": sample_deis,
}
