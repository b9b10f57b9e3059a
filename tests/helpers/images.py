"""Pictures compared: PSNR, the fidelity check every test against diffusers makes, and the inputs they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import Pipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))  # a plain float: xdist sends it


def check(ours: np.ndarray, ref: np.ndarray, min_db: float = 40.0) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    assert ref.std() > 5, "reference image is flat: the comparison would say nothing"
    db = psnr(ours, ref)
    assert db >= min_db, f"PSNR {db:.1f} dB < {min_db} dB"
    return db


def sdrt_images(pipe: Pipeline, **kw) -> np.ndarray:
    return np.stack([np.asarray(im) for im in pipe(**kw)])


def init_and_mask(h: int = 64, w: int = 128) -> tuple[Image.Image, Image.Image]:
    """A structured init image, and a mask whose white (repainted) region is an off-centre rectangle."""
    yy, xx = np.mgrid[0:h, 0:w]
    init = np.stack([xx * 2, yy * 4, (xx + yy) % 256], -1) // 2 + np.random.default_rng(0).integers(0, 64, (h, w, 3))
    mask = np.zeros((h, w), np.uint8)
    mask[8:48, 40:112] = 255
    return Image.fromarray(init.astype(np.uint8)), Image.fromarray(mask)
