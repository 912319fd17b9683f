"""Input normalisation and output registration of the GCN predictor, batched torch.

Why normalise: the network must see the same numbers for the same hand wherever it is and however
it is held, so 3D keypoints are put in a palm frame (similarity fit of the mean hand's palm joints,
so missing joints just drop out of the fit) and 2D keypoints in a *virtual crop camera* (the real
camera rotated to look at the hand, focal length 1, crop half-size 1), which removes the camera's
intrinsics and the hand's position in the image, perspective-correctly. Predictions are made in
that frame and mapped back.

Why register: a single view fixes a root-relative hand but not its distance; as in MobRecon's
2D-1D registration, the translation that makes the predicted joints project onto the 2D keypoints
is linear in the translation once each residual is multiplied by the point's depth, so it is
solved by iteratively reweighted linear least squares (Cauchy weights on the reprojection error,
rows rescaled by the current depth) — for one view or several calibrated ones.
"""
from __future__ import annotations

import numpy as np
import torch

PALM = (0, 1, 5, 9, 13, 17)  # wrist, thumb CMC, index..pinky MCP: nearly rigid
MIRROR = (-1.0, 1.0, 1.0)


def weighted_similarity(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched weighted Umeyama: (s (B,), R (B,3,3), t (B,3)) minimising sum w |s R src + t - dst|^2.

    ``src`` (N,3) or (B,N,3), ``dst`` (B,N,3), ``w`` (B,N) >= 0 with at least 3 non-collinear
    weighted points per row."""
    if src.dim() == 2:
        src = src.expand_as(dst)
    wn = w / w.sum(1, keepdim=True).clamp(min=1e-12)
    mu_s = (wn[..., None] * src).sum(1)
    mu_d = (wn[..., None] * dst).sum(1)
    a, b = src - mu_s[:, None], dst - mu_d[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", wn, b, a)
    # LAPACK through numpy: ~50x less overhead than torch's batched SVD for 3x3 (no gradient needed:
    # the frame is a function of the input keypoints only)
    U, S, Vh = (torch.as_tensor(m, dtype=dst.dtype, device=dst.device) for m in np.linalg.svd(cov.detach().cpu().double().numpy()))
    d = torch.sign(torch.det(U) * torch.det(Vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.ones_like(S)
    D[:, 2] = d
    R = U @ torch.diag_embed(D) @ Vh
    var = (wn * (a**2).sum(-1)).sum(1).clamp(min=1e-12)
    s = (S * D).sum(1) / var
    t = mu_d - s[:, None] * (R @ mu_s[..., None])[..., 0]
    return s, R, t


def canonical_frame_3d(kp: torch.Tensor, valid: torch.Tensor, rest_joints: torch.Tensor, palm_size: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Palm frame of 3D keypoints ``kp`` (B,21,3) with ``valid`` (B,21): the similarity taking the
    mean right hand's rest joints (21,3, wrist at the origin) onto the valid palm joints (all valid
    joints where fewer than 3 palm joints are). Returns ``R`` (B,3,3) (canonical -> world axes),
    origin ``o`` (B,3) and ``scale`` (B,) in metres per canonical unit, so world = scale R x + o."""
    v = valid.to(kp.dtype)
    palm = torch.zeros_like(v)
    palm[:, list(PALM)] = 1.0
    w = v * palm
    few = (w > 0).sum(1) < 3
    w = torch.where(few[:, None], v, w)
    s, R, t = weighted_similarity(rest_joints.to(kp.dtype), kp, w)
    return R, t, s * palm_size


def to_canonical_3d(x: torch.Tensor, R: torch.Tensor, o: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """World points (B,N,3) -> canonical units: R^T (x - o) / scale."""
    return torch.einsum("bji,bnj->bni", R, x - o[:, None]) / scale[:, None, None]


def from_canonical_3d(x: torch.Tensor, R: torch.Tensor, o: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Canonical points (B,N,3) -> world metres: scale R x + o."""
    return scale[:, None, None] * torch.einsum("bij,bnj->bni", R, x) + o[:, None]


def normalised_image_coords(uv: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Pixels (B,N,2) -> K^-1 [u v 1] (B,N,2): camera-ray slopes, independent of the intrinsics."""
    h = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)
    r = torch.einsum("bij,bnj->bni", torch.linalg.inv(K), h)
    return r[..., :2] / r[..., 2:3]


def virtual_crop(xy: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The virtual crop camera of normalised image coordinates ``xy`` (B,21,2).

    Returns ``R_virt`` (B,3,3) (camera -> virtual camera axes; its optical axis goes through the
    centre of the keypoints' bounding box, its x axis stays horizontal) and the keypoints in that
    camera, centred on their box and divided by its half-size (B,21,2) (missing joints are zero),
    and that half-size (B,) (the hand's angular size: tells how strong the perspective is)."""
    v = valid > 0
    big = torch.finfo(xy.dtype).max
    lo = torch.where(v[..., None], xy, torch.full_like(xy, big)).amin(1)
    hi = torch.where(v[..., None], xy, torch.full_like(xy, -big)).amax(1)
    centre = 0.5 * (lo + hi)
    z = torch.cat([centre, torch.ones_like(centre[:, :1])], -1)
    z = z / z.norm(dim=-1, keepdim=True)
    ydown = torch.tensor([0.0, 1.0, 0.0], dtype=xy.dtype, device=xy.device).expand_as(z)
    x = torch.linalg.cross(ydown, z)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    R_virt = torch.stack([x, y, z], 1)  # rows: virtual axes in camera coordinates
    rays = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
    r = torch.einsum("bij,bnj->bni", R_virt, rays)
    p = r[..., :2] / r[..., 2:3]
    lo = torch.where(v[..., None], p, torch.full_like(p, big)).amin(1)
    hi = torch.where(v[..., None], p, torch.full_like(p, -big)).amax(1)
    c = 0.5 * (lo + hi)
    half = 0.5 * (hi - lo).amax(-1).clamp(min=1e-6)
    out = (p - c[:, None]) / half[:, None, None]
    return R_virt, torch.where(v[..., None], out, torch.zeros_like(out)), half


def register_translation(
    points: torch.Tensor,
    obs: torch.Tensor,
    weights: torch.Tensor,
    R: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    iterations: int = 10,
    scale: float = 0.01,
) -> torch.Tensor:
    """Translation T (B,3) making ``points + T`` project onto ``obs``: MobRecon's 2D-1D registration,
    robust and multi-view.

    ``points`` (B,N,3) root-relative in world axes; ``obs`` (B,V,N,2) normalised image coordinates
    (K^-1 u) in V views with world->camera ``R`` (B,V,3,3), ``t`` (B,V,3) (identity / zero: the
    points are already in the camera frame); ``weights`` (B,V,N) >= 0 (0 = unused). Projection
    x = (r1.(X+T) + t1) / (r3.(X+T) + t3) gives the linear rows (r1 - x r3).T = x (r3.X + t3) -
    (r1.X + t1); each iteration scales them by 1/depth (algebraic -> reprojection error) and by
    Cauchy weights of the reprojection residual with ``scale`` (normalised units, ~ px / focal)."""
    # numpy float64: a few hundred tiny batched ops; LAPACK through numpy has far less per-op
    # overhead than torch here, and nothing needs a gradient.
    f64 = lambda a: a.detach().cpu().double().numpy()  # noqa: E731
    B, V, N, _ = obs.shape
    P, x, w = f64(points), f64(obs), f64(weights)
    R = np.broadcast_to(np.eye(3), (B, V, 3, 3)) if R is None else f64(R)
    t = np.zeros((B, V, 3)) if t is None else f64(t)
    cam = np.einsum("bvij,bnj->bvni", R, P) + t[:, :, None]  # (B,V,N,3) points before T
    r1, r2, r3 = R[:, :, None, 0], R[:, :, None, 1], R[:, :, None, 2]  # (B,V,1,3)
    A = np.stack([r1 - x[..., :1] * r3, r2 - x[..., 1:] * r3], 3).reshape(B, -1, 3)  # (B,V*N*2,3)
    rhs = (x * cam[..., 2:3] - cam[..., :2]).reshape(B, -1)
    row_w = np.repeat(w.reshape(B, -1), 2, axis=1)
    T = np.zeros((B, 3))
    for _ in range(max(1, iterations)):
        Aw = A * row_w[..., None]
        normal = Aw.transpose(0, 2, 1) @ A
        ridge = 1e-13 * np.maximum(np.trace(normal, axis1=1, axis2=2), 1e-30)  # only guards singular systems
        T = np.linalg.solve(normal + ridge[:, None, None] * np.eye(3), (Aw * rhs[..., None]).sum(1)[..., None])[..., 0]
        depth = np.maximum(cam[..., 2] + np.einsum("bvi,bi->bv", R[:, :, 2], T)[..., None], 1e-6)  # (B,V,N)
        res = (np.einsum("bmi,bi->bm", A, T) - rhs).reshape(B, V, N, 2) / depth[..., None]
        robust = 1.0 / (1.0 + (res**2).sum(-1) / scale**2)
        row_w = np.repeat((w * robust / depth**2).reshape(B, -1), 2, axis=1)
    return torch.as_tensor(T, dtype=points.dtype, device=points.device)


# --------------------------------------------------------------------------------------- rotations
def rot6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """Continuous 6D rotation representation (Zhou et al. 2019) (...,6) -> (...,3,3), columns."""
    a, b = x[..., :3], x[..., 3:]
    c1 = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    b = b - (c1 * b).sum(-1, keepdim=True) * c1
    c2 = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    c3 = torch.linalg.cross(c1, c2)
    return torch.stack([c1, c2, c3], -1)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """(...,3,3) -> axis-angle (...,3) via scipy (inference only, no gradient)."""
    from scipy.spatial.transform import Rotation

    shape = R.shape[:-2]
    aa = Rotation.from_matrix(R.detach().reshape(-1, 3, 3).cpu().double().numpy()).as_rotvec()
    return torch.as_tensor(aa.reshape(*shape, 3), dtype=R.dtype, device=R.device)


def random_rotations(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,3,3) rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)
    return R.to(dtype)


def mirror_matrix(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """diag(-1, 1, 1): the x-flip that maps a left hand to a right one."""
    return torch.diag(torch.tensor(MIRROR, dtype=dtype, device=device))
