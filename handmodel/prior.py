"""Pose and shape priors usable as losses, and a sampler of plausible hand poses.

Each finger joint gets an anatomical frame computed from the model's flat rest pose (so the prior
works for any source and side): ``flex`` about the axis that bends the bone towards the palm,
``abd`` (abduction) about the axis that swings it sideways, positive towards the thumb, and
``twist`` about the bone. The local angles are the components of the joint's full axis-angle
(``hand_pose + pose_mean``) in that frame. For the thumb, "towards the palm" is the bisector of
the palm normal and the direction to the little finger's knuckle (the thumb flexes across the
palm). Frames of a left hand are mirrored so that the same angles mean the same motion.

The penalty is a squared hinge beyond each limit (smooth, zero inside), plus a small L2 on
``hand_pose``. ``sample_poses`` draws poses inside the limits with the natural coupling of a
finger's joints (PIP and DIP flex together, curled fingers spread less).
"""
from __future__ import annotations

import math
import weakref
from functools import lru_cache

import torch

from .model import HandModel
from .params import NUM_POSE_JOINTS

DEG = math.pi / 180.0
# Limits in degrees, (low, high) for (flex, abd, twist), per joint kind.
LIMITS_DEG = {
    "thumb_cmc": ((-25.0, 60.0), (-25.0, 25.0), (-25.0, 25.0)),
    "thumb_mcp": ((-10.0, 60.0), (-10.0, 10.0), (-10.0, 10.0)),
    "thumb_ip": ((-15.0, 80.0), (-5.0, 5.0), (-5.0, 5.0)),
    "mcp": ((-20.0, 90.0), (-20.0, 20.0), (-10.0, 10.0)),
    "pip": ((0.0, 110.0), (-5.0, 5.0), (-5.0, 5.0)),
    "dip": ((0.0, 90.0), (-5.0, 5.0), (-5.0, 5.0)),
}
JOINT_KINDS = ["thumb_cmc", "thumb_mcp", "thumb_ip"] + ["mcp", "pip", "dip"] * 4


def default_limits() -> torch.Tensor:
    """(15, 3, 2) limits in radians, rows in hand_pose order, columns (flex, abd, twist)."""
    return torch.tensor([LIMITS_DEG[k] for k in JOINT_KINDS], dtype=torch.float64) * DEG


def anatomical_frames(model: HandModel) -> torch.Tensor:
    """(15, 3, 3) rows = (flex axis, abduction axis, twist axis) of each joint, in the rest axes."""
    with torch.no_grad():
        dt = torch.float64
        B = torch.zeros(1, model.num_betas, dtype=model.template.dtype, device=model.template.device)
        flat = -model.pose_mean[None]  # full pose 0: the flat rest pose
        j = model(B, flat).joints[0].to(dt).cpu()  # (21,3) MediaPipe order, wrist at the model's rest wrist
    s = 1.0 if model.side == "right" else -1.0
    wrist, index_mcp, pinky_mcp = j[0], j[5], j[17]
    normal = s * torch.linalg.cross(index_mcp - wrist, pinky_mcp - wrist)
    normal = normal / normal.norm()
    frames = []
    for f in range(5):
        for k in range(3):
            a, b = j[1 + 4 * f + k], j[2 + 4 * f + k]
            bone = (b - a) / (b - a).norm()
            towards = normal.clone()
            if f == 0:
                ulnar = pinky_mcp - a
                towards = normal + _perp(ulnar / ulnar.norm(), bone)
            towards = _perp(towards, bone)
            towards = towards / towards.norm()
            flex = torch.linalg.cross(bone, towards)  # rotating +flex moves the bone towards `towards`
            abd = s * torch.linalg.cross(bone, flex)
            frames.append(torch.stack([flex, abd, s * bone]))
    return torch.stack(frames)


