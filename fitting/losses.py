"""Loss terms shared by the image-based stages (``silhouette_fit``, ``ham``): colour-space
conversion, silhouette and photometric data terms over per-pixel weight maps, mesh regularisers,
and the interpenetration penalty between two hands.

Why one module: both stages must see the same definition of "the mask pixels that count" (the
weight maps of ``fitting.masks``) and compare renders to photos the same way. Conventions:
renders are linear colour; photos are sRGB in [0, 1]; the photometric term converts the render to
sRGB once, so the loss lives in the space the photos (and PSNR) are measured in. Weight maps are
(V, H, W) floats, 0 = pixel ignored (forearm, broken view, padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture.camera import Camera, scene_depth_range, to_clip
from renderer.mesh_ops import apply_sparse, edge_lengths, normal_consistency_loss
from renderer.ops import TopologyHash, antialias, interpolate, rasterize

if TYPE_CHECKING:
    from renderer.context import RenderContext

# ----------------------------------------------------------------------------------- colour space


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """IEC 61966-2-1 sRGB -> linear, for values in [0, 1] (clamped first)."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear -> sRGB, clamped to [0, 1]; the power branch is fed a safe value so its gradient
    never sees 0 ** (1/2.4 - 1)."""
    x = x.clamp(0.0, 1.0)
    safe = torch.where(x > 0.0031308, x, torch.full_like(x, 0.0031308))
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * safe ** (1.0 / 2.4) - 0.055)


# ------------------------------------------------------------------------------------ data terms


def silhouette_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    view_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared coverage error over the weighted pixels of each view, divided by the view's
    target area (so a view's loss is ~ the fraction of its hand area that is wrong, whatever its
    size or resolution), averaged over views with ``view_weight`` (V,).

    pred: antialiased coverage (V, H, W) in [0, 1]; target, weight (V, H, W)."""
    err = weight * (pred - target) ** 2
    area = (weight * target).flatten(1).sum(1).clamp_min(1.0)
    per_view = err.flatten(1).sum(1) / area
    if view_weight is None:
        return per_view.mean()
    return (per_view * view_weight).sum() / view_weight.sum().clamp_min(1e-9)


def photometric_loss(render_linear: torch.Tensor, photo_srgb: torch.Tensor, weight: torch.Tensor,
                     view_weight: torch.Tensor | None = None, eps: float = 0.05) -> torch.Tensor:
    """Charbonnier between the sRGB-encoded render and the photo, mean over weighted pixels and
    channels of each view, averaged over views. render (V,H,W,3) linear, photo (V,H,W,3).

    ``eps`` sets where it turns from quadratic (errors of the size of noise and misfit, where the
    least-squares fit is what PSNR measures) to linear (specular highlights and cast shadows,
    outliers of the Lambertian model). Measured on the demo capture after HAM: eps 0.001 (robust
    L1) 25.57 dB, 0.05 25.70, 0.1 25.59, 0.2 25.26 (the gradient of small errors shrinks as
    error / eps against the regularisers)."""
    diff = linear_to_srgb(render_linear) - photo_srgb
    rho = torch.sqrt(diff * diff + eps * eps) - eps
    w = weight.unsqueeze(-1)
    per_view = (w * rho).flatten(1).sum(1) / (3.0 * weight.flatten(1).sum(1).clamp_min(1.0))
    if view_weight is None:
        return per_view.mean()
    return (per_view * view_weight).sum() / view_weight.sum().clamp_min(1e-9)


# ----------------------------------------------------------------------------------- regularisers


class _CSRMatMul(torch.autograd.Function):
    """M @ x with M and M^T held in CSR: torch's COO product (and its backward, which transposes
    M on every call) costs ten times more on CPU, and optimisation loops multiply by the same
    subdivision and Laplacian matrices hundreds of times."""

    @staticmethod
    def forward(ctx: Any, M: torch.Tensor, Mt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.Mt = Mt
        return torch.sparse.mm(M, x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, torch.Tensor]:  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.Mt, g.contiguous())


_CSR_CACHE: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}


