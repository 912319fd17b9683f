"""Overlays of 2D detections against fitted keypoint projections, one PNG per view.

What a reader should see at a glance: fitted skeletons as lines (one colour per side),
detections as hollow circles in the colour of the side the fit assigned them to (which exposes
swapped detector labels), and detections the fit rejected in grey (crossed). The fit is drawn
last, on top of the detections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import torch

from capture.camera import Camera
from export.atomic import write_image
from handmodel.joint_orders import BONES, NUM_JOINTS

# RGB
SIDE_COLORS: dict[str, tuple[int, int, int]] = {"left": (255, 140, 0), "right": (0, 170, 255)}
REJECTED_COLOR = (150, 150, 150)


def _to_uint8_rgb(image: np.ndarray | None, width: int, height: int) -> np.ndarray:
    if image is None:
        return np.zeros((height, width, 3), np.uint8)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(np.nan_to_num(img.astype(np.float64)) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _lighter(c: tuple[int, int, int], t: float = 0.45) -> tuple[int, int, int]:
    return tuple(int(round(x + (255 - x) * t)) for x in c)  # type: ignore[return-value]


def project_joints(camera: Camera, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (21,2) of world joints and which of them lie in front of the camera."""
    X = np.asarray(joints, dtype=np.float64).reshape(-1, 3)
    z = (X @ camera.R.T + camera.t)[:, 2]
    uv = camera.project(torch.from_numpy(X)).numpy()
    return uv, z > 1e-6


def draw_overlay(
    image: np.ndarray | None,
    camera: Camera,
    detections: Mapping[str, np.ndarray],
    fitted: Mapping[str, np.ndarray],
    *,
    fitted_valid: Mapping[str, np.ndarray] | None = None,
    assignment: Mapping[str, str] | None = None,
    accepted: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> np.ndarray:
    """RGB uint8 overlay for one view.

    ``detections[label]`` (21,3) = (u, v, confidence) as the detector labelled them;
    ``assignment[label]`` = the side the fit decided (None: labels taken as given; a label missing
    from a given assignment was discarded by the fit and is drawn grey); ``accepted[side]`` (21,) marks inlier joints (others grey);
    ``fitted[side]`` (21,3) world joints, ``fitted_valid[side]`` (21,) which to draw."""
    W, H = camera.width, camera.height
    canvas = _to_uint8_rgb(image, W, H).copy()
    diag = float(np.hypot(W, H))
    thick = max(1, int(round(diag / 700)))
    radius = max(3, int(round(diag / 220)))
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    k = 1 << shift

    def pt(p: np.ndarray) -> tuple[int, int]:
        # OpenCV draws pixel (j, i) centred at integer coordinates; ours are centred at +0.5.
        return int(round((p[0] - 0.5) * k)), int(round((p[1] - 0.5) * k))

    for label, kp in detections.items():
        kp = np.asarray(kp, dtype=np.float64)
        side = assignment.get(label) if assignment is not None else label
        color = SIDE_COLORS.get(side, REJECTED_COLOR) if side is not None else REJECTED_COLOR
        inl = np.ones(NUM_JOINTS, bool) if side is not None else np.zeros(NUM_JOINTS, bool)
        if side is not None and accepted is not None and side in accepted:
            inl = np.asarray(accepted[side], bool).reshape(-1)
        for j in range(NUM_JOINTS):
            if kp[j, 2] <= 0 or not np.isfinite(kp[j, :2]).all():
                continue
            c = _lighter(color) if inl[j] else REJECTED_COLOR
            p, r = pt(kp[j, :2]), radius * k
            # a dark outline under every mark keeps it visible on skin and on black alike
            cv2.circle(canvas, p, r, (0, 0, 0), thick + 2, cv2.LINE_AA, shift)
            cv2.circle(canvas, p, r, c, thick, cv2.LINE_AA, shift)
            if not inl[j]:
                cv2.line(canvas, (p[0] - r, p[1] - r), (p[0] + r, p[1] + r), (0, 0, 0), thick + 2, cv2.LINE_AA, shift)
                cv2.line(canvas, (p[0] - r, p[1] - r), (p[0] + r, p[1] + r), c, thick, cv2.LINE_AA, shift)

    for side, joints in fitted.items():
        color = SIDE_COLORS.get(side, (255, 255, 255))
        uv, front = project_joints(camera, joints)
        ok = front & np.isfinite(uv).all(axis=1)
        if fitted_valid is not None and side in fitted_valid:
            ok &= np.asarray(fitted_valid[side], bool).reshape(-1)
        for a, b in BONES:
            if ok[a] and ok[b]:
                cv2.line(canvas, pt(uv[a]), pt(uv[b]), color, thick + 1, cv2.LINE_AA, shift)
        for j in range(NUM_JOINTS):
            if ok[j]:
                cv2.circle(canvas, pt(uv[j]), max(2, radius // 2) * k, color, -1, cv2.LINE_AA, shift)

    _legend(canvas, title, fitted.keys(), diag)
    return canvas


def _legend(canvas: np.ndarray, title: str, sides: Any, diag: float) -> None:
    scale = max(0.4, diag / 2500)
    th = max(1, int(round(scale * 2)))
    y = int(28 * scale * 1.6)
    lines = ([(title, (255, 255, 255))] if title else []) + [
        (f"{s}: fit (lines), detections (circles)", SIDE_COLORS.get(s, (255, 255, 255))) for s in sides
    ] + [("rejected detections", REJECTED_COLOR)]
    for text, color in lines:
        cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), th + 2, cv2.LINE_AA)
        cv2.putText(canvas, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, th, cv2.LINE_AA)
        y += int(26 * scale * 1.6)


def write_overlays(
    scan: Any,
    out_dir: str | Path,
    fitted: Mapping[str, np.ndarray],
    *,
    fitted_valid: Mapping[str, np.ndarray] | None = None,
    assignment: Mapping[str, Mapping[str, str]] | None = None,
    accepted: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    title: str = "",
) -> list[Path]:
    """One ``overlay_<view>.png`` per view of ``scan`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    paths = []
    for view in scan.views:
        img = draw_overlay(
            view.image, view.camera, view.keypoints, fitted,
            fitted_valid=fitted_valid,
            assignment=(assignment or {}).get(view.name),
            accepted=(accepted or {}).get(view.name),
            title=f"{title} view {view.name}".strip(),
        )
        paths.append(write_image(out_dir / f"overlay_{view.name}.png", img))
    return paths