def _perp(v: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    return v - (v @ axis) * axis


class PosePrior(torch.nn.Module):
    """Anatomical pose prior of one model: ``prior(hand_pose (B,15,3)) -> (B,)`` loss."""

    def __init__(self, model: HandModel, l2_weight: float = 0.01, limits: torch.Tensor | None = None) -> None:
        super().__init__()
        like = {"dtype": model.template.dtype, "device": model.template.device}
        self.side = model.side
        self.l2_weight = float(l2_weight)
        self.register_buffer("frames", anatomical_frames(model).to(**like), persistent=False)
        lim = default_limits() if limits is None else torch.as_tensor(limits, dtype=torch.float64).cpu()
        if lim.shape != (NUM_POSE_JOINTS, 3, 2) or bool((lim[..., 0] > lim[..., 1]).any()):
            raise ValueError(f"limits must be (15, 3, 2) with low <= high, got shape {tuple(lim.shape)}")
        self.register_buffer("low", lim[..., 0].to(**like), persistent=False)
        self.register_buffer("high", lim[..., 1].to(**like), persistent=False)
        self.register_buffer("pose_mean", model.pose_mean.detach().clone(), persistent=False)

    def angles(self, hand_pose: torch.Tensor) -> torch.Tensor:
        """(B,15,3) -> local (flex, abd, twist) angles in radians of the full pose."""
        full = hand_pose.reshape(-1, NUM_POSE_JOINTS, 3) + self.pose_mean
        return torch.einsum("jab,njb->nja", self.frames, full)

    def angles_to_pose(self, angles: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`angles`: local angles (B,15,3) -> hand_pose (B,15,3)."""
        return torch.einsum("jab,nja->njb", self.frames, angles) - self.pose_mean

    def limit_penalty(self, hand_pose: torch.Tensor) -> torch.Tensor:
        """(B,) sum of squared excess (radians^2) beyond the limits; zero inside them."""
        a = self.angles(hand_pose)
        over = torch.relu(a - self.high) + torch.relu(self.low - a)
        return (over**2).sum(dim=(1, 2))

    def forward(self, hand_pose: torch.Tensor) -> torch.Tensor:
        """(B,) limit penalty + l2_weight * |hand_pose|^2."""
        hp = hand_pose.reshape(-1, NUM_POSE_JOINTS, 3)
        return self.limit_penalty(hp) + self.l2_weight * (hp**2).sum(dim=(1, 2))

    def sample_poses(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,15,3) plausible hand poses inside the limits, on the prior's device and dtype.

        ``generator``: a CPU ``torch.Generator`` for reproducible draws (the global one if None).
        """
        g = generator
        dev, dt = self.frames.device, self.frames.dtype

        def U(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g, dtype=torch.float64)

        def N(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        a = torch.zeros(n, NUM_POSE_JOINTS, 3, dtype=torch.float64)
        # One overall grip plus per-finger variation; a third of the samples stay near open.
        grip = U(n, 1) * (U(n, 1) > 1 / 3)
        curl = (0.6 * grip + 0.4 * U(n, 4)).clamp(0, 1)  # index..pinky
        for f in range(4):
            c = curl[:, f]
            mcp, pip, dip = 3 + 3 * f, 4 + 3 * f, 5 + 3 * f
            a[:, mcp, 0] = -10 * DEG + c * 95 * DEG + 8 * DEG * N(n)
            a[:, pip, 0] = c * 105 * DEG + 8 * DEG * N(n)
            a[:, dip, 0] = 0.7 * a[:, pip, 0] + 5 * DEG * N(n)
            a[:, mcp, 1] = (1 - c) * 10 * DEG * N(n)
            a[:, mcp, 2] = 3 * DEG * N(n)
            a[:, pip, 1:] = 1.5 * DEG * N(n, 2)
            a[:, dip, 1:] = 1.5 * DEG * N(n, 2)
        t = 0.5 * grip[:, 0] + 0.5 * U(n)  # thumb follows the grip loosely
        a[:, 0, 0] = -15 * DEG + t * 65 * DEG + 6 * DEG * N(n)
        a[:, 0, 1] = 12 * DEG * N(n)
        a[:, 0, 2] = 10 * DEG * N(n)
        a[:, 1, 0] = t * 50 * DEG + 6 * DEG * N(n)
        a[:, 2, 0] = t * 65 * DEG + 8 * DEG * N(n)
        a[:, 1:3, 1:] = 3 * DEG * N(n, 2, 2)
        margin = 1e-4
        a = torch.maximum(torch.minimum(a, self.high.double().cpu() - margin), self.low.double().cpu() + margin)
        return self.angles_to_pose(a.to(device=dev, dtype=dt))


def shape_prior(betas: torch.Tensor) -> torch.Tensor:
    """(B,) squared norm of the betas: the shape space is scaled so betas ~ N(0, I)."""
    return (betas**2).sum(-1)


def sample_poses(model: HandModel, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,15,3) plausible random poses for ``model`` (see :meth:`PosePrior.sample_poses`)."""
    return PosePrior(model).sample_poses(n, generator)


@lru_cache(maxsize=8)
def _builtin_prior(side: str, device: str, dtype: torch.dtype) -> PosePrior:
    from . import load

    return PosePrior(load("builtin", side, dtype=dtype)).to(device)


_MODEL_PRIORS: "weakref.WeakKeyDictionary[HandModel, PosePrior]" = weakref.WeakKeyDictionary()


def pose_prior_loss(hand_pose: torch.Tensor, side: str = "right", model: HandModel | None = None) -> torch.Tensor:
    """(B,) pose prior of ``hand_pose`` for ``model`` (default: the built-in hand of ``side``).

    Pass ``model`` when fitting MANO: its rest pose and ``pose_mean`` differ from the built-in's.
    Priors are built once per model (a forward pass) and cached while the model lives.
    """
    if model is None:
        return _builtin_prior(side, str(hand_pose.device), hand_pose.dtype)(hand_pose)
    prior = _MODEL_PRIORS.get(model)
    if prior is None or prior.frames.device != model.template.device or prior.frames.dtype != model.template.dtype:
        prior = _MODEL_PRIORS[model] = PosePrior(model)
    return prior(hand_pose)


__all__ = ["LIMITS_DEG", "PosePrior", "anatomical_frames", "default_limits", "pose_prior_loss", "sample_poses", "shape_prior"]
