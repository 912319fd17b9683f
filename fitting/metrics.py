"""Evaluation metrics with one standard definition each (DESIGN.md), so numbers are comparable
across stages, datasets and papers.

Units: 3D inputs are metres and 3D errors are reported in millimetres; images are float in [0, 1];
pixel errors are reported in pixels of the ORIGINAL image size (pass the run's image scale).
Inputs may be numpy arrays or torch tensors; results are Python floats.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.ndimage import correlate1d
from scipy.spatial import cKDTree

MM = 1000.0


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _valid(valid: Any, n: int) -> np.ndarray:
    if valid is None:
        return np.ones(n, dtype=bool)
    v = _np(valid, bool).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"valid mask has {v.shape[0]} entries for {n} points")
    return v


# ----------------------------------------------------------------------------- joints and vertices
def mpjpe(pred: Any, gt: Any, valid: Any = None) -> float:
    """Mean per-joint position error (mm): mean Euclidean distance over valid joints (metres in)."""
    p, g = _np(pred).reshape(-1, 3), _np(gt).reshape(-1, 3)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ")
    v = _valid(valid, len(p))
    if not v.any():
        return float("nan")
    return float(np.linalg.norm(p[v] - g[v], axis=1).mean() * MM)


def mpvpe(pred: Any, gt: Any, valid: Any = None) -> float:
    """Mean per-vertex position error (mm); vertices in correspondence."""
    return mpjpe(pred, gt, valid)


def procrustes(pred: Any, gt: Any, valid: Any = None) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Similarity (scale, rotation, translation) taking ``pred`` onto ``gt`` in least squares
    (Umeyama 1991). A reflection is never returned: if the best orthogonal map has det -1, the
    smallest singular direction is flipped. Returns (aligned pred (N,3), s, R (3,3), t (3,)) with
    aligned = s * pred @ R.T + t. Fitted on the valid points, applied to all."""
    p, g = _np(pred).reshape(-1, 3), _np(gt).reshape(-1, 3)
    v = _valid(valid, len(p))
    if v.sum() < 3:
        raise ValueError("Procrustes needs at least 3 valid points")
    x, y = p[v], g[v]
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var_x = (xc**2).sum() / len(x)
    if var_x <= 0:
        raise ValueError("Procrustes: predicted points are all identical")
    cov = yc.T @ xc / len(x)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / var_x)
    t = my - s * R @ mx
    return s * p @ R.T + t, s, R, t


def pa_mpjpe(pred: Any, gt: Any, valid: Any = None) -> float:
    """MPJPE (mm) after similarity Procrustes alignment of pred to gt."""
    aligned = procrustes(pred, gt, valid)[0]
    return mpjpe(aligned, gt, valid)


def pa_mpvpe(pred: Any, gt: Any, valid: Any = None) -> float:
    aligned = procrustes(pred, gt, valid)[0]
    return mpvpe(aligned, gt, valid)


# --------------------------------------------------------------------------------- surfaces/points
def nearest_distances(a: Any, b: Any) -> np.ndarray:
    """For each point of ``a`` (N,3), the distance to the nearest point of ``b`` (M,3)."""
    return cKDTree(_np(b).reshape(-1, 3)).query(_np(a).reshape(-1, 3))[0]


def fscore(pred: Any, gt: Any, threshold: float) -> dict[str, float]:
    """F-score at ``threshold`` metres between point sets (Knapitsch et al. 2017): precision = share
    of predicted points within the threshold of gt, recall = share of gt points within it of pred."""
    precision = float((nearest_distances(pred, gt) < threshold).mean())
    recall = float((nearest_distances(gt, pred) < threshold).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"f": f, "precision": precision, "recall": recall}


def fscores_mm(pred: Any, gt: Any, thresholds_mm: Sequence[float] = (5.0, 15.0)) -> dict[str, float]:
    """``{"f@5mm": ..., "f@15mm": ...}``: the standard hand benchmark F-scores."""
    return {f"f@{t:g}mm": fscore(pred, gt, t / MM)["f"] for t in thresholds_mm}


