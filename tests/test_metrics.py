"""Metrics against hand-computed values and independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fitting import metrics as M


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------ joints / Procrustes
def test_mpjpe_known_offset_and_valid_mask():
    gt = _rng().normal(size=(21, 3))
    pred = gt + np.array([0.003, 0.004, 0.0])  # 5 mm everywhere
    assert M.mpjpe(pred, gt) == pytest.approx(5.0)
    pred[0] += 1.0  # a far-off joint, excluded by the mask
    valid = np.ones(21, bool)
    valid[0] = False
    assert M.mpjpe(pred, gt, valid) == pytest.approx(5.0)
    assert M.mpjpe(pred, gt) > 40.0
    assert M.mpvpe(torch.tensor(gt), torch.tensor(gt)) == 0.0


def test_procrustes_recovers_known_similarity():
    X = _rng(1).normal(size=(30, 3))
    R = Rotation.from_rotvec([0.3, -1.2, 0.7]).as_matrix()
    s, t = 1.7, np.array([0.1, -2.0, 0.5])
    Y = s * X @ R.T + t
    aligned, s_hat, R_hat, t_hat = M.procrustes(X, Y)
    np.testing.assert_allclose(aligned, Y, atol=1e-10)
    assert s_hat == pytest.approx(s, abs=1e-12)
    np.testing.assert_allclose(R_hat, R, atol=1e-12)
    np.testing.assert_allclose(t_hat, t, atol=1e-12)
    assert M.pa_mpjpe(X, Y) < 1e-8
    # a 10 mm translation is invisible to PA-MPJPE but not to MPJPE
    assert M.mpjpe(Y + 0.01, Y) == pytest.approx(np.sqrt(3) * 10.0)
    assert M.pa_mpjpe(Y + 0.01, Y) < 1e-8


@pytest.mark.parametrize("reflect", [False, True])
def test_procrustes_rotation_matches_kabsch_and_never_reflects(reflect):
    rng = _rng(2)
    X = rng.normal(size=(25, 3))
    Y = X @ Rotation.from_rotvec([0.2, 0.4, -0.9]).as_matrix().T + 0.01 * rng.normal(size=X.shape)
    if reflect:  # a mirrored target: the best *reflection* would fit exactly; we must not return it
        Y[:, 0] *= -1
    _, s, R, _ = M.procrustes(X, Y)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # independent: scipy's Kabsch (proper rotations only) on centred points gives the same rotation
    ref = Rotation.align_vectors(Y - Y.mean(0), X - X.mean(0))[0].as_matrix()
    np.testing.assert_allclose(R, ref, atol=1e-8)
    if reflect:
        assert M.pa_mpjpe(X, Y) > 100.0  # nothing aligns a mirrored hand


def test_procrustes_fits_on_valid_points_only():
    X = _rng(3).normal(size=(21, 3))
    Y = 0.5 * X + 1.0
    Y_bad = Y.copy()
    Y_bad[5] += 10.0
    valid = np.ones(21, bool)
    valid[5] = False
    aligned = M.procrustes(X, Y_bad, valid)[0]
    np.testing.assert_allclose(aligned, Y, atol=1e-10)
    assert M.pa_mpjpe(X, Y_bad, valid) < 1e-8


# ------------------------------------------------------------------------------------- surfaces
def _plane(n: int = 4, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A square grid in z = 0, [0, size]^2, two triangles per cell."""
    g = np.linspace(0, size, n + 1)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    V = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], 1)
    idx = lambda i, j: i * (n + 1) + j  # noqa: E731
    F = []
    for i in range(n):
        for j in range(n):
            F += [[idx(i, j), idx(i + 1, j), idx(i + 1, j + 1)], [idx(i, j), idx(i + 1, j + 1), idx(i, j + 1)]]
    return V, np.array(F)


def test_p2s_of_points_offset_from_a_plane_is_the_offset():
    V, F = _plane()
    rng = _rng(4)
    d = 0.0123
    pts = np.concatenate([rng.uniform(0.05, 0.95, (200, 2)), np.full((200, 1), d)], 1)
    pts[100:, 2] = -d  # both sides
    dist = M.point_to_surface_distances(pts, V, F)
    np.testing.assert_allclose(dist, d, atol=1e-12)
    assert M.p2s_mm(pts, V, F) == pytest.approx(12.3)
    # beyond the edge: the distance is to the edge, not to the plane
    far = np.array([[1.3, 0.5, 0.4]])
    assert M.point_to_surface_distances(far, V, F)[0] == pytest.approx(0.5)
    # beyond a corner: the distance is to the corner vertex
    corner = np.array([[-0.3, -0.4, 0.0]])
    assert M.point_to_surface_distances(corner, V, F)[0] == pytest.approx(0.5)


def test_closest_point_on_triangle_matches_dense_sampling():
    rng = _rng(5)
    K = 60
    a, b, c = rng.normal(size=(3, K, 3))
    p = 2 * rng.normal(size=(K, 3))
    q = M.closest_points_on_triangles(p, a, b, c)
    exact = np.linalg.norm(p - q, axis=1)
    u, v = np.meshgrid(np.linspace(0, 1, 301), np.linspace(0, 1, 301))
    inside = (u + v) <= 1
    u, v = u[inside], v[inside]
    samples = a[:, None] + (b - a)[:, None] * u[None, :, None] + (c - a)[:, None] * v[None, :, None]
    dense = np.linalg.norm(samples - p[:, None], axis=2).min(1)
    assert np.all(exact <= dense + 1e-12)  # exact is never worse than any sample
    np.testing.assert_allclose(exact, dense, atol=0.02)


