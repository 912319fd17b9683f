"""Renderer ops: rasterize vs a ray-casting reference, gradients vs finite differences,
antialiasing exactness, silhouette fitting, texture, and agreement with nvdiffrast (CUDA only)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import renderer as R
from capture.camera import Camera, to_clip
from renderer import nvdr

CPU = R.make_context("cpu")


# ----------------------------------------------------------------------------- fixtures


def _camera(H: int, W: int) -> Camera:
    f = 1.1 * W
    K = np.array([[f, 0.0, W / 2 + 0.3], [0.0, f * 1.05, H / 2 - 0.2], [0.0, 0.0, 1.0]])
    return Camera(K, np.eye(3), np.zeros(3), W, H)


def _random_tris(rng: np.random.Generator, F: int, behind: int = 0) -> np.ndarray:
    """Camera-space triangles (F, 3, 3) in front of a camera at the origin; ``behind`` of them
    have one vertex behind the camera (they cross the near plane)."""
    centre = np.stack([rng.uniform(-0.4, 0.4, F), rng.uniform(-0.4, 0.4, F), rng.uniform(1.5, 3.0, F)], 1)
    tris = centre[:, None, :] + rng.normal(scale=0.35, size=(F, 3, 3))
    tris[:behind, 0, 2] = -rng.uniform(0.2, 1.0, behind)
    return tris


def _raycast(tris: np.ndarray, cam: Camera, near: float, far: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference visibility: per pixel, the nearest ray-triangle hit (Moller-Trumbore) with
    camera z in [near, far]. Returns ids (H, W) (id + 1, 0 = none) and barycentrics of
    vertices 0 and 1 (H, W, 2), plus nothing else: an independent route to the same answer."""
    H, W = cam.height, cam.width
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d = np.stack([jj, ii, np.ones_like(jj)], -1) @ np.linalg.inv(cam.K).T  # rays, z = 1
    best = np.full((H, W), np.inf)
    ids = np.zeros((H, W), np.int64)
    bary = np.zeros((H, W, 2))
    for f, (p0, p1, p2) in enumerate(tris):
        e1, e2 = p1 - p0, p2 - p0
        pv = np.cross(d, e2)
        det = pv @ e1
        ok = np.abs(det) > 1e-12
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        tv = -p0
        b1 = (pv @ tv) * inv
        qv = np.cross(tv, e1)
        b2 = (qv * d).sum(-1) * inv
        t = (qv @ e2) * inv
        hit = ok & (b1 >= 0) & (b2 >= 0) & (b1 + b2 <= 1) & (t >= near) & (t <= far) & (t < best)
        best[hit] = t[hit]
        ids[hit] = f + 1
        bary[hit, 0] = (1 - b1 - b2)[hit]
        bary[hit, 1] = b1[hit]
    return ids, bary


def _edge_distance(tris: np.ndarray, cam: Camera) -> np.ndarray:
    """Per pixel, the smallest distance (px) from its centre to any projected triangle edge
    of triangles wholly in front of the camera (pixels within rounding of an edge are ties)."""
    H, W = cam.height, cam.width
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    q = np.stack([jj, ii], -1)
    dist = np.full((H, W), np.inf)
    for tri in tris:
        if np.any(tri[:, 2] <= 1e-3):
            continue
        px = tri @ cam.K.T
        px = px[:, :2] / px[:, 2:]
        for a, b in ((0, 1), (1, 2), (2, 0)):
            ab = px[b] - px[a]
            t = np.clip(((q - px[a]) @ ab) / max(ab @ ab, 1e-18), 0, 1)
            dist = np.minimum(dist, np.linalg.norm(q - (px[a] + t[..., None] * ab), axis=-1))
    return dist


