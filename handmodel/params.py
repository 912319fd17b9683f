"""HandParams: the parameters of one or more hands of one side, batched on a leading dimension."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

NUM_BETAS = 10
NUM_POSE_JOINTS = 15
SIDES = ("left", "right")


def check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"hand side must be 'left' or 'right', got {side!r}")
    return side


@dataclass
class HandParams:
    """``betas (B,10)``, ``hand_pose (B,15,3)`` axis-angle (thumb..pinky, proximal->distal),
    ``global_orient (B,3)`` axis-angle of the wrist, ``transl (B,3)`` metres (wrist position)."""

    betas: torch.Tensor
    hand_pose: torch.Tensor
    global_orient: torch.Tensor
    transl: torch.Tensor

    @staticmethod
    def zeros(batch: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "HandParams":
        z = lambda *s: torch.zeros(batch, *s, device=device, dtype=dtype)  # noqa: E731
        return HandParams(z(NUM_BETAS), z(NUM_POSE_JOINTS, 3), z(3), z(3))

    @property
    def batch_size(self) -> int:
        return self.betas.shape[0]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_dict(d: dict) -> "HandParams":
        missing = [f.name for f in fields(HandParams) if f.name not in d]
        if missing:
            raise KeyError(f"hand parameters lack {missing}")
        t = {k: torch.as_tensor(d[k], dtype=torch.float32) for k in (f.name for f in fields(HandParams))}
        if t["hand_pose"].dim() == 2:  # (B,45) -> (B,15,3)
            t["hand_pose"] = t["hand_pose"].reshape(t["hand_pose"].shape[0], NUM_POSE_JOINTS, 3)
        return HandParams(**t)

    def detach(self) -> "HandParams":
        return HandParams(**{k: v.detach().clone() for k, v in self.to_dict().items()})

    def to(self, device: str | torch.device) -> "HandParams":
        return HandParams(**{k: v.to(device) for k, v in self.to_dict().items()})

    def requires_grad_(self, flag: bool = True) -> "HandParams":
        for v in self.to_dict().values():
            v.requires_grad_(flag)
        return self