def test_p2s_matches_brute_force_on_a_closed_mesh():
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.05)
    V, F = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    pts = _rng(6).normal(scale=0.05, size=(300, 3))
    fast = M.point_to_surface_distances(pts, V, F)
    tri = V[F]
    P = np.repeat(pts, len(F), 0)
    A, B, C = (np.tile(tri[:, k], (len(pts), 1)) for k in range(3))
    brute = np.linalg.norm(P - M.closest_points_on_triangles(P, A, B, C), axis=1).reshape(len(pts), len(F)).min(1)
    np.testing.assert_allclose(fast, brute, atol=1e-15)


def test_fscore_and_chamfer_of_a_shifted_point_set():
    g = np.arange(20) * 0.05  # a planar grid 50 mm apart: each point's nearest neighbour is its twin
    gt = np.stack(np.meshgrid(g, np.arange(25) * 0.05, [0.0]), -1).reshape(-1, 3)  # 500 points
    pred = gt + np.array([0.0, 0.0, 0.010])  # 10 mm off
    f = M.fscores_mm(pred, gt)
    assert f == {"f@5mm": 0.0, "f@15mm": 1.0}
    assert M.chamfer_mm(pred, gt) == pytest.approx(10.0)
    half = M.fscore(np.concatenate([gt[:250], pred[250:]]), gt, 0.005)
    assert half["precision"] == pytest.approx(0.5) and half["recall"] == pytest.approx(0.5)
    assert half["f"] == pytest.approx(0.5)
    extra = M.fscore(np.concatenate([gt, pred]), gt, 0.005)  # every gt matched, half of pred off
    assert extra["recall"] == 1.0 and extra["precision"] == pytest.approx(0.5)
    assert extra["f"] == pytest.approx(2 * 0.5 / 1.5)


def test_normal_angle_error():
    n = np.array([[0, 0, 1.0], [1, 0, 0], [0, 2, 0]])
    assert M.normal_angle_error_deg(n, n) == pytest.approx(0.0, abs=1e-6)
    rot = n @ Rotation.from_rotvec([np.pi / 2, 0, 0]).as_matrix().T
    assert M.normal_angle_error_deg(n[:1], rot[:1]) == pytest.approx(90.0)
    assert M.normal_angle_error_deg(n, -n) == pytest.approx(180.0)
    assert M.normal_angle_error_deg(n, -n, oriented=False) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------- images
def test_psnr_of_known_rmse_over_the_mask_only():
    gt = np.zeros((20, 30, 3))
    pred = np.full_like(gt, 0.1)  # RMSE 0.1 inside the mask -> 20 dB
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    pred[~mask] = 1.0  # outside the mask must not count
    assert M.psnr(pred, gt, mask) == pytest.approx(20.0)
    pred[mask] = 0.01
    assert M.psnr(pred, gt, mask) == pytest.approx(40.0)
    assert M.psnr(gt, gt) == float("inf")


def _ssim_brute(x: np.ndarray, y: np.ndarray) -> float:
    """Reference SSIM computed window by window with explicit weighted statistics."""
    g = M.gaussian_window()
    w = np.outer(g, g)
    C1, C2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(x.shape[2]):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                a, b = x[i:i + 11, j:j + 11, ch], y[i:i + 11, j:j + 11, ch]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + C1) * (2 * cov + C2)) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
    return float(np.mean(vals))


def test_ssim_identity_reference_and_closed_form():
    rng = _rng(8)
    x = rng.uniform(size=(18, 20, 3))
    y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1)
    assert M.ssim(x, x) == pytest.approx(1.0)
    ref = _ssim_brute(x, y)
    assert M.ssim(x, y) == pytest.approx(ref, abs=1e-10)
    assert 0.2 < ref < 0.99
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.2, 0.6
    expect = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    assert M.ssim(np.full((12, 12), a), np.full((12, 12), b)) == pytest.approx(expect)


def test_ssim_uses_the_mask_bounding_box():
    rng = _rng(9)
    x = rng.uniform(size=(40, 40, 3))
    y = x.copy()
    y[:, 25:] = rng.uniform(size=(40, 15, 3))  # differ only right of column 25
    mask = np.zeros((40, 40), bool)
    mask[2:20, 1:22] = True
    assert M.ssim(x, y, mask) == pytest.approx(1.0)
    assert M.ssim(x, y) < 0.9
    # a tiny mask is grown to one full window
    tiny = np.zeros((40, 40), bool)
    tiny[30, 30] = True
    assert M.mask_bbox(tiny, 11) == (25, 36, 25, 36)
    edge = np.zeros((40, 40), bool)
    edge[0, 39] = True
    assert M.mask_bbox(edge, 11) == (0, 11, 29, 40)
    assert M.ssim(x, y, tiny) == pytest.approx(_ssim_brute(x[25:36, 25:36], y[25:36, 25:36]))


def test_silhouette_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True  # 20 px
    b[2:6, 0:5] = True  # 20 px, overlap 10
    assert M.silhouette_iou(a, b) == pytest.approx(10 / 30)
    assert M.silhouette_iou(a, a) == 1.0
    assert M.silhouette_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


def test_reprojection_error_in_original_pixels():
    obs = np.array([[10.0, 10.0], [20.0, 20.0]])
    proj = obs + np.array([3.0, 4.0])  # 5 px at the run's resolution
    assert M.reprojection_error_px(proj, obs) == pytest.approx(5.0)
    assert M.reprojection_error_px(proj, obs, scale=0.5) == pytest.approx(10.0)
    proj[1] += 100
    assert M.reprojection_error_px(proj, obs, scale=0.25, valid=[True, False]) == pytest.approx(20.0)
