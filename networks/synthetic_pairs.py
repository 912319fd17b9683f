"""Training / evaluation pairs (keypoints -> mesh) drawn on the fly from the hand model.

Why on the fly: the hand model is a cheap pure function, so every batch is new (no over-fitting to a
fixed set) and a split is just a seed. Hands: poses from the pose prior's sampler, shapes
betas ~ N(0, 1) clipped at 3, global rotations uniform on SO(3). The 3D branch gets triangulation-
like noise; the 2D branch gets a random camera (train: varied focal lengths, distances, off-axis
positions; scene: like ``synthetic.generate``, 640x480 with 35-55 degree fields of view and the
hands filling 70 % of the image) and pixel noise. Missed joints are zeroed and flagged.

Everything is the RIGHT hand; left hands are mirrored to right ones before the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from handmodel.model import HandModel
from handmodel.prior import PosePrior

from .geometry import canonical_frame_3d, normalised_image_coords, random_rotations, to_canonical_3d, virtual_crop

# Mean palm length (wrist -> middle MCP) of the built-in hand sets the 2D branch's output unit.
IMAGE_SIZE = (640, 480)


@dataclass
class Pair:
    """One batch. ``x`` (B,21,d) normalised keypoints, ``vis`` (B,21), ``extra`` (B,1); targets in
    the same frame and unit: ``vertices`` (B,V,3), ``joints`` (B,21,3), ``rotation`` (B,3,3) and
    ``translation`` (B,3) of the hand model, ``unit`` (B,) metres per unit; ``betas``, ``hand_pose``."""

    x: torch.Tensor
    vis: torch.Tensor
    extra: torch.Tensor
    vertices: torch.Tensor
    joints: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    unit: torch.Tensor
    betas: torch.Tensor
    hand_pose: torch.Tensor


class PairSampler:
    """Draws :class:`Pair` batches from ``model`` (the right built-in hand) with its own generator."""

    def __init__(self, model: HandModel, seed: int, beta_clip: float = 3.0) -> None:
        if model.side != "right":
            raise ValueError("pairs are drawn for the right hand; mirror left hands instead")
        self.model = model
        self.prior = PosePrior(model)
        self.g = torch.Generator().manual_seed(int(seed))
        self.beta_clip = beta_clip
        with torch.no_grad():
            self.rest_joints = model(torch.zeros(1, model.num_betas)).joints[0].float()
        self.palm_size = float((self.rest_joints[9] - self.rest_joints[0]).norm())

    # ----------------------------------------------------------------------------------- helpers
    def _u(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g)

    def _n(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def hands(self, B: int) -> dict[str, torch.Tensor]:
        """Local hands (wrist at the origin, no global rotation) and a random rotation each."""
        betas = self._n(B, self.model.num_betas).clamp(-self.beta_clip, self.beta_clip)
        pose = self.prior.sample_poses(B, self.g).float()
        R = random_rotations(B, self.g)
        with torch.no_grad():
            out = self.model(betas, pose)
        return {"betas": betas, "hand_pose": pose, "R": R, "verts": out.vertices, "joints": out.joints}

    def _misses(self, B: int, fraction: float, max_rate: float) -> torch.Tensor:
        """(B,21) visibility: a ``fraction`` of the samples lose each joint with rate U(0, max_rate)."""
        rate = self._u(B, 1) * max_rate * (self._u(B, 1) < fraction)
        vis = (self._u(B, 21) >= rate).float()
        few = vis.sum(1) < 6  # keep enough joints for a frame
        vis[few] = 1.0
        return vis

    # ------------------------------------------------------------------------------------ 3D
    def batch_3d(self, B: int, noise_mm: tuple[float, float] = (0.0, 4.0), miss_fraction: float = 0.3, miss_rate: float = 0.15) -> Pair:
        """Triangulation-like 3D keypoints (per-sample noise sigma in ``noise_mm``) in the palm frame."""
        h = self.hands(B)
        T = 0.3 * self._n(B, 3)
        verts = h["verts"] @ h["R"].transpose(1, 2) + T[:, None]
        joints = h["joints"] @ h["R"].transpose(1, 2) + T[:, None]
        sigma = 1e-3 * (noise_mm[0] + (noise_mm[1] - noise_mm[0]) * self._u(B, 1, 1))
        kp = joints + sigma * self._n(B, 21, 3)
        vis = self._misses(B, miss_fraction, miss_rate)
        R, o, s = canonical_frame_3d(kp, vis, self.rest_joints, self.palm_size)
        x = to_canonical_3d(kp, R, o, s)
        return Pair(
            x=x * vis[..., None],
            vis=vis,
            extra=torch.log(s / self.palm_size)[:, None],
            vertices=to_canonical_3d(verts, R, o, s),
            joints=to_canonical_3d(joints, R, o, s),
            rotation=R.transpose(1, 2) @ h["R"],
            translation=torch.einsum("bji,bj->bi", R, T - o) / s[:, None],
            unit=s,
            betas=h["betas"],
            hand_pose=h["hand_pose"],
        )

    # ------------------------------------------------------------------------------------ 2D
    def cameras(self, B: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Intrinsics K (B,3,3) and the wrist position in the camera (B,3)."""
        W, H = IMAGE_SIZE
        if mode == "train":
            f = 300.0 + 1300.0 * self._u(B)
            depth = 0.25 + 0.95 * self._u(B)
            off = math.radians(30.0) * self._u(B).sqrt()
        elif mode == "scene":
            fov = torch.deg2rad(35.0 + 20.0 * self._u(B))
            f = W / (2.0 * torch.tan(fov / 2.0))
            depth = 0.11 * f / (0.5 * 0.7 * min(W, H)) * (1.0 + 0.1 * (2 * self._u(B) - 1))
            off = math.radians(3.0) * self._u(B)
        else:
            raise ValueError(f"camera mode {mode!r}; expected 'train' or 'scene'")
        az = 2 * math.pi * self._u(B)
        d = torch.stack([torch.sin(off) * torch.cos(az), torch.sin(off) * torch.sin(az), torch.cos(off)], -1)
        K = torch.zeros(B, 3, 3)
        K[:, 0, 0], K[:, 1, 1], K[:, 2, 2] = f, f * (1 + 0.002 * self._n(B)), 1.0
        K[:, 0, 2], K[:, 1, 2] = W / 2 + 0.01 * W * self._n(B), H / 2 + 0.01 * H * self._n(B)
        return K, d * depth[:, None]

    def batch_2d(
        self,
        B: int,
        mode: str = "train",
        noise_px: tuple[float, float] | None = None,
        noise_rel: tuple[float, float] = (0.0, 0.03),
        miss_fraction: float = 0.3,
        miss_rate: float = 0.15,
    ) -> tuple[Pair, dict[str, torch.Tensor]]:
        """Projected keypoints of a hand seen by one random camera, in the virtual crop camera.

        Noise: ``noise_px`` (range, pixels) when given, else a fraction ``noise_rel`` of the hand's
        size in pixels. Also returns the camera-side truth (``K``, ``uv``, ``joints_cam``,
        ``verts_cam``, ``R_virt``) for registration tests and evaluation."""
        h = self.hands(B)
        K, T = self.cameras(B, mode)
        verts_rel = h["verts"] @ h["R"].transpose(1, 2)
        joints_rel = h["joints"] @ h["R"].transpose(1, 2)
        joints_cam, verts_cam = joints_rel + T[:, None], verts_rel + T[:, None]
        uvw = joints_cam @ K.transpose(1, 2)
        uv = uvw[..., :2] / uvw[..., 2:3]
        if noise_px is not None:
            sigma = noise_px[0] + (noise_px[1] - noise_px[0]) * self._u(B, 1, 1)
        else:
            size_px = 0.18 * K[:, 0, 0] / T[:, 2]
            sigma = (noise_rel[0] + (noise_rel[1] - noise_rel[0]) * self._u(B)) * size_px
            sigma = sigma[:, None, None]
        uv_obs = uv + sigma * self._n(B, 21, 2)
        vis = self._misses(B, miss_fraction, miss_rate)
        xy = normalised_image_coords(uv_obs, K)
        R_virt, x, half = virtual_crop(xy, vis)
        unit = torch.full((B,), self.palm_size)
        pair = Pair(
            x=x,
            vis=vis,
            extra=torch.log(half)[:, None],
            vertices=torch.einsum("bij,bnj->bni", R_virt, verts_rel) / self.palm_size,
            joints=torch.einsum("bij,bnj->bni", R_virt, joints_rel) / self.palm_size,
            rotation=R_virt @ h["R"],
            translation=torch.zeros(B, 3),
            unit=unit,
            betas=h["betas"],
            hand_pose=h["hand_pose"],
        )
        truth = {"K": K, "uv": uv_obs, "uv_clean": uv, "joints_cam": joints_cam, "verts_cam": verts_cam, "R_virt": R_virt, "wrist_cam": T}
        return pair, truth

    # ------------------------------------------------------------------------- lifter (joints only)
    def joint_pool(self, n: int, chunk: int = 1000) -> torch.Tensor:
        """(n,21,3) local joints (wrist at the origin, no global rotation) of random hands: the
        lifter's training pool; each use draws a fresh rotation, camera, noise and misses."""
        out = []
        for i in range(0, n, chunk):
            out.append(self.hands(min(chunk, n - i))["joints"])
        return torch.cat(out)

    def lift_batch(
        self,
        joints_local: torch.Tensor,
        mode: str = "train",
        noise_rel: tuple[float, float] = (0.0, 0.03),
        miss_fraction: float = 0.3,
        miss_rate: float = 0.15,
        noise_px: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lifter inputs and targets for local joints (B,21,3): ``x`` (B,21,2), ``vis``, ``extra``
        and root-relative joints in the virtual camera's axes in palm lengths (B,21,3)."""
        B = joints_local.shape[0]
        R = random_rotations(B, self.g)
        K, T = self.cameras(B, mode)
        joints_rel = joints_local @ R.transpose(1, 2)
        uvw = (joints_rel + T[:, None]) @ K.transpose(1, 2)
        uv = uvw[..., :2] / uvw[..., 2:3]
        size_px = 0.18 * K[:, 0, 0] / T[:, 2]
        sigma = (noise_rel[0] + (noise_rel[1] - noise_rel[0]) * self._u(B)) * size_px
        if noise_px is not None:
            sigma = torch.full((B,), float(noise_px))
        uv = uv + sigma[:, None, None] * self._n(B, 21, 2)
        vis = self._misses(B, miss_fraction, miss_rate)
        R_virt, x, half = virtual_crop(normalised_image_coords(uv, K), vis)
        target = torch.einsum("bij,bnj->bni", R_virt, joints_rel) / self.palm_size
        return x, vis, torch.log(half)[:, None], target
