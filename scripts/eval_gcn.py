"""Held-out accuracy of the committed GCN predictor: ``python scripts/eval_gcn.py``.

On hands drawn with a seed that training (1000+, 2000+) and validation (1) never used:
- 3D keypoints (clean, both sides, random world pose): PA-MPVPE of the GCN mesh and of the
  hand model driven by the predicted parameters, MPJPE of those parameters' joints (world, after
  the translation solve), all in mm. Targets: PA-MPVPE <= 4 mm, MPJPE <= 6 mm.
- 2D keypoints of one view (640x480, 35-55 degree field of view, hand filling ~70 % of the image
  as in ``synthetic.generate``) with 3 px noise: PA-MPVPE of the GCN and param meshes and the
  registered wrist's error. Target: PA-MPVPE <= 8 mm.
- ``--iterations N`` (instead of the above): how many hand_fit iterations reach the final error
  of the default fit from the mean hand (Adam, 40 + 150 iterations), within 5 % (at least
  0.05 mm), from the mean hand (that schedule, shorter) and from the GCN's prediction (the warm
  schedule: damped Newton steps), on N synthetic scans with clean and 2 mm-noise 3D keypoints
  (error: true MPJPE) and on the real capture ``--demo`` scan 1 (its detected 2D keypoints ->
  pose_fit's 3D keypoints; error: distance to those keypoints). Also prints seconds per fit and a
  control: Newton steps from the mean hand. See ``iterations_to_target``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import handmodel  # noqa: E402
from fitting import metrics as M  # noqa: E402
from networks.predictor import GCNPredictor  # noqa: E402
from networks.synthetic_pairs import PairSampler  # noqa: E402

EVAL_SEED = 7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eval_3d(pred: GCNPredictor, n: int, seed: int) -> dict[str, float]:
    model = handmodel.load("builtin", "right")
    out: dict[str, float] = {}
    for side in ("right", "left"):
        s = PairSampler(model, seed + (0 if side == "right" else 100))
        h = s.hands(n)
        T = 0.2 * torch.randn(n, 3, generator=s.g)
        verts = h["verts"] @ h["R"].transpose(1, 2) + T[:, None]
        joints = h["joints"] @ h["R"].transpose(1, 2) + T[:, None]
        if side == "left":
            flip = torch.tensor([-1.0, 1.0, 1.0])
            verts, joints = verts * flip, joints * flip
        p = pred.predict_3d(joints, torch.ones(n, 21), side)
        with torch.no_grad():
            pv = pred.models[side](p.params).vertices
        out[f"3d_{side}_pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(p.vertices[i], verts[i]) for i in range(n)]))
        out[f"3d_{side}_mpvpe_mm"] = float(np.mean([M.mpvpe(p.vertices[i], verts[i]) for i in range(n)]))
        out[f"3d_{side}_param_pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(pv[i], verts[i]) for i in range(n)]))
        out[f"3d_{side}_param_mpjpe_mm"] = float(np.mean([M.mpjpe(p.joints[i], joints[i]) for i in range(n)]))
    return out


def eval_2d(pred: GCNPredictor, n: int, seed: int, noise_px: float) -> dict[str, float]:
    model = handmodel.load("builtin", "right")
    s = PairSampler(model, seed + 200)
    _, truth = s.batch_2d(n, mode="scene", noise_px=(noise_px, noise_px), miss_fraction=0.0)
    out: dict[str, float] = {}
    for side in ("right", "left"):
        uv, K, verts, wrist = truth["uv"], truth["K"], truth["verts_cam"], truth["wrist_cam"]
        if side == "left":  # mirror the camera picture: x -> -x in camera coordinates
            flip = torch.tensor([-1.0, 1.0, 1.0])
            verts, wrist = verts * flip, wrist * flip
            uv = torch.stack([2 * K[:, None, 0, 2] - uv[..., 0], uv[..., 1]], -1)
        p = pred.predict_2d(uv, torch.ones(n, 21), K, side)
        with torch.no_grad():
            pv = pred.models[side](p.params).vertices
        out[f"2d_{side}_pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(p.vertices[i], verts[i]) for i in range(n)]))
        out[f"2d_{side}_param_pa_mpvpe_mm"] = float(np.mean([M.pa_mpvpe(pv[i], verts[i]) for i in range(n)]))
        out[f"2d_{side}_root_rel_mpvpe_mm"] = float(np.mean([M.mpvpe(p.vertices[i] - p.params.transl[i], verts[i] - wrist[i]) for i in range(n)]))
        out[f"2d_{side}_wrist_error_mm"] = float((p.params.transl - wrist).norm(dim=-1).median() * 1000)
    return out


# ----------------------------------------------------------------------- fit iterations (--iterations)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # of the mean-hand schedule's budget


@dataclass
class FitCase:
    """One fit problem: a scan, the pose fit's state (3D keypoints etc.), and how to score a fit
    (error in mm of fitted parameters; ground truth on synthetic scans, keypoints on real ones)."""

    scan: Any
    state: Any
    score: Callable[[dict], float]


def target_of(reference_mm: float, tolerance: float, floor_mm: float) -> float:
    """'Reached the same final error': within ``tolerance`` (relative) of the reference fit's
    final error, and never asked closer than ``floor_mm`` (below what a fit can mean)."""
    return max(reference_mm * (1.0 + tolerance), reference_mm + floor_mm)


def _fit(cases: list[FitCase], conf: dict, gcn: Callable[[Any, Any], None] | None) -> tuple[float, float]:
    """Mean error (mm) and mean hand_fit seconds over the cases, each fitted from a copy of its
    state (``gcn`` fills ``state.params`` first: the warm start)."""
    from fitting import hand_fit

    errs, secs = [], []
    for c in cases:
        st = copy.deepcopy(c.state)
        if gcn is not None:
            gcn(c.scan, st)
        t0 = time.perf_counter()
        out = hand_fit.run(c.scan, st, conf)
        secs.append(time.perf_counter() - t0)
        errs.append(c.score(out.params))
    return float(np.mean(errs)), float(np.mean(secs))


def iterations_to_target(cases: list[FitCase], base: dict, gcn: Callable[[Any, Any], None], tolerance: float = 0.05,
                         floor_mm: float = 0.05) -> dict[str, object]:
    """The iterations each start needs to reach the final error of hand_fit from the mean hand with
    its default schedule (Adam, ``iterations_global`` + ``iterations_full``), within the tolerance
    of :func:`target_of`. A count is the smallest *budget* whose fit ends at or below the target:
    the mean-hand schedule scaled by ``FRACTIONS`` (iterations = global + full; Adam's step size
    decays over the budget, so a shorter run is not a prefix of a longer one), and the GCN start's
    warm schedule with 1, 2, ... ``warm_iterations_full`` Newton steps. The same Newton steps from
    the mean hand are a control: what the optimizer alone buys. Errors are means over the cases."""
    from fitting.hand_fit import HandFitConf

    d = HandFitConf()

    def conf(**kw: object) -> dict:
        return {**base, "hand_fit": {**base.get("hand_fit", {}), **kw}}

    ref, ref_s = _fit(cases, conf(), None)
    target = target_of(ref, tolerance, floor_mm)
    out: dict[str, object] = {"reference_final_mm": ref, "reference_iterations": d.iterations_global + d.iterations_full,
                              "reference_seconds": ref_s, "target_mm": target}
    for f in FRACTIONS:
        g, n = round(f * d.iterations_global), round(f * d.iterations_full)
        err, sec = _fit(cases, conf(iterations_global=g, iterations_full=n), None) if f < 1 else (ref, ref_s)
        if err <= target:
            out.update(mean_iterations=g + n, mean_final_mm=err, mean_seconds=sec)
            break
    out["mean_start_mm"] = _fit(cases, conf(iterations_global=0, iterations_full=0), None)[0]  # Kabsch + IK
    out["gcn_start_mm"] = _fit(cases, conf(warm_iterations_global=0, warm_iterations_full=0), gcn)[0]
    out.update(gcn_iterations=None, control_iterations=None)
    for name, start, key in (("gcn", gcn, "warm_iterations_full"), ("control", None, "iterations_full")):
        for k in range(1, d.warm_iterations_full + 1):
            kw = {key: k} if start is not None else {"optimizer": d.warm_optimizer, "iterations_global": 0, key: k}
            err, sec = _fit(cases, conf(**kw), start)
            out[f"{name}_final_mm"], out[f"{name}_seconds"] = err, sec
            if err <= target:
                out[f"{name}_iterations"] = d.warm_iterations_global + k
                break
    return out


def synthetic_cases(n_scans: int, seed: int, noise_mm: float) -> list[FitCase]:
    """Two-hand synthetic scans (6 views) whose 3D keypoints are the truth plus N(0, noise_mm)."""
    import synthetic
    from fitting.state import State

    cases = []
    for k in range(n_scans):
        syn = synthetic.generate(views=6, size=(640, 480), seed=seed + 1000 + k, noise_px=2.0, miss_rate=0.0,
                                 hand_miss_rate=0.0, swap_rate=0.0)
        g = np.random.default_rng(seed + k)
        truth = {s: np.asarray(syn.hands.keypoints3d[s], np.float64) for s in syn.scan.sides}
        st = State()
        st.keypoints3d = {s: (truth[s] + g.normal(0, noise_mm / 1000, (21, 3))).astype(np.float32) for s in truth}
        st.keypoints3d_valid = {s: np.ones(21, bool) for s in truth}
        cases.append(FitCase(syn.scan, st, _scorer(truth)))
    return cases


def _scorer(reference: dict[str, np.ndarray], valid: dict[str, np.ndarray] | None = None) -> Callable[[dict], float]:
    """Mean over sides of the MPJPE (mm) of the fitted hand's joints against ``reference``."""
    models = {s: handmodel.load("builtin", s) for s in reference}

    def score(params: dict) -> float:
        errs = []
        for s, ref in reference.items():
            with torch.no_grad():
                j = models[s](params[s]).joints[0].numpy()
            errs.append(M.mpjpe(j, ref, None if valid is None else valid[s]))
        return float(np.mean(errs))

    return score