def chamfer_mm(a: Any, b: Any) -> float:
    """Symmetric chamfer distance (mm): mean of the two directional mean nearest distances."""
    return float(0.5 * (nearest_distances(a, b).mean() + nearest_distances(b, a).mean()) * MM)


def closest_points_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact closest point on triangle (a, b, c) to ``p``, row by row (all (K,3)); Ericson,
    Real-Time Collision Detection 5.1.5, vectorised over the Voronoi regions of the triangle."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp = p - b
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    cp = p - c
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    # interior (default), with degenerate denominators guarded
    denom = va + vb + vc
    safe = np.where(np.abs(denom) > 1e-30, denom, 1.0)
    v = vb / safe
    w = vc / safe
    out = a + ab * v[:, None] + ac * w[:, None]
    done = np.zeros(len(p), dtype=bool)

    def take(mask: np.ndarray, value: np.ndarray) -> None:
        nonlocal done
        m = mask & ~done
        out[m] = value[m]
        done |= m

    with np.errstate(divide="ignore", invalid="ignore"):
        take((d1 <= 0) & (d2 <= 0), a)  # vertex A
        take((d3 >= 0) & (d4 <= d3), b)  # vertex B
        take((d6 >= 0) & (d5 <= d6), c)  # vertex C
        t_ab = np.nan_to_num(d1 / (d1 - d3))
        take((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + ab * t_ab[:, None])  # edge AB
        t_ac = np.nan_to_num(d2 / (d2 - d6))
        take((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + ac * t_ac[:, None])  # edge AC
        t_bc = np.nan_to_num((d4 - d3) / ((d4 - d3) + (d5 - d6)))
        take((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), b + (c - b) * t_bc[:, None])  # edge BC
    return out


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, y)


def point_to_surface_distances(points: Any, vertices: Any, faces: Any, chunk: int = 200_000) -> np.ndarray:
    """Exact distance (metres) from each point (N,3) to the triangle mesh (vertices, faces).

    Exact, not sampled: the nearest mesh vertex bounds the distance from above, so only triangles
    whose bounding sphere comes within that bound can be closer; those are tested exactly."""
    P = _np(points).reshape(-1, 3)
    V = _np(vertices).reshape(-1, 3)
    F = _np(faces, np.int64).reshape(-1, 3)
    if len(F) == 0:
        raise ValueError("point_to_surface: mesh has no faces")
    tri = V[F]
    centre = tri.mean(1)
    radius = np.linalg.norm(tri - centre[:, None], axis=2).max(1)
    used = np.unique(F)
    bound = cKDTree(V[used]).query(P)[0]
    ctree = cKDTree(centre)
    cand = ctree.query_ball_point(P, bound + radius.max() + 1e-12)
    counts = np.fromiter((len(c) for c in cand), dtype=np.int64, count=len(P))
    pi = np.repeat(np.arange(len(P)), counts)
    fi = np.fromiter((f for c in cand for f in c), dtype=np.int64, count=int(counts.sum()))
    keep = np.linalg.norm(P[pi] - centre[fi], axis=1) - radius[fi] <= bound[pi] + 1e-12
    pi, fi = pi[keep], fi[keep]
    best = bound.copy()
    for s in range(0, len(pi), chunk):
        i, f = pi[s:s + chunk], fi[s:s + chunk]
        q = closest_points_on_triangles(P[i], tri[f, 0], tri[f, 1], tri[f, 2])
        np.minimum.at(best, i, np.linalg.norm(P[i] - q, axis=1))
    return best


def p2s_mm(points: Any, vertices: Any, faces: Any) -> float:
    """Point-to-surface (mm): mean exact distance from ``points`` to the mesh."""
    return float(point_to_surface_distances(points, vertices, faces).mean() * MM)


def normal_angle_error_deg(pred: Any, gt: Any, valid: Any = None, oriented: bool = True) -> float:
    """Mean angle (degrees) between corresponding normals; ``oriented=False`` ignores the sign."""
    p, g = _np(pred).reshape(-1, 3), _np(gt).reshape(-1, 3)
    p = p / np.clip(np.linalg.norm(p, axis=1, keepdims=True), 1e-12, None)
    g = g / np.clip(np.linalg.norm(g, axis=1, keepdims=True), 1e-12, None)
    cos = np.einsum("ij,ij->i", p, g)
    if not oriented:
        cos = np.abs(cos)
    v = _valid(valid, len(p))
    return float(np.degrees(np.arccos(np.clip(cos[v], -1.0, 1.0))).mean())


# ------------------------------------------------------------------------------------------ images
def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = _np(mask, np.float64) > 0.5
    if m.shape != shape:
        raise ValueError(f"mask {m.shape} does not match image {shape}")
    return m


def psnr(pred: Any, gt: Any, mask: Any = None) -> float:
    """PSNR (dB) = 20 log10(1 / RMSE), RMSE over all channels of the mask's pixels, images in [0,1]."""
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ")
    m = _mask(mask, p.shape[:2])
    if not m.any():
        return float("nan")
    err = (p - g)[m]
    rmse = float(np.sqrt(np.mean(err**2)))
    return float("inf") if rmse == 0 else 20.0 * np.log10(1.0 / rmse)


SSIM_WIN, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def gaussian_window(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def mask_bbox(mask: np.ndarray, min_size: int = 1) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the mask's pixels, grown symmetrically to at least ``min_size`` and
    kept inside the image."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("mask is empty")
    box = [int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1]
    for lo, hi, n in ((0, 1, H), (2, 3, W)):
        size = box[hi] - box[lo]
        if size < min_size:
            start = min(max(0, box[lo] - (min_size - size) // 2), max(0, n - min_size))
            box[lo], box[hi] = start, min(n, start + min_size)
    return int(box[0]), int(box[1]), int(box[2]), int(box[3])


def ssim(pred: Any, gt: Any, mask: Any = None) -> float:
    """SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
    averaged over the 'valid' window positions of the mask's bounding box and over channels."""
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ")
    if p.ndim == 2:
        p, g = p[..., None], g[..., None]
    if min(p.shape[:2]) < SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN}, got {p.shape[:2]}")
    y0, y1, x0, x1 = mask_bbox(_mask(mask, p.shape[:2]), SSIM_WIN)
    p, g = p[y0:y1, x0:x1], g[y0:y1, x0:x1]
    w = gaussian_window()
    r = SSIM_WIN // 2

    def filt(x: np.ndarray) -> np.ndarray:
        y = correlate1d(correlate1d(x, w, axis=0, mode="constant"), w, axis=1, mode="constant")
        return y[r:-r, r:-r]  # only windows fully inside: MATLAB's filter2(..., 'valid')

    C1, C2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    vals = []
    for ch in range(p.shape[2]):
        x, y = p[..., ch], g[..., ch]
        mx, my = filt(x), filt(y)
        sxx = filt(x * x) - mx * mx
        syy = filt(y * y) - my * my
        sxy = filt(x * y) - mx * my
        smap = ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx * mx + my * my + C1) * (sxx + syy + C2))
        vals.append(smap.mean())
    return float(np.mean(vals))


def silhouette_iou(pred_mask: Any, gt_mask: Any) -> float:
    """|A and B| / |A or B| of two binary masks; two empty masks score 1."""
    a, b = _np(pred_mask, np.float64) > 0.5, _np(gt_mask, np.float64) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"masks {a.shape} and {b.shape} differ")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def reprojection_error_px(projected: Any, observed: Any, scale: float = 1.0, valid: Any = None) -> float:
    """Mean pixel distance, in pixels of the ORIGINAL image: a run at ``data.scale`` = 0.5 measures
    in half-size pixels, so distances are divided by ``scale``."""
    if scale <= 0:
        raise ValueError(f"image scale must be positive, got {scale}")
    p, o = _np(projected).reshape(-1, 2), _np(observed).reshape(-1, 2)
    if p.shape != o.shape:
        raise ValueError(f"projected {p.shape} and observed {o.shape} differ")
    v = _valid(valid, len(p))
    if not v.any():
        return float("nan")
    return float(np.linalg.norm(p[v] - o[v], axis=1).mean() / scale)
