"""The limit beside the figure: FLOPs per stage at the benchmark shape, the device's dense matmul rate, and the
lower bound on time they imply.

FLOPs are counted once per stage with `torch.utils.flop_counter.FlopCounterMode` on the diffusers modules the
engine directory was exported from (matmuls, convolutions and attention; element-wise work is not counted), then
multiplied by the number of calls. The matmul rate is the best of a few large `torch.matmul` in the precision the
device is benchmarked in (fp16 on a GPU, fp32 on the CPU). ``flops / rate`` is a lower bound: no contender can
run a stage faster than its dense arithmetic at the device's best matmul throughput.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's registry covers the CUDA attention kernels; the CPU flash kernel would otherwise count as zero
_EXTRA = {
    getattr(aten, name): _sdpa_flop
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(aten, name)
}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` under no_grad (multiply-add = 2 FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Shape:
    """The benchmark shape: images per call, latent size, and whether guidance doubles the conditioned rows."""

    batch: int
    height: int
    width: int
    cfg: bool

    @property
    def rows(self) -> int:  # U-Net rows per call: [2B, 4, h, w] under classifier-free guidance
        return 2 * self.batch if self.cfg else self.batch


def stage_flops(pipe: Any, shape: Shape) -> dict[str, int]:
    """FLOPs of the text encoder(s) for one request, of one U-Net call, and of one VAE decode, at ``shape``.

    ``pipe`` is a diffusers Stable Diffusion (XL) pipeline; its modules are run once each on zero inputs of the
    benchmark shape, on their own device and dtype (the count depends on shapes only).
    """
    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, unet.dtype
    f = 2 ** len(vae.config.block_out_channels) // 2  # the VAE's downsampling factor (8 for every SD VAE)
    h, w = shape.height // f, shape.width // f
    encoders = [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m]
    ids = torch.zeros((shape.rows, 77), dtype=torch.long, device=device)  # prompt and negative, as one batch
    text = sum(count_flops(te, ids) for te in encoders)
    states = torch.zeros((shape.rows, 77, unet.config.cross_attention_dim), dtype=dtype, device=device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and size/crop ids
        pooled = pipe.text_encoder_2.config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros((shape.rows, pooled), dtype=dtype, device=device),
            "time_ids": torch.zeros((shape.rows, 6), dtype=dtype, device=device),
        }
    x = torch.zeros((shape.rows, unet.config.in_channels, h, w), dtype=dtype, device=device)
    t = torch.full((shape.rows,), 999.0, device=device)
    unet_call = count_flops(unet, x, t, states, **extra)
    z = torch.zeros((shape.batch, vae.config.latent_channels, h, w), dtype=vae.dtype, device=device)
    decode = count_flops(vae.decode, z)
    return {"text_encoder": text, "unet_call": unet_call, "vae_decoder": decode}


def matmul_tflops(device: torch.device) -> dict[str, Any]:
    """The device's dense matmul rate: the best of 10 fp16 8192^3 matmuls on a GPU, of 3 fp32 2048^3 on the CPU
    (with a thread per CPU this process may use, whatever torch's thread count: the device's rate, not torch's)."""
    cuda = device.type == "cuda"
    n, dtype, repeats = (8192, torch.float16, 10) if cuda else (2048, torch.float32, 3)
    threads = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or threads)
    torch.set_num_threads(max(threads, cpus))
    try:
        best = _best_matmul_s(device, n, dtype, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "tflops": 2 * n**3 / best / 1e12,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "cpu_threads": None if cuda else max(threads, cpus),
    }


def _best_matmul_s(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    cuda = device.type == "cuda"
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn((n, n), generator=gen, device=device, dtype=torch.float32).to(dtype)
    torch.matmul(a, b)  # kernel selection and allocation outside the timing
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    return best


def lower_bounds(flops: dict[str, int], unet_calls: int, tflops: float) -> dict[str, float]:
    """ms per stage and end to end at ``tflops``: text encoders once, the U-Net ``unet_calls`` times, VAE once."""
    per_stage = {
        "text_encoder": flops["text_encoder"],
        "unet": flops["unet_call"] * unet_calls,
        "vae_decoder": flops["vae_decoder"],
    }
    out = {stage: f / (tflops * 1e12) * 1e3 for stage, f in per_stage.items()}
    out["e2e"] = sum(out.values())
    return out
