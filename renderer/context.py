"""Render context: which backend runs the ops, chosen once and passed around explicitly."""
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
    """The requested backend plus nvdiffrast's per-device RasterizeCudaContext, made on first use.

    'auto' decides per call from the tensors: nvdiffrast for CUDA tensors when it imports, the
    cpu backend otherwise. 'cpu' accepts tensors on any device (visibility runs on the host and
    results come back to the tensors' device); 'nvdiffrast' needs CUDA tensors.
    """

    requested: str
    device: torch.device
    _raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def backend_for(self, t: torch.Tensor) -> str:
        """Concrete backend ('cpu' or 'nvdiffrast') for an op on tensor t."""
        if self.requested == "auto":
            return "nvdiffrast" if t.is_cuda and nvdr.available() else "cpu"
        if self.requested == "nvdiffrast" and not t.is_cuda:
            raise RendererError(f"backend 'nvdiffrast' needs CUDA tensors, got a tensor on '{t.device}'")
        return self.requested

    @property
    def backend(self) -> str:
        """Concrete backend for tensors on this context's device."""
        if self.requested == "auto":
            return "nvdiffrast" if self.device.type == "cuda" and nvdr.available() else "cpu"
        return self.requested

    def raw(self, device: torch.device) -> Any:
        """nvdiffrast's RasterizeCudaContext for a CUDA device (one per device, reused)."""
        key = str(device)
        if key not in self._raw:
            dr = nvdr.load()
            if dr is None:
                raise RendererError(f"nvdiffrast cannot be used: {nvdr.why_unavailable()}")
            self._raw[key] = dr.RasterizeCudaContext(device=device)
        return self._raw[key]


def make_context(backend: str = "auto", device: str | torch.device | None = None) -> RenderContext:
    """Create a context; 'auto' = nvdiffrast for CUDA tensors when it imports, else cpu.

    'nvdiffrast' is checked here (CUDA present, nvdiffrast imports) so a missing install fails
    at setup, not in the middle of a fit.
    """
    if backend not in BACKENDS:
        raise RendererError(f"unknown renderer backend '{backend}', expected one of {BACKENDS}")
    if device is None:
        device = "cuda" if (backend != "cpu" and torch.cuda.is_available()) else "cpu"
    device = torch.device(device)
    if backend == "nvdiffrast":
        if device.type != "cuda":
            raise RendererError(f"backend 'nvdiffrast' needs a CUDA device, got '{device}'")
        if not nvdr.available():
            raise RendererError(f"backend 'nvdiffrast' requested but it cannot be used: {nvdr.why_unavailable()}")
    return RenderContext(backend, device)
