"""The state that flows between stages. Each stage reads what earlier stages left and adds its own.

Everything here is tensors, arrays and plain records so a checkpoint is one ``torch.save`` of
``State.to_dict()`` and loads with ``weights_only=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handmodel.params import HandParams


@dataclass
class State:
    # pose_fit: robust 3D keypoints per side (21,3) world metres, and which joints are trustworthy.
    keypoints3d: dict[str, np.ndarray] = field(default_factory=dict)
    keypoints3d_valid: dict[str, np.ndarray] = field(default_factory=dict)
    # pose_fit: which side each detection really is, per view: {view: {file_label: side}}.
    assignment: dict[str, dict[str, str]] = field(default_factory=dict)
    # pose_fit: which joints of each (view, side) were accepted as inliers: {view: {side: (21,) bool}}.
    accepted: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # init / hand_fit: parametric hand per side (batch 1).
    params: dict[str, HandParams] = field(default_factory=dict)
    # ham / neural: per side refined mesh records and per-view lighting, filled by later stages.
    refined: dict[str, dict[str, Any]] = field(default_factory=dict)
    lighting: dict[str, Any] = field(default_factory=dict)
    neural: dict[str, Any] = field(default_factory=dict)
    # metrics per stage name, JSON-serialisable.
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keypoints3d": _tensors(self.keypoints3d),
            "keypoints3d_valid": _tensors(self.keypoints3d_valid),
            "assignment": self.assignment,
            "accepted": {v: _tensors(d) for v, d in self.accepted.items()},
            "params": {s: {k: t.detach().cpu() for k, t in p.to_dict().items()} for s, p in self.params.items()},
            "refined": {s: _tensors(d) for s, d in self.refined.items()},
            "lighting": _tensors(self.lighting),
            "neural": _tensors(self.neural),
            "metrics": self.metrics,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "State":
        return State(
            keypoints3d=_arrays(d.get("keypoints3d", {})),
            keypoints3d_valid=_arrays(d.get("keypoints3d_valid", {})),
            assignment=d.get("assignment", {}),
            accepted={v: _arrays(x) for v, x in d.get("accepted", {}).items()},
            params={s: HandParams.from_dict(p) for s, p in d.get("params", {}).items()},
            refined=dict(d.get("refined", {})),
            lighting=dict(d.get("lighting", {})),
            neural=dict(d.get("neural", {})),
            metrics=d.get("metrics", {}),
        )


def _tensors(d: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays -> tensors (weights_only-safe); nested dicts kept."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, dict):
            out[k] = _tensors(v)
        else:
            out[k] = v
    return out


def _arrays(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