def _scene(V: int = 2, F: int = 6, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random overlapping triangles directly in clip space, w in [1, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * F
    xy = torch.rand(V, N, 2, generator=g, dtype=dtype) * 1.6 - 0.8
    z = torch.rand(V, N, 1, generator=g, dtype=dtype) * 0.5
    w = 1 + torch.rand(V, N, 1, generator=g, dtype=dtype) * 0.5
    return torch.cat([xy * w, z, w], -1), torch.arange(N, dtype=torch.int32).view(F, 3)


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _icosphere(level: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=level)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int32)


# ----------------------------------------------------------------------------- rasterize


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rasterize_matches_raycast_reference(dtype):
    rng = np.random.default_rng(3)
    H, W = 24, 32
    cam = _camera(H, W)
    tris = _random_tris(rng, 14, behind=3)
    near, far = 0.5, 3.6  # some triangles poke through the far plane too
    verts = torch.tensor(tris.reshape(-1, 3), dtype=dtype)
    tri = torch.arange(len(verts), dtype=torch.int32).view(-1, 3)
    pos = to_clip(verts, [cam], near, far)
    rast, _ = R.rasterize(CPU, pos, tri, (H, W))
    ids_ref, bary_ref = _raycast(tris, cam, near, far)
    ids = rast[0, ..., 3].long().numpy()
    assert (ids_ref > 0).mean() > 0.3, "scene should cover a good part of the image"
    assert ((ids_ref > 0) & (ids_ref <= 3)).any(), "near-plane crossing triangles must be visible somewhere"
    tie = _edge_distance(tris, cam) < (1e-6 if dtype == torch.float64 else 1e-3)
    mismatch = (ids != ids_ref) & ~tie
    assert mismatch.sum() == 0, f"{mismatch.sum()} pixels with a different triangle"
    same = (ids == ids_ref) & (ids > 0)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(rast[0, ..., :2].numpy()[same], bary_ref[same], atol=tol)
    # z/w is the clip depth of the hit: in [-1, 1] and increasing with camera depth.
    z = rast[0, ..., 2].numpy()[ids > 0]
    assert z.min() >= -1 and z.max() <= 1


def test_rasterize_empty_degenerate_and_behind():
    H, W = 8, 10
    pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.0, 0.5, 0.0, 1.0],  # ok
                         [0.1, 0.1, 0.0, 1.0], [0.2, 0.2, 0.0, 1.0], [0.3, 0.3, 0.0, 1.0],  # collinear
                         [-0.5, -0.5, 0.5, -1.0], [0.5, -0.5, 0.5, -1.0], [0.0, 0.5, 0.5, -1.0],  # behind
                         [float("nan"), 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0], [0.0, 0.9, 0.0, 1.0]]])  # NaN
    none = torch.zeros(0, 3, dtype=torch.int32)
    rast, db = R.rasterize(CPU, pos, none, (H, W))
    assert rast.shape == (1, H, W, 4) and db.shape == (1, H, W, 4) and not rast.any()
    for f in (1, 2, 3):
        tri = torch.tensor([[3 * f, 3 * f + 1, 3 * f + 2]], dtype=torch.int32)
        rast, _ = R.rasterize(CPU, pos, tri, (H, W))
        assert not rast.any(), f"triangle {f} (degenerate / behind / NaN) must not be drawn"
    tri = torch.tensor([[0, 0, 1], [0, 1, 2]], dtype=torch.int32)  # repeated index, then a good one
    rast, _ = R.rasterize(CPU, pos, tri, (H, W))
    assert set(rast[..., 3].unique().tolist()) == {0.0, 2.0}
    with pytest.raises(R.RendererError):
        R.rasterize(CPU, pos, torch.tensor([[0, 1, 99]], dtype=torch.int32), (H, W))


def test_shared_edges_cover_each_pixel_once():
    """A grid whose edges pass exactly through pixel centres: no holes, no double coverage."""
    H, W, n = 16, 16, 4
    g = torch.linspace(-1.0, 1.0, n + 1, dtype=torch.float64)  # lines at pixel *edges* ...
    g = g + 1.0 / W  # ... shifted by half a pixel onto pixel centres
    ys, xs = torch.meshgrid(g, g, indexing="ij")
    verts = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.zeros(xs.numel(), dtype=torch.float64),
                         torch.ones(xs.numel(), dtype=torch.float64)], -1)[None]
    faces = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = i * (n + 1) + j, i * (n + 1) + j + 1, (i + 1) * (n + 1) + j, (i + 1) * (n + 1) + j + 1
            faces += [[a, b, d], [a, d, c]] if (i + j) % 2 else [[a, b, c], [b, d, c]]
    tri = torch.tensor(faces, dtype=torch.int32)
    count = torch.zeros(H, W)
    for f in range(len(faces)):
        r, _ = R.rasterize(CPU, verts, tri[f:f + 1], (H, W))
        count += (r[0, ..., 3] > 0).float()
    assert count.max() == 1, "a pixel centre on a shared edge was drawn by two triangles"
    full, _ = R.rasterize(CPU, verts, tri, (H, W))
    assert torch.equal((full[0, ..., 3] > 0).float(), count)
    # Grid lines sit on centres 0.5, 4.5, ...: every centre strictly inside the square is covered.
    assert bool((count[1:, 1:] == 1).all()), "hole on a shared edge"


