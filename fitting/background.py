"""What lies behind the hands in each photo, so renders can be composited the way photos form.

A photo's pixel on a hand's outline mixes the hand with whatever is behind it. A render
antialiased over black mixes the hand with black, so every outline pixel is wrong by the
background's colour however good the fit: on the demo capture at 320x256 that one-pixel rim was
half of the squared error inside the masks. ``over_background`` composites an antialiased render
over an estimate of the background: ``image + (1 - coverage) * background`` in linear RGB, with
the antialiased coverage. Antialiasing is linear in the image, so this equals compositing before
antialiasing (nvdiffrast's recipe) wherever the background is smooth across a pixel, and it
serves every renderer (shaded, neural) and every render already made on black.

The estimate is an inpainting of the photo from pixels that are surely background (outside every
mask and every hand, by a margin): normalised Gaussian convolution at growing scales, each pixel
taking the finest scale with enough support. Backdrops near a hand are smooth at the scale of a
pixel, which is all the rim needs; no pixel's estimate reads that pixel itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fitting.losses import linear_to_srgb, srgb_to_linear

SCALES_PX = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MIN_SUPPORT = 0.2  # fraction of a scale's Gaussian weight that must fall on known pixels


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W), zero outside the image."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    C = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, r), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(r, 0), groups=C)


def dilate(m: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation of (V,H,W) bool by ``radius`` pixels."""
    if radius <= 0:
        return m
    k = 2 * radius + 1
    return F.max_pool2d(m.float().unsqueeze(1), k, stride=1, padding=radius).squeeze(1) > 0.5


@torch.no_grad()
def inpaint_background(photo_srgb: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Linear-RGB background (V,H,W,3) of sRGB photos (V,H,W,3) from their ``known`` (V,H,W)
    background pixels: known pixels keep their colour, the others take the normalised Gaussian
    average of the known ones at the finest scale of ``SCALES_PX`` with ``MIN_SUPPORT``; a view
    with no known pixel gets black (the render then composites as before, over black)."""
    lin = srgb_to_linear(photo_srgb.clamp(0.0, 1.0)).permute(0, 3, 1, 2)  # (V,3,H,W)
    k = known.to(lin.dtype).unsqueeze(1)
    out = lin * k
    filled = known.clone().unsqueeze(1)
    for sigma in SCALES_PX:
        if bool(filled.all()):
            break
        den = _blur(k, sigma)
        num = _blur(lin * k, sigma)
        take = (~filled) & (den >= MIN_SUPPORT)
        out = torch.where(take, num / den.clamp_min(1e-6), out)
        filled = filled | take
    if not bool(filled.all()):  # far from any known pixel: the mean of the view's known pixels
        n = k.sum((2, 3), keepdim=True)
        mean = (lin * k).sum((2, 3), keepdim=True) / n.clamp_min(1.0)
        out = torch.where(filled, out, mean.expand_as(out))
    return out.permute(0, 2, 3, 1).contiguous()


def surely_background(inside: torch.Tensor, occupied: torch.Tensor, margin_px: int = 2) -> torch.Tensor:
    """Pixels inside the image and at least ``margin_px`` from anything ``occupied`` (masks of
    hands and forearms, rendered hands): the ones the inpainting may read."""
    return (inside > 0.5) & ~dilate(occupied > 0.5, margin_px)


def over_background(image_linear: torch.Tensor, coverage: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """Antialiased linear render (...,H,W,3) on black, its antialiased coverage (...,H,W), over
    a linear ``background`` (...,H,W,3); unchanged when ``background`` is None."""
    if background is None:
        return image_linear
    return image_linear + (1.0 - coverage.clamp(0.0, 1.0)).unsqueeze(-1) * background.to(image_linear)


def srgb_over_background(image_srgb: np.ndarray, coverage: np.ndarray, background: np.ndarray | None) -> np.ndarray:
    """``over_background`` of sRGB numpy renders (the exporters' and evaluations' images)."""
    if background is None:
        return image_srgb
    lin = srgb_to_linear(torch.as_tensor(image_srgb))
    out = over_background(lin, torch.as_tensor(coverage), torch.as_tensor(background))
    return linear_to_srgb(out).clamp(0.0, 1.0).numpy()


@torch.no_grad()
def estimate_background(photo_srgb: torch.Tensor, inside: torch.Tensor, occupied: torch.Tensor,
                        margin_px: int = 2) -> torch.Tensor:
    """Linear background (V,H,W,3) of sRGB photos (V,H,W,3) inpainted from their pixels inside the
    image and ``margin_px`` away from everything ``occupied`` (V,H,W: masks, rendered hands)."""
    return inpaint_background(photo_srgb, surely_background(inside, occupied, margin_px))
