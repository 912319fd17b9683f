"""Mesh utilities for fitting: Loop subdivision as a sparse matrix, Laplacians, regularisers.

Loop subdivision is returned as faces plus a sparse (V_new, V_old) matrix rather than new
positions, so anything per-vertex (positions of every frame, skinning weights, albedo, UVs)
is carried by one matmul and the subdivided topology is the same for every hand built from
the same template (edge numbering is deterministic). Vertex index order: old vertices first,
then one new vertex per unique edge (edges sorted by (min, max) vertex index). Face order:
face f of level k becomes faces 4f..4f+3 of level k+1, corners in the parent's order.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

# ----------------------------------------------------------------------------- topology


def _faces_np(faces: torch.Tensor | np.ndarray) -> np.ndarray:
    f = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {f.shape}")
    return f.astype(np.int64)


def _edge_table(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique undirected edges (E, 2) sorted, half-edge -> edge id (F, 3), faces per edge (E,).

    Half-edge (f, i) runs from corner i to corner i + 1.
    """
    a = f
    b = np.roll(f, -1, axis=1)
    lo, hi = np.minimum(a, b).reshape(-1), np.maximum(a, b).reshape(-1)
    n = int(f.max()) + 1 if f.size else 0
    key = lo * max(n, 1) + hi
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    edges = np.stack([uniq // max(n, 1), uniq % max(n, 1)], axis=1)
    return edges, inv.reshape(f.shape), counts


def mesh_edges(faces: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Unique undirected edges (E, 2), int64, sorted by (min, max) vertex index."""
    edges, _, _ = _edge_table(_faces_np(faces))
    return torch.as_tensor(edges, dtype=torch.long)


def face_adjacency(faces: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pairs (P, 2) of faces sharing an edge that has exactly two faces (manifold interior edges)."""
    f = _faces_np(faces)
    _, he, counts = _edge_table(f)
    e = he.reshape(-1)
    face_of = np.repeat(np.arange(len(f)), 3)
    order = np.argsort(e, kind="stable")
    e_sorted = e[order]
    # Half-edges of one edge are consecutive after sorting; keep edges with exactly two.
    first = np.r_[True, e_sorted[1:] != e_sorted[:-1]]
    p = np.flatnonzero(first & (counts[e_sorted] == 2))
    starts, seconds = order[p], order[p + 1]
    pairs = np.stack([face_of[starts], face_of[seconds]], axis=1)
    return torch.as_tensor(pairs, dtype=torch.long)


# ----------------------------------------------------------------------------- Loop subdivision


def _loop_level(f: np.ndarray, n_vertices: int, smooth: bool) -> tuple[np.ndarray, sp.csr_matrix]:
    """One level: new faces and the (V + E, V) matrix (Loop weights, or linear midpoints)."""
    edges, he, counts = _edge_table(f)
    E = len(edges)
    V = n_vertices
    m = V + he  # new vertex of each half-edge's edge
    a, b, c = f[:, 0], f[:, 1], f[:, 2]
    mab, mbc, mca = m[:, 0], m[:, 1], m[:, 2]
    new_faces = np.stack(
        [np.stack([a, mab, mca], 1), np.stack([b, mbc, mab], 1), np.stack([c, mca, mbc], 1), np.stack([mab, mbc, mca], 1)],
        axis=1,
    ).reshape(-1, 3)

    rows, cols, vals = [], [], []
    # Odd (edge) vertices.
    interior_e = counts == 2
    if smooth:
        opp_sum_rows, opp_cols = [], []
        # Opposite corner of half-edge (f, i) is corner i + 2.
        opp = np.roll(f, -2, axis=1).reshape(-1)
        e_flat = he.reshape(-1)
        sel = interior_e[e_flat]
        opp_sum_rows.append(V + e_flat[sel])
        opp_cols.append(opp[sel])
        w_end = np.where(interior_e, 3.0 / 8.0, 0.5)
        rows += [V + np.arange(E), V + np.arange(E), *opp_sum_rows]
        cols += [edges[:, 0], edges[:, 1], *opp_cols]
        vals += [w_end, w_end, np.full(int(sel.sum()), 1.0 / 8.0)]
    else:
        rows += [V + np.arange(E), V + np.arange(E)]
        cols += [edges[:, 0], edges[:, 1]]
        vals += [np.full(E, 0.5), np.full(E, 0.5)]

    # Even (old) vertices.
    if smooth:
        nbr_r = np.concatenate([edges[:, 0], edges[:, 1]])
        nbr_c = np.concatenate([edges[:, 1], edges[:, 0]])
        valence = np.bincount(nbr_r, minlength=V)
        bnd_e = ~interior_e
        bnd_r = np.concatenate([edges[bnd_e, 0], edges[bnd_e, 1]])
        bnd_c = np.concatenate([edges[bnd_e, 1], edges[bnd_e, 0]])
        n_bnd = np.bincount(bnd_r, minlength=V)
        is_bnd = n_bnd > 0
        # Interior: Loop's beta; boundary with two boundary neighbours: 1/8 each; else fixed.
        nv = np.maximum(valence, 1)
        beta = (5.0 / 8.0 - (3.0 / 8.0 + 0.25 * np.cos(2 * math.pi / nv)) ** 2) / nv
        interior_v = (~is_bnd) & (valence >= 3)
        regular_bnd = is_bnd & (n_bnd == 2)
        self_w = np.ones(V)
        self_w[interior_v] = 1.0 - valence[interior_v] * beta[interior_v]
        self_w[regular_bnd] = 0.75
        rows.append(np.arange(V))
        cols.append(np.arange(V))
        vals.append(self_w)
        keep = interior_v[nbr_r]
        rows.append(nbr_r[keep])
        cols.append(nbr_c[keep])
        vals.append(beta[nbr_r[keep]])
        keep = regular_bnd[bnd_r]
        rows.append(bnd_r[keep])
        cols.append(bnd_c[keep])
        vals.append(np.full(int(keep.sum()), 1.0 / 8.0))
    else:
        rows.append(np.arange(V))
        cols.append(np.arange(V))
        vals.append(np.ones(V))

    S = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(V + E, V)
    ).tocsr()
    return new_faces, S


def _to_torch_sparse(S: sp.spmatrix) -> torch.Tensor:
    S = S.tocoo()
    idx = torch.as_tensor(np.stack([S.row, S.col]), dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.as_tensor(S.data, dtype=torch.float32), S.shape, check_invariants=False).coalesce()


def apply_sparse(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S (M, N) sparse @ x with x (N,), (N, C) or (B, N, C); differentiable w.r.t. x."""
    S = S.to(device=x.device, dtype=x.dtype)
    if x.ndim == 1:
        return torch.sparse.mm(S, x[:, None])[:, 0]
    if x.ndim == 2:
        return torch.sparse.mm(S, x)
    B, N, C = x.shape
    y = torch.sparse.mm(S, x.permute(1, 0, 2).reshape(N, B * C))
    return y.reshape(-1, B, C).permute(1, 0, 2)


@dataclass
class Subdivision:
    """Result of ``loop_subdivide``: faces, the vertex matrix, and optionally UV faces and matrix."""

    faces: torch.Tensor
    matrix: torch.Tensor
    uv_faces: torch.Tensor | None = None
    uv_matrix: torch.Tensor | None = None
    levels: int = 1

    @property
    def num_vertices(self) -> int:
        return int(self.matrix.shape[0])

    def apply(self, attr: torch.Tensor) -> torch.Tensor:
        """Carry per-vertex attributes (N,), (N, C) or (B, N, C) to the subdivided mesh."""
        return apply_sparse(self.matrix, attr)

    def apply_uv(self, uv: torch.Tensor) -> torch.Tensor:
        """Carry per-UV-vertex values (UV coordinates) to the subdivided UV mesh."""
        if self.uv_matrix is None:
            raise ValueError("this subdivision was made without uv_faces")
        return apply_sparse(self.uv_matrix, uv)


def loop_subdivide(
    faces: torch.Tensor | np.ndarray,
    n_vertices: int | None = None,
    levels: int = 1,
    uv_faces: torch.Tensor | np.ndarray | None = None,
    n_uv: int | None = None,
    smooth_uv: bool = False,
) -> Subdivision:
    """Loop subdivision (1..3 levels) as faces plus sparse (V_new, V_old) matrix.

    Interior edges: 3/8, 3/8, 1/8, 1/8; boundary edges midpoints; interior vertices Loop's
    beta; boundary vertices 3/4, 1/8, 1/8 (open wrist of a hand mesh stays a smooth curve);
    corners and non-manifold vertices stay. UV seams: ``uv_faces`` (same F, indexing a separate
    UV vertex set) are split exactly like ``faces``, and the UV matrix interpolates linearly
    (default, keeps the atlas) or with the Loop rules on the UV mesh (``smooth_uv``).
    """
    if not 1 <= levels <= 3:
        raise ValueError(f"levels must be 1..3, got {levels}")
    f = _faces_np(faces)
    V = int(n_vertices) if n_vertices is not None else int(f.max()) + 1
    total = sp.identity(V, format="csr")
    uf = _faces_np(uv_faces) if uv_faces is not None else None
    if uf is not None and uf.shape != f.shape:
        raise ValueError(f"uv_faces {uf.shape} must match faces {f.shape}")
    U = (int(n_uv) if n_uv is not None else int(uf.max()) + 1) if uf is not None else 0
    uv_total = sp.identity(U, format="csr") if uf is not None else None
    for _ in range(levels):
        f, S = _loop_level(f, total.shape[0], smooth=True)
        total = S @ total
        if uf is not None:
            uf, Su = _loop_level(uf, uv_total.shape[0], smooth=smooth_uv)
            uv_total = Su @ uv_total
    return Subdivision(
        faces=torch.as_tensor(f, dtype=torch.long),
        matrix=_to_torch_sparse(total),
        uv_faces=torch.as_tensor(uf, dtype=torch.long) if uf is not None else None,
        uv_matrix=_to_torch_sparse(uv_total) if uv_total is not None else None,
        levels=levels,
    )


# ----------------------------------------------------------------------------- geometry


def face_normals(verts: torch.Tensor, faces: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Face normals (..., F, 3) of verts (..., N, 3); unnormalised = 2 x area x unit normal."""
    faces = faces.long().to(verts.device)
    v0 = verts[..., faces[:, 0], :]
    v1 = verts[..., faces[:, 1], :]
    v2 = verts[..., faces[:, 2], :]
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12) if normalize else n


def edge_lengths(verts: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Lengths (..., E) of edges (E, 2) (e.g. from ``mesh_edges``)."""
    edges = edges.long().to(verts.device)
    d = verts[..., edges[:, 0], :] - verts[..., edges[:, 1], :]
    return torch.sqrt((d * d).sum(-1).clamp_min(1e-24))


def uniform_laplacian(faces: torch.Tensor | np.ndarray, n_vertices: int) -> torch.Tensor:
    """Sparse (N, N) L = I - D^-1 A: (L x)_i = x_i - mean of x over i's neighbours."""
    return _to_torch_sparse(_uniform_laplacian_sp(_faces_np(faces), n_vertices))


def _uniform_laplacian_sp(f: np.ndarray, n_vertices: int) -> sp.coo_matrix:
    edges, _, _ = _edge_table(f)
    r = np.concatenate([edges[:, 0], edges[:, 1]])
    c = np.concatenate([edges[:, 1], edges[:, 0]])
    deg = np.bincount(r, minlength=n_vertices).astype(np.float64)
    w = -1.0 / np.maximum(deg[r], 1.0)
    diag = (deg > 0).astype(np.float64)
    return sp.coo_matrix((np.concatenate([w, diag]), (np.concatenate([r, np.arange(n_vertices)]),
                                                      np.concatenate([c, np.arange(n_vertices)]))),
                         shape=(n_vertices, n_vertices))


def confidence_fill(values: torch.Tensor, confidence: torch.Tensor, faces: torch.Tensor | np.ndarray,
                    floor: float = 1e-6) -> torch.Tensor:
    """Per-vertex ``values`` (N,C) kept in proportion to ``confidence`` (N,) in [0, 1] and taken
    from the neighbours for the rest: x_i = c_i v_i + (1 - c_i) mean_j x_j over i's neighbours, one
    sparse solve. Confident vertices keep their value, unseen ones get the harmonic interpolation
    of the surface around them (a membrane, no overshoot). ``floor`` keeps a wholly unseen
    component at its own values."""
    from scipy.sparse.linalg import spsolve

    n = values.shape[0]
    c = confidence.detach().double().cpu().numpy().reshape(-1).clip(floor, 1.0)
    L = _uniform_laplacian_sp(_faces_np(faces), n).tocsr()
    A = (sp.diags(c) + sp.diags(1.0 - c) @ L).tocsc()
    rhs = c[:, None] * values.detach().double().cpu().numpy()
    x = np.asarray(spsolve(A, rhs)).reshape(n, -1)
    if not np.isfinite(x).all():  # e.g. a non-finite input value: keep the values as they were
        logging.getLogger(__name__).warning("confidence_fill: the solve gave non-finite values; values left unfilled")
        return values.clone()
    return torch.as_tensor(x, dtype=values.dtype, device=values.device)


def cotangent_laplacian(verts: torch.Tensor, faces: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Sparse (N, N) cotangent Laplacian, (L x)_i = sum_j (cot a + cot b)/2 (x_i - x_j).

    Zero on interior vertices of any planar mesh (linear precision). normalize divides row i by
    the vertex's barycentric area (1/3 of its faces' areas), approximating -Laplace-Beltrami.
    Weights are differentiable w.r.t. verts (N, 3).
    """
    faces = faces.long().to(verts.device)
    N = verts.shape[0]
    v = [verts[faces[:, k]] for k in range(3)]
    rows, cols, vals = [], [], []
    area2 = torch.linalg.norm(torch.cross(v[1] - v[0], v[2] - v[0], dim=-1), dim=-1)
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        e1 = v[i] - v[k]
        e2 = v[j] - v[k]
        cot = (e1 * e2).sum(-1) / area2.clamp_min(1e-20)
        w = 0.5 * cot
        rows += [faces[:, i], faces[:, j]]
        cols += [faces[:, j], faces[:, i]]
        vals += [-w, -w]
    r = torch.cat(rows)
    c = torch.cat(cols)
    off = torch.cat(vals)
    diag = torch.zeros(N, dtype=verts.dtype, device=verts.device).index_add(0, r, -off)
    idx = torch.cat([torch.stack([r, c]), torch.arange(N, device=verts.device).expand(2, N)], dim=1)
    val = torch.cat([off, diag])
    if normalize:
        area = torch.zeros(N, dtype=verts.dtype, device=verts.device)
        for k in range(3):
            area = area.index_add(0, faces[:, k], area2 / 6.0)
        val = val / area.clamp_min(1e-20)[idx[0]]
    return torch.sparse_coo_tensor(idx, val, (N, N), check_invariants=False).coalesce()


# ----------------------------------------------------------------------------- losses


def normal_consistency_loss(verts: torch.Tensor, faces: torch.Tensor, adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 - cos between normals of adjacent faces (0 for a plane); verts (..., N, 3)."""
    adj = face_adjacency(faces) if adjacency is None else adjacency
    adj = adj.to(verts.device)
    n = face_normals(verts, faces)
    cos = (n[..., adj[:, 0], :] * n[..., adj[:, 1], :]).sum(-1)
    return (1.0 - cos).mean()


def laplacian_smoothing_loss(verts: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """Mean norm of L v over vertices; verts (N, 3) or (B, N, 3); L from a Laplacian above."""
    lv = apply_sparse(laplacian, verts)
    return torch.sqrt((lv * lv).sum(-1) + 1e-20).mean()