# ----------------------------------------------------------------------------- gradients


def test_interpolate_gradients_match_finite_differences():
    pos, tri = _scene()
    H, W = 10, 12
    pos.requires_grad_(True)
    attr_shared = torch.randn(pos.shape[1], 3, dtype=torch.float64, requires_grad=True)
    attr_view = torch.randn(2, pos.shape[1], 2, dtype=torch.float64, requires_grad=True)

    def f(p, a):
        rast, db = R.rasterize(CPU, p, tri, (H, W))
        out, da = R.interpolate(a, rast, tri, db, diff_attrs="all")
        return out, da

    rast, _ = R.rasterize(CPU, pos, tri, (H, W))
    assert 0.15 < (rast[..., 3] > 0).float().mean() < 0.9
    for a in (attr_shared, attr_view):
        assert torch.autograd.gradcheck(f, (pos, a), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_antialias_gradients_match_finite_differences():
    pos, tri = _scene(seed=1)
    H, W = 10, 12
    pos.requires_grad_(True)
    color = torch.rand(2, H, W, 3, dtype=torch.float64, requires_grad=True)

    def aa(c, p):
        rast, _ = R.rasterize(CPU, p, tri, (H, W))
        return R.antialias(c, rast, p, tri)

    out = aa(color, pos)
    assert (out - color).abs().max() > 1e-3, "the scene must have blended silhouette pixels"
    assert torch.autograd.gradcheck(aa, (color, pos), eps=1e-6, atol=1e-5, rtol=1e-4)

    attr = torch.randn(pos.shape[1], 3, dtype=torch.float64, requires_grad=True)

    def chain(p, a):
        rast, _ = R.rasterize(CPU, p, tri, (H, W))
        col, _ = R.interpolate(a, rast, tri)
        return R.antialias(col, rast, p, tri, pos_gradient_boost=1.0)

    assert torch.autograd.gradcheck(chain, (pos, attr), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_antialias_gives_exact_coverage_and_edge_gradient_for_axis_aligned_edges():
    """A rectangle with non-integer edges: AA coverage per pixel = box-filter area (except the
    four corner pixels), and the gradient of total coverage w.r.t. the right edge's x counts the
    pixel rows it crosses."""
    H, W = 12, 16
    x0, x1, y0, y1 = 3.3, 11.8, 2.6, 9.2  # pixels

    def nd(v, n):
        return 2 * v / n - 1

    right = torch.tensor(nd(x1, W), dtype=torch.float64, requires_grad=True)
    xs = [nd(x0, W), right, right, nd(x0, W)]
    ys = [nd(y0, H), nd(y0, H), nd(y1, H), nd(y1, H)]
    pos = torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64),
                                    torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)])
                       for x, y in zip(xs, ys)])[None]
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, _ = R.rasterize(CPU, pos, tri, (H, W))
    cov = R.antialias((rast[..., 3:4] > 0).double(), rast, pos, tri)[0, ..., 0]
    cx = np.clip(np.minimum(np.arange(W) + 1, x1) - np.maximum(np.arange(W), x0), 0, 1)
    cy = np.clip(np.minimum(np.arange(H) + 1, y1) - np.maximum(np.arange(H), y0), 0, 1)
    ref = np.outer(cy, cx)
    corner = np.outer(cy < 1, cx < 1)  # AA is 1-D per pixel pair: exact away from corners only
    np.testing.assert_allclose(cov.detach().numpy()[~corner], ref[~corner], atol=1e-9)
    cov.sum().backward()
    # d(sum)/d(x1 in px) = one per pixel row whose centre the right edge spans (AA works on
    # pixel pairs along rows; the partial corner rows take their coverage from the top/bottom edges).
    centres = np.arange(H) + 0.5
    expected = float(((centres > y0) & (centres < y1)).sum())
    assert expected == 6
    np.testing.assert_allclose(right.grad.item() * (2 / W), expected, rtol=1e-6)