def gcn_filler(conf: dict) -> Callable[[Any, Any], None]:
    """The pipeline's ``init`` stage (GCN from the 3D keypoints) as the warm start."""
    from fitting import init_gcn

    def fill(scan: Any, state: Any) -> None:
        init_gcn.run(scan, state, {**conf, "init": {"enabled": True, "input": "3d", "weights": ""}})

    return fill


def real_capture_case(data_path: str, scan_id: str) -> tuple[FitCase, dict]:
    """The real capture: its detected 2D keypoints -> pose_fit's 3D keypoints, scored by the fitted
    joints' distance to those keypoints (no ground truth), with conf/demo_sfs.conf's settings."""
    from fitting import pose_fit
    from fitting.conf import load_conf
    from fitting.pipeline import read_scan
    from fitting.state import State

    tree = load_conf(os.path.join(REPO, "conf", "demo_sfs.conf"), ["device=cpu", "log.progress=false"]).tree
    scan = read_scan(tree, data_path, scan_id, load_images=False)
    conf = {"data": tree["data"], "hand_model": tree["hand_model"], "device": "cpu",
            "pose_fit": tree["pose_fit"], "hand_fit": dict(tree["hand_fit"])}
    state = pose_fit.run(scan, State(), conf)
    kp = {s: np.asarray(state.keypoints3d[s], np.float64) for s in scan.sides if s in state.keypoints3d}
    valid = {s: np.asarray(state.keypoints3d_valid[s], bool) for s in kp}
    return FitCase(scan, state, _scorer(kp, valid)), conf


