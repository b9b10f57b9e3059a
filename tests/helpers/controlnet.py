"""ControlNets as users bring them, at test size: diffusers' ControlNetModel made from a U-Net with visible effect,
and a control image with edges and gradients."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def make_controlnet(unet_folder, dest, seed: int = 3):
    """diffusers' ControlNetModel.from_unet (4 input channels, as real ControlNets have even for inpainting U-Nets),
    its zero-initialised output convolutions given random weights so that it visibly changes the picture."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    if unet.config.in_channels != 4:  # an inpainting U-Net: the ControlNet reads the 4 latent channels
        conv = torch.nn.Conv2d(4, cn.conv_in.out_channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(unet.conv_in.weight[:, :4])
            conv.bias.copy_(unet.conv_in.bias)
        cn.conv_in = conv
        cn.register_to_config(in_channels=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    cn.save_pretrained(dest)
    return dest


def control_image(w: int = 96, h: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    edges = ((xx // 8 + yy // 8) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([edges, (xx * 3 % 256).astype(np.uint8), edges[::-1]], -1))
