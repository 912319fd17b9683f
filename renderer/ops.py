"""nvdiffrast's four ops (rasterize, interpolate, texture, antialias) over two backends.

Signatures, shapes and meanings follow ``nvdiffrast.torch`` so that code above is backend
agnostic; the cpu backend is ours (numba kernels in ``cpu_kernels``), the nvdiffrast backend
calls nvdiffrast itself. Differences of the cpu backend, all documented on the functions:
instanced mode only (pos (V, N, 4), no ``ranges``), no mipmaps or cube maps in ``texture``,
float64 accepted (used by the gradient tests), and antialias position gradients use the exact
edge-crossing derivative (nvdiffrast adds a 1e-3 px epsilon to the denominator).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from renderer import cpu_kernels as K
from renderer import nvdr
from renderer.context import RenderContext, RendererError

# ----------------------------------------------------------------------------- helpers


def _np(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """Host numpy view (copy only when needed) of a tensor, detached."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.cpu().contiguous().numpy()


def _float_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the kernels are compiled for these two)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _tri_np(tri: torch.Tensor, n_vertices: int) -> np.ndarray:
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise RendererError(f"tri must have shape (F, 3), got {tuple(tri.shape)}")
    if tri.is_floating_point():
        raise RendererError(f"tri must be an integer tensor, got {tri.dtype}")
    t = _np(tri, torch.int32)
    if t.size and (t.min() < 0 or t.max() >= n_vertices):
        raise RendererError(f"tri indexes vertices {t.min()}..{t.max()} but pos has {n_vertices} vertices")
    return t


def _torch_dtype(a: np.ndarray) -> torch.dtype:
    return torch.float64 if a.dtype == np.float64 else torch.float32


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_NUM_THREADS = 0  # 0: all CPUs this process may use
_SMALL_WORK = 1 << 15  # pixels; below this, threads cost more than they save


def set_num_threads(n: int) -> None:
    """Threads of the cpu backend (0 = all CPUs this process may use)."""
    global _NUM_THREADS, _POOL
    if n < 0:
        raise RendererError(f"number of threads must be >= 0, got {n}")
    _NUM_THREADS = int(n)
    if _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None


def get_num_threads() -> int:
    """Threads the cpu backend uses for images of 32k pixels or more."""
    if _NUM_THREADS > 0:
        return _NUM_THREADS
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _threads(pixels: int) -> int:
    """Threads for a job of this many pixels (1 for tiny images: wake-ups would dominate)."""
    return 1 if pixels < _SMALL_WORK else get_num_threads()


