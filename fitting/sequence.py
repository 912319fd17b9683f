"""Sequence mode: a range of scan ids (one frame each) -> per-frame prediction -> one calibrated
shape per hand side -> test-time optimisation of every frame -> per-frame meshes and metrics.

``fit.py --conf conf/identity.conf --scan_id A-B`` lands here (:func:`run_cli`). Frames are read
with the conf's reader (``data.format``: fmhr, synthetic, or interhand frame numbers), each frame
one scan of one or more calibrated views. Per side and frame, the GCN predictor lifts the 2D
keypoints of the frame's best view (most detected joints, then the largest hand) and places the
hand by 2D-1D registration over every view of the frame that saw that side; the confidence head
scores the prediction (``networks.confidence``). Then ``fitting.identity`` calibrates the shape
(confidence-weighted and robust; the size component beta 0 from the plain mean through the GCN's
size prior, ``fitting.identity.GCN_SIZE_PRIOR``) or takes it from ``identity.betas_file``,
optionally refines it against the whole sequence (``identity.refine_iterations``), and
``fitting.tto`` refines every frame with it. Detections are taken with the labels they come
with (a sequence does not run the multi-view label assignment of ``pose_fit``). Consecutive positions in the range are temporal neighbours.

Outputs under ``<out>``: ``frames/<scan_id>/hand_<side>.{obj,ply}`` and ``hand_params.json``
(the TTO result), ``identity.json`` / ``identity.npz`` (the calibrated shape: pass it to later
runs with ``--set identity.betas_file=<out>/identity.json``), ``metrics.json`` (per side:
calibration, TTO losses and reprojection errors, timings, and — for synthetic frames with ground
truth — shape errors of the per-frame, plain-mean and calibrated shapes and MPJPE before/after
TTO), ``conf.resolved.conf`` and ``run.log``.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from fitting.identity import GCN_SIZE_PRIOR, Calibration, IdentityConf, calibrate, load_identity, resolve_path, save_identity
from fitting.tto import SequenceTargets, TTOConf, fit_sequence
from handmodel.params import SIDES, HandParams

log = logging.getLogger("handrecon")
RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
MIN_JOINTS = 6
PREDICT_CHUNK = 256


def parse_scan_range(text: str | None) -> list[str] | None:
    """``"A-B"`` -> the ids A..B inclusive (zero-padded like A when A has leading zeros: "007-010"
    -> 007, 008, 009, 010); None when ``text`` is not a range. B < A is an error."""
    if text is None:
        return None
    m = RANGE_RE.match(str(text))
    if not m:
        return None
    a, b = m.group(1), m.group(2)
    lo, hi = int(a), int(b)
    if hi < lo:
        from fitting.conf import ConfError

        raise ConfError(f"--scan_id {text}: the range ends before it starts")
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    return [f"{i:0{width}d}" if width else str(i) for i in range(lo, hi + 1)]


# ------------------------------------------------------------------------------------ per frame
@dataclass
class SideFrames:
    """One side's frames: ``positions`` in the sequence, their ``scan_ids``, the predicting view
    inputs (``uv`` (F,21,2), ``vis`` (F,21), ``K``/``R``/``t``) and all views padded to V
    (``views`` in ``GCNPredictor.predict_2d``'s layout), plus the TTO targets."""

    positions: list[int]
    scan_ids: list[str]
    uv: torch.Tensor
    vis: torch.Tensor
    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    views: dict[str, torch.Tensor]
    best_view: list[str]


def side_frames(scans: list[Any], side: str) -> SideFrames | None:
    """Gather the frames in which ``side`` was detected with at least ``MIN_JOINTS`` joints."""
    from fitting.init_gcn import best_view

    rows = []
    for pos, scan in enumerate(scans):
        dets = [(vi, np.asarray(v.keypoints[side], np.float64)) for vi, v in enumerate(scan.views)
                if side in v.keypoints and (np.asarray(v.keypoints[side])[:, 2] > 0).sum() >= MIN_JOINTS]
        if dets:
            rows.append((pos, scan, dets, best_view(dets)))
    if not rows:
        return None
    V = max(len(r[2]) for r in rows)
    F = len(rows)
    uv = np.zeros((F, V, 21, 2), np.float32)
    w = np.zeros((F, V, 21), np.float32)
    K = np.zeros((F, V, 3, 3), np.float32)
    R = np.zeros((F, V, 3, 3), np.float32)
    t = np.zeros((F, V, 3), np.float32)
    best = np.zeros(F, np.int64)
    names = []
    for f, (pos, scan, dets, b) in enumerate(rows):
        for k in range(V):
            vi, kp = dets[min(k, len(dets) - 1)]  # padding repeats a real camera with weight 0
            cam = scan.views[vi].camera
            K[f, k], R[f, k], t[f, k] = cam.K, cam.R, cam.t
            if k < len(dets):
                uv[f, k], w[f, k] = kp[:, :2], np.where(kp[:, 2] > 0, kp[:, 2], 0.0)
        best[f] = b
        names.append(scan.views[dets[b][0]].name)
    T = lambda a: torch.as_tensor(a)  # noqa: E731
    ar = torch.arange(F)
    bi = T(best)
    return SideFrames(
        positions=[r[0] for r in rows], scan_ids=[str(r[1].scan_id) for r in rows],
        uv=T(uv)[ar, bi], vis=(T(w)[ar, bi] > 0).float(), K=T(K)[ar, bi], R=T(R)[ar, bi], t=T(t)[ar, bi],
        views={"uv": T(uv), "weights": T(w), "K": T(K), "R": T(R), "t": T(t)}, best_view=names,
    )


def sequence_targets(frames: SideFrames, scans: list[Any], side: str, scale: float, with_masks: bool) -> SequenceTargets:
    """TTO targets of one side; masks only where every frame's views have one and the frames hold
    this side alone (a mask of two hands cannot be explained by one)."""
    vw = frames.views
    targets = SequenceTargets(vw["uv"], vw["weights"], vw["K"], vw["R"], vw["t"],
                              torch.as_tensor(frames.positions, dtype=torch.long), scale)
    if not with_masks:
        return targets
    sel = [scans[p] for p in frames.positions]
    single = all(tuple(s.sides) == (side,) for s in sel)
    views = [[v for v in s.views if side in v.keypoints] for s in sel]
    if not single or any(len(v) != len(views[0]) for v in views) or any(x.mask is None for v in views for x in v):
        log.info("tto: %s silhouettes unavailable (masks missing, or frames with two hands); term skipped", side)
        return targets
    hw = {x.mask.shape for v in views for x in v}
    if len(hw) != 1:
        log.info("tto: masks of different sizes; silhouette term skipped")
        return targets
    targets.masks = torch.as_tensor(np.stack([[x.mask for x in v] for v in views]).astype(np.float32))
    targets.mask_weight = torch.ones(targets.masks.shape[:2])
    targets.cameras = [[x.camera for x in v] for v in views]
    if targets.masks.shape[1] != targets.uv.shape[1]:
        log.info("tto: views differ between keypoints and masks; silhouette term skipped")
        targets.masks = targets.mask_weight = targets.cameras = None
    return targets


@lru_cache(maxsize=2)
def _confidence_head(path: str) -> Any:
    from networks.confidence import ConfidenceHead

    return ConfidenceHead.load(path or None)


def predict_side(frames: SideFrames, side: str, weights: str, confidence_path: str | None) -> tuple[HandParams, torch.Tensor, torch.Tensor | None, float]:
    """Per-frame predictions (HandParams batch F, joints (F,21,3)) and confidence scores (F,) or
    None without a head; and the seconds it took. Batched in chunks of ``PREDICT_CHUNK`` frames."""
    from fitting.init_gcn import _predictor
    from networks.confidence import predict_with_confidence

    pred = _predictor(weights, "cpu")
    head = _confidence_head(confidence_path) if confidence_path is not None else None
    t0 = time.perf_counter()
    params, joints, scores = [], [], []
    F = len(frames.positions)
    for a in range(0, F, PREDICT_CHUNK):
        sl = slice(a, min(F, a + PREDICT_CHUNK))
        views = {k: v[sl] for k, v in frames.views.items()}
        args = (frames.uv[sl], frames.vis[sl], frames.K[sl], side, frames.R[sl], frames.t[sl])
        if head is not None:
            p, s = predict_with_confidence(pred, head, *args, views=views)
            scores.append(s)
        else:
            p = pred.predict_2d(*args, views=views)
        params.append(p.params)
        joints.append(p.joints)
    cat = HandParams(*(torch.cat([getattr(p, k) for p in params]) for k in ("betas", "hand_pose", "global_orient", "transl")))
    return cat, torch.cat(joints), (torch.cat(scores) if scores else None), time.perf_counter() - t0


# ------------------------------------------------------------------------------------ the run
@dataclass
class SideResult:
    """Everything one side's run produced: its frames, the raw predictions (``init``, joints
    (F,21,3)), confidence ``score`` (F,) or None, the calibration, the TTO result, the metrics."""

    frames: SideFrames
    init: HandParams
    joints_raw: torch.Tensor
    score: torch.Tensor | None
    calibration: Calibration
    tto: Any
    record: dict[str, Any]


def process_scans(tree: Mapping[str, Any], scans: list[Any]) -> dict[str, SideResult | dict[str, Any]]:
    """Prediction -> calibration (or the fixed shape) -> optional refinement -> TTO for every side
    of the in-memory frames ``scans`` (in temporal order); a side with no usable frame maps to a
    record saying why."""
    import handmodel

    icfg = IdentityConf.from_tree(tree)
    tcfg = TTOConf.from_tree(tree)
    if str(tree["hand_model"]["name"]) != "builtin":
        from fitting.conf import ConfError

        raise ConfError("sequence mode predicts with the GCN, trained on the built-in hand: set hand_model.name = builtin")
    scale = float(tree["data"]["scale"])
    weights = str(tree["init"]["weights"])
    backend = str(tree["renderer"]["backend"])
    conf_path = None
    if icfg.use_confidence and not icfg.betas_file:
        conf_path = str(resolve_path(icfg.confidence_weights)) if icfg.confidence_weights else ""
    fixed = {s: torch.as_tensor(b) for s, b in load_identity(resolve_path(icfg.betas_file)).items()} if icfg.betas_file else {}
    out: dict[str, SideResult | dict[str, Any]] = {}
    for side in [s for s in SIDES if any(s in sc.sides for sc in scans)]:
        frames = side_frames(scans, side)
        if frames is None:
            out[side] = {"skipped": f"no frame with {MIN_JOINTS} detected joints of this side"}
            continue
        model = handmodel.load("builtin", side)
        F = len(frames.positions)
        init, joints_raw, score, t_pred = predict_side(frames, side, weights, conf_path)
        t0 = time.perf_counter()
        if side in fixed:
            uniform = np.full(F, 1.0 / F)
            cal = Calibration(betas=fixed[side].numpy(), plain_mean=init.betas.mean(0).numpy(), weights=uniform, prior_weights=uniform,
                              distances_mm=np.zeros(F), frames=frames.scan_ids, method=f"fixed from {icfg.betas_file}")
        else:
            cal = calibrate(model, init.betas, score, icfg, frames.scan_ids, size_prior=GCN_SIZE_PRIOR)
        betas = torch.as_tensor(cal.betas)
        t_cal = time.perf_counter() - t0
        targets = sequence_targets(frames, scans, side, scale, tcfg.weights.get("silhouette", 0.0) > 0)
        refined = None
        t_ref = 0.0
        if icfg.refine_iterations > 0 and side not in fixed:
            t0 = time.perf_counter()
            rcfg = TTOConf(**{**tcfg.__dict__, "iterations": icfg.refine_iterations})
            r = fit_sequence(model, betas, init, targets, rcfg, backend, shape_anchor=icfg.refine_anchor)
            refined = r.params.betas[0].clone()
            cal.betas_before_refinement = cal.betas.copy()
            cal.betas = refined.numpy().astype(np.float32)
            cal.method += f", refined over the sequence ({icfg.refine_iterations} iterations)"
            betas = refined
            t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = fit_sequence(model, betas, init, targets, tcfg, backend)
        t_tto = time.perf_counter() - t0
        rec: dict[str, Any] = {"frames": F}
        rec["calibration"] = {"method": cal.method, "betas": cal.betas.round(5).tolist(), "plain_mean_betas": cal.plain_mean.round(5).tolist(),
                              "effective_frames": float(1.0 / np.sum(cal.weights**2)),
                              "confidence": None if score is None else score.numpy().round(4).tolist()}
        rec["tto"] = {"reprojection_before_median_px": result.reprojection_before_px,
                      "reprojection_after_median_px": result.reprojection_after_px, "losses": result.losses,
                      "phases_s": {k: round(v, 3) for k, v in result.seconds.items()}}
        rec["time_s"] = {"prediction": round(t_pred, 3), "calibration": round(t_cal, 4), "refinement": round(t_ref, 3),
                         "tto": round(t_tto, 3), "calibration_and_tto": round(t_cal + t_ref + t_tto, 3)}
        rec["gt"] = gt_metrics(model, scans, frames, side, init, joints_raw, cal, result.params, refined)
        log.info("sequence %s: %d frames, calibration %.2f s, TTO %.1f s, reprojection %.1f -> %.1f px", side, F,
                 t_cal + t_ref, t_tto, result.reprojection_before_px, result.reprojection_after_px)
        out[side] = SideResult(frames, init, joints_raw, score, cal, result, rec)
    return out


def run_sequence(tree: Mapping[str, Any], data_path: str | Path, scan_ids: list[str], out_dir: str | Path) -> dict[str, Any]:
    """Read the frames, :func:`process_scans`, write the outputs (see the module docstring);
    returns the metrics it wrote."""
    from export.atomic import write_json
    from export.mesh_io import write_obj, write_ply
    from export.params_io import save_hand_params
    from fitting.pipeline import PeakMemory, json_safe, read_scan
    import handmodel

    out_dir = Path(out_dir)
    formats = [str(f) for f in tree["output"]["mesh_formats"]]
    unknown = sorted(set(formats) - {"obj", "ply"})
    if unknown:
        raise ValueError(f"output.mesh_formats: unknown {unknown}; use any of obj, ply")
    t_start = time.perf_counter()
    scans = [read_scan(tree, data_path, sid) for sid in scan_ids]
    t_read = time.perf_counter() - t_start
    log.info("sequence: %d frames %s..%s read in %.1f s", len(scans), scan_ids[0], scan_ids[-1], t_read)
    with PeakMemory() as mem:
        results = process_scans(tree, scans)
    metrics: dict[str, Any] = {
        "sequence": {"scan_ids": list(scan_ids), "frames": len(scans), "read_s": round(t_read, 3), "peak_mem_mb": round(mem.peak_mb, 1),
                     "total_s": round(time.perf_counter() - t_start, 3)},
        "sides": {s: (r.record if isinstance(r, SideResult) else r) for s, r in results.items()},
    }
    done = {s: r for s, r in results.items() if isinstance(r, SideResult)}
    if done:
        save_identity(out_dir / "identity", {s: r.calibration for s, r in done.items()}, {"scan_ids": list(scan_ids)})
    for side, r in done.items():
        model = handmodel.load("builtin", side)
        with torch.no_grad():
            mesh = model(r.tto.params)
        for f, sid in enumerate(r.frames.scan_ids):
            d = out_dir / "frames" / sid
            v, fc = mesh.vertices[f].numpy(), mesh.faces.numpy()
            if "obj" in formats:
                write_obj(d / f"hand_{side}.obj", v, fc)
            if "ply" in formats:
                write_ply(d / f"hand_{side}.ply", v, fc)
    for sid in scan_ids:  # one parameter file per frame with every side fitted there
        per = {s: HandParams(*(getattr(r.tto.params, k)[i : i + 1] for k in ("betas", "hand_pose", "global_orient", "transl")))
               for s, r in done.items() for i, x in enumerate(r.frames.scan_ids) if x == sid}
        if per:
            save_hand_params(out_dir / "frames" / sid / "hand_params", per)
    write_json(out_dir / "metrics.json", json_safe(metrics))
    return metrics


def gt_metrics(model: Any, scans: list[Any], frames: SideFrames, side: str, init: HandParams, joints_raw: torch.Tensor,
               cal: Calibration, params: HandParams, refined: torch.Tensor | None) -> dict[str, Any]:
    """Errors against the frames' ground truth, where the scans have it: mean-pose shape error (mm)
    of the per-frame predictions (mean over frames), of their plain mean and of the calibrated
    shape — absolute, and after scaling each onto the truth (one view cannot tell size from
    distance) — and MPJPE / PA-MPJPE (mm) of the raw predictions and after TTO."""
    from fitting import metrics as M
    from fitting.identity import shape_error_mm

    sel = [scans[p] for p in frames.positions]
    have = [s.gt is not None and side in s.gt.keypoints3d for s in sel]
    if not any(have):
        return {}
    out: dict[str, Any] = {}
    betas_true = [np.asarray(s.gt.hand_params[side]["betas"], np.float32) for s, h in zip(sel, have) if h and side in s.gt.hand_params]
    if betas_true:
        bt = betas_true[0]
        calibrated = cal.betas if cal.betas_before_refinement is None else cal.betas_before_refinement
        for key, err in (("shape_error_mm", shape_error_mm), ("shape_error_scale_aligned_mm", scale_aligned_shape_error_mm)):
            out[key] = {"per_frame_mean": float(np.mean([err(model, b, bt) for b in init.betas.numpy()])),
                        "plain_mean": err(model, cal.plain_mean, bt), "calibrated": err(model, calibrated, bt)}
            if cal.betas_weighted is not None:
                out[key]["weighted_without_size_prior"] = err(model, cal.betas_weighted, bt)
            if refined is not None:
                out[key]["refined"] = err(model, refined.numpy(), bt)
    with torch.no_grad():
        tto_joints = model(params).joints.numpy()
    raw = joints_raw.numpy()
    gtj = [(f, np.asarray(s.gt.keypoints3d[side], np.float64)) for f, (s, h) in enumerate(zip(sel, have)) if h]
    out["mpjpe_mm"] = {"raw": float(np.mean([M.mpjpe(raw[f], g) for f, g in gtj])), "tto": float(np.mean([M.mpjpe(tto_joints[f], g) for f, g in gtj]))}
    out["pa_mpjpe_mm"] = {"raw": float(np.mean([M.pa_mpjpe(raw[f], g) for f, g in gtj])), "tto": float(np.mean([M.pa_mpjpe(tto_joints[f], g) for f, g in gtj]))}
    out["mpjpe_reduction"] = 1.0 - out["mpjpe_mm"]["tto"] / max(out["mpjpe_mm"]["raw"], 1e-9)
    return out


def scale_aligned_shape_error_mm(model: Any, betas: np.ndarray, betas_true: np.ndarray) -> float:
    """Mean-pose vertex error (mm) after the least-squares scale (about the wrist, the rest-pose
    origin) that best maps the estimate onto the truth: the shape part a single view can see."""
    from fitting import metrics as M

    f = lambda b: torch.as_tensor(np.asarray(b, np.float32).reshape(1, -1))  # noqa: E731
    with torch.no_grad():
        a, b = model.rest_vertices(f(betas))[0].double(), model.rest_vertices(f(betas_true))[0].double()
    k = float((a * b).sum() / (a * a).sum())
    return M.mpvpe(a * k, b)


# -------------------------------------------------------------------------------------------- CLI
def run_cli(conf: Any, data_path: Path, label: str, out: Path, overrides: list[str], resolve_scale: Any = None) -> int:
    """``fit.py`` with a range ``label`` ("A-B") as scan id: logging, the run; returns the exit
    code. ``resolve_scale(tree, data_path, scan_id)`` is fit.py's ``data.width`` handling, applied
    with the first frame."""
    from export.atomic import write_text
    from fitting.pipeline import setup_logging

    ids = parse_scan_range(label)
    if ids is None:
        raise ValueError(f"scan id {label!r} is not a range A-B")
    tree = conf.tree
    if resolve_scale is not None:
        resolve_scale(tree, data_path, ids[0])
    logger = setup_logging(out, str(tree["log"]["level"]))
    logger.info("sequence mode: conf %s%s, scans %s..%s (%d) from %s (%s); output %s", conf.path,
                "".join(f" --set {o}" for o in overrides), ids[0], ids[-1], len(ids), data_path, tree["data"]["format"], out)
    write_text(out / "conf.resolved.conf", conf.to_hocon() + "\n")
    metrics = run_sequence(tree, data_path, ids, out)
    for side, rec in metrics["sides"].items():
        gt = rec.get("gt", {})
        if "shape_error_mm" in gt:
            logger.info("%s shape error mm: per-frame %.2f, plain mean %.2f, calibrated %.2f; MPJPE mm raw %.1f -> TTO %.1f", side,
                        gt["shape_error_mm"]["per_frame_mean"], gt["shape_error_mm"]["plain_mean"], gt["shape_error_mm"]["calibrated"],
                        gt["mpjpe_mm"]["raw"], gt["mpjpe_mm"]["tto"])
    logger.info("done: %s", out / "metrics.json")
    return 0


__all__ = ["SideResult", "parse_scan_range", "predict_side", "process_scans", "run_cli", "run_sequence", "scale_aligned_shape_error_mm", "side_frames", "sequence_targets"]