def test_silhouette_gradient_descent_fits_target_mask():
    """Translate + scale a sphere so its antialiased silhouette matches a target's (IoU > 0.95)."""
    H, W = 48, 64
    cam = Camera(np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]]), np.eye(3), np.zeros(3), W, H)
    verts, tri = _icosphere(2)
    verts = verts * 0.18
    topo = R.antialias_construct_topology_hash(tri)

    def sil(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = verts * s + t + torch.tensor([0.0, 0.0, 1.0])
        pos = to_clip(v, [cam], 0.3, 2.0)
        rast, _ = R.rasterize(CPU, pos, tri, (H, W))
        mask = (rast[..., 3:4] > 0).float()
        return R.antialias(mask, rast, pos, tri, topo)[0, ..., 0]

    target = sil(torch.tensor([0.05, -0.03, 0.0]), torch.tensor(1.25)).detach()
    t = torch.tensor([-0.06, 0.05, 0.0], requires_grad=True)
    s = torch.tensor(0.8, requires_grad=True)

    def iou(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a > 0.5, b > 0.5
        return float((a & b).sum() / (a | b).sum())

    start = iou(sil(t, s), target)
    opt = torch.optim.Adam([t, s], lr=0.01)
    for _ in range(80):
        opt.zero_grad()
        loss = ((sil(t, s) - target) ** 2).mean()
        loss.backward()
        opt.step()
    final = iou(sil(t, s).detach(), target)
    assert start < 0.6 and final > 0.95, (start, final)


# ----------------------------------------------------------------------------- texture


def test_texture_bilinear_values_modes_and_gradients():
    tex = torch.arange(12, dtype=torch.float64).view(1, 3, 4, 1)
    centres = torch.tensor([[[[(1 + 0.5) / 4, (2 + 0.5) / 3], [(0.5 + 0.5 + 0.25) / 4, 0.5 / 3]]]], dtype=torch.float64)
    out = R.texture(tex, centres, filter_mode="linear")
    assert out[0, 0, 0, 0].item() == pytest.approx(9.0)  # texel (row 2, col 1)
    assert out[0, 0, 1, 0].item() == pytest.approx(0.75)  # between texels 0 and 1 of row 0
    outside = torch.tensor([[[[-0.1, 0.5 / 3]]]], dtype=torch.float64)  # left of texel 0's centre
    assert R.texture(tex, outside, boundary_mode="clamp").item() == pytest.approx(0.0)
    wrap = R.texture(tex, outside, boundary_mode="wrap").item()
    assert wrap == pytest.approx(R.texture(tex, outside + torch.tensor([1.0, 0.0], dtype=torch.float64)).item())
    assert 0.0 < wrap < 3.0  # blends texel 3 and texel 0 of row 0
    assert R.texture(tex, torch.full((1, 1, 1, 2), -0.5, dtype=torch.float64), boundary_mode="zero").item() == 0.0
    assert R.texture(tex, centres, filter_mode="nearest")[0, 0, 0, 0].item() == 9.0
    with pytest.raises(R.RendererError):
        R.texture(tex, centres, filter_mode="linear-mipmap-linear")
    g = torch.Generator().manual_seed(0)
    tx = torch.rand(2, 5, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    uv = (torch.rand(2, 4, 4, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    for mode in ("wrap", "clamp", "zero"):
        assert torch.autograd.gradcheck(lambda a, b: R.texture(a, b, boundary_mode=mode), (tx, uv), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- backends


def test_make_context_and_auto_backend():
    assert R.make_context("cpu").backend == "cpu"
    auto = R.make_context("auto")
    assert auto.backend_for(torch.zeros(1)) == "cpu"  # 'auto' follows the tensors
    with pytest.raises(R.RendererError):
        R.make_context("opengl")
    if not torch.cuda.is_available():
        with pytest.raises(R.RendererError):
            R.make_context("nvdiffrast")
    # The same ops run under an 'auto' context on CPU tensors.
    pos, tri = _scene(V=1, F=2, dtype=torch.float32)
    r_auto, _ = R.rasterize(auto, pos, tri, (8, 8))
    r_cpu, _ = R.rasterize(CPU, pos, tri, (8, 8))
    assert torch.equal(r_auto, r_cpu)


_NO_NVDR = not (torch.cuda.is_available() and nvdr.available())
_NVDR_REASON = "nvdiffrast agreement needs CUDA and nvdiffrast.torch: " + (nvdr.why_unavailable() or "unavailable")


@pytest.mark.gpu
@pytest.mark.skipif(_NO_NVDR, reason=_NVDR_REASON)
def test_nvdiffrast_agreement():
    """The same triangle on >= 98 % of covered pixels and a neighbouring one on all but 0.1 %
    (a fold of the silhouette where two layers meet in depth), attributes within 1e-4 where the
    triangle is the same, and the same antialiased image and gradients (w.r.t. positions and
    attributes) up to edge pixels. Thresholds from an H100: 98.95 %, 0.01 %, 0.99999 / 0.994."""
    import trimesh

    gpu = R.make_context("nvdiffrast")
    m = trimesh.creation.icosphere(subdivisions=3)
    g = torch.Generator().manual_seed(0)
    verts = torch.tensor(m.vertices, dtype=torch.float32) * 0.2 * (1 + 0.1 * torch.rand(len(m.vertices), 1, generator=g))
    tri = torch.tensor(m.faces, dtype=torch.int32)
    H, W = 96, 128
    cams = [Camera(np.array([[120.0, 0, W / 2], [0, 120.0, H / 2], [0, 0, 1]]), _rot_y(a), np.array([0.0, 0.0, 0.8]), W, H)
            for a in (0.0, 0.7, 1.9)]
    pos = to_clip(verts, cams, 0.3, 1.5).contiguous()
    attr = torch.rand(len(verts), 3, generator=g)
    weight = torch.rand(len(cams), H, W, 3, generator=g)

    def run(ctx: R.RenderContext, device: str):
        p = pos.detach().to(device).requires_grad_(True)
        a = attr.detach().to(device).requires_grad_(True)
        t = tri.to(device)
        rast, _ = R.rasterize(ctx, p, t, (H, W))
        col, _ = R.interpolate(a, rast, t, ctx=ctx)
        img = R.antialias(col, rast, p, t, ctx=ctx)
        (img * weight.to(device)).sum().backward()
        return rast.detach().cpu(), col.detach().cpu(), img.detach().cpu(), p.grad.cpu(), a.grad.cpu()

    rc, cc, ic, gpc, gac = run(CPU, "cpu")
    rg, cg, ig, gpg, gag = run(gpu, "cuda")
    covered = (rc[..., 3] > 0) | (rg[..., 3] > 0)
    same = (rc[..., 3] == rg[..., 3]) & covered
    # nvdiffrast snaps vertices to a sub-pixel grid: a pixel centre within that snap of an edge may
    # go to the neighbouring triangle, so a different id must be a neighbour (a shared vertex) and
    # the interpolated attribute, continuous across the edge, must still agree closely there
    both = (rc[..., 3] > 0) & (rg[..., 3] > 0) & ~same
    tc, tg = tri.long()[rc[..., 3][both].long() - 1], tri.long()[rg[..., 3][both].long() - 1]
    neighbours = (tc[:, :, None] == tg[:, None, :]).any(-1).any(-1)

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x * y).sum() / (x.norm() * y.norm()))

    found = {"same_id": float(same.sum() / covered.sum()),
             "attr_same_id": float((cc[same] - cg[same]).abs().max()),
             "far": float((~neighbours).sum() / covered.sum()),
             "attr_neighbour": float((cc[both][neighbours] - cg[both][neighbours]).abs().max()) if neighbours.any() else 0.0,
             "image_1e-3": float(((ic - ig).abs().amax(-1) < 1e-3).float().mean()),
             "grad_attr_cos": cosine(gac, gag), "grad_pos_cos": cosine(gpc, gpg)}
    assert found["same_id"] >= 0.98 and found["far"] <= 1e-3, found
    assert found["attr_same_id"] < 1e-4 and found["attr_neighbour"] < 0.15, found
    assert found["image_1e-3"] > 0.98, found
    assert found["grad_attr_cos"] > 0.995 and found["grad_pos_cos"] > 0.95, found


class _FakeDr:
    """Stand-in with nvdiffrast.torch's signatures, delegating to the cpu backend and recording
    the calls: checks the wrapper's plumbing (dtypes, keyword names, topology hash) without CUDA."""

    calls: list[str] = []

    class RasterizeCudaContext:
        def __init__(self, device=None):
            _FakeDr.calls.append("context")

    @staticmethod
    def rasterize(glctx, pos, tri, resolution, ranges=None, grad_db=True):
        assert isinstance(glctx, _FakeDr.RasterizeCudaContext)
        assert pos.dtype == torch.float32 and tri.dtype == torch.int32 and pos.is_contiguous()
        _FakeDr.calls.append("rasterize")
        return R.rasterize(CPU, pos, tri, resolution, ranges=ranges, grad_db=grad_db)

    @staticmethod
    def interpolate(attr, rast, tri, rast_db=None, diff_attrs=None):
        _FakeDr.calls.append("interpolate")
        return R.interpolate(attr, rast, tri, rast_db, diff_attrs, ctx=CPU)

    @staticmethod
    def texture(tex, uv, uv_da=None, mip_level_bias=None, mip=None, filter_mode="auto", boundary_mode="wrap",
                max_mip_level=None):
        _FakeDr.calls.append("texture")
        return R.texture(tex, uv, filter_mode="linear", boundary_mode=boundary_mode, ctx=CPU)

    @staticmethod
    def antialias_construct_topology_hash(tri):
        _FakeDr.calls.append("hash")
        return ("hash", tri.shape[0])

    @staticmethod
    def antialias(color, rast, pos, tri, topology_hash=None, pos_gradient_boost=1.0):
        assert topology_hash == ("hash", tri.shape[0])
        _FakeDr.calls.append("antialias")
        return R.antialias(color, rast, pos, tri, pos_gradient_boost=pos_gradient_boost, ctx=CPU)


def test_nvdiffrast_plugin_names_follow_the_fork(monkeypatch):
    """The fork's compiled plugin is named after both versions; its build dir must be importable."""
    import types
    monkeypatch.setitem(sys.modules, "nvdiffrast", types.SimpleNamespace(__version__="0.3.3.1"))
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    names = nvdr.plugin_names()
    assert "nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130" in names
    assert "nvdiffrast_plugin_0_3_3_1_torch2_11_0_cu130_gl" in names and "nvdiffrast_plugin" in names


def test_nvdiffrast_wrapper_plumbing(monkeypatch):
    class _GpuCtx(R.RenderContext):
        def backend_for(self, t):
            return "nvdiffrast"

    monkeypatch.setattr(nvdr, "load", lambda: _FakeDr)
    _FakeDr.calls = []
    ctx = _GpuCtx("nvdiffrast", torch.device("cpu"))
    pos, tri = _scene(V=2, F=4, dtype=torch.float32)
    pos.requires_grad_(True)
    rast, db = R.rasterize(ctx, pos, tri.long(), (12, 16))
    col, da = R.interpolate(torch.rand(pos.shape[1], 2), rast, tri, db, diff_attrs=[1], ctx=ctx)
    assert col.shape == (2, 12, 16, 2) and da.shape == (2, 12, 16, 2)
    topo = R.antialias_construct_topology_hash(tri)
    out = R.antialias(col, rast, pos, tri, topo, ctx=ctx)
    R.antialias(col, rast, pos, tri, topo, ctx=ctx)  # the backend's hash is built once and reused
    tex = R.texture(torch.rand(1, 4, 4, 3), torch.rand(2, 12, 16, 2), ctx=ctx)
    assert tex.shape == (2, 12, 16, 3)
    out.sum().backward()
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    assert _FakeDr.calls == ["context", "rasterize", "interpolate", "hash", "antialias", "antialias", "texture"]


def test_bench_render_cli_runs(capsys):
    """The benchmark's render subcommand on a tiny grid: prints the table with one row."""
    from conftest import load_script

    bench = load_script("bench")
    rc = bench.main(["render", "--backends", "cpu", "--views", "2", "--sizes", "64x48", "--faces", "3000",
                     "--repeat", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rast f/b ms" in out
    row = [line for line in out.splitlines() if line.startswith("cpu")]
    assert len(row) == 1 and "64x48" in row[0]
    verts, faces = bench.hand_like_mesh(3000)
    assert 2500 < len(faces) < 3500 and faces.max() < len(verts)