def _run(kernel: Callable[..., None], jobs: list[tuple], threads: int) -> None:
    """Run kernel(*args) for every args in jobs, on the pool when there is more than one thread."""
    global _POOL, _POOL_PID
    if threads <= 1 or len(jobs) <= 1:
        for args in jobs:
            kernel(*args)
        return
    if _POOL is None or _POOL_PID != os.getpid():  # a forked child has the object but no threads
        _POOL = ThreadPoolExecutor(max_workers=get_num_threads(), thread_name_prefix="renderer")
        _POOL_PID = os.getpid()
    for _ in _POOL.map(lambda args: kernel(*args), jobs):
        pass


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges splitting range(n) into at most ``parts`` near-equal pieces."""
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _bands(n_views: int, height: int, threads: int) -> list[tuple[int, int, int]]:
    """(view, row0, row1) units: whole views when there are enough, else bands of rows."""
    nband = K.plan_units(n_views, height, threads)
    return [(v, r0, r1) for v in range(n_views) for r0, r1 in _chunks(height, nband)]


def _backend(ctx: RenderContext | None, t: torch.Tensor) -> str:
    if ctx is not None:
        return ctx.backend_for(t)
    return "nvdiffrast" if t.is_cuda and nvdr.available() else "cpu"


def _row_units(n_views: int, height: int, per_view: bool, threads: int) -> tuple[list[np.ndarray], int]:
    """Flattened (view * H + row) rows of each gradient unit, and the number of units per view.

    per_view: units never mix views (their gradients go to per-view buffers); else one unit per
    thread with interleaved rows (balances covered and empty rows).
    """
    if per_view:
        nband = K.plan_units(n_views, height, threads)
        rows = [np.arange(b, height, nband, dtype=np.int64) + v * height for v in range(n_views) for b in range(nband)]
        return rows, nband
    total = n_views * height
    return [np.arange(u, total, threads, dtype=np.int64) for u in range(threads)], 0


# ----------------------------------------------------------------------------- rasterize


class _RasterizeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int], grad_db: bool):
        H, W = resolution
        dtype = _float_dtype(pos)
        p = _np(pos, dtype)
        t = _tri_np(tri, p.shape[1])
        V = p.shape[0]
        T = _threads(V * H * W)
        sxy = np.empty((V, p.shape[1], 2), np.float64)
        code = np.empty((V, p.shape[1]), np.uint8)
        _run(K.vertex_setup, [(p, H, W, sxy, code, a, b) for a, b in _chunks(V, T)], T)
        rast = np.empty((V, H, W, 4), p.dtype)
        rast_db = np.empty((V, H, W, 4), p.dtype)
        units = _bands(V, H, T)
        _run(K.raster_fwd, [(p, t, sxy, code, v, r0, r1, rast, rast_db) for v, r0, r1 in units], T)
        ctx.saved = (p, t, rast, units, grad_db)
        ctx.pos_dtype = pos.dtype
        ctx.set_materialize_grads(False)  # an unused rast_db gets no (V, H, W, 4) zero gradient
        out = torch.from_numpy(rast).to(pos.device)
        out_db = torch.from_numpy(rast_db).to(pos.device)
        return out, out_db

    @staticmethod
    def backward(ctx, grad_rast: torch.Tensor | None, grad_db: torch.Tensor | None):
        p, t, rast, units, use_db = ctx.saved
        if not ctx.needs_input_grad[0] or (grad_rast is None and grad_db is None):
            return None, None, None, None
        V, N = p.shape[0], p.shape[1]
        dev = grad_rast.device if grad_rast is not None else grad_db.device
        if V == 0 or not units:
            return torch.zeros(p.shape, dtype=ctx.pos_dtype, device=dev), None, None, None
        kd = _torch_dtype(p)
        gr = _np(grad_rast, kd) if grad_rast is not None else np.zeros_like(rast)
        use_db = bool(use_db and grad_db is not None and bool(torch.any(grad_db != 0)))
        gdb = _np(grad_db, kd) if use_db else np.zeros((1, 1, 1, 4), p.dtype)
        nband = len(units) // V
        gbuf = np.zeros((len(units), N, 4), p.dtype)
        T = _threads(rast.shape[0] * rast.shape[1] * rast.shape[2])
        _run(K.raster_bwd, [(p, t, rast, gr, gdb, use_db, v, r0, r1, gbuf[k]) for k, (v, r0, r1) in enumerate(units)], T)
        g = gbuf.reshape(V, nband, N, 4).sum(axis=1) if nband > 1 else gbuf
        return torch.from_numpy(g).to(device=dev, dtype=ctx.pos_dtype), None, None, None


def rasterize(
    ctx: RenderContext,
    pos: torch.Tensor,
    tri: torch.Tensor,
    resolution: Sequence[int],
    ranges: torch.Tensor | None = None,
    grad_db: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterize triangles: (rast (V,H,W,4) = (u, v, z/w, id+1), rast_db (V,H,W,4)).

    pos (V, N, 4) clip coordinates, tri (F, 3) int, resolution (H, W). u, v weight vertices 0
    and 1 of the triangle (perspective correct, differentiable w.r.t. pos x, y, w); z/w is not
    differentiable; id 0 = background. rast_db = (du/dX, du/dY, dv/dX, dv/dY) in pixels,
    differentiable when grad_db. The cpu backend supports instanced mode only (no ranges).
    """
    H, W = (int(r) for r in resolution)
    if H <= 0 or W <= 0:
        raise RendererError(f"resolution must be positive (H, W), got {tuple(resolution)}")
    if ctx.backend_for(pos) == "nvdiffrast":
        dr = nvdr.load()
        return dr.rasterize(ctx.raw(pos.device), pos.float().contiguous(), tri.int().contiguous(), (H, W),
                            ranges=ranges, grad_db=grad_db)
    if ranges is not None:
        raise RendererError("the cpu backend supports instanced mode only: pass pos (V, N, 4) and ranges=None")
    if pos.ndim != 3 or pos.shape[2] != 4:
        raise RendererError(f"pos must have shape (V, N, 4) clip coordinates, got {tuple(pos.shape)}")
    return _RasterizeCPU.apply(pos, tri, (H, W), bool(grad_db))


