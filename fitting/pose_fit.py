"""Stage ``pose_fit``: robust multi-view 3D keypoints per hand from 2D detections.

Why it is more than a triangulation: detectors (MediaPipe) miss hands and joints, swap the
Left/Right labels in some views, sometimes put both labels on the same hand, and place single
joints far off. So the labels are treated as hints only:

1. *Which detection is which hand* — RANSAC over pairs of detections from different views: each
   pair, hypothesised to be the same hand, is triangulated (two-view DLT of all 21 joints) and
   scored by the joints of other views' detections that reproject within the inlier threshold
   (one detection per view). The best hypothesis is hand A; hand B is the best hypothesis given
   A, where each view picks its best injective assignment of its detections to {A, B, none}.
   Both skeletons are then re-triangulated robustly from their detections and the per-view
   assignment is re-solved until it stops changing.
2. *Which hand is left* — the weighted majority of the detector's labels over the views (a few
   swapped views are outvoted; the views that disagree are reported as relabelled).
3. *Each joint* — RANSAC over view pairs, then Huber-weighted Gauss-Newton on the reprojection
   error; a detection's joint is accepted when it reprojects within the threshold.

The inlier threshold is a fraction of each view's image diagonal, so it means the same at any
resolution the scan was loaded at; reported errors are in pixels of the original image size.
A detection assigned to no hand (the second label on one hand, a detection no other view
confirms) is left out of ``state.assignment`` and listed in the metrics' ``discarded_detections``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from capture.scan import Scan
from fitting.geometry import project, projection_matrices, robust_triangulate, triangulate_dlt
from fitting.state import State
from handmodel.params import SIDES

NUM_JOINTS = 21


@dataclass
class Detection:
    """One detected hand in one view: ``uv`` (21,2) pixels, ``conf`` (21,) (0 = missing joint)."""

    view: int
    label: str
    uv: np.ndarray
    conf: np.ndarray


@dataclass
class PoseFitConf:
    """Keys of the ``pose_fit`` conf section."""

    inlier_threshold: float = 0.025  # fraction of the image diagonal (41 px at 1280x1024)
    huber: float = 0.5  # Huber scale of the refinement, as a fraction of the inlier threshold
    min_confidence: float = 0.0  # joints at or below this confidence count as missing
    min_joints: int = 8  # a detection supports a hand hypothesis with at least this many joints
    assignment_rounds: int = 3  # re-triangulate / re-assign iterations
    refine_iterations: int = 10  # Gauss-Newton iterations per refinement round
    chirality_weight: float = 0.5  # weight of the 3D handedness cue against the label vote (in [-1, 1])

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "PoseFitConf":
        section = _section(conf, "pose_fit")
        out = PoseFitConf()
        for key in out.__dataclass_fields__:
            if key in section:
                setattr(out, key, type(getattr(out, key))(section[key]))
        return out


# ----------------------------------------------------------------------------------------- stage
def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Fill ``state.keypoints3d``, ``keypoints3d_valid``, ``assignment``, ``accepted`` and
    ``state.metrics['pose_fit']``."""
    cfg = PoseFitConf.from_conf(conf)
    scale = image_scale(scan, conf)
    result = fit_keypoints(scan, cfg)
    state.keypoints3d = result["keypoints3d"]
    state.keypoints3d_valid = result["keypoints3d_valid"]
    state.assignment = result["assignment"]
    state.accepted = result["accepted"]
    state.metrics["pose_fit"] = _metrics(scan, result, scale)
    return state


def image_scale(scan: Scan, conf: Mapping[str, Any] | None) -> float:
    """Factor by which the scan's images were resized from the originals (pixels / scale = pixels
    of the original size). Read from the conf's ``data.scale``; 1 when absent."""
    data = _section(conf, "data")
    s = float(data.get("scale", 1.0)) if data else 1.0
    if not s > 0:
        raise ValueError(f"data.scale must be positive, got {s}")
    return s


