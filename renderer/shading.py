"""Shading on top of the ops: normals, spherical-harmonics Lambertian shading, and ``render_mesh``.

Conventions: colours are linear (convert photos from sRGB once, at the loss); SH coefficients
are the projection of the environment's incident *radiance* on the 9 real orthonormal SH
functions, and ``sh_shading`` returns the outgoing radiance of a white Lambertian surface
E(n)/pi = sum_k A_l/pi L_k Y_k(n), with A_0 = pi, A_1 = 2pi/3, A_2 = pi/4 (Ramamoorthi &
Hanrahan). A uniform environment of radiance 1 is L_00 = 2 sqrt(pi), and shades to exactly 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from capture.camera import Camera, scene_depth_range, to_clip
from renderer.context import RenderContext, RendererError
from renderer.mesh_ops import face_normals
from renderer.ops import TopologyHash, antialias, antialias_construct_topology_hash, interpolate, rasterize

# Real SH normalisation constants, bands 0..2.
_C0 = 0.5 * math.sqrt(1.0 / math.pi)
_C1 = math.sqrt(3.0 / (4.0 * math.pi))
_C2 = 0.5 * math.sqrt(15.0 / math.pi)
_C20 = 0.25 * math.sqrt(5.0 / math.pi)
_C22 = 0.25 * math.sqrt(15.0 / math.pi)
# Lambertian kernel / pi per band: 1, 2/3, 1/4 for the 9 coefficients.
_LAMBERT = (1.0, 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 0.25, 0.25, 0.25, 0.25, 0.25)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals (..., N, 3): sum of incident face normals weighted by face area."""
    fn = face_normals(verts, faces, normalize=False)  # 2 x area x unit normal
    faces = faces.long().to(verts.device)
    out = torch.zeros_like(verts)
    for k in range(3):
        out = out.index_add(-2, faces[:, k], fn)
    return torch.nn.functional.normalize(out, dim=-1, eps=1e-12)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 real orthonormal SH functions at unit directions (..., 3) -> (..., 9).

    Order: Y00; Y1-1 (y), Y10 (z), Y11 (x); Y2-2 (xy), Y2-1 (yz), Y20 (3z^2 - 1), Y21 (xz),
    Y22 (x^2 - y^2).
    """
    x, y, z = normals.unbind(-1)
    one = torch.ones_like(x)
    return torch.stack(
        [
            _C0 * one,
            _C1 * y,
            _C1 * z,
            _C1 * x,
            _C2 * x * y,
            _C2 * y * z,
            _C20 * (3.0 * z * z - 1.0),
            _C2 * x * z,
            _C22 * (x * x - y * y),
        ],
        dim=-1,
    )


def sh_ambient(radiance: float = 1.0, rgb: bool = False) -> torch.Tensor:
    """Coefficients of a uniform environment that shades a white surface to ``radiance``."""
    c = torch.zeros(9, 3) if rgb else torch.zeros(9)
    c[0] = radiance * 2.0 * math.sqrt(math.pi)
    return c


def sh_shading(normals: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """White-Lambertian radiance E(n)/pi for normals (V, ..., 3) or (..., 3).

    coeffs: (9,) grey or (9, 3) RGB shared by all views, or (V, 9) / (V, 9, 3) per view (then
    normals' first dimension is the view). Returns (..., 1) for grey, (..., 3) for RGB.
    """
    basis = sh_basis(normals) * normals.new_tensor(_LAMBERT)
    c = coeffs.to(device=normals.device, dtype=normals.dtype)
    if c.shape[-1] == 9:
        c = c.unsqueeze(-1)  # grey -> one channel
    elif c.shape[-2:] != (9, 3):
        raise RendererError(f"SH coefficients must be (9,), (9,3), (V,9) or (V,9,3), got {tuple(coeffs.shape)}")
    if c.ndim == 2:
        return basis @ c
    V = c.shape[0]
    if normals.shape[0] != V:
        raise RendererError(f"per-view SH for {V} views but normals have leading dimension {normals.shape[0]}")
    shape = (V,) + (1,) * (normals.ndim - 2) + c.shape[1:]
    return (basis.unsqueeze(-2) @ c.reshape(shape)).squeeze(-2)


def shade_lambertian(albedo: torch.Tensor, normals: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Albedo (..., C) x SH shading of the normals; grey shading broadcasts over channels."""
    return albedo * sh_shading(normals, coeffs)


def silhouette(rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor, topology_hash: TopologyHash | None = None,
               *, ctx: RenderContext | None = None) -> torch.Tensor:
    """Antialiased coverage (V, H, W): differentiable w.r.t. pos through the silhouette edges."""
    mask = (rast[..., 3:4] > 0).to(pos.dtype)
    return antialias(mask, rast, pos, tri, topology_hash, ctx=ctx)[..., 0]


def normal_map(rast: torch.Tensor, tri: torch.Tensor, normals: torch.Tensor, rotation: torch.Tensor | None = None,
               *, ctx: RenderContext | None = None) -> torch.Tensor:
    """Unit interpolated normals (V, H, W, 3), 0 on background; rotation (V, 3, 3) maps them
    (e.g. world -> camera with the cameras' R)."""
    n, _ = interpolate(normals, rast, tri, ctx=ctx)
    if rotation is not None:
        n = torch.einsum("vij,vhwj->vhwi", rotation.to(n), n)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def depth_map(rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor, *, ctx: RenderContext | None = None) -> torch.Tensor:
    """Camera-space depth (V, H, W), 0 on background: clip w is the camera z for
    ``Camera.clip_matrix``, and perspective-correct interpolation of w gives the surface's z."""
    d, _ = interpolate(pos[..., 3:4].contiguous(), rast, tri, ctx=ctx)
    return d[..., 0]


@dataclass
class RenderResult:
    """Everything ``render_mesh`` made, for losses and for reuse (rast, pos, tri, topology)."""

    images: torch.Tensor  # (V, H, W, 3) linear colour, antialiased
    silhouettes: torch.Tensor  # (V, H, W, M) antialiased coverage per mesh
    mask: torch.Tensor  # (V, H, W) antialiased coverage of the scene
    normals: torch.Tensor  # (V, H, W, 3) unit world normals, 0 on background
    depth: torch.Tensor  # (V, H, W) camera z in metres, 0 on background
    mesh_ids: torch.Tensor  # (V, H, W) int64 index of the visible mesh, -1 on background
    rast: torch.Tensor
    rast_db: torch.Tensor
    pos: torch.Tensor  # (V, N, 4) clip coordinates of the merged scene
    tri: torch.Tensor  # (F, 3) int32 merged faces
    topology: TopologyHash
    near: float
    far: float


def _as_list(x: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
    if x is None:
        return None
    return [x] if isinstance(x, torch.Tensor) else list(x)


def render_mesh(
    ctx: RenderContext,
    verts: torch.Tensor | Sequence[torch.Tensor],
    faces: torch.Tensor | Sequence[torch.Tensor],
    cameras: Sequence[Camera],
    resolution: Sequence[int],
    albedo: torch.Tensor | Sequence[torch.Tensor] | None = None,
    sh: torch.Tensor | None = None,
    near: float | None = None,
    far: float | None = None,
    background: torch.Tensor | None = None,
    topology: TopologyHash | None = None,
) -> RenderResult:
    """to_clip -> rasterize -> interpolate -> SH-Lambertian shade -> antialias, one scene.

    verts / faces / albedo: one mesh or a list (e.g. both hands; merged into one scene so
    occlusion between them is right). albedo per vertex (N, 3), default 0.7 grey; sh as in
    ``sh_shading``, default a uniform environment (shading 1). near / far default to the scene's
    depth range over all cameras. resolution (H, W) may differ from the cameras' size (clip
    space is normalised, so the image is the camera's image resampled). Pass ``topology`` from
    a previous result when the faces do not change.
    """
    vs, fs = _as_list(verts), _as_list(faces)
    if len(vs) != len(fs):
        raise RendererError(f"{len(vs)} vertex sets but {len(fs)} face sets")
    albs = _as_list(albedo)
    if albs is not None and len(albs) != len(vs):
        raise RendererError(f"{len(albs)} albedo sets for {len(vs)} meshes")
    device = vs[0].device
    offsets = np.cumsum([0] + [v.shape[0] for v in vs])
    v_all = torch.cat(vs, 0)
    tri = torch.cat([f.to(device).long() + int(o) for f, o in zip(fs, offsets[:-1])], 0).to(torch.int32).contiguous()
    face_mesh = torch.cat([torch.full((f.shape[0],), k, dtype=torch.long, device=device) for k, f in enumerate(fs)])
    if albs is None:
        alb = torch.full_like(v_all, 0.7)
    else:
        alb = torch.cat([a.to(v_all) for a in albs], 0)
    if near is None or far is None:
        n0, f0 = scene_depth_range(v_all.detach().cpu().double().numpy(), list(cameras))
        near = n0 if near is None else near
        far = f0 if far is None else far
    pos = to_clip(v_all, list(cameras), near, far).contiguous()
    rast, rast_db = rasterize(ctx, pos, tri, resolution)
    nrm = vertex_normals(v_all, tri)
    attr, _ = interpolate(torch.cat([alb, nrm], -1), rast, tri, ctx=ctx)
    depth = depth_map(rast, pos, tri, ctx=ctx)
    covered = rast[..., 3] > 0
    n_img = torch.nn.functional.normalize(attr[..., 3:6], dim=-1, eps=1e-12)
    coeffs = sh if sh is not None else sh_ambient().to(v_all)
    color = shade_lambertian(attr[..., 0:3], n_img, coeffs)
    M = len(vs)
    tid = rast[..., 3].long()
    mesh_ids = torch.where(covered, face_mesh[(tid - 1).clamp_min(0)], torch.full_like(tid, -1))
    masks = torch.stack([(mesh_ids == k) for k in range(M)], -1).to(color.dtype)
    if background is not None:
        bg = background.to(color).reshape(1, 1, 1, -1)
        color = torch.where(covered.unsqueeze(-1), color, bg.expand_as(color))
    topo = topology if topology is not None else antialias_construct_topology_hash(tri)
    # One antialias pass for colour and every mesh's coverage.
    aa = antialias(torch.cat([color, masks], -1), rast, pos, tri, topo, ctx=ctx)
    sil = aa[..., 3:]
    return RenderResult(
        images=aa[..., :3],
        silhouettes=sil,
        mask=sil.sum(-1).clamp(0.0, 1.0),
        normals=n_img * covered.unsqueeze(-1),
        depth=depth,
        mesh_ids=mesh_ids,
        rast=rast,
        rast_db=rast_db,
        pos=pos,
        tri=tri,
        topology=topo,
        near=float(near),
        far=float(far),
    )