# ----------------------------------------------------------------------------- interpolate


class _InterpolateCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attr, rast, tri, rast_db, diff_idx: tuple[int, ...]):
        dtype = _float_dtype(attr, rast)
        a = _np(attr, dtype)
        a = a[None] if a.ndim == 2 else a
        r = _np(rast, dtype)
        V, H, W = r.shape[:3]
        if a.shape[0] not in (1, V):
            raise RendererError(f"attr minibatch {a.shape[0]} must be 1 or match rast's {V}")
        t = _tri_np(tri, a.shape[1])
        didx = np.asarray(diff_idx, np.int64)
        db = _np(rast_db, dtype) if len(didx) else np.zeros((1, 1, 1, 4), r.dtype)
        out = np.empty((V, H, W, a.shape[2]), r.dtype)
        out_da = np.empty((V, H, W, 2 * len(didx)), r.dtype)
        T = _threads(V * H * W)
        _run(K.interp_fwd, [(a, r, t, db, didx, out, out_da, r0, r1) for r0, r1 in _chunks(V * H, 4 * T)], T)
        ctx.saved = (a, r, t, db, didx, attr.ndim == 2)
        ctx.dtypes = (attr.dtype, rast.dtype, rast_db.dtype)
        ctx.set_materialize_grads(False)
        dev = rast.device
        return torch.from_numpy(out).to(dev), torch.from_numpy(out_da).to(dev)

    @staticmethod
    def backward(ctx, gout, gda):
        a, r, t, db, didx, attr_2d = ctx.saved
        if gout is None and gda is None:
            return None, None, None, None, None
        V, H, W = r.shape[:3]
        A, N, C = a.shape
        go = _np(gout, _torch_dtype(r)) if gout is not None else np.zeros((V, H, W, C), r.dtype)
        gd = _np(gda, _torch_dtype(r)) if (gda is not None and len(didx)) else np.zeros((V, H, W, 2 * len(didx)), r.dtype)
        per_view = A > 1
        T = _threads(V * H * W)
        rows, nband = _row_units(V, H, per_view, T)
        gbuf = np.zeros((len(rows), N, C), r.dtype)
        grast = np.zeros((V, H, W, 4), r.dtype)
        gdb = np.zeros((V, H, W, 4), r.dtype) if len(didx) else np.zeros((1, 1, 1, 4), r.dtype)
        _run(K.interp_bwd, [(a, r, t, db, didx, go, gd, rw, gbuf[k], grast, gdb) for k, rw in enumerate(rows)], T)
        if per_view:
            ga = gbuf.reshape(V, nband, N, C).sum(axis=1) if nband > 1 else gbuf
        else:
            ga = gbuf.sum(axis=0, keepdims=True)
        if attr_2d:
            ga = ga[0]
        dev = gout.device if gout is not None else gda.device
        g_attr = torch.from_numpy(np.ascontiguousarray(ga)).to(device=dev, dtype=ctx.dtypes[0])
        g_rast = torch.from_numpy(grast).to(device=dev, dtype=ctx.dtypes[1])
        g_db = torch.from_numpy(gdb).to(device=dev, dtype=ctx.dtypes[2]) if len(didx) else None
        return g_attr, g_rast, None, g_db, None