def spmm(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sparse (rows, N) matrix @ x (N,) or (N, C), differentiable w.r.t. x; the CSR forms of M
    and M^T are made once per matrix (kept while M lives) and per device/dtype."""
    import warnings
    import weakref

    if x.ndim == 1:
        return spmm(M, x[:, None])[:, 0]
    key = id(M)
    hit = _CSR_CACHE.get(key)
    if hit is None or hit[0]() is not M or hit[1].device != x.device or hit[1].dtype != x.dtype:
        Mc = M.to(device=x.device, dtype=x.dtype).coalesce() if M.layout == torch.sparse_coo else \
            M.to(device=x.device, dtype=x.dtype).to_sparse_coo().coalesce()
        with warnings.catch_warnings():  # "CSR support is in beta": the product used here is stable
            warnings.simplefilter("ignore", UserWarning)
            hit = (weakref.ref(M), Mc.to_sparse_csr(), Mc.t().coalesce().to_sparse_csr())
        _CSR_CACHE[key] = hit
        for k in [k for k, v in _CSR_CACHE.items() if v[0]() is None]:
            del _CSR_CACHE[k]
    return _CSRMatMul.apply(hit[1], hit[2], x)


def laplacian_loss(field: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of L f for a per-vertex field (N, C): smoothness of a displacement or an
    albedo, zero for constant fields."""
    lf = spmm(laplacian, field)
    return (lf * lf).sum(-1).mean()


def edge_length_loss(verts: torch.Tensor, edges: torch.Tensor, rest_lengths: torch.Tensor) -> torch.Tensor:
    """Mean squared relative change of edge lengths against the un-displaced mesh: keeps the
    triangles from collapsing or stretching when displacements are free."""
    rel = edge_lengths(verts, edges) / rest_lengths.clamp_min(1e-9) - 1.0
    return (rel * rel).mean()


def normal_consistency(verts: torch.Tensor, faces: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """1 - cos between adjacent face normals, mean (``renderer.mesh_ops``); penalises spikes."""
    return normal_consistency_loss(verts, faces, adjacency)


def sh_consistency(sh: torch.Tensor) -> torch.Tensor:
    """Per-view SH (V, 9, 3) against their mean: the views share one environment, so per-view
    lighting should only absorb exposure and white-balance differences between cameras."""
    if sh.shape[0] < 2:
        return sh.new_zeros(())
    return ((sh - sh.mean(0, keepdim=True)) ** 2).mean()


# ------------------------------------------------------------------------------ interpenetration


def interpenetration_loss(verts_a: torch.Tensor, faces_a: torch.Tensor, verts_b: torch.Tensor,
                          faces_b: torch.Tensor, radius: float = 0.02) -> torch.Tensor:
    """Squared penetration depth in millimetres of each hand's vertices inside the other hand,
    summed over both directions and averaged over each hand's vertices (mm so that a weight of
    ~1 balances the other terms).

    Signed distance by the nearest vertex and its outward normal: a vertex x of A with nearest
    vertex y of B (normal n_y) is inside B when (x - y) . n_y < 0. Only pairs closer than
    ``radius`` count (far away the nearest-vertex sign is meaningless), which also makes the term
    exactly zero for hands apart. Nearest neighbours are chosen without gradient; the depth is
    differentiable w.r.t. both hands."""
    from renderer.shading import vertex_normals

    total = verts_a.new_zeros(())
    for x, y, fy in ((verts_a, verts_b, faces_b), (verts_b, verts_a, faces_a)):
        with torch.no_grad():
            d = torch.cdist(x.detach(), y.detach())
            dist, idx = d.min(1)
        near = dist < radius
        if not bool(near.any()):
            continue
        n = vertex_normals(y, fy)
        sd = ((x - y[idx]) * n[idx]).sum(-1)
        depth = 1000.0 * F.relu(-sd) * near.to(sd.dtype)
        total = total + (depth * depth).sum() / x.shape[0]
    return total


# ------------------------------------------------------------------------------------ set-up


def stage_device(conf: Mapping[str, Any] | None) -> torch.device:
    """The conf's resolved ``device`` (cpu when absent, or cuda asked for without a GPU)."""
    name = str(conf.get("device", "cpu")) if conf is not None and hasattr(conf, "get") else "cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        name = "cpu"
    return torch.device(name)


def render_context(conf: Mapping[str, Any] | None, device: torch.device) -> "RenderContext":
    """Renderer for the image stages: ``renderer.backend`` (auto = nvdiffrast on CUDA when it
    imports, else our CPU backend), on the stage's device."""
    from renderer import make_context

    backend = "auto"
    if conf is not None and "renderer" in conf:
        backend = str(conf["renderer"].get("backend", "auto"))
    return make_context(backend, device)


# -------------------------------------------------------------------------------------- rendering


@dataclass
class Scene:
    """Meshes merged into one scene (so occlusion between them is resolved by one rasterization):
    vertices (N,3), int32 faces (F,3), and each mesh's vertex offset."""

    verts: torch.Tensor
    tri: torch.Tensor
    offsets: list[int]


def merge(verts: Sequence[torch.Tensor], faces: Sequence[torch.Tensor]) -> Scene:
    offsets = [0]
    for v in verts:
        offsets.append(offsets[-1] + int(v.shape[0]))
    dev = verts[0].device
    tri = torch.cat([f.to(dev).long() + o for f, o in zip(faces, offsets[:-1])]).to(torch.int32).contiguous()
    return Scene(torch.cat(list(verts), 0), tri, offsets)


def clip_positions(verts: torch.Tensor, cameras: Sequence[Camera], near: float | None = None,
                   far: float | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Clip coordinates (V,N,4) with near/far from the scene's depth range unless given.

    ``offsets`` (V,2): per-view principal-point corrections in pixels of the canvas (a camera
    whose K[0,2], K[1,2] move by (dx, dy)); applied in clip space so they are differentiable."""
    if near is None or far is None:
        near, far = scene_depth_range(verts.detach().cpu().double().numpy(), list(cameras))
    pos = to_clip(verts, list(cameras), near, far)
    if offsets is not None:
        W = torch.tensor([c.width for c in cameras], dtype=pos.dtype, device=pos.device)
        H = torch.tensor([c.height for c in cameras], dtype=pos.dtype, device=pos.device)
        o = offsets.to(pos)
        shift = torch.stack([2.0 * o[:, 0] / W, 2.0 * o[:, 1] / H], -1)  # (V,2) NDC
        pos = torch.cat([pos[..., :2] + shift[:, None, :] * pos[..., 3:4], pos[..., 2:]], -1)
    return pos.contiguous()


def offset_projections(P: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """Projection matrices (V,3,4) of cameras whose principal points move by ``offsets`` (V,2)
    pixels: rows 0/1 gain offset x row 2 (K's last row is [0, 0, 1])."""
    if offsets is None:
        return P
    o = offsets.to(P)
    return torch.stack([P[:, 0] + o[:, 0:1] * P[:, 2], P[:, 1] + o[:, 1:2] * P[:, 2], P[:, 2]], 1)


def render_silhouette(ctx: "RenderContext", scene: Scene, cameras: Sequence[Camera], hw: tuple[int, int],
                      topology: TopologyHash | None = None, offsets: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased coverage (V,H,W) of the whole scene and its raster: rasterize + antialias of
    one channel, the cheapest differentiable silhouette (no shading)."""
    pos = clip_positions(scene.verts, cameras, offsets=offsets)
    rast, _ = rasterize(ctx, pos, scene.tri, hw, grad_db=False)
    cov = (rast[..., 3:4] > 0).to(pos.dtype)
    return antialias(cov, rast, pos, scene.tri, topology, ctx=ctx)[..., 0], rast


def box_pool(img: torch.Tensor, s: int) -> torch.Tensor:
    """(V,H*s,W*s[,C]) -> (V,H,W[,C]): the mean of each s x s block of samples (linear values)."""
    if s == 1:
        return img
    V, Hs, Ws = img.shape[:3]
    return img.reshape(V, Hs // s, s, Ws // s, s, *img.shape[3:]).mean((2, 4))


@dataclass
class Raster:
    """A scene rasterized from a set of cameras. ``rast`` (V,H,W,4) at the image size says which
    triangle each pixel centre sees (back faces, contours, pixel indexing); with ``s`` > 1,
    ``fine`` (V,H*s,W*s,4) holds s x s samples per pixel for the colours, which the renders average
    back to the image size: a camera pixel integrates the light over its area, so an outline pixel
    of a photo holds the true fraction of hand and a pixel over fine texture or a highlight its
    mean, which one sample plus antialiasing only approximates (a synthetic scan at 320x256
    rendered so against its 4 x 4 sampled self: 31-34 dB over the hand mask, 27 dB on the outline
    band; 2 x 2 samples: 41-44 dB). One set of clip positions ``pos`` serves both (clip space does
    not depend on the image size)."""

    pos: torch.Tensor
    rast: torch.Tensor
    fine: torch.Tensor | None = None
    s: int = 1

    @property
    def sampled(self) -> torch.Tensor:
        """The raster the colours are computed on."""
        return self.rast if self.fine is None else self.fine


def raster_scene(ctx: "RenderContext", scene: Scene, cameras: Sequence[Camera], hw: tuple[int, int],
                 offsets: torch.Tensor | None = None, supersample: int = 1) -> Raster:
    """``Raster`` of ``scene`` with ``supersample`` samples per pixel side (vertices differentiable
    through ``pos``)."""
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    pos = clip_positions(scene.verts, cameras, offsets=offsets)
    rast, _ = rasterize(ctx, pos, scene.tri, hw, grad_db=False)
    fine = rasterize(ctx, pos, scene.tri, (hw[0] * s, hw[1] * s), grad_db=False)[0] if s > 1 else None
    return Raster(pos, rast, fine, s)


@dataclass
class Shaded:
    """An antialiased Lambertian render: ``image`` (V,H,W,3) linear, ``coverage`` (V,H,W), the
    raster (``rast`` at the image size, ``pos``) for reuse, and per-pixel visible mesh ids."""

    image: torch.Tensor
    coverage: torch.Tensor
    rast: torch.Tensor
    pos: torch.Tensor


def render_shaded(ctx: "RenderContext", scene: Scene, albedo: torch.Tensor, sh: torch.Tensor,
                  cameras: Sequence[Camera], hw: tuple[int, int], topology: TopologyHash | None = None,
                  raster: Raster | None = None, offsets: torch.Tensor | None = None,
                  supersample: int = 1) -> Shaded:
    """SH-Lambertian render of a scene with per-vertex albedo (N,3) and SH (9,3) or per view
    (V,9,3), shaded at the vertices (Gouraud) and interpolated, with ``supersample`` samples per
    pixel side (``Raster``).

    Why per vertex: the SH basis is then evaluated once per vertex instead of per pixel and view
    (13 views x 320x256 is ~1M pixels against ~100k vertices), and on meshes subdivided to about a
    pixel per triangle the result is the per-pixel one. ``raster`` of a previous call with the
    same geometry skips the rasterization (albedo/lighting-only optimisation; its own samples)."""
    from renderer.shading import _LAMBERT, sh_basis, sh_shading, vertex_normals

    n = vertex_normals(scene.verts, scene.tri)
    if sh.ndim == 3:  # the basis once per vertex, then one (N,9) @ (9,3) product per view
        basis = sh_basis(n) * n.new_tensor(_LAMBERT)
        shading = torch.matmul(basis.unsqueeze(0), sh.to(basis))  # (V,N,3)
    else:
        shading = sh_shading(n, sh).unsqueeze(0)
    color = albedo.unsqueeze(0) * shading
    r = raster if raster is not None else raster_scene(ctx, scene, cameras, hw, offsets, supersample)
    img, _ = interpolate(color.contiguous(), r.sampled, scene.tri, ctx=ctx)
    cov = (r.sampled[..., 3:4] > 0).to(img.dtype)
    aa = box_pool(antialias(torch.cat([img, cov], -1), r.sampled, r.pos, scene.tri, topology, ctx=ctx), r.s)
    return Shaded(aa[..., :3], aa[..., 3], r.rast, r.pos)


@torch.no_grad()
def barycentric_share(tri: torch.Tensor, bary: torch.Tensor, weight: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """(N,) per vertex: the pixels it was seen over, each pixel's ``weight`` split among the
    corners of its triangle ``tri`` (P,3) by the barycentrics ``bary`` (P,3)."""
    w = (bary.abs() * weight[:, None].to(bary.dtype)).reshape(-1)
    return torch.zeros(num_vertices, device=bary.device, dtype=bary.dtype).index_add_(0, tri.long().reshape(-1), w)


def vertex_pixel_share(rast: torch.Tensor, tri: torch.Tensor, weight: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """(N,) ``barycentric_share`` of a raster (V,H,W,4) over its pixels with ``weight`` (V,H,W) > 0."""
    cov = (rast[..., 3] > 0) & (weight > 0)
    flat = rast[cov]
    t = tri.long()[flat[:, 3].long() - 1]
    u, v = flat[:, 0:1], flat[:, 1:2]
    return barycentric_share(t, torch.cat([u, v, 1.0 - u - v], 1), weight[cov], num_vertices)


@torch.no_grad()
def back_facing(verts: torch.Tensor, tri: torch.Tensor, rast: torch.Tensor, cameras: Sequence[Camera]) -> torch.Tensor:
    """(V,H,W) bool: pixels whose visible triangle turns its back to the camera.

    Why: a hand model ends at the wrist, open; through the opening a camera sees the mesh's
    inside, a surface the hand does not have (in a photo it is the forearm or the wrist's shadowed
    inside). Those pixels are left out of the photometric terms and the photo metrics, the way the
    forearm is."""
    from renderer.shading import face_normals

    fn = face_normals(verts, tri, normalize=False)
    centroid = verts[tri.long()].mean(1)
    centers = torch.as_tensor(np.stack([c.center for c in cameras]), dtype=verts.dtype, device=verts.device)
    back = ((centroid.unsqueeze(0) - centers[:, None]) * fn.unsqueeze(0)).sum(-1) > 0  # (V,F)
    tid = rast[..., 3].round().long()
    idx = (tid - 1).clamp_min(0).flatten(1)
    return torch.gather(back, 1, idx).view_as(tid) & (tid > 0)


# -------------------------------------------------------------------------------- contour terms
#
# Why contour terms besides the antialiased coverage: the coverage gradient comes from
# antialiasing (nvdiffrast's method), which only sees a silhouette edge when it belongs to the
# triangle covering the pixel centre next to it. With triangles of a pixel or less (a hand at
# 320x256, any subdivided mesh) most silhouette crossings belong to neighbouring triangles and the
# gradient is a fraction of the true one (measured: 1/3 on the model mesh, 1/20 after one Loop
# level, against finite differences), and it is zero beyond a pixel from the edge. Contour terms
# have neither problem: each rendered boundary pixel's surface point moves with its triangle's
# vertices and is pulled along the mask's distance field from any distance, and every usable mask
# contour pixel pulls the nearest rendered contour point.


@dataclass
class Contours:
    """What the contour terms compare against, per view on the canvas:

    ``field`` (V,H,W) signed distance in pixels to the mask's contour: > 0 outside the mask (to
    the nearest mask pixel), < 0 inside (to the nearest background pixel, less one: a boundary
    pixel of the mask is where a rendered boundary pixel belongs), from the whole given mask (a
    pixel outside it is background whatever was ignored);
    ``valid`` (V,H,W) where rendered contour points count at all (not a missing hand's region,
    inside the image); ``inner_ok`` (V,H,W) where they may also be pulled outwards (at least the
    margin away from ignored pixels, so the open wrist is not pulled up the forearm);
    ``points`` per view (K,2) pixel-centre coordinates of the usable mask contour pixels (at least
    the margin away from ignored pixels: the cut at a forearm is not a real contour)."""

    field: torch.Tensor
    valid: torch.Tensor
    inner_ok: torch.Tensor
    points: list[torch.Tensor]


def erode(m: torch.Tensor) -> torch.Tensor:
    """4-neighbour binary erosion of (V,H,W) bool (pixels off the image count as outside)."""
    e = torch.zeros_like(m)
    e[:, 1:-1, 1:-1] = (m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:])
    return e


def mask_contours(target: torch.Tensor, valid: torch.Tensor, margin: int = 2, max_points: int = 4000,
                  inside: torch.Tensor | None = None) -> Contours:
    """Distance field, validity maps and usable contour pixels of the given masks (see
    ``Contours``). ``valid``: the weight map of the image terms (0 = ignored pixel); ``inside``:
    1 inside each view's image (default: everywhere). Contour points are evenly subsampled to at
    most ``max_points`` per view."""
    from scipy.ndimage import distance_transform_edt

    m = target > 0.5
    ok = valid > 0.5
    img = inside > 0.5 if inside is not None else torch.ones_like(m)
    bad = ~ok
    if margin > 0:
        bad = F.max_pool2d(bad.float()[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0.5
    mn = m.cpu().numpy()
    field = np.zeros(mn.shape, np.float32)
    for v in range(mn.shape[0]):
        if mn[v].any() and not mn[v].all():
            field[v] = distance_transform_edt(~mn[v]) - np.maximum(distance_transform_edt(mn[v]) - 1.0, 0.0)
    # a missing hand's region (ignored background) is neither trusted outside nor inside
    ignored_bg = ~ok & ~m & img
    edge = m & ~erode(m) & ~bad
    pts = []
    for v in range(m.shape[0]):
        yx = torch.nonzero(edge[v]).to(target.dtype)
        if len(yx) > max_points:
            yx = yx[torch.linspace(0, len(yx) - 1, max_points, device=yx.device).long()]
        pts.append(torch.stack([yx[:, 1] + 0.5, yx[:, 0] + 0.5], -1))
    return Contours(torch.from_numpy(field).to(target.device), img & ~ignored_bg, ~bad, pts)


def sample_field(field: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (K,) of one view's field (H,W) at continuous pixel coordinates (K,2)
    (pixel centres at +0.5), differentiable w.r.t. the points; clamped at the border."""
    H, W = field.shape
    g = torch.stack([2.0 * pts[:, 0] / W - 1.0, 2.0 * pts[:, 1] / H - 1.0], -1).to(field.dtype)
    out = F.grid_sample(field[None, None], g[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0, 0]


def rendered_contour_points(scene: "Scene", rast: torch.Tensor, P: torch.Tensor,
                            max_points: int = 4000) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per view: projected surface points (K,2) of the rendered silhouette's boundary pixels
    (covered pixels with an uncovered 4-neighbour), differentiable w.r.t. the scene vertices
    through the barycentric combination of their triangle's vertices, and their integer pixels
    (K,2) as (y, x). ``rast`` may be detached; P (V,3,4) pixel projections."""
    covered = rast[..., 3] > 0
    edge = covered & ~erode(covered)
    pts, pix = [], []
    tri = scene.tri.long()
    for v in range(rast.shape[0]):
        yx = torch.nonzero(edge[v])
        if len(yx) > max_points:
            yx = yx[torch.linspace(0, len(yx) - 1, max_points, device=yx.device).long()]
        r = rast[v, yx[:, 0], yx[:, 1]].detach()
        t = tri[r[:, 3].long() - 1]
        u, w = r[:, 0:1].to(scene.verts.dtype), r[:, 1:2].to(scene.verts.dtype)
        X = u * scene.verts[t[:, 0]] + w * scene.verts[t[:, 1]] + (1 - u - w) * scene.verts[t[:, 2]]
        Xh = torch.cat([X, torch.ones_like(X[:, :1])], -1) @ P[v].to(X).T
        pts.append(Xh[:, :2] / Xh[:, 2:3].clamp_min(1e-6))
        pix.append(yx)
    return pts, pix


def contour_loss(rendered: list[torch.Tensor], pixels: list[torch.Tensor], contours: Contours, scale: float,
                 sigma_px: float = 2.0, reverse_sigma_px: float = 10.0,
                 view_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Contour terms in pixels of the original image size, per view averaged.

    Rendered -> mask: pseudo-Huber (``sigma_px``) of the mask's signed distance field at each
    rendered contour point (on valid pixels; pulled only inwards next to ignored pixels).
    Mask -> rendered: Geman-McClure (``reverse_sigma_px``) of each usable mask contour pixel's
    distance to the nearest rendered contour point, i.e. it pulls only while that is within a few
    sigma (a finger the render lacks must not drag whatever contour is nearest across the hand);
    it saturates at ``reverse_sigma_px``."""
    losses = []
    weights = []
    for v, (r, yx) in enumerate(zip(rendered, pixels)):
        w = 1.0 if view_weight is None else float(view_weight[v])
        if w <= 0 or len(r) == 0:
            continue
        keep = contours.valid[v, yx[:, 0], yx[:, 1]]
        r, yx = r[keep], yx[keep]
        if len(r) == 0:
            continue
        f = sample_field(contours.field[v], r)
        f = torch.where(contours.inner_ok[v, yx[:, 0], yx[:, 1]], f, f.clamp_min(0.0)) / scale
        term = (sigma_px * (torch.sqrt(1.0 + (f / sigma_px) ** 2) - 1.0)).mean()
        m = contours.points[v].to(r)
        if len(m):
            with torch.no_grad():  # matching without gradient: cdist's backward is slow on CPU
                i_mr = torch.cdist(m, r.detach()).argmin(1)
            d_mr = torch.sqrt(((r[i_mr] - m) ** 2).sum(-1) + 1e-12) / scale
            term = 0.5 * (term + (reverse_sigma_px * d_mr ** 2 / (d_mr ** 2 + reverse_sigma_px ** 2)).mean())
        losses.append(term)
        weights.append(w)
    if not losses:
        return contours.field.new_zeros(())
    wt = torch.tensor(weights, dtype=losses[0].dtype, device=losses[0].device)
    return (torch.stack(losses) * wt).sum() / wt.sum()