def fit_keypoints(scan: Scan, cfg: PoseFitConf) -> dict[str, Any]:
    """The whole pose fit on plain arrays; ``run`` only stores its result."""
    views = scan.views
    V = len(views)
    P = projection_matrices(scan.cameras)
    thr = np.array([cfg.inlier_threshold * np.hypot(v.camera.width, v.camera.height) for v in views])
    dets = detections(scan, cfg.min_confidence)
    clusters = assign_detections(dets, P, thr, cfg, n_hands=min(2, len(scan.sides)))
    tri = []
    for cluster in clusters:
        uv, conf = _stack(cluster, dets, V)
        tri.append(robust_triangulate(
            P, uv, conf, thr, huber_px=cfg.huber * float(np.median(thr)), refine_iterations=cfg.refine_iterations
        ))
    chir = [chirality(X) for X, _, _ in tri]
    sides = name_clusters(clusters, dets, scan.sides, chir, cfg.chirality_weight)

    keypoints3d: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    errors: dict[str, np.ndarray] = {}
    inliers: dict[str, np.ndarray] = {}
    chirality_of: dict[str, float] = {}
    assignment: dict[str, dict[str, str]] = {v.name: {} for v in views}
    accepted: dict[str, dict[str, np.ndarray]] = {v.name: {} for v in views}
    used: dict[str, dict[int, int]] = {}
    for cluster, side, (X, inl, err), c in zip(clusters, sides, tri, chir):
        chirality_of[side] = c
        ok = np.isfinite(X).all(axis=1)
        keypoints3d[side] = np.where(ok[:, None], X, 0.0).astype(np.float32)
        valid[side] = ok
        errors[side], inliers[side] = err, inl
        used[side] = cluster
        for v, d in cluster.items():
            assignment[views[v].name][dets[d].label] = side
            accepted[views[v].name][side] = inl[v].copy()
    for side in scan.sides:  # a side the scan expects but no views support: present, all invalid
        if side not in keypoints3d:
            keypoints3d[side] = np.zeros((NUM_JOINTS, 3), np.float32)
            valid[side] = np.zeros(NUM_JOINTS, bool)
    return {
        "keypoints3d": keypoints3d,
        "keypoints3d_valid": valid,
        "assignment": assignment,
        "accepted": accepted,
        "errors": errors,
        "inliers": inliers,
        "clusters": used,
        "chirality": chirality_of,
        "detections": dets,
        "threshold_px": thr,
    }


# ------------------------------------------------------------------------------------ detections
def detections(scan: Scan, min_confidence: float = 0.0) -> list[Detection]:
    """Every detected hand of every view, labels as the detector gave them."""
    out = []
    for vi, view in enumerate(scan.views):
        for label in sorted(view.keypoints):
            kp = np.asarray(view.keypoints[label], dtype=np.float64)
            conf = np.where(kp[:, 2] > min_confidence, kp[:, 2], 0.0)
            if (conf > 0).sum() >= 2:
                out.append(Detection(vi, label, kp[:, :2].copy(), conf))
    return out


def _stack(cluster: dict[int, int], dets: list[Detection], V: int) -> tuple[np.ndarray, np.ndarray]:
    """(V,21,2) pixels and (V,21) confidences of one hand from its detection per view."""
    uv = np.zeros((V, NUM_JOINTS, 2))
    conf = np.zeros((V, NUM_JOINTS))
    for v, d in cluster.items():
        uv[v], conf[v] = dets[d].uv, dets[d].conf
    return uv, conf


# ------------------------------------------------------------------------------------ assignment
def support(P: np.ndarray, thr: np.ndarray, skeletons: np.ndarray, dets: list[Detection], min_joints: int) -> np.ndarray:
    """(H,D) support of each detection for each skeleton (H,21,3): the confidence-weighted count
    of its joints reprojecting within the threshold; 0 below ``min_joints`` inlier joints."""
    H = len(skeletons)
    S = np.zeros((H, len(dets)))
    if H == 0 or not dets:
        return S
    Xf = np.where(np.isfinite(skeletons), skeletons, 0.0).reshape(-1, 3)
    proj, z = project(P, Xf)
    proj = proj.reshape(len(P), H, NUM_JOINTS, 2)
    z = z.reshape(len(P), H, NUM_JOINTS)
    finite = np.isfinite(skeletons).all(axis=-1)  # (H,21)
    for k, d in enumerate(dets):
        err = np.linalg.norm(proj[d.view] - d.uv[None], axis=-1)  # (H,21)
        inl = (err < thr[d.view]) & (z[d.view] > 0) & finite & (d.conf[None] > 0)
        n = inl.sum(axis=1)
        S[:, k] = np.where(n >= min_joints, (inl * d.conf[None]).sum(axis=1), 0.0)
    return S


def _pair_hypotheses(dets: list[Detection], P: np.ndarray) -> np.ndarray:
    """Two-view DLT skeletons (H,21,3) of every pair of detections from different views."""
    pairs = [(a, b) for a in range(len(dets)) for b in range(a + 1, len(dets)) if dets[a].view != dets[b].view]
    if not pairs:
        return np.zeros((0, NUM_JOINTS, 3))
    Pp = np.stack([P[[dets[a].view, dets[b].view]] for a, b in pairs])  # (H,2,3,4)
    uv = np.stack([np.stack([dets[a].uv, dets[b].uv], axis=1) for a, b in pairs])  # (H,21,2,2)
    w = np.stack([np.stack([dets[a].conf > 0, dets[b].conf > 0], axis=1) for a, b in pairs]).astype(float)
    H = len(pairs)
    X = triangulate_dlt(
        np.broadcast_to(Pp[:, None], (H, NUM_JOINTS, 2, 3, 4)).reshape(-1, 2, 3, 4),
        uv.reshape(-1, 2, 2),
        w.reshape(-1, 2),
    )
    return X.reshape(H, NUM_JOINTS, 3)