def interpolate(
    attr: torch.Tensor,
    rast: torch.Tensor,
    tri: torch.Tensor,
    rast_db: torch.Tensor | None = None,
    diff_attrs: str | Sequence[int] | None = None,
    *,
    ctx: RenderContext | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolate vertex attributes: (out (V,H,W,C), out_da (V,H,W,2*len(diff_attrs))).

    attr (V, N, C) or (N, C) (broadcast over views); out = u a0 + v a1 + (1-u-v) a2 on covered
    pixels, 0 on background. Differentiable w.r.t. attr and, through rast's (u, v), pos.
    diff_attrs ('all' or indices) with rast_db gives (dA/dX, dA/dY) per selected attribute.
    """
    if attr.ndim not in (2, 3):
        raise RendererError(f"attr must be (N, C) or (V, N, C), got {tuple(attr.shape)}")
    if rast.ndim != 4 or rast.shape[3] != 4:
        raise RendererError(f"rast must be (V, H, W, 4), got {tuple(rast.shape)}")
    C = attr.shape[-1]
    if diff_attrs is None:
        didx: tuple[int, ...] = ()
    elif diff_attrs == "all":
        didx = tuple(range(C))
    else:
        didx = tuple(int(i) for i in diff_attrs)
        if any(i < 0 or i >= C for i in didx):
            raise RendererError(f"diff_attrs {didx} out of range for {C} attributes")
    if didx and rast_db is None:
        raise RendererError("diff_attrs needs rast_db (the second output of rasterize)")
    if _backend(ctx, rast) == "nvdiffrast":
        dr = nvdr.load()
        if didx:
            return dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous(), rast_db=rast_db, diff_attrs=list(didx))
        return dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
    db = rast_db if didx else rast.new_zeros((1, 1, 1, 4))
    return _InterpolateCPU.apply(attr, rast, tri, db, didx)


# ----------------------------------------------------------------------------- texture


_FILTERS = ("auto", "nearest", "linear", "linear-mipmap-nearest", "linear-mipmap-linear")
_BOUNDARIES = ("wrap", "clamp", "zero", "cube")


def _texel_index(i: torch.Tensor, size: int, boundary: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Texel index under the boundary mode, plus a validity mask for 'zero'."""
    if boundary == "wrap":
        return torch.remainder(i, size), None
    valid = (i >= 0) & (i < size) if boundary == "zero" else None
    return i.clamp(0, size - 1), valid


def _texture_cpu(tex: torch.Tensor, uv: torch.Tensor, filter_mode: str, boundary_mode: str) -> torch.Tensor:
    """Bilinear / nearest lookups written as gathers, so autograd gives d/dtex and d/duv."""
    V, H, W, _ = uv.shape
    Vt, Ht, Wt, C = tex.shape
    if Vt not in (1, V):
        raise RendererError(f"tex minibatch {Vt} must be 1 or match uv's {V}")
    flat = tex.reshape(Vt, Ht * Wt, C)
    batch = torch.arange(Vt, device=uv.device).view(Vt, 1)
    x = uv[..., 0].reshape(V, H * W) * Wt
    y = uv[..., 1].reshape(V, H * W) * Ht

    def fetch(ix: torch.Tensor, iy: torch.Tensor) -> torch.Tensor:
        ixx, vx = _texel_index(ix, Wt, boundary_mode)
        iyy, vy = _texel_index(iy, Ht, boundary_mode)
        val = flat[batch, iyy * Wt + ixx]
        if vx is not None:
            val = val * (vx & vy).unsqueeze(-1).to(val.dtype)
        return val

    if filter_mode == "nearest":
        out = fetch(torch.floor(x).long(), torch.floor(y).long())
    else:
        x = x - 0.5
        y = y - 0.5
        x0f = torch.floor(x.detach())
        y0f = torch.floor(y.detach())
        fx = (x - x0f).unsqueeze(-1)
        fy = (y - y0f).unsqueeze(-1)
        x0, y0 = x0f.long(), y0f.long()
        top = fetch(x0, y0) * (1 - fx) + fetch(x0 + 1, y0) * fx
        bot = fetch(x0, y0 + 1) * (1 - fx) + fetch(x0 + 1, y0 + 1) * fx
        out = top * (1 - fy) + bot * fy
    return out.reshape(V, H, W, C)


def texture(
    tex: torch.Tensor,
    uv: torch.Tensor,
    uv_da: torch.Tensor | None = None,
    mip_level_bias: torch.Tensor | None = None,
    mip: object | None = None,
    filter_mode: str = "auto",
    boundary_mode: str = "wrap",
    max_mip_level: int | None = None,
    *,
    ctx: RenderContext | None = None,
) -> torch.Tensor:
    """Sample tex (V or 1, Ht, Wt, C) at uv (V, H, W, 2) -> (V, H, W, C), differentiable.

    Texel (i, j) is centred at uv = ((j + 0.5)/Wt, (i + 0.5)/Ht); v indexes rows, no flip.
    'wrap' repeats, 'clamp' clamps to the border texels' centres, 'zero' pads with zeros.
    The cpu backend does 'nearest' and 'linear' ('auto' without uv_da = 'linear').
    """
    if filter_mode not in _FILTERS:
        raise RendererError(f"filter_mode '{filter_mode}' not in {_FILTERS}")
    if boundary_mode not in _BOUNDARIES:
        raise RendererError(f"boundary_mode '{boundary_mode}' not in {_BOUNDARIES}")
    if _backend(ctx, uv) == "nvdiffrast":
        dr = nvdr.load()
        return dr.texture(tex.float().contiguous(), uv.float().contiguous(), uv_da=uv_da, mip_level_bias=mip_level_bias,
                          mip=mip, filter_mode=filter_mode, boundary_mode=boundary_mode, max_mip_level=max_mip_level)
    if filter_mode == "auto":
        filter_mode = "linear-mipmap-linear" if (uv_da is not None or mip_level_bias is not None) else "linear"
    if "mipmap" in filter_mode or boundary_mode == "cube":
        raise RendererError(f"the cpu backend does not do mipmaps or cube maps (filter_mode '{filter_mode}', "
                            f"boundary_mode '{boundary_mode}'); use 'linear' or 'nearest'")
    if tex.ndim != 4 or uv.ndim != 4 or uv.shape[3] != 2:
        raise RendererError(f"tex must be (V, Ht, Wt, C) and uv (V, H, W, 2), got {tuple(tex.shape)}, {tuple(uv.shape)}")
    return _texture_cpu(tex, uv, filter_mode, boundary_mode)


# ----------------------------------------------------------------------------- antialias


class TopologyHash:
    """Per-edge opposite vertices of a triangle tensor (what nvdiffrast's topology hash holds).

    Built lazily per backend: numpy table for cpu, nvdiffrast's own object for CUDA.
    """

    def __init__(self, tri: torch.Tensor):
        self.tri = tri
        self.num_triangles = int(tri.shape[0])
        self._opp: np.ndarray | None = None
        self._nv: object | None = None

    def opposite(self) -> np.ndarray:
        if self._opp is None:
            t = _np(self.tri, torch.int32)
            n = int(t.max()) + 1 if t.size else 0
            self._opp = K.build_opposite(t, n)
        return self._opp

    def nvdiffrast(self, device: torch.device) -> object:
        if self._nv is None:
            tri = self.tri.to(device=device, dtype=torch.int32).contiguous()
            self._nv = nvdr.load().antialias_construct_topology_hash(tri)
        return self._nv


_TOPO_CACHE: "OrderedDict[int, tuple[int, TopologyHash]]" = OrderedDict()
_TOPO_CACHE_SIZE = 16


def antialias_construct_topology_hash(tri: torch.Tensor) -> TopologyHash:
    """Topology of tri for antialias; reuse it while tri stays constant (as in nvdiffrast)."""
    return TopologyHash(tri)


def _cached_topology(tri: torch.Tensor) -> TopologyHash:
    """Topology for a tri tensor, cached by identity and version (in-place edits invalidate).

    Entries hold their tensor, so an id cannot be reused while cached; at most 16 are kept.
    """
    key = id(tri)
    hit = _TOPO_CACHE.get(key)
    if hit is not None and hit[1].tri is tri and hit[0] == tri._version:
        _TOPO_CACHE.move_to_end(key)
        return hit[1]
    topo = TopologyHash(tri)
    _TOPO_CACHE[key] = (tri._version, topo)
    while len(_TOPO_CACHE) > _TOPO_CACHE_SIZE:
        _TOPO_CACHE.popitem(last=False)
    return topo


class _AntialiasCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, color, rast, pos, tri, topo: TopologyHash, boost: float):
        dtype = _float_dtype(color, pos)
        c = _np(color, dtype)
        r = _np(rast, dtype)
        p = _np(pos, dtype)
        t = _tri_np(tri, p.shape[1])
        V, H, W = r.shape[:3]
        if c.shape[:3] != (V, H, W):
            raise RendererError(f"color {tuple(color.shape)} must match rast {tuple(rast.shape[:3])}")
        if p.shape[0] != V:
            raise RendererError(f"pos minibatch {p.shape[0]} must match rast's {V}")
        opp = topo.opposite()
        if opp.shape[0] != t.shape[0]:
            raise RendererError("topology_hash was built for a different triangle tensor")
        alpha = np.empty((V, H, W, 2), c.dtype)
        info = np.empty((V, H, W, 2), np.int8)
        row_count = np.empty(V * H, np.int64)
        flags = np.full((V, t.shape[0]), 255, np.uint8)
        T = _threads(V * H * W)
        _run(K.aa_analyze, [(p, t, opp, flags, r, alpha, info, row_count, r0, r1) for r0, r1 in _chunks(V * H, 4 * T)], T)
        items, alphas, infos = K.aa_compact(alpha, info, row_count)
        out = c.copy()
        K.aa_apply(c, items, alphas, H, W, out)
        ctx.saved = (c, r, p, t, items, alphas, infos, float(boost))
        ctx.dtypes = (color.dtype, pos.dtype)
        return torch.from_numpy(out).to(device=color.device, dtype=color.dtype)

    @staticmethod
    def backward(ctx, gout):
        c, r, p, t, items, alphas, infos, boost = ctx.saved
        go = _np(gout, _torch_dtype(c))
        gcolor = go.copy()
        gpos = np.zeros(p.shape, p.dtype)
        K.aa_bwd(c, r, p, t, items, alphas, infos, go, boost, gcolor, gpos)
        dev = gout.device
        g_color = torch.from_numpy(gcolor).to(device=dev, dtype=ctx.dtypes[0])
        g_pos = torch.from_numpy(gpos).to(device=dev, dtype=ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return g_color, None, g_pos, None, None, None


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos: torch.Tensor,
    tri: torch.Tensor,
    topology_hash: TopologyHash | None = None,
    pos_gradient_boost: float = 1.0,
    *,
    ctx: RenderContext | None = None,
) -> torch.Tensor:
    """Analytic silhouette antialiasing (nvdiffrast's): color (V,H,W,C) -> same shape.

    For horizontally / vertically adjacent pixels with different triangle ids, the front
    triangle's silhouette edge crossing the segment between the centres blends the two colours
    by the crossing position; gradients reach the edge's vertex positions (that is what gives
    silhouettes a gradient) and the colours. Without topology_hash it is built (and cached
    while tri is unchanged).
    """
    if topology_hash is None:
        topology_hash = _cached_topology(tri)
    if _backend(ctx, color) == "nvdiffrast":
        dr = nvdr.load()
        return dr.antialias(color.float().contiguous(), rast, pos.float().contiguous(), tri.int().contiguous(),
                            topology_hash=topology_hash.nvdiffrast(tri.device), pos_gradient_boost=pos_gradient_boost)
    if color.ndim != 4 or rast.ndim != 4 or pos.ndim != 3:
        raise RendererError(f"antialias needs color (V,H,W,C), rast (V,H,W,4), pos (V,N,4); got "
                            f"{tuple(color.shape)}, {tuple(rast.shape)}, {tuple(pos.shape)}")
    return _AntialiasCPU.apply(color, rast, pos, tri, topology_hash, float(pos_gradient_boost))