def eval_iterations(pred_seed: int, n_scans: int, demo: str | None, tolerance: float, floor_mm: float) -> dict[str, object]:
    """Synthetic scans with clean and 2 mm-noise keypoints, and the real capture when present."""
    base = {"device": "cpu"}
    res: dict[str, object] = {}
    for noise in (0.0, 2.0):
        r = iterations_to_target(synthetic_cases(n_scans, pred_seed, noise), base, gcn_filler(base), tolerance, floor_mm)
        res.update({f"synthetic_{noise:g}mm_{k}": v for k, v in r.items()})
    if demo and os.path.isfile(os.path.join(demo, "1", "camera", "param.npz")):
        case, conf = real_capture_case(demo, "1")
        r = iterations_to_target([case], conf, gcn_filler(conf), tolerance, floor_mm)
        res.update({f"real_{k}": v for k, v in r.items()})
    else:
        res["real_skipped"] = f"no capture at {demo}"
    for pre in ("synthetic_0mm", "synthetic_2mm", "real"):
        mean_it, gcn_it = res.get(f"{pre}_mean_iterations"), res.get(f"{pre}_gcn_iterations")
        if mean_it is not None:
            met = gcn_it is not None and 2 * gcn_it <= mean_it
            res[f"{pre}_criterion"] = f"GCN {gcn_it} vs mean hand {mean_it} iterations: {'met' if met else 'NOT met'} (<= half)"
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Held-out accuracy of the GCN predictor.")
    ap.add_argument("--n", type=int, default=256, help="hands per test")
    ap.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out seed (training uses 1000+/2000+, validation 1)")
    ap.add_argument("--noise-px", type=float, default=3.0)
    ap.add_argument("--iterations", type=int, default=0, metavar="N",
                    help="only measure the hand_fit iterations from the mean hand vs the GCN on N synthetic scans (and the real capture)")
    ap.add_argument("--demo", default=os.path.join(REPO, "..", "shared", "data", "fmhr_demo"), help="real capture for --iterations")
    ap.add_argument("--tolerance", type=float, default=0.05, help="--iterations: relative tolerance on the final error")
    ap.add_argument("--floor-mm", type=float, default=0.05, help="--iterations: smallest tolerance in mm")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    res: dict[str, object] = {}
    if args.iterations:
        res.update(eval_iterations(args.seed, args.iterations, args.demo, args.tolerance, args.floor_mm))
    else:
        pred = GCNPredictor.load(args.weights)
        res.update(eval_3d(pred, args.n, args.seed))
        res.update(eval_2d(pred, args.n, args.seed, args.noise_px))
        res["targets"] = {"3d_pa_mpvpe_mm": 4.0, "3d_mpjpe_mm": 6.0, "2d_pa_mpvpe_mm": 8.0}
    res["seconds"] = round(time.time() - t0, 1)
    for k, v in res.items():
        print(f"{k:40s} {v:.2f}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
