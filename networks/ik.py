"""Swing inverse kinematics: a posed mean hand from 3D keypoints, as the 3D branch's prior mesh.

Why: regressing 1609 vertices from 63 numbers from scratch needs long training; with 3D keypoints
most of the answer is geometry — each finger bone's direction is observed. Walking the kinematic
tree from the wrist, each joint gets the smallest rotation (swing, no twist) taking its rest bone
direction onto the observed one, expressed in its parent's posed frame. The mean-shape hand posed
so is the decoder's starting point (its output is a residual on it) and its pose the parameter
head's: the network learns what geometry cannot give (twist, shape, soft tissue, noise).
"""
from __future__ import annotations

import torch
from torch import nn

from handmodel.model import TREE_PARENTS, HandModel, axis_angle_to_matrix

# MediaPipe keypoint of each of the 15 posed tree joints (thumb CMC, MCP, IP, index MCP, ...).
TREE_KEYPOINT = [1 + 4 * f + k for f in range(5) for k in range(3)]


def swing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Axis-angle (...,3) of the smallest rotation taking direction ``a`` to direction ``b``."""
    a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    axis = torch.linalg.cross(a, b)
    s = axis.norm(dim=-1, keepdim=True)
    c = (a * b).sum(-1, keepdim=True)
    angle = torch.atan2(s, c)
    return torch.where(s > 1e-9, axis / s.clamp(min=1e-12) * angle, torch.zeros_like(axis))


class SwingIK(nn.Module):
    """``forward(kp (B,21,3), vis (B,21))`` in a frame where the wrist is at the origin with the
    rest orientation -> (hand_pose (B,15,3), vertices (B,V,3) of the mean-shape hand, metres)."""

    def __init__(self, model: HandModel) -> None:
        super().__init__()
        if model.side != "right":
            raise ValueError("the IK prior is built on the right hand")
        self.model = model
        with torch.no_grad():
            rest = model(torch.zeros(1, model.num_betas)).joints[0].float()
        self.register_buffer("rest", rest, persistent=False)
        self.palm_size = float((rest[9] - rest[0]).norm())  # metres: the 3D branch's canonical unit
        parents = [int(p) for p in TREE_PARENTS]
        depth = [0] * 16
        for j in range(1, 16):
            depth[j] = depth[parents[j]] + 1
        levels = [[j for j in range(1, 16) if depth[j] == d] for d in range(1, max(depth) + 1)]
        # Each level's parents are the previous level, finger by finger: one batched product per level.
        for prev, level in zip(levels, levels[1:]):
            if [parents[j] for j in level] != prev:
                raise ValueError("SwingIK expects one chain per finger in the kinematic tree")
        self.num_levels = len(levels)
        for i, level in enumerate(levels):
            m = [TREE_KEYPOINT[j - 1] for j in level]
            self.register_buffer(f"_kp{i}", torch.tensor(m), persistent=False)
            self.register_buffer(f"_child{i}", torch.tensor([k + 1 for k in m]), persistent=False)
            self.register_buffer(f"_rest_dir{i}", rest[[k + 1 for k in m]] - rest[m], persistent=False)
        order = [j for level in levels for j in level]
        self.register_buffer("_unorder", torch.argsort(torch.tensor(order)), persistent=False)

    def forward(self, kp: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = kp.shape[0]
        Gp = torch.eye(3, dtype=kp.dtype, device=kp.device).expand(B, 5, 3, 3)
        aas = []
        for i in range(self.num_levels):
            m, c = getattr(self, f"_kp{i}"), getattr(self, f"_child{i}")
            local = (Gp.transpose(-1, -2) @ (kp[:, c] - kp[:, m])[..., None])[..., 0]
            aa = swing(getattr(self, f"_rest_dir{i}").expand_as(local), local)
            aa = aa * (vis[:, m] * vis[:, c])[..., None]  # a missing end keeps the rest direction
            Gp = Gp @ axis_angle_to_matrix(aa)
            aas.append(aa)
        pose = torch.cat(aas, 1)[:, self._unorder]
        with torch.no_grad():
            verts = self.model(kp.new_zeros(B, self.model.num_betas), pose).vertices
        return pose, verts
