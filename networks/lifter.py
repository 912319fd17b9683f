"""2D -> 3D keypoint lifter of the single-view branch (Pose2Mesh's PoseNet idea).

Why: from one view the hard part is depth (which way each bone leans), not the mesh. A small
residual MLP lifts the 21 normalised 2D keypoints (virtual crop camera, networks/geometry.py) to
root-relative 3D keypoints in that camera's axes; the 3D branch (swing IK prior + spiral decoder)
then turns them into a mesh and parameters. Lifting is cheap to train (no mesh in the loop), so
it gets many more samples in the same CPU time than a mesh decoder would.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

NUM_KEYPOINTS = 21


@dataclass
class LifterConfig:
    hidden: int = 512
    blocks: int = 2
    extra_dim: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ELU(), nn.Linear(width, width), nn.LayerNorm(width), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class KeypointLifter(nn.Module):
    """``forward(x (B,21,2), vis (B,21), extra (B,1))`` -> (B,21,3) root-relative keypoints in the
    virtual camera's axes, in palm lengths (the wrist is exactly the origin)."""

    def __init__(self, cfg: LifterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.inp = nn.Sequential(nn.Linear(NUM_KEYPOINTS * 3 + cfg.extra_dim, H), nn.ELU())
        self.blocks = nn.Sequential(*[_Residual(H) for _ in range(cfg.blocks)])
        self.out = nn.Linear(H, (NUM_KEYPOINTS - 1) * 3)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, vis: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        v = vis[..., None].to(x.dtype)
        h = self.inp(torch.cat([torch.cat([x * v, v], -1).reshape(B, -1), extra], -1))
        y = self.out(self.blocks(h)).reshape(B, NUM_KEYPOINTS - 1, 3)
        return torch.cat([y.new_zeros(B, 1, 3), y], 1)

    def macs(self, batch: int = 1) -> int:
        return batch * sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