def _view_groups(dets: list[Detection]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for k, d in enumerate(dets):
        groups.setdefault(d.view, []).append(k)
    return groups


def _best_view_assignment(sa: np.ndarray, sb: np.ndarray | None, idx: list[int]) -> tuple[float, int | None, int | None]:
    """Best injective choice of one detection per hand (or none) among ``idx`` of one view."""
    best = (0.0, None, None)
    cands_a = [None, *idx]
    cands_b = [None, *idx] if sb is not None else [None]
    for a in cands_a:
        for b in cands_b:
            if a is not None and a == b:
                continue
            s = (sa[a] if a is not None else 0.0) + (sb[b] if (b is not None and sb is not None) else 0.0)
            if s > best[0] + 1e-9:
                best = (s, a, b)
    return best


def _joint_scores(S: np.ndarray, fixed: np.ndarray | None, groups: dict[int, list[int]]) -> np.ndarray:
    """Score of every hypothesis row of ``S`` as hand A, given ``fixed`` (D,) support of hand B
    (or alone): the sum over views of the best injective assignment."""
    H = S.shape[0]
    total = np.zeros(H)
    for idx in groups.values():
        sub = S[:, idx]  # (H,n)
        if fixed is None:
            total += sub.max(axis=1)
            continue
        fb = fixed[idx]
        best = np.maximum(sub.max(axis=1), fb.max())
        for i in range(len(idx)):
            for j in range(len(idx)):
                if i != j:
                    best = np.maximum(best, sub[:, i] + fb[j])
        total += best
    return total


def assign_detections(
    dets: list[Detection], P: np.ndarray, thr: np.ndarray, cfg: PoseFitConf, n_hands: int = 2
) -> list[dict[int, int]]:
    """Group the detections into at most ``n_hands`` hands: a list of {view index: detection
    index}, each hand seen in at least two views, hands sorted by support (largest first)."""
    if not dets:
        return []
    groups = _view_groups(dets)
    hyp = _pair_hypotheses(dets, P)
    if len(hyp) == 0:
        return []
    S = support(P, thr, hyp, dets, cfg.min_joints)
    a = int(np.argmax(_joint_scores(S, None, groups)))
    b: int | None = None
    if n_hands >= 2:
        for _ in range(2):  # coordinate ascent: B given A, then A given B
            b = int(np.argmax(_joint_scores(S, S[a], groups)))
            a = int(np.argmax(_joint_scores(S, S[b], groups)))
    skeletons = [hyp[a]] + ([hyp[b]] if b is not None else [])
    clusters: list[dict[int, int]] = []
    for _ in range(max(1, cfg.assignment_rounds)):
        Ss = support(P, thr, np.stack(skeletons), dets, cfg.min_joints)
        new = _assign(Ss, groups)
        new = [c for c in new if len(c) >= 2]
        if new == clusters:
            break
        clusters = new
        skeletons = []
        for c in clusters:
            uv, conf = _stack(c, dets, len(P))
            X, _, _ = robust_triangulate(P, uv, conf, thr, huber_px=cfg.huber * float(np.median(thr)),
                                         refine_iterations=cfg.refine_iterations)
            skeletons.append(X)
        if not skeletons:
            break
    clusters.sort(key=lambda c: -sum((dets[d].conf > 0).sum() for d in c.values()))
    return clusters


def _assign(S: np.ndarray, groups: dict[int, list[int]]) -> list[dict[int, int]]:
    """Per view, the best injective assignment of detections to the (one or two) skeletons."""
    out: list[dict[int, int]] = [{} for _ in range(S.shape[0])]
    for v, idx in groups.items():
        sb = S[1] if S.shape[0] > 1 else None
        _, da, db = _best_view_assignment(S[0], sb, idx)
        if da is not None:
            out[0][v] = da
        if db is not None and sb is not None:
            out[1][v] = db
    return out


def chirality(X: np.ndarray) -> float:
    """Handedness of a 3D skeleton from its flexion, in [-1, 1]: > 0 left, < 0 right, ~0 unknown.

    With x = wrist -> middle MCP and y = pinky MCP -> index MCP, n = x × y points out of the back
    of a right hand and out of the palm of a left one; fingers and thumb bend towards the palm, so
    the mean of (tip - base)·n over the digits is negative for a right hand. A flat hand gives ~0,
    which is why this only backs up the detector's labels."""
    if not np.isfinite(X[[0, 1, 4, 5, 9, 17]]).all():
        return 0.0
    x = X[9] - X[0]
    y = X[5] - X[17]
    if np.linalg.norm(x) < 1e-9:
        return 0.0
    x = x / np.linalg.norm(x)
    y = y - x * (x @ y)
    if np.linalg.norm(y) < 1e-9:
        return 0.0
    n = np.cross(x, y / np.linalg.norm(y))
    vals = []
    for base, tip in ((1, 4), (5, 8), (9, 12), (13, 16), (17, 20)):
        d = X[tip] - X[base]
        if np.isfinite(d).all() and np.linalg.norm(d) > 1e-9:
            vals.append(d @ n / np.linalg.norm(d))
    return float(np.mean(vals)) if vals else 0.0


def name_clusters(
    clusters: list[dict[int, int]],
    dets: list[Detection],
    sides: tuple[str, ...],
    chiralities: list[float] | None = None,
    chirality_weight: float = 0.5,
) -> list[str]:
    """Which side each hand is: the detector's labels, weighted by joint counts and voted over
    views (in [-1, 1]), plus ``chirality_weight`` times the 3D handedness cue — which so decides
    only when the vote is close (one hand labelled both ways, or few views)."""
    if not clusters:
        return []
    if len(sides) == 1:
        return [sides[0]]
    chir = chiralities if chiralities is not None else [0.0] * len(clusters)

    def label_vote(c: dict[int, int]) -> float:
        n = [float((dets[d].conf > 0).sum()) for d in c.values()]
        s = [1.0 if dets[d].label == "left" else -1.0 for d in c.values()]
        return float(np.dot(n, s) / max(sum(n), 1e-9))

    if len(clusters) == 1:
        evidence = label_vote(clusters[0]) + chirality_weight * chir[0]
        return ["left" if evidence > 0 else "right"]
    evidence = (label_vote(clusters[0]) - label_vote(clusters[1])) / 2 + chirality_weight * (chir[0] - chir[1]) / 2
    return ["left", "right"] if evidence > 0 else ["right", "left"]


# ---------------------------------------------------------------------------------------- metrics
def _metrics(scan: Scan, result: dict[str, Any], scale: float) -> dict[str, Any]:
    """Per side median reprojection error (original pixels) over the accepted joints, acceptance
    fractions over all detected joints, and which views were relabelled or discarded."""
    dets: list[Detection] = result["detections"]
    views = scan.views
    detected_total = int(sum((v.keypoints[l][:, 2] > 0).sum() for v in views for l in v.keypoints))
    per_side: dict[str, Any] = {}
    accepted_total = 0
    for side, cluster in result["clusters"].items():
        err, inl = result["errors"][side], result["inliers"][side]
        n_det = int(sum((dets[d].conf > 0).sum() for d in cluster.values()))
        n_acc = int(inl.sum())
        accepted_total += n_acc
        per_side[side] = {
            "reprojection_median_px": float(np.median(err[inl]) / scale) if n_acc else None,
            "reprojection_mean_px": float(np.mean(err[inl]) / scale) if n_acc else None,
            "accepted_fraction": n_acc / max(n_det, 1),
            "views": [views[v].name for v in sorted(cluster)],
            "valid_joints": int(result["keypoints3d_valid"][side].sum()),
            "chirality": result["chirality"][side],
            # the 3D cue confidently says the other side: worth a look at the labels and views
            "handedness_conflict": bool(abs(result["chirality"][side]) > 0.15
                                        and (result["chirality"][side] > 0) != (side == "left")),
        }
    assigned = {(v, dets[d].label) for c in result["clusters"].values() for v, d in c.items()}
    relabelled = sorted(
        {views[v].name for c_side, c in result["clusters"].items() for v, d in c.items() if dets[d].label != c_side}
    )
    discarded = [f"{views[d.view].name}:{d.label}" for d in dets if (d.view, d.label) not in assigned]
    all_err = [result["errors"][s][result["inliers"][s]] for s in result["clusters"]]
    pooled = np.concatenate(all_err) if all_err else np.zeros(0)
    return {
        "sides": per_side,
        "reprojection_median_px": float(np.median(pooled) / scale) if pooled.size else None,
        "accepted_fraction": accepted_total / max(detected_total, 1),
        "detected_joints": detected_total,
        "accepted_joints": accepted_total,
        "relabelled_views": relabelled,
        "discarded_detections": discarded,
        "inlier_threshold_px": float(np.median(result["threshold_px"]) / scale),
    }


def _section(conf: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    if conf is None:
        return {}
    try:
        sec = conf[name] if name in conf else {}
    except (KeyError, TypeError):
        return {}
    return sec if isinstance(sec, Mapping) else {}
