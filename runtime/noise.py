"""The step noise a plan reads, drawn on the host before the sampling loop: `randn` from the request's generator in
diffusers' order, or, for DPM++ SDE, a Brownian tree's increments, made with torchsde as diffusers' and
k-diffusion's BrownianTreeNoiseSampler make them.

A tree's values depend only on its seed, its span, the latent shape and the intervals asked for, all fixed before
the loop, so the loop reads them from the noise buffer like any other draws and stays graph-safe. torchsde is
imported only here, and only when a plan asks for a tree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sdrt.runtime.schedule import ScheduleError

if TYPE_CHECKING:
    from sdrt.runtime.planners import Plan


@dataclass(frozen=True)
class Brownian:
    """Step noise from a Brownian tree instead of the seed's generator (`Plan.brownian`): draw k is the tree's
    increment over intervals[k], divided by the square root of its length."""

    span: tuple[float, float]  # the tree's (t0, t1): the schedule's smallest nonzero sigma and its largest
    intervals: tuple[tuple[float, float], ...]  # per draw (sigma, sigma_next), the float32 values diffusers queries
    seed: int | None  # noise_sampler_seed: one tree over the batch; None: a tree per image, seeded seed + j


def step_noise(plan: Plan, shape: tuple[int, ...], gen: torch.Generator, seed: int) -> torch.Tensor:
    """One request's step noise, [plan.noise_draws, *shape] (shape: its latents, [B, C, h, w]), drawn after its
    initial latents: randn from ``gen`` in diffusers' order, or the plan's Brownian tree (``seed``: the request's)."""
    if plan.brownian is not None:
        return brownian_noise(plan.brownian, shape, seed)
    draws = [torch.randn(shape, generator=gen) for _ in range(plan.noise_draws)]
    return torch.stack(draws) if draws else torch.zeros((0, *shape))


def brownian_noise(tree: Brownian, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """[len(tree.intervals), *shape] float32: the increments of torchsde's BrownianInterval (tol 1e-6, pool 24, the
    halfway tree: diffusers' BatchedBrownianTree) over each interval / sqrt(its length), on the CPU. With
    ``tree.seed`` (the checkpoint's noise_sampler_seed) one tree spans the batch, as diffusers builds it; without,
    image j has a tree of its own seeded ``seed + j``, as the web UI seeds k-diffusion's sampler (its image j has
    seed + j), so each image is the one-image request with that seed's."""
    if not tree.intervals:
        return torch.zeros((0, *shape))
    try:
        import torchsde
    except ImportError:
        raise ScheduleError(
            "the dpmpp_sde samplers draw their noise from a Brownian tree, which needs torchsde: pip "
            "install torchsde, or sdrt[samplers]",
            field="sampler",
        ) from None
    per_image = tree.seed is None
    seeds, size = ([seed + j for j in range(shape[0])], shape[1:]) if per_image else ([tree.seed], shape)
    kw = dict(size=size, dtype=torch.float32, device="cpu", tol=1e-6, pool_size=24, halfway_tree=True)
    trees = [torchsde.BrownianInterval(t0=tree.span[0], t1=tree.span[1], entropy=s, **kw) for s in seeds]
    out = []
    with warnings.catch_warnings():  # a query an ulp past the span is clamped to it, as in diffusers
        warnings.simplefilter("ignore", UserWarning)
        for sigma, sigma_next in tree.intervals:  # sigma > sigma_next: the tree is read forwards, negated
            w = torch.stack([t(sigma_next, sigma) for t in trees]) * -1.0
            dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
            out.append((w if per_image else w[0]) / dt.abs().sqrt())
    return torch.stack(out)
