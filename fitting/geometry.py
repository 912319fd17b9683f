"""Multi-view geometry for the fitting stages: projection, DLT and robust triangulation, similarity
alignment and rotation conversions.

Everything here is batched numpy (float64) unless the name says torch: the pose fit works on a few
hundred points, where vectorised numpy is faster and more exact than autograd.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from capture.camera import Camera


# ---------------------------------------------------------------------------------------- projection
def projection_matrices(cameras: list[Camera]) -> np.ndarray:
    """(V,3,4) matrices P = K [R|t] of the cameras."""
    return np.stack([c.projection for c in cameras]).astype(np.float64)


def project(P: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points ``X`` (N,3) with every camera ``P`` (V,3,4).

    Returns pixels (V,N,2) and depths (V,N); points behind a camera get depth <= 0 and pixels far
    away (so they never count as inliers)."""
    Xh = np.concatenate([X, np.ones_like(X[:, :1])], axis=1)
    x = np.einsum("vij,nj->vni", P, Xh)
    z = x[..., 2]
    safe = np.where(z > 1e-9, z, 1e-9)
    uv = x[..., :2] / safe[..., None]
    uv = np.where((z > 1e-9)[..., None], uv, 1e9)
    return uv, z


def reprojection_errors(P: np.ndarray, X: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Pixel distance (V,N) between the projections of ``X`` (N,3) and observations ``uv`` (V,N,2)."""
    proj, _ = project(P, X)
    return np.linalg.norm(proj - uv, axis=-1)


# -------------------------------------------------------------------------------------- triangulation
def triangulate_dlt(P: np.ndarray, uv: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted linear (DLT) triangulation of N points, each seen in V views.

    ``P`` (V,3,4) or (N,V,3,4), ``uv`` (N,V,2), ``w`` (N,V) >= 0 (0 = unused). Rows are normalised
    before weighting so the result does not depend on pixel magnitudes. Returns (N,3); points with
    fewer than two weighted views come back as NaN."""
    N, V = uv.shape[:2]
    if P.ndim == 3:
        P = np.broadcast_to(P, (N, V, 3, 4))
    rows = np.concatenate(
        [uv[..., 0:1] * P[..., 2, :] - P[..., 0, :], uv[..., 1:2] * P[..., 2, :] - P[..., 1, :]], axis=1
    )  # (N, 2V, 4)
    ww = np.concatenate([w, w], axis=1)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    A = rows / np.maximum(norms, 1e-12) * ww[..., None]
    _, _, vt = np.linalg.svd(A)
    Xh = vt[:, -1]
    X = Xh[:, :3] / np.where(np.abs(Xh[:, 3:]) > 1e-12, Xh[:, 3:], 1e-12)
    X[(w > 0).sum(axis=1) < 2] = np.nan
    return X


def refine_points(
    P: np.ndarray,
    uv: np.ndarray,
    w: np.ndarray,
    X: np.ndarray,
    huber_px: float,
    iterations: int = 10,
) -> np.ndarray:
    """Huber-weighted Gauss-Newton (IRLS) on the reprojection error of each point independently.

    ``P`` (V,3,4), ``uv`` (V,N,2) observations, ``w`` (V,N) confidences (0 = unused), ``X`` (N,3)
    start. The Huber weights keep a few bad detections from pulling the point while the squared
    error near the solution keeps its accuracy; a small Levenberg damping keeps two-view,
    short-baseline points stable."""
    X = X.copy()
    M = P[:, :3, :3]  # (V,3,3)
    for _ in range(iterations):
        Xh = np.concatenate([X, np.ones_like(X[:, :1])], axis=1)
        x = np.einsum("vij,nj->vni", P, Xh)  # (V,N,3)
        z = x[..., 2]
        front = z > 1e-9
        zs = np.where(front, z, 1.0)
        proj = x[..., :2] / zs[..., None]
        r = proj - uv  # (V,N,2)
        # d(proj)/dX = (M[:2] - proj * M[2]) / z
        J = (M[:, None, :2, :] - proj[..., None] * M[:, None, 2:3, :]) / zs[..., None, None]  # (V,N,2,3)
        err = np.linalg.norm(r, axis=-1)
        hw = np.where(err <= huber_px, 1.0, huber_px / np.maximum(err, 1e-12))
        ww = w * hw * front
        H = np.einsum("vn,vnai,vnaj->nij", ww, J, J)
        g = np.einsum("vn,vnai,vna->ni", ww, J, r)
        lam = 1e-6 * np.trace(H, axis1=1, axis2=2)[:, None, None] + 1e-12
        H = H + lam * np.eye(3)
        dX = np.linalg.solve(H, -g[..., None])[..., 0]
        ok = np.isfinite(dX).all(axis=1) & ((w > 0).sum(axis=0) >= 2)
        X[ok] += dX[ok]
        if np.abs(dX[ok]).max(initial=0.0) < 1e-9:
            break
    return X


def robust_triangulate(
    P: np.ndarray,
    uv: np.ndarray,
    conf: np.ndarray,
    threshold_px: np.ndarray | float,
    huber_px: float | None = None,
    refine_iterations: int = 10,
    rounds: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triangulate N points from V views with outliers, each point independently.

    RANSAC over every pair of views that see the point (exhaustive: V <= ~30 gives <= 435 pairs):
    each pair's two-view DLT is scored by the confidence of the views it reprojects into within
    ``threshold_px`` (per view (V,) or a scalar), ties broken by the truncated error. The winner is
    refined on its inliers by Huber IRLS, and the inliers are re-selected, ``rounds`` times.

    ``P`` (V,3,4), ``uv`` (V,N,2), ``conf`` (V,N) (0 = not observed). Returns ``X`` (N,3) (NaN
    where fewer than two views agree), ``inliers`` (V,N) bool, ``errors`` (V,N) px."""
    V, N = conf.shape
    thr = np.broadcast_to(np.asarray(threshold_px, dtype=np.float64), (V,))[:, None]  # (V,1)
    huber = float(np.median(thr)) / 2 if huber_px is None else huber_px
    pairs = np.array(list(combinations(range(V), 2)), dtype=int).reshape(-1, 2)
    X = np.full((N, 3), np.nan)
    inl = np.zeros((V, N), dtype=bool)
    if len(pairs) == 0:
        return X, inl, np.full((V, N), np.inf)
    observed = conf > 0
    # hypotheses: (pairs * N) two-view DLTs in one batch
    Pp = P[pairs]  # (Q,2,3,4)
    uvp = np.transpose(uv[pairs], (0, 2, 1, 3))  # (Q,N,2,2)
    wp = np.transpose(observed[pairs].astype(np.float64), (0, 2, 1))  # (Q,N,2)
    Q = len(pairs)
    hyp = triangulate_dlt(
        np.broadcast_to(Pp[:, None], (Q, N, 2, 3, 4)).reshape(Q * N, 2, 3, 4),
        uvp.reshape(Q * N, 2, 2),
        wp.reshape(Q * N, 2),
    ).reshape(Q, N, 3)
    usable = np.isfinite(hyp).all(axis=-1)  # (Q,N)
    hyp_f = np.where(usable[..., None], hyp, 0.0)
    Xh = np.concatenate([hyp_f, np.ones_like(hyp_f[..., :1])], axis=-1)
    x = np.einsum("vij,qnj->qvni", P, Xh)  # (Q,V,N,3)
    z = x[..., 2]
    proj = x[..., :2] / np.where(z > 1e-9, z, 1e-9)[..., None]
    err = np.linalg.norm(proj - uv[None], axis=-1)
    err = np.where(z > 1e-9, err, np.inf)
    is_in = (err < thr[None]) & observed[None]
    # a hypothesis must agree with the two views it came from
    both = is_in[np.arange(Q), pairs[:, 0]] & is_in[np.arange(Q), pairs[:, 1]]  # (Q,N)
    score = (is_in * conf[None]).sum(axis=1)  # (Q,N)
    trunc = np.where(observed[None], np.minimum(err, thr[None]) / thr[None], 0.0).sum(axis=1)
    total = np.where(usable & both, score - 1e-3 * trunc, -np.inf)
    best = np.argmax(total, axis=0)  # (N,)
    found = np.isfinite(total[best, np.arange(N)])
    X[found] = hyp[best[found], np.arange(N)[found]]
    inl[:, found] = is_in[best[found], :, np.arange(N)[found]].T
    for _ in range(rounds):
        w = conf * inl
        ok = found & (inl.sum(axis=0) >= 2)
        if not ok.any():
            break
        X[ok] = refine_points(P, uv[:, ok], w[:, ok], X[ok], huber, refine_iterations)
        e = reprojection_errors(P, np.where(np.isfinite(X), X, 0.0), uv)
        new_inl = (e < thr) & observed
        new_inl[:, ~ok] = inl[:, ~ok]
        # never drop below two views: keep the old set if the refined point lost its support
        keep_old = new_inl.sum(axis=0) < 2
        new_inl[:, keep_old] = inl[:, keep_old]
        inl = new_inl
    errors = reprojection_errors(P, np.where(np.isfinite(X), X, 0.0), uv)
    errors[:, ~np.isfinite(X).all(axis=1)] = np.inf
    X[inl.sum(axis=0) < 2] = np.nan
    inl[:, ~np.isfinite(X).all(axis=1)] = False
    return X, inl, errors


# ------------------------------------------------------------------------------------------ alignment
def similarity_transform(
    src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, with_scale: bool = True
) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted Umeyama: (s, R, t) minimising sum w |s R src + t - dst|^2 for (N,3) point sets."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / max(w.sum(), 1e-12)
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    cov = (b * w[:, None]).T @ a
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    var = float(w @ (a**2).sum(axis=1))
    s = float(np.trace(np.diag(S) @ D) / max(var, 1e-12)) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


# ------------------------------------------------------------------------------------------ rotations
def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues (...,3) -> (...,3,3), differentiable and safe at zero angle."""
    theta2 = (aa * aa).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-12)
    k = aa / theta
    small = theta2 < 1e-8
    K = _skew(k)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(K.shape)
    R = eye + s * K + (1 - c) * (K @ K)
    R_small = eye + _skew(aa)  # first order near identity keeps gradients finite
    return torch.where(small[..., None], R_small, R)


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (...,3,3) -> axis-angle (...,3) (numpy; for initialisations)."""
    from scipy.spatial.transform import Rotation

    shape = R.shape[:-2]
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(*shape, 3)


def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([z, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], z, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )
