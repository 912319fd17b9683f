"""Render context: which backend runs the rasterizer, chosen once and passed around explicitly."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from renderer import nvdr

BACKENDS = ("auto", "cpu", "nvdiffrast")


class RendererError(ValueError):
    """A renderer call whose inputs cannot be used (bad shapes, dtypes, backend)."""


@dataclass
class RenderContext:
    """Backend choice plus the backend's own state (nvdiffrast's RasterizeCudaContext)."""

    backend: str
    device: torch.device
    raw: Any = field(default=None, repr=False)

    @property
    def is_cpu(self) -> bool:
        return self.backend == "cpu"


def make_context(backend: str = "auto", device: str | torch.device | None = None) -> RenderContext:
    """Create a context. 'auto' = nvdiffrast when the device is CUDA and nvdiffrast imports, else cpu.

    The cpu backend accepts tensors on any device (visibility runs on the host, the result comes
    back to the tensors' device); the nvdiffrast backend needs CUDA tensors.
    """
    if backend not in BACKENDS:
        raise RendererError(f"unknown renderer backend '{backend}', expected one of {BACKENDS}")
    if device is None:
        device = "cuda" if (backend == "nvdiffrast" or (backend == "auto" and torch.cuda.is_available())) else "cpu"
    device = torch.device(device)
    if backend == "auto":
        backend = "nvdiffrast" if device.type == "cuda" and nvdr.available() else "cpu"
    if backend == "nvdiffrast":
        if device.type != "cuda":
            raise RendererError(f"backend 'nvdiffrast' needs a CUDA device, got '{device}'")
        dr = nvdr.load()
        if dr is None:
            raise RendererError(f"backend 'nvdiffrast' requested but it cannot be used: {nvdr.why_unavailable()}")
        return RenderContext("nvdiffrast", device, dr.RasterizeCudaContext(device=device))
    return RenderContext("cpu", device)
