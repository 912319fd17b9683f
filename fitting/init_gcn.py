"""Stage ``init``: a first hand per side from the GCN predictor, in milliseconds, to start the fit.

Why: the keypoint fit converges faster and into the right basin when it starts from a posed,
shaped hand instead of the mean flat hand. With ``init.input = auto`` the stage predicts from the
pose fit's 3D keypoints when they exist (list ``pose_fit`` before ``init``), otherwise from the
2D keypoints of the best view of each side (most detected joints, then the largest hand), placing
the hand by 2D-1D registration over every view that saw that side. The result goes to
``state.params[side]``; ``hand_fit`` starts from it.

The networks were trained on the built-in hand; with ``hand_model.name = mano`` the stage leaves
``state.params`` empty (the fit then starts from the mean MANO hand) and says so in its metrics.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from capture.scan import Scan
from fitting.state import State

log = logging.getLogger("handrecon")
REPO_ROOT = Path(__file__).resolve().parent.parent
INPUT_MODES = ("auto", "3d", "2d")
MIN_JOINTS = 6


@dataclass
class InitConf:
    """Keys of the ``init`` conf section."""

    enabled: bool = True
    weights: str = ""  # "" = networks/data/gcn_weights.pt; relative paths resolve against the repo root
    input: str = "auto"  # auto | 3d | 2d

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "InitConf":
        out = InitConf()
        section: Mapping[str, Any] = conf["init"] if conf is not None and "init" in conf else {}
        if "enabled" in section:
            out.enabled = bool(section["enabled"])
        if "weights" in section:
            out.weights = str(section["weights"])
        if "input" in section:
            out.input = str(section["input"])
        if out.input not in INPUT_MODES:
            raise ValueError(f"init.input = {out.input!r}; expected one of {INPUT_MODES}")
        return out


@lru_cache(maxsize=4)
def _predictor(weights: str, device: str) -> Any:
    """The loaded predictor, warmed up once (first calls pay one-off allocations and imports, so
    the stage's ``inference_ms`` is the steady-state time)."""
    from networks.predictor import GCNPredictor

    path = None
    if weights:
        p = Path(weights)
        path = p if p.is_absolute() else REPO_ROOT / p
    pred = GCNPredictor.load(path, device=device)
    with torch.no_grad():
        kp = pred.rest_joints[None].cpu()
        pred.predict_3d(kp, torch.ones(1, 21), "right")
        K = torch.tensor([[[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]])
        uv = (kp[0] + torch.tensor([0.0, 0.0, 0.5])) @ K[0].T
        pred.predict_2d((uv[:, :2] / uv[:, 2:])[None], torch.ones(1, 21), K, "right")
    return pred


def _device(conf: Mapping[str, Any] | None) -> str:
    dev = str(conf.get("device", "cpu")) if conf is not None and hasattr(conf, "get") else "cpu"
    return "cuda" if dev == "cuda" and torch.cuda.is_available() else "cpu"


def _model_name(conf: Mapping[str, Any] | None) -> str:
    if conf is not None and "hand_model" in conf and "name" in conf["hand_model"]:
        return str(conf["hand_model"]["name"])
    return "builtin"


def side_detections(scan: Scan, state: State, side: str) -> list[tuple[int, np.ndarray]]:
    """(view index, (21,3) u v confidence) of every view's detection of ``side``: through the pose
    fit's label assignment when it ran, else by the detector's label."""
    out = []
    for vi, view in enumerate(scan.views):
        if state.assignment:
            labels = [lab for lab, s in state.assignment.get(view.name, {}).items() if s == side and lab in view.keypoints]
        else:
            labels = [side] if side in view.keypoints else []
        for lab in labels[:1]:
            kp = np.asarray(view.keypoints[lab], np.float64)
            if (kp[:, 2] > 0).sum() >= MIN_JOINTS:
                out.append((vi, kp))
    return out


def best_view(dets: list[tuple[int, np.ndarray]]) -> int:
    """Position in ``dets`` of the view with most detected joints, then the largest hand box."""
    def score(kp: np.ndarray) -> tuple[int, float]:
        ok = kp[:, 2] > 0
        uv = kp[ok, :2]
        return int(ok.sum()), float(np.linalg.norm(uv.max(0) - uv.min(0)))

    return max(range(len(dets)), key=lambda i: score(dets[i][1]))


def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Predict ``state.params`` for each side of the scan (see the module docstring)."""
    cfg = InitConf.from_conf(conf)
    if not cfg.enabled:
        state.metrics["init"] = {"enabled": False}
        return state
    if _model_name(conf) != "builtin":
        state.metrics["init"] = {"enabled": True, "skipped": f"hand_model.name = {_model_name(conf)}: the GCN predicts the built-in hand"}
        log.info("init: skipped (the GCN predicts the built-in hand, the run fits %s)", _model_name(conf))
        return state
    t_load = time.perf_counter()
    pred = _predictor(cfg.weights, _device(conf))
    load_ms = 1000.0 * (time.perf_counter() - t_load)
    per_side: dict[str, Any] = {}
    t_all = time.perf_counter()
    for side in scan.sides:
        valid3d = np.asarray(state.keypoints3d_valid.get(side, np.zeros(21, bool)), bool)
        has3d = side in state.keypoints3d and valid3d.sum() >= MIN_JOINTS
        dets = side_detections(scan, state, side)
        mode = cfg.input
        if mode == "auto":
            mode = "3d" if has3d else "2d"
        if mode == "3d" and not has3d:
            per_side[side] = {"skipped": "no 3D keypoints for this side (list pose_fit before init, or set init.input = 2d)"}
            continue
        if mode == "2d" and not dets:
            per_side[side] = {"skipped": f"no view with at least {MIN_JOINTS} detected joints of this side"}
            continue
        rec: dict[str, Any] = {"input": mode}
        if mode == "3d":
            kp = torch.as_tensor(np.asarray(state.keypoints3d[side], np.float32))[None]
            p = pred.predict_3d(kp, torch.as_tensor(valid3d, dtype=torch.float32)[None], side)
        else:
            b = best_view(dets)
            vi, kp = dets[b]
            cams = [scan.views[i].camera for i, _ in dets]
            f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731
            views = {
                "uv": f32([k[:, :2] for _, k in dets]),
                "weights": f32([k[:, 2] * (k[:, 2] > 0) for _, k in dets]),
                "K": f32([c.K for c in cams]),
                "R": f32([c.R for c in cams]),
                "t": f32([c.t for c in cams]),
            }
            cam = scan.views[vi].camera
            p = pred.predict_2d(f32(kp[:, :2]), f32(kp[:, 2] > 0), f32(cam.K), side, f32(cam.R), f32(cam.t), views=views)
            rec["view"] = scan.views[vi].name
            rec["registration_views"] = len(dets)
        state.params[side] = p.params.detach().to("cpu")
        rec["inference_ms"] = 1000.0 * p.seconds
        rec["params"] = {k: v[0].detach().cpu().numpy().round(5).tolist() for k, v in p.params.to_dict().items()}
        rec.update(_gt_errors(scan, side, p))
        per_side[side] = rec
    state.metrics["init"] = {"enabled": True, "sides": per_side, "total_ms": 1000.0 * (time.perf_counter() - t_all), "load_ms": load_ms}
    return state


def _gt_errors(scan: Scan, side: str, p: Any) -> dict[str, float]:
    """Errors against the scan's ground truth (synthetic scans) where it has some."""
    from fitting import metrics as M

    gt = scan.gt
    out: dict[str, float] = {}
    if gt is None:
        return out
    if side in gt.keypoints3d:
        out["mpjpe_mm"] = M.mpjpe(p.joints[0], gt.keypoints3d[side])
    if side in gt.vertices and np.asarray(gt.vertices[side]).shape == tuple(p.vertices[0].shape):
        out["pa_mpvpe_mm"] = M.pa_mpvpe(p.vertices[0], gt.vertices[side])
        out["mpvpe_mm"] = M.mpvpe(p.vertices[0], gt.vertices[side])
    return out
