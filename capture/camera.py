"""Calibrated pinhole cameras (OpenCV convention) and the one conversion to clip space.

Conventions (shared by every module):
- world -> camera: ``x_cam = R @ x_world + t``; camera x right, y down, z forward; metres.
- pixels: continuous coordinates with the top-left *corner* of the image at (0, 0), so the
  centre of pixel (row i, col j) is at (j + 0.5, i + 0.5). ``u = fx*x/z + s*y/z + cx``.
- clip space follows nvdiffrast: x_ndc = 2u/W - 1, y_ndc = 2v/H - 1, so row 0 of a rasterized
  image is the top row of the photo (no flip anywhere), and z/w in [-1, 1] between near and far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class CameraError(ValueError):
    """A camera whose numbers cannot be used (NaN, singular, bad size)."""


@dataclass
class Camera:
    """One calibrated view: intrinsics ``K`` (3x3), world->camera ``R`` (3x3), ``t`` (3,), size."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    name: str = field(default="")

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.R = np.asarray(self.R, dtype=np.float64).reshape(3, 3)
        self.t = np.asarray(self.t, dtype=np.float64).reshape(3)
        self.width, self.height = int(self.width), int(self.height)
        self.validate()

    def validate(self) -> None:
        where = f"camera '{self.name}'" if self.name else "camera"
        for key in ("K", "R", "t"):
            if not np.all(np.isfinite(getattr(self, key))):
                raise CameraError(f"{where}: {key} contains NaN or Inf; fix the calibration file")
        if self.width <= 0 or self.height <= 0:
            raise CameraError(f"{where}: image size {self.width}x{self.height} must be positive")
        if self.K[0, 0] <= 0 or self.K[1, 1] <= 0 or abs(self.K[2, 2] - 1.0) > 1e-6:
            raise CameraError(f"{where}: K must have positive focal lengths and K[2,2] = 1, got\n{self.K}")
        if abs(np.linalg.det(self.R) - 1.0) > 1e-3 or not np.allclose(self.R @ self.R.T, np.eye(3), atol=1e-3):
            raise CameraError(f"{where}: R is not a rotation (det {np.linalg.det(self.R):.4f})")

    # ------------------------------------------------------------------ geometry
    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        return -self.R.T @ self.t

    @property
    def projection(self) -> np.ndarray:
        """3x4 matrix P = K [R | t] mapping homogeneous world points to homogeneous pixels."""
        return self.K @ np.concatenate([self.R, self.t[:, None]], axis=1)

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        R, t = _as_tensor(self.R, points), _as_tensor(self.t, points)
        return points @ R.T + t

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points (..., 3) -> pixels (..., 2). Differentiable; depth clamped away from 0."""
        cam = self.world_to_camera(points)
        K = _as_tensor(self.K, points)
        z = cam[..., 2:3].clamp(min=1e-6)
        uvw = cam @ K.T
        return uvw[..., :2] / z

    def unproject(self, pixels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Pixels (..., 2) at camera depth z (...) -> world points (..., 3)."""
        Kinv = _as_tensor(np.linalg.inv(self.K), pixels)
        ones = torch.ones_like(pixels[..., :1])
        rays = torch.cat([pixels, ones], dim=-1) @ Kinv.T
        cam = rays * depth[..., None]
        R, t = _as_tensor(self.R, pixels), _as_tensor(self.t, pixels)
        return (cam - t) @ R

    def scaled(self, factor: float) -> "Camera":
        """The same camera for images resized by ``factor`` (sizes rounded, K scaled per axis)."""
        w, h = max(1, round(self.width * factor)), max(1, round(self.height * factor))
        K = self.K.copy()
        K[0] *= w / self.width
        K[1] *= h / self.height
        K[2] = [0.0, 0.0, 1.0]
        return Camera(K, self.R.copy(), self.t.copy(), w, h, self.name)

    def clip_matrix(self, near: float, far: float) -> np.ndarray:
        """4x4 matrix taking homogeneous world points to nvdiffrast clip space for this view."""
        if not (0 < near < far):
            raise CameraError(f"near/far must satisfy 0 < near < far, got {near}, {far}")
        fx, s, cx = self.K[0]
        fy, cy = self.K[1, 1], self.K[1, 2]
        W, H = self.width, self.height
        ndc = np.array(
            [
                [2 * fx / W, 2 * s / W, 2 * cx / W - 1, 0.0],
                [0.0, 2 * fy / H, 2 * cy / H - 1, 0.0],
                [0.0, 0.0, (far + near) / (far - near), -2 * far * near / (far - near)],
                [0.0, 0.0, 1.0, 0.0],
            ]
        )
        Rt = np.eye(4)
        Rt[:3, :3], Rt[:3, 3] = self.R, self.t
        return ndc @ Rt

    def depth_range(self, points: np.ndarray, margin: float = 0.5) -> tuple[float, float]:
        """(near, far) enclosing ``points`` (N,3 world) with a relative margin."""
        z = (np.asarray(points, dtype=np.float64) @ self.R.T + self.t)[:, 2]
        zmin, zmax = float(z.min()), float(z.max())
        span = max(zmax - zmin, 1e-3)
        return max(1e-3, zmin - margin * span), zmax + margin * span


def to_clip(points: torch.Tensor, cameras: list[Camera], near: float, far: float) -> torch.Tensor:
    """World points (N,3) -> clip coordinates (V,N,4) for V cameras. The only clip conversion."""
    mats = torch.stack([_as_tensor(c.clip_matrix(near, far), points) for c in cameras])
    homo = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)
    return torch.einsum("vij,nj->vni", mats, homo)


def scene_depth_range(points: np.ndarray, cameras: list[Camera], margin: float = 0.5) -> tuple[float, float]:
    """One (near, far) valid for every camera, from the scene's points."""
    ranges = [c.depth_range(points, margin) for c in cameras]
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _as_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(a, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)
