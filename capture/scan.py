"""Scan: what one capture instant gives the fitting stages — calibrated views of one or two hands."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from capture.camera import Camera
from handmodel.params import SIDES


class ScanError(ValueError):
    """Input that cannot be fitted; the message names the file and the fix."""


@dataclass
class View:
    """One calibrated photo. ``image`` float32 (H,W,3) sRGB in [0,1]; ``mask`` bool (H,W) of the
    hands; ``keypoints[side]`` float32 (21,3) = (u, v, confidence) in pixels of this view's image
    size, MediaPipe order, confidence 0 for a missing joint. A side absent from ``keypoints`` was
    not detected in this view. Labels are as detected and may be swapped: the pose fit decides."""

    name: str
    camera: Camera
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    keypoints: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self, source: str = "") -> None:
        where = f"view {self.name}" + (f" of {source}" if source else "")
        W, H = self.camera.width, self.camera.height
        if self.image is not None:
            if self.image.ndim != 3 or self.image.shape[2] != 3:
                raise ScanError(f"{where}: image must be HxWx3, got {self.image.shape}")
            if self.image.shape[:2] != (H, W):
                raise ScanError(
                    f"{where}: image is {self.image.shape[1]}x{self.image.shape[0]} but its camera is "
                    f"{W}x{H}; resize the image or fix the intrinsics"
                )
        if self.mask is not None and self.mask.shape != (H, W):
            raise ScanError(f"{where}: mask is {self.mask.shape[1]}x{self.mask.shape[0]}, camera is {W}x{H}")
        for side, kp in self.keypoints.items():
            if side not in SIDES:
                raise ScanError(f"{where}: keypoints labelled {side!r}; use 'left' or 'right'")
            if kp.shape != (21, 3):
                raise ScanError(f"{where}: {side} keypoints must be (21,3) (u, v, conf), got {kp.shape}")
            if not np.all(np.isfinite(kp)):
                raise ScanError(f"{where}: {side} keypoints contain NaN/Inf")


@dataclass
class GroundTruth:
    """Known answers of a synthetic (or annotated) scan, per side; any field may be missing."""

    hand_params: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    keypoints3d: dict[str, np.ndarray] = field(default_factory=dict)  # (21,3) metres, world
    vertices: dict[str, np.ndarray] = field(default_factory=dict)  # fine mesh, world metres
    faces: dict[str, np.ndarray] = field(default_factory=dict)
    # (21,) bool per side where annotations mark joints invalid (InterHand2.6M); absent = all valid
    keypoints_valid: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Scan:
    """Views of one instant. ``sides`` lists the hands the scan is expected to contain."""

    views: list[View]
    sides: tuple[str, ...] = SIDES
    scan_id: str = ""
    source: str = ""
    scale_mat: np.ndarray | None = None  # FMHR's normalisation (normalised -> world); kept, not used
    gt: GroundTruth | None = None
    # Views kept out of every fitting stage (``data.holdout_views``): the image stages evaluate
    # novel-view rendering on them, never fit to them.
    holdout: list[View] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.views:
            raise ScanError(f"scan {self.scan_id} at {self.source or '?'}: no views")
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            raise ScanError(f"scan {self.scan_id}: duplicate view names {names}")
        for v in self.views + self.holdout:
            v.validate(self.source)

    @property
    def cameras(self) -> list[Camera]:
        return [v.camera for v in self.views]

    def view(self, name: str) -> View:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(f"scan {self.scan_id} has no view {name!r}; it has {[v.name for v in self.views]}")

    def subset(self, names: list[str]) -> "Scan":
        held = [v for v in self.holdout if v.name in names]
        kept = [self.view(n) for n in names if n not in {v.name for v in held}]
        return Scan(kept, self.sides, self.scan_id, self.source, self.scale_mat, self.gt, held)

    def hold_out(self, names: list[str]) -> "Scan":
        """This scan with the views ``names`` moved from ``views`` to ``holdout``."""
        if not names:
            return self
        known = [v.name for v in self.views]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ScanError(f"scan {self.scan_id} at {self.source or '?'}: holdout views {unknown} are not "
                            f"among its views {known}; fix data.holdout_views")
        kept = [v for v in self.views if v.name not in names]
        if not kept:
            raise ScanError(f"scan {self.scan_id}: data.holdout_views holds out every view; keep at least one")
        return Scan(kept, self.sides, self.scan_id, self.source, self.scale_mat, self.gt,
                    self.holdout + [v for v in self.views if v.name in names])
