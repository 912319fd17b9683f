"""Mesh ops (Loop subdivision, Laplacians, regularisers), SH shading and render_mesh."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import renderer as R
from capture.camera import Camera
from renderer import mesh_ops as M
from renderer import shading as S


def _icosahedron() -> tuple[torch.Tensor, torch.Tensor]:
    import trimesh

    m = trimesh.creation.icosahedron()
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.long)


def _grid(n: int, jitter: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(n+1)^2 vertices of a unit square in the plane z = 0.3 x - 0.2 y + 1, tilted so the
    plane is not axis aligned; returns the interior-vertex mask too."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1), indexing="ij")
    interior = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    u = u + interior * rng.uniform(-jitter, jitter, u.shape) / n
    v = v + interior * rng.uniform(-jitter, jitter, v.shape) / n
    xyz = np.stack([u, v, 0.3 * u - 0.2 * v + 1.0], -1).reshape(-1, 3)
    faces = []
    for i in range(n):
        for j in range(n):
            a, b, c, d = i * (n + 1) + j, i * (n + 1) + j + 1, (i + 1) * (n + 1) + j, (i + 1) * (n + 1) + j + 1
            faces += [[a, c, b], [b, c, d]]
    return torch.tensor(xyz), torch.tensor(faces), interior.reshape(-1)


# ----------------------------------------------------------------------------- Loop subdivision


def test_loop_subdivision_counts_euler_and_sphere():
    v, f = _icosahedron()
    euler = len(v) - len(M.mesh_edges(f)) + len(f)
    spreads, bends = [], []
    for level in (1, 2, 3):
        sub = M.loop_subdivide(f, len(v), levels=level)
        nv = sub.apply(v.float()).double()
        E = len(M.mesh_edges(sub.faces))
        assert nv.shape[0] == 10 * 4**level + 2  # closed icosahedron family
        assert sub.faces.shape[0] == 20 * 4**level and E == 30 * 4**level
        assert nv.shape[0] - E + sub.faces.shape[0] == euler == 2
        r = nv.norm(dim=1)
        spreads.append(float((r.max() - r.min()) / r.mean()))
        bends.append(float(M.normal_consistency_loss(nv, sub.faces)))
        # Rows are affine combinations: constants and skinning-weight partitions carry over.
        ones = sub.apply(torch.ones(len(v), 2))
        assert torch.allclose(ones, torch.ones_like(ones), atol=1e-6)
    # The limit surface of an icosahedron is round to ~1 %, and gets smoother every level.
    assert max(spreads) < 0.015
    assert bends[0] > bends[1] > bends[2] > 0
    assert bends[2] < 0.25 * bends[0]


def test_loop_subdivision_boundary_attributes_and_uv_seams():
    v, f, _ = _grid(3)
    sub = M.loop_subdivide(f, len(v), levels=2)
    nv = sub.apply(v)
    # Planar patch with a boundary stays in its plane; boundary stays the square's outline.
    assert torch.allclose(nv[:, 2], 0.3 * nv[:, 0] - 0.2 * nv[:, 1] + 1.0, atol=1e-6)
    assert nv[:, :2].min() >= -1e-6 and nv[:, :2].max() <= 1 + 1e-6
    # Batched attributes (B, N, C) go through the same matrix.
    batch = torch.stack([v, 2 * v])
    assert torch.allclose(sub.apply(batch)[1], 2 * nv, atol=1e-6)
    # UV seam along x = 1/3: faces right of it use a second UV island, shifted far away.
    uv = v[:, :2].clone()
    uv_faces = f.clone()
    n_uv = len(uv)
    right = [k for k in range(len(v)) if v[k, 0] > 1 / 3 - 1e-9]
    dup = {k: n_uv + i for i, k in enumerate(right)}
    uv = torch.cat([uv, uv[right] + torch.tensor([5.0, 0.0], dtype=uv.dtype)])
    centroid_x = v[f].mean(1)[:, 0]
    for fi in range(len(f)):
        if centroid_x[fi] > 1 / 3:
            uv_faces[fi] = torch.tensor([dup.get(int(k), int(k)) for k in f[fi]])
    sub = M.loop_subdivide(f, len(v), levels=1, uv_faces=uv_faces, n_uv=len(uv))
    new_uv = sub.apply_uv(uv)
    assert sub.uv_faces.shape == sub.faces.shape
    # Every subdivided face's UV triangle is tiny: no face straddles the seam islands.
    span = (new_uv[sub.uv_faces].amax(1) - new_uv[sub.uv_faces].amin(1)).amax(-1)
    assert span.max() < 0.5
    # Seam edges exist twice in UV space: UV count = UVs + UV edges (> geometric count).
    assert new_uv.shape[0] == len(uv) + len(M.mesh_edges(uv_faces))
    assert new_uv.shape[0] > sub.num_vertices
    # Old corners keep their UVs on both sides of the seam.
    assert torch.allclose(new_uv[: len(uv)], uv)


def test_loop_subdivision_uv_is_linear_midpoints():
    v, f = _icosahedron()
    uv = torch.rand(len(v), 2, dtype=torch.float64)
    sub = M.loop_subdivide(f, len(v), levels=1, uv_faces=f, n_uv=len(v))
    new_uv = sub.apply_uv(uv)
    a, b, c = f[0]
    child_corner = sub.uv_faces[0]  # (a, mid(a,b), mid(c,a))
    assert torch.allclose(new_uv[child_corner[0]], uv[a])
    assert torch.allclose(new_uv[child_corner[1]], 0.5 * (uv[a] + uv[b]))
    assert torch.allclose(new_uv[child_corner[2]], 0.5 * (uv[c] + uv[a]))
    with pytest.raises(ValueError):
        M.loop_subdivide(f, len(v), levels=4)


# ----------------------------------------------------------------------------- Laplacians, losses


def test_laplacians_vanish_inside_a_plane():
    v, f, interior = _grid(6)
    L = M.uniform_laplacian(f, len(v))
    lv = M.apply_sparse(L, v.float())
    assert lv[torch.as_tensor(interior)].abs().max() < 1e-5  # regular grid: neighbour mean = vertex
    assert lv[torch.as_tensor(~interior)].abs().max() > 1e-2  # boundary is not
    vj, fj, interior = _grid(6, jitter=0.3, seed=1)
    Lc = M.cotangent_laplacian(vj, fj)
    lc = M.apply_sparse(Lc, vj)
    assert lc[torch.as_tensor(interior)].abs().max() < 1e-10  # linear precision on any planar mesh
    lu = M.apply_sparse(M.uniform_laplacian(fj, len(vj)), vj)
    assert lu[torch.as_tensor(interior)].abs().max() > 1e-3  # ... which the uniform one lacks
    # Row sums are zero (constants in the kernel) and the normalised one scales by area.
    ones = torch.ones(len(vj), 1, dtype=torch.float64)
    assert M.apply_sparse(Lc, ones).abs().max() < 1e-12
    Ln = M.cotangent_laplacian(vj, fj, normalize=True)
    assert M.apply_sparse(Ln, vj)[torch.as_tensor(interior)].abs().max() < 1e-8


def test_confidence_fill_keeps_seen_values_and_fills_unseen_ones_from_around():
    """Confident vertices keep their values; a patch nobody saw gets the harmonic interpolation of
    its surroundings (a linear field exactly, on a regular grid), not its own garbage; partial
    confidence blends the two by the stated equation."""
    v, f, interior = _grid(9)
    field = torch.stack([2.0 * v[:, 0] + 3.0 * v[:, 1], 1.0 - v[:, 1]], 1)
    hole = ((v[:, :2] - 0.5).abs() < 0.3).all(1)  # a square patch of the unit square, away from its border
    noisy = field.clone()
    noisy[hole] = torch.tensor([5.0, -4.0], dtype=field.dtype)
    conf = (~hole).to(field.dtype)
    out = M.confidence_fill(noisy, conf, f)
    assert out.dtype == noisy.dtype and out.shape == noisy.shape
    assert (out[~hole] - noisy[~hole]).abs().max() < 1e-12
    assert (out[hole] - field[hole]).abs().max() < 1e-3  # (the floor keeps 1e-6 of the garbage)
    assert (noisy[hole] - field[hole]).abs().max() > 1.0
    # half confidence: x_i = c_i v_i + (1 - c_i) * mean of x over the neighbours, at every vertex
    c = torch.full((len(v),), 0.5, dtype=field.dtype)
    c[0] = 1.0
    x = M.confidence_fill(noisy, c, f)
    L = M.uniform_laplacian(f, len(v)).double()
    neighbour_mean = x - M.apply_sparse(L, x)
    assert (x - (c[:, None] * noisy + (1 - c[:, None]) * neighbour_mean)).abs().max() < 1e-6
    # a non-finite value never spreads into an output: the values come back unfilled
    bad = noisy.clone()
    bad[0, 0] = float("nan")
    assert torch.equal(M.confidence_fill(bad, conf, f)[1:], bad[1:])


def test_regularisers_and_geometry_helpers():
    v, f, _ = _grid(4)
    assert float(M.normal_consistency_loss(v, f)) < 1e-10
    bumped = v.clone()
    bumped[12, 2] += 0.2
    assert float(M.normal_consistency_loss(bumped, f)) > 1e-3
    L = M.uniform_laplacian(f, len(v)).double()
    flat = float(M.laplacian_smoothing_loss(v, L))
    assert float(M.laplacian_smoothing_loss(bumped, L)) > flat
    bumped.requires_grad_(True)
    M.laplacian_smoothing_loss(bumped[None], L).backward()
    assert bumped.grad[12, 2] > 0  # pushes the bump back down
    e = M.mesh_edges(f)
    assert len(e) == 2 * 4 * 5 + 16  # grid edges + diagonals
    lens = M.edge_lengths(v, e)
    assert lens.min() > 0.2 and lens.max() < 0.5
    n = M.face_normals(v, f)
    expected = torch.nn.functional.normalize(torch.tensor([-0.3, 0.2, 1.0], dtype=torch.float64), dim=0)
    assert torch.allclose(n.abs(), expected.abs().expand_as(n), atol=1e-9)
    vn = S.vertex_normals(v, f)
    assert torch.allclose(vn, n[:1].expand_as(vn), atol=1e-9)
    assert M.face_adjacency(f).shape == (3 * 4 * 4 - 2 * 4, 2)


# ----------------------------------------------------------------------------- shading


def test_sh_shading_matches_hand_computed_values():
    coeffs = torch.tensor([0.8, 0.1, 0.3, -0.2, 0.05, 0.0, 0.4, 0.0, -0.1])
    n = torch.tensor([0.0, 0.0, 1.0])
    # Only Y00, Y10 (z) and Y20 are non-zero at +z; kernel factors 1, 2/3, 1/4.
    y00 = 0.5 / math.sqrt(math.pi)
    y10 = math.sqrt(3 / (4 * math.pi))
    y20 = 0.25 * math.sqrt(5 / math.pi) * 2.0
    expected = 0.8 * y00 + (2 / 3) * 0.3 * y10 + 0.25 * 0.4 * y20
    assert S.sh_shading(n, coeffs).item() == pytest.approx(expected, rel=1e-6)
    d = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -0.5]), dim=0)
    x, y, z = d.tolist()
    basis = [y00, y10 * y, y10 * z, y10 * x, 0.5 * math.sqrt(15 / math.pi) * x * y, 0.5 * math.sqrt(15 / math.pi) * y * z,
             0.25 * math.sqrt(5 / math.pi) * (3 * z * z - 1), 0.5 * math.sqrt(15 / math.pi) * x * z,
             0.25 * math.sqrt(15 / math.pi) * (x * x - y * y)]
    assert torch.allclose(S.sh_basis(d), torch.tensor(basis), atol=1e-6)
    # Uniform white environment -> shading 1 everywhere; RGB and per-view shapes.
    dirs = torch.nn.functional.normalize(torch.randn(2, 5, 4, 3), dim=-1)
    assert torch.allclose(S.sh_shading(dirs, S.sh_ambient()), torch.ones(2, 5, 4, 1), atol=1e-6)
    rgb = torch.stack([coeffs, 2 * coeffs, 0 * coeffs], -1)
    out = S.sh_shading(n, rgb)
    assert torch.allclose(out, torch.tensor([expected, 2 * expected, 0.0]), atol=1e-6)
    per_view = torch.stack([coeffs, 2 * coeffs])
    pv = S.sh_shading(dirs, per_view)
    assert torch.allclose(pv[1], 2 * S.sh_shading(dirs[1], coeffs), atol=1e-6)
    assert torch.allclose(pv[0], S.sh_shading(dirs[0], coeffs), atol=1e-6)
    albedo = torch.full((2, 5, 4, 3), 0.5)
    assert torch.allclose(S.shade_lambertian(albedo, dirs, per_view), 0.5 * pv.expand(-1, -1, -1, 3))


def test_render_mesh_two_meshes_occlusion_depth_normals():
    import trimesh

    ctx = R.make_context("cpu")
    H, W = 40, 48
    cam = Camera(np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]]), np.eye(3), np.zeros(3), W, H)
    # Coarse spheres: nvdiffrast's AA finds silhouettes only where the outermost triangle covers
    # pixel centres, so silhouette gradients need triangles of about a pixel or more.
    m = trimesh.creation.icosphere(subdivisions=1)
    sphere = torch.tensor(m.vertices, dtype=torch.float32)
    faces = torch.tensor(m.faces, dtype=torch.int32)
    back = sphere * 0.3 + torch.tensor([0.0, 0.0, 1.5])
    front = sphere * 0.12 + torch.tensor([0.0, 0.0, 1.0])
    alb = [torch.tensor([1.0, 0.0, 0.0]).expand(len(sphere), 3), torch.tensor([0.0, 1.0, 0.0]).expand(len(sphere), 3)]
    out = R.render_mesh(ctx, [back, front], [faces, faces], [cam], (H, W), albedo=alb)
    cy, cx = H // 2, W // 2
    assert out.mesh_ids[0, cy, cx] == 1  # the nearer sphere occludes the farther one
    assert out.mesh_ids[0, cy, cx + 8] == 0 and out.mesh_ids[0, 0, 0] == -1
    assert out.images[0, cy, cx, 1] > 0.5 and out.images[0, cy, cx, 0] < 1e-6
    assert out.depth[0, cy, cx].item() == pytest.approx(1.0 - 0.12, abs=0.012)
    assert out.normals[0, cy, cx, 2].item() < -0.9  # faces the camera (camera looks along +z)
    assert torch.allclose(out.mask, out.silhouettes.sum(-1).clamp(0, 1))
    assert out.silhouettes.shape == (1, H, W, 2)
    # Silhouettes are differentiable w.r.t. the vertices.
    v = front.clone().requires_grad_(True)
    res = R.render_mesh(ctx, [back, v], [faces, faces], [cam], (H, W), topology=out.topology)
    res.silhouettes[..., 1].sum().backward()
    assert v.grad.abs().sum() > 0
