"""Numba kernels of the CPU backend: visibility, barycentrics, interpolation, antialiasing.

Why numba: on CPU these ops are memory-bound; one fused pass per pixel (or per triangle) beats
chains of vectorized torch ops, each of which streams whole (K, 3, 4) temporaries through
memory (measured: a single index_add of 1.1M rows costs as much as a whole interpolate pass),
and visibility needs a z-buffer loop that torch cannot express without per-triangle Python. The kernels follow nvdiffrast's definitions:

- clip space: pixel (row i, col j) samples NDC ((2j + 1)/W - 1, (2i + 1)/H - 1);
- coverage by 2D homogeneous edge functions (Olano & Greer): a pixel is inside a triangle iff
  all three functions agree in sign with the triangle's determinant, which also clips at w = 0
  without explicit clipping; fragments with z/w outside [-1, 1] are dropped (near/far
  clipping, as the hardware clipper of nvdiffrast does); ties on an edge go to one triangle
  (top-left rule on the normalised edge function), so no pixel is covered twice or missed;
- barycentrics (u, v) are the perspective-correct weights of vertices 0 and 1; z/w is not
  differentiable (as in nvdiffrast); gradients of (u, v) and of their screen derivatives
  flow to x, y, w of the three vertices.

Kernels are serial and release the GIL; ``renderer.ops`` runs them on a thread pool, one call
per unit of work (a view, a band of rows, a chunk of rows). Serial kernels compile several
times faster than numba's parallel ones (which matters with a cold cache, e.g. in CI) and make
the split explicit. Gradients are scattered into one private buffer per unit (summed
afterwards), so nothing races and results are deterministic.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_OPTS = dict(cache=True, nogil=True)

# ----------------------------------------------------------------------------- helpers


@nb.njit(inline="always")
def _load(pos, v, i):
    return float(pos[v, i, 0]), float(pos[v, i, 1]), float(pos[v, i, 2]), float(pos[v, i, 3])


@nb.njit(inline="always")
def _edge_coeffs(X0, Y0, W0, X1, Y1, W1, X2, Y2, W2):
    """Edge functions a_i(x, y) = c_i + ax_i x + ay_i y of the three vertices and det = sum W_i c_i."""
    c0 = X1 * Y2 - Y1 * X2
    ax0 = Y1 * W2 - Y2 * W1
    ay0 = X2 * W1 - X1 * W2
    c1 = X2 * Y0 - Y2 * X0
    ax1 = Y2 * W0 - Y0 * W2
    ay1 = X0 * W2 - X2 * W0
    c2 = X0 * Y1 - Y0 * X1
    ax2 = Y0 * W1 - Y1 * W0
    ay2 = X1 * W0 - X0 * W1
    det = W0 * c0 + W1 * c1 + W2 * c2
    return c0, ax0, ay0, c1, ax1, ay1, c2, ax2, ay2, det


@nb.njit(inline="always")
def _inside(e, ax, ay):
    """Edge test with the top-left tie rule on an edge function normalised to det > 0."""
    if e > 0.0:
        return True
    if e < 0.0:
        return False
    return ax > 0.0 or (ax == 0.0 and ay > 0.0)


@nb.njit(inline="always")
def _grow(px, py, xmin, xmax, ymin, ymax):
    return min(xmin, px), max(xmax, px), min(ymin, py), max(ymax, py)


def plan_units(n_views: int, height: int, n_threads: int) -> int:
    """Bands per view so that views x bands gives each thread about four units to balance."""
    if n_threads <= 1 or n_views >= 4 * n_threads:
        return 1
    return int(max(1, min(height, -(-4 * n_threads // max(n_views, 1)))))


# ----------------------------------------------------------------------------- rasterize


@nb.njit(inline="always")
def _pixel_box(xmin, xmax, ymin, ymax, height, width):
    """Pixels whose centres j + 0.5 may lie in [xmin, xmax] x [ymin, ymax] (1e-4 px margin)."""
    eps = 1e-4
    fx0 = max(-1.0, min(float(width) + 1.0, xmin - 0.5 - eps))
    fx1 = max(-1.0, min(float(width) + 1.0, xmax - 0.5 + eps))
    fy0 = max(-1.0, min(float(height) + 1.0, ymin - 0.5 - eps))
    fy1 = max(-1.0, min(float(height) + 1.0, ymax - 0.5 + eps))
    x0 = max(0, int(np.ceil(fx0)))
    x1 = min(width - 1, int(np.floor(fx1)))
    y0 = max(0, int(np.ceil(fy0)))
    y1 = min(height - 1, int(np.floor(fy1)))
    if x0 > x1 or y0 > y1:
        return 1, 0, 1, 0
    return x0, x1, y0, y1


@nb.njit(inline="always")
def _bbox_one(pos, v, i0, i1, i2, height, width):
    """Pixel box (x0, x1, y0, y1) of one triangle in one view after near-plane clipping.

    Empty (x0 > x1) when culled: outside the frustum, behind the near or beyond the far
    plane, degenerate or non-finite.
    """
    if i0 == i1 or i1 == i2 or i0 == i2:
        return 1, 0, 1, 0
    X0, Y0, Z0, W0 = _load(pos, v, i0)
    X1, Y1, Z1, W1 = _load(pos, v, i1)
    X2, Y2, Z2, W2 = _load(pos, v, i2)
    if not np.isfinite(X0 + Y0 + Z0 + W0 + X1 + Y1 + Z1 + W1 + X2 + Y2 + Z2 + W2):
        return 1, 0, 1, 0
    # Trivial rejects against the six clip planes.
    if (X0 > W0 and X1 > W1 and X2 > W2) or (X0 < -W0 and X1 < -W1 and X2 < -W2):
        return 1, 0, 1, 0
    if (Y0 > W0 and Y1 > W1 and Y2 > W2) or (Y0 < -W0 and Y1 < -W1 and Y2 < -W2):
        return 1, 0, 1, 0
    d0, d1, d2 = Z0 + W0, Z1 + W1, Z2 + W2
    if (Z0 > W0 and Z1 > W1 and Z2 > W2) or (d0 < 0.0 and d1 < 0.0 and d2 < 0.0):
        return 1, 0, 1, 0
    hw = 0.5 * width
    hh = 0.5 * height
    if d0 >= 0.0 and d1 >= 0.0 and d2 >= 0.0 and W0 > 0.0 and W1 > 0.0 and W2 > 0.0:
        # Common case: wholly in front of the near plane.
        u0, u1, u2 = X0 / W0, X1 / W1, X2 / W2
        v0, v1, v2 = Y0 / W0, Y1 / W1, Y2 / W2
        xmin = (min(u0, min(u1, u2)) + 1.0) * hw
        xmax = (max(u0, max(u1, u2)) + 1.0) * hw
        ymin = (min(v0, min(v1, v2)) + 1.0) * hh
        ymax = (max(v0, max(v1, v2)) + 1.0) * hh
    else:
        xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
        full = False
        # Polygon clipped to the near plane z + w >= 0: kept corners plus edge crossings.
        for k in range(3):
            if k == 0:
                Xa, Ya, Wa, da, Xb, Yb, Wb, db = X0, Y0, W0, d0, X1, Y1, W1, d1
            elif k == 1:
                Xa, Ya, Wa, da, Xb, Yb, Wb, db = X1, Y1, W1, d1, X2, Y2, W2, d2
            else:
                Xa, Ya, Wa, da, Xb, Yb, Wb, db = X2, Y2, W2, d2, X0, Y0, W0, d0
            if da >= 0.0:
                if Wa > 0.0:
                    xmin, xmax, ymin, ymax = _grow((Xa / Wa + 1.0) * hw, (Ya / Wa + 1.0) * hh, xmin, xmax, ymin, ymax)
                else:
                    full = True
            if (da >= 0.0) != (db >= 0.0):
                t = da / (da - db)
                Wc = Wa + t * (Wb - Wa)
                if Wc > 0.0:
                    xmin, xmax, ymin, ymax = _grow((Xa + t * (Xb - Xa)) / Wc * hw + hw,
                                                   (Ya + t * (Yb - Ya)) / Wc * hh + hh, xmin, xmax, ymin, ymax)
                else:
                    full = True
        if full:
            xmin, xmax, ymin, ymax = 0.0, float(width), 0.0, float(height)
    return _pixel_box(xmin, xmax, ymin, ymax, height, width)


# Outcode bits of a clip-space vertex.
_OUT_PLANES = 63  # bits 0-5: outside one of the six frustum planes (x, y: 1-8; far 16; near 32)
_OUT_FAR = 16  # z > w
_OUT_NEAR = 32  # z < -w
_OUT_WNEG = 64  # w <= 0
_OUT_BAD = 128  # not finite


@nb.njit(**_OPTS)
def vertex_setup(pos, height, width, sxy, code, v0, v1):
    """Per vertex of views [v0, v1): pixel coordinates (where w > 0) and clip outcodes, so that
    each triangle's culling and pixel box take three lookups instead of three projections."""
    N = pos.shape[1]
    hw = 0.5 * width
    hh = 0.5 * height
    for v in range(v0, v1):
        for i in range(N):
            X, Y, Z, Wc = _load(pos, v, i)
            c = 0
            if not np.isfinite(X + Y + Z + Wc):
                c = _OUT_BAD
            else:
                if X > Wc:
                    c |= 1
                if X < -Wc:
                    c |= 2
                if Y > Wc:
                    c |= 4
                if Y < -Wc:
                    c |= 8
                if Z > Wc:
                    c |= _OUT_FAR
                if Z < -Wc:
                    c |= _OUT_NEAR
                if Wc <= 0.0:
                    c |= _OUT_WNEG
            code[v, i] = c
            if c & (_OUT_BAD | _OUT_WNEG):
                sxy[v, i, 0] = 0.0
                sxy[v, i, 1] = 0.0
            else:
                sxy[v, i, 0] = (X / Wc + 1.0) * hw
                sxy[v, i, 1] = (Y / Wc + 1.0) * hh


@nb.njit(**_OPTS)
def raster_fwd(pos, tri, sxy, code, v, r0, r1, rast, rast_db):
    """Z-buffered visibility of view v, rows [r0, r1), writing (u, v, z/w, id + 1) and
    d(u, v)/d(X, Y) whenever a fragment wins the depth test (sxy, code from vertex_setup)."""
    H, W = rast.shape[1], rast.shape[2]
    F = tri.shape[0]
    xs = 2.0 / W
    ys = 2.0 / H
    xo = 1.0 / W - 1.0
    yo = 1.0 / H - 1.0
    if r0 >= r1:
        return
    zb = np.full((r1 - r0, W), np.inf)
    for y in range(r0, r1):
        for x in range(W):
            for c in range(4):
                rast[v, y, x, c] = 0.0
                rast_db[v, y, x, c] = 0.0
    for f in range(F):
        i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
        k0, k1, k2 = code[v, i0], code[v, i1], code[v, i2]
        if (k0 & k1 & k2) & _OUT_PLANES or (k0 | k1 | k2) & _OUT_BAD or i0 == i1 or i1 == i2 or i0 == i2:
            continue
        if (k0 | k1 | k2) & (_OUT_NEAR | _OUT_WNEG):
            bx0, bx1, by0, by1 = _bbox_one(pos, v, i0, i1, i2, H, W)
        else:
            sx0, sx1, sx2 = sxy[v, i0, 0], sxy[v, i1, 0], sxy[v, i2, 0]
            sy0, sy1, sy2 = sxy[v, i0, 1], sxy[v, i1, 1], sxy[v, i2, 1]
            bx0, bx1, by0, by1 = _pixel_box(min(sx0, min(sx1, sx2)), max(sx0, max(sx1, sx2)),
                                            min(sy0, min(sy1, sy2)), max(sy0, max(sy1, sy2)), H, W)
        if bx0 > bx1:
            continue
        by0 = max(by0, r0)
        by1 = min(by1, r1 - 1)
        if by0 > by1:
            continue
        X0, Y0, Z0, W0 = _load(pos, v, i0)
        X1, Y1, Z1, W1 = _load(pos, v, i1)
        X2, Y2, Z2, W2 = _load(pos, v, i2)
        c0, ax0, ay0, c1, ax1, ay1, c2, ax2, ay2, det = _edge_coeffs(X0, Y0, W0, X1, Y1, W1, X2, Y2, W2)
        if det == 0.0:
            continue
        if det < 0.0:
            c0, ax0, ay0, c1, ax1, ay1, c2, ax2, ay2, det = -c0, -ax0, -ay0, -c1, -ax1, -ay1, -c2, -ax2, -ay2, -det
        idet = 1.0 / det
        sx = ax0 + ax1 + ax2
        sy = ay0 + ay1 + ay2
        # Top-left rule per edge, decided once; the pixel test below is branch-free.
        tl0 = _inside(0.0, ax0, ay0)
        tl1 = _inside(0.0, ax1, ay1)
        tl2 = _inside(0.0, ax2, ay2)
        for y in range(by0, by1 + 1):
            yn = y * ys + yo
            e0r = c0 + ay0 * yn
            e1r = c1 + ay1 * yn
            e2r = c2 + ay2 * yn
            for x in range(bx0, bx1 + 1):
                xn = x * xs + xo
                e0 = e0r + ax0 * xn
                e1 = e1r + ax1 * xn
                e2 = e2r + ax2 * xn
                inside = ((e0 > 0.0) | ((e0 == 0.0) & tl0)) & ((e1 > 0.0) | ((e1 == 0.0) & tl1)) & \
                    ((e2 > 0.0) | ((e2 == 0.0) & tl2))
                if not inside:
                    continue
                z = (e0 * Z0 + e1 * Z1 + e2 * Z2) * idet
                if z < -1.0 or z > 1.0 or not z < zb[y - r0, x]:
                    continue
                zb[y - r0, x] = z
                iet = 1.0 / (e0 + e1 + e2)
                b0 = e0 * iet
                b1 = e1 * iet
                rast[v, y, x, 0] = b0
                rast[v, y, x, 1] = b1
                rast[v, y, x, 2] = z
                rast[v, y, x, 3] = f + 1
                rast_db[v, y, x, 0] = xs * (ax0 - b0 * sx) * iet
                rast_db[v, y, x, 1] = ys * (ay0 - b0 * sy) * iet
                rast_db[v, y, x, 2] = xs * (ax1 - b1 * sx) * iet
                rast_db[v, y, x, 3] = ys * (ay1 - b1 * sy) * iet


@nb.njit(**_OPTS)
def raster_bwd(pos, tri, rast, grad_rast, grad_db, use_db, v, r0, r1, gbuf):
    """Gradient of (u, v) and of d(u, v)/d(X, Y) w.r.t. x, y, w of the covering triangle, for
    view v, rows [r0, r1), accumulated into gbuf (N, 4)."""
    H, W = rast.shape[1], rast.shape[2]
    F = tri.shape[0]
    xs = 2.0 / W
    ys = 2.0 / H
    xo = 1.0 / W - 1.0
    yo = 1.0 / H - 1.0
    for y in range(r0, r1):
        yn = y * ys + yo
        for x in range(W):
            t = int(rast[v, y, x, 3])
            if t <= 0 or t > F:
                continue
            gu = float(grad_rast[v, y, x, 0])
            gv = float(grad_rast[v, y, x, 1])
            g0 = g1 = g2 = g3 = 0.0
            if use_db:
                g0 = float(grad_db[v, y, x, 0])
                g1 = float(grad_db[v, y, x, 1])
                g2 = float(grad_db[v, y, x, 2])
                g3 = float(grad_db[v, y, x, 3])
            if gu == 0.0 and gv == 0.0 and g0 == 0.0 and g1 == 0.0 and g2 == 0.0 and g3 == 0.0:
                continue
            f = t - 1
            i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
            X0, Y0, Z0, W0 = _load(pos, v, i0)
            X1, Y1, Z1, W1 = _load(pos, v, i1)
            X2, Y2, Z2, W2 = _load(pos, v, i2)
            xn = x * xs + xo
            p0x, p0y = X0 - xn * W0, Y0 - yn * W0
            p1x, p1y = X1 - xn * W1, Y1 - yn * W1
            p2x, p2y = X2 - xn * W2, Y2 - yn * W2
            a0 = p1x * p2y - p1y * p2x
            a1 = p2x * p0y - p2y * p0x
            a2 = p0x * p1y - p0y * p1x
            at = a0 + a1 + a2
            if at == 0.0:
                continue
            b0 = a0 / at
            b1 = a1 / at
            gb0, gb1, gat = gu, gv, 0.0
            gX0 = gX1 = gX2 = gY0 = gY1 = gY2 = gW0 = gW1 = gW2 = 0.0
            if use_db and (g0 != 0.0 or g1 != 0.0 or g2 != 0.0 or g3 != 0.0):
                ax0 = Y1 * W2 - Y2 * W1
                ay0 = X2 * W1 - X1 * W2
                ax1 = Y2 * W0 - Y0 * W2
                ay1 = X0 * W2 - X2 * W0
                ax2 = Y0 * W1 - Y1 * W0
                ay2 = X1 * W0 - X0 * W1
                sx = ax0 + ax1 + ax2
                sy = ay0 + ay1 + ay2
                dux = xs * (ax0 - b0 * sx) / at
                duy = ys * (ay0 - b0 * sy) / at
                dvx = xs * (ax1 - b1 * sx) / at
                dvy = ys * (ay1 - b1 * sy) / at
                gsx = -xs * (g0 * b0 + g2 * b1) / at
                gsy = -ys * (g1 * b0 + g3 * b1) / at
                tax0 = xs * g0 / at + gsx
                tax1 = xs * g2 / at + gsx
                tax2 = gsx
                tay0 = ys * g1 / at + gsy
                tay1 = ys * g3 / at + gsy
                tay2 = gsy
                gb0 -= (xs * g0 * sx + ys * g1 * sy) / at
                gb1 -= (xs * g2 * sx + ys * g3 * sy) / at
                gat = -(dux * g0 + duy * g1 + dvx * g2 + dvy * g3) / at
                # ax_i, ay_i are 2x2 minors of (X, Y, W).
                gY1 += tax0 * W2
                gW2 += tax0 * Y1
                gY2 -= tax0 * W1
                gW1 -= tax0 * Y2
                gY2 += tax1 * W0
                gW0 += tax1 * Y2
                gY0 -= tax1 * W2
                gW2 -= tax1 * Y0
                gY0 += tax2 * W1
                gW1 += tax2 * Y0
                gY1 -= tax2 * W0
                gW0 -= tax2 * Y1
                gX2 += tay0 * W1
                gW1 += tay0 * X2
                gX1 -= tay0 * W2
                gW2 -= tay0 * X1
                gX0 += tay1 * W2
                gW2 += tay1 * X0
                gX2 -= tay1 * W0
                gW0 -= tay1 * X2
                gX1 += tay2 * W0
                gW0 += tay2 * X1
                gX0 -= tay2 * W1
                gW1 -= tay2 * X0
            s = (gb0 * b0 + gb1 * b1) / at
            ga0 = gb0 / at - s + gat
            ga1 = gb1 / at - s + gat
            ga2 = gat - s
            gp0x = ga2 * p1y - ga1 * p2y
            gp0y = ga1 * p2x - ga2 * p1x
            gp1x = ga0 * p2y - ga2 * p0y
            gp1y = ga2 * p0x - ga0 * p2x
            gp2x = ga1 * p0y - ga0 * p1y
            gp2y = ga0 * p1x - ga1 * p0x
            gX0 += gp0x
            gY0 += gp0y
            gW0 -= xn * gp0x + yn * gp0y
            gX1 += gp1x
            gY1 += gp1y
            gW1 -= xn * gp1x + yn * gp1y
            gX2 += gp2x
            gY2 += gp2y
            gW2 -= xn * gp2x + yn * gp2y
            gbuf[i0, 0] += gX0
            gbuf[i0, 1] += gY0
            gbuf[i0, 3] += gW0
            gbuf[i1, 0] += gX1
            gbuf[i1, 1] += gY1
            gbuf[i1, 3] += gW1
            gbuf[i2, 0] += gX2
            gbuf[i2, 1] += gY2
            gbuf[i2, 3] += gW2


# ----------------------------------------------------------------------------- interpolate


@nb.njit(**_OPTS)
def interp_fwd(attr, rast, tri, rast_db, diff_idx, out, out_da, row0, row1):
    """out = u a0 + v a1 + (1 - u - v) a2; out_da = (dA/dX, dA/dY) for attributes diff_idx;
    flattened (view * H + row) rows [row0, row1)."""
    H, W = rast.shape[1], rast.shape[2]
    A, C = attr.shape[0], attr.shape[2]
    F = tri.shape[0]
    D = diff_idx.shape[0]
    for row in range(row0, row1):
        v = row // H
        y = row % H
        av = v if A > 1 else 0
        for x in range(W):
            t = int(rast[v, y, x, 3])
            if t <= 0 or t > F:
                for c in range(C):
                    out[v, y, x, c] = 0.0
                for k in range(2 * D):
                    out_da[v, y, x, k] = 0.0
                continue
            i0, i1, i2 = tri[t - 1, 0], tri[t - 1, 1], tri[t - 1, 2]
            b0 = rast[v, y, x, 0]
            b1 = rast[v, y, x, 1]
            b2 = 1.0 - b0 - b1
            for c in range(C):
                out[v, y, x, c] = b0 * attr[av, i0, c] + b1 * attr[av, i1, c] + b2 * attr[av, i2, c]
            if D > 0:
                dux, duy, dvx, dvy = rast_db[v, y, x, 0], rast_db[v, y, x, 1], rast_db[v, y, x, 2], rast_db[v, y, x, 3]
                for k in range(D):
                    c = diff_idx[k]
                    d0 = attr[av, i0, c] - attr[av, i2, c]
                    d1 = attr[av, i1, c] - attr[av, i2, c]
                    out_da[v, y, x, 2 * k] = d0 * dux + d1 * dvx
                    out_da[v, y, x, 2 * k + 1] = d0 * duy + d1 * dvy


@nb.njit(**_OPTS)
def interp_bwd(attr, rast, tri, rast_db, diff_idx, gout, gda, rows, gbuf, grast, gdb):
    """Gradients of interpolate over the flattened (view * H + row) rows listed in rows:
    scattered into gbuf (N, C); written densely into grast / gdb."""
    H, W = rast.shape[1], rast.shape[2]
    A, C = attr.shape[0], attr.shape[2]
    F = tri.shape[0]
    D = diff_idx.shape[0]
    for j in range(rows.shape[0]):
        row = rows[j]
        v = row // H
        y = row % H
        av = v if A > 1 else 0
        for x in range(W):
            t = int(rast[v, y, x, 3])
            if t <= 0 or t > F:
                continue
            i0, i1, i2 = tri[t - 1, 0], tri[t - 1, 1], tri[t - 1, 2]
            b0 = rast[v, y, x, 0]
            b1 = rast[v, y, x, 1]
            b2 = 1.0 - b0 - b1
            gu = 0.0
            gv = 0.0
            for c in range(C):
                g = gout[v, y, x, c]
                if g != 0.0:
                    gbuf[i0, c] += b0 * g
                    gbuf[i1, c] += b1 * g
                    gbuf[i2, c] += b2 * g
                    a2 = attr[av, i2, c]
                    gu += g * (attr[av, i0, c] - a2)
                    gv += g * (attr[av, i1, c] - a2)
            grast[v, y, x, 0] = gu
            grast[v, y, x, 1] = gv
            if D > 0:
                dux, duy, dvx, dvy = rast_db[v, y, x, 0], rast_db[v, y, x, 1], rast_db[v, y, x, 2], rast_db[v, y, x, 3]
                gdux = gduy = gdvx = gdvy = 0.0
                for k in range(D):
                    c = diff_idx[k]
                    gx = gda[v, y, x, 2 * k]
                    gy = gda[v, y, x, 2 * k + 1]
                    if gx == 0.0 and gy == 0.0:
                        continue
                    d0 = attr[av, i0, c] - attr[av, i2, c]
                    d1 = attr[av, i1, c] - attr[av, i2, c]
                    gd0 = gx * dux + gy * duy
                    gd1 = gx * dvx + gy * dvy
                    gbuf[i0, c] += gd0
                    gbuf[i1, c] += gd1
                    gbuf[i2, c] -= gd0 + gd1
                    gdux += gx * d0
                    gdvx += gx * d1
                    gduy += gy * d0
                    gdvy += gy * d1
                gdb[v, y, x, 0] = gdux
                gdb[v, y, x, 1] = gduy
                gdb[v, y, x, 2] = gdvx
                gdb[v, y, x, 3] = gdvy


# ----------------------------------------------------------------------------- antialias


@nb.njit(**_OPTS)
def build_opposite(tri, n_vertices):
    """opp[f, i]: vertex across the edge opposite corner i of triangle f, or -1.

    Same rule as nvdiffrast's topology hash: an undirected edge remembers the first two
    distinct opposite vertices; a triangle sees the other one, else -1 (boundary or a third
    face on a non-manifold edge, both treated as silhouette candidates).
    """
    F = tri.shape[0]
    keys = np.empty(3 * F, np.int64)
    for f in range(F):
        for i in range(3):
            a = tri[f, (i + 1) % 3]
            b = tri[f, (i + 2) % 3]
            lo, hi = min(a, b), max(a, b)
            keys[3 * f + i] = lo * np.int64(n_vertices) + hi
    order = np.argsort(keys, kind="mergesort")
    opp = np.full((F, 3), -1, np.int32)
    n = 3 * F
    s = 0
    while s < n:
        e = s
        k = keys[order[s]]
        while e < n and keys[order[e]] == k:
            e += 1
        first = -1
        second = -1
        for j in range(s, e):
            h = order[j]
            f = h // 3
            if tri[f, 0] == tri[f, 1] or tri[f, 1] == tri[f, 2] or tri[f, 0] == tri[f, 2]:
                continue
            o = tri[f, h % 3]
            if first < 0:
                first = o
            elif second < 0 and o != first:
                second = o
        for j in range(s, e):
            h = order[j]
            o = tri[h // 3, h % 3]
            if o == first and first >= 0:
                opp[h // 3, h % 3] = second
            elif o == second and second >= 0:
                opp[h // 3, h % 3] = first
        s = e
    return opp


@nb.njit(inline="always")
def _same_sign(a, b):
    return (a < 0.0) == (b < 0.0)


@nb.njit(inline="always")
def _to_px(pos, v, i, hw, hh, cx, cy):
    X, Y, Z, Wc = _load(pos, v, i)
    return X / Wc * hw + hw - cx, Y / Wc * hh + hh - cy


@nb.njit(inline="always")
def _silhouette_flags(pos, v, tri, opp, f, hw, hh):
    """Bit k set iff edge k of triangle f may be a silhouette in view v: no neighbour, or the
    wing test says the neighbour folds back (degenerate or behind-camera cases count too)."""
    i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
    if pos[v, i0, 3] <= 0.0 or pos[v, i1, 3] <= 0.0 or pos[v, i2, 3] <= 0.0:
        return 7
    x0, y0 = _to_px(pos, v, i0, hw, hh, 0.0, 0.0)
    x1, y1 = _to_px(pos, v, i1, hw, hh, 0.0, 0.0)
    x2, y2 = _to_px(pos, v, i2, hw, hh, 0.0, 0.0)
    bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    fl = 0
    for k in range(3):
        o = opp[f, k]
        if o < 0 or pos[v, o, 3] <= 0.0:
            fl |= 1 << k
            continue
        ox, oy = _to_px(pos, v, o, hw, hh, 0.0, 0.0)
        if k == 0:
            wing = (x1 - ox) * (y2 - oy) - (x2 - ox) * (y1 - oy)
        elif k == 1:
            wing = (x2 - ox) * (y0 - oy) - (x0 - ox) * (y2 - oy)
        else:
            wing = (x0 - ox) * (y1 - oy) - (x1 - ox) * (y0 - oy)
        if _same_sign(wing, bb) or abs(wing) < 1e-6 or abs(bb) < 1e-6:
            fl |= 1 << k
    return fl


@nb.njit(**_OPTS)
def aa_analyze(pos, tri, opp, flags, rast, alpha, info, row_count, row0, row1):
    """For each pixel pair (right: d=0, down: d=1) with different triangle ids, decide whether a
    silhouette edge of the front triangle crosses the segment between the pixel centres, and
    store the blend weight alpha (0: no blend), info = edge | (other-pixel-chosen << 2), and
    the number of blends per (view, row), for flattened rows [row0, row1). flags (V, F) uint8
    starts at 255 (unknown).

    As nvdiffrast: of the front triangle's edges crossing the line through both centres the
    farthest crossing is taken; it blends only if that edge is a silhouette (no neighbour, or
    the neighbour's opposite vertex lies on the same side), is steeper than 45 degrees to the
    pair's axis, and crosses within the segment (1/16 px tolerance, then clamped).
    """
    H, W = rast.shape[1], rast.shape[2]
    F = tri.shape[0]
    hw = 0.5 * W
    hh = 0.5 * H
    eps = 0.0625
    for row in range(row0, row1):
        v = row // H
        y = row % H
        count = 0
        for x in range(W):
            for d in range(2):
                alpha[v, y, x, d] = 0.0
                info[v, y, x, d] = 0
                qx = x + 1 - d
                qy = y + d
                if qx >= W or qy >= H:
                    continue
                t0 = int(rast[v, y, x, 3])
                t1 = int(rast[v, qy, qx, 3])
                if t0 == t1:
                    continue
                if t0 > 0 and t1 > 0:
                    use1 = not (rast[v, y, x, 2] < rast[v, qy, qx, 2])
                else:
                    use1 = t0 <= 0
                t = t1 if use1 else t0
                if t <= 0 or t > F:
                    continue
                f = t - 1
                # Most pairs lie inside the surface: skip triangles without a candidate edge
                # (memoised per view and triangle; concurrent writers store the same byte).
                fl = flags[v, f]
                if fl == 255:
                    fl = _silhouette_flags(pos, v, tri, opp, f, hw, hh)
                    flags[v, f] = fl
                if fl == 0:
                    continue
                cx = (qx if use1 else x) + 0.5
                cy = (qy if use1 else y) + 0.5
                ds = -1.0 if use1 else 1.0
                i0, i1, i2 = tri[f, 0], tri[f, 1], tri[f, 2]
                if pos[v, i0, 3] <= 0.0 or pos[v, i1, 3] <= 0.0 or pos[v, i2, 3] <= 0.0:
                    continue
                x0, y0 = _to_px(pos, v, i0, hw, hh, cx, cy)
                x1, y1 = _to_px(pos, v, i1, hw, hh, cx, cy)
                x2, y2 = _to_px(pos, v, i2, hw, hh, cx, cy)
                # (s, r) = coordinates along / across the pair's axis.
                if d == 1:
                    s0, r0, s1, r1, s2, r2 = y0, x0, y1, x1, y2, x2
                else:
                    s0, r0, s1, r1, s2, r2 = x0, y0, x1, y1, x2, y2
                best = -np.inf
                di = -1
                for k in range(3):
                    if k == 0:
                        sa, ra, sb, rb = s1, r1, s2, r2
                    elif k == 1:
                        sa, ra, sb, rb = s2, r2, s0, r0
                    else:
                        sa, ra, sb, rb = s0, r0, s1, r1
                    if _same_sign(ra, rb):
                        continue
                    dr = rb - ra
                    if dr == 0.0:
                        continue
                    dc = ds * (sa * dr - ra * (sb - sa)) / dr
                    if dc > best:
                        best = dc
                        di = k
                if di < 0 or not (best > -eps and best < 1.0 + eps):
                    continue
                if di == 0:
                    dsx, drx = s2 - s1, r2 - r1
                elif di == 1:
                    dsx, drx = s0 - s2, r0 - r2
                else:
                    dsx, drx = s1 - s0, r1 - r0
                if abs(drx) < abs(dsx):
                    continue
                o = opp[f, di]
                if o >= 0:
                    # Silhouette iff the wing triangle (o, edge) has the triangle's orientation.
                    ox, oy = _to_px(pos, v, o, hw, hh, cx, cy)
                    bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
                    if di == 0:
                        wing = (x1 - ox) * (y2 - oy) - (x2 - ox) * (y1 - oy)
                    elif di == 1:
                        wing = (x2 - ox) * (y0 - oy) - (x0 - ox) * (y2 - oy)
                    else:
                        wing = (x0 - ox) * (y1 - oy) - (x1 - ox) * (y0 - oy)
                    if not _same_sign(wing, bb):
                        continue
                a = ds * (0.5 - min(max(best, 0.0), 1.0))
                if a != 0.0:
                    alpha[v, y, x, d] = a
                    info[v, y, x, d] = di | (4 if use1 else 0)
                    count += 1
        row_count[row] = count


@nb.njit(**_OPTS)
def aa_compact(alpha, info, row_count):
    """Flat (V, H, W, 2) indices, alphas and infos of the blends, scanning only rows that have any."""
    V, H, W = alpha.shape[0], alpha.shape[1], alpha.shape[2]
    n = 0
    for r in range(V * H):
        n += row_count[r]
    items = np.empty(n, np.int64)
    alphas = np.empty(n, alpha.dtype)
    infos = np.empty(n, np.int8)
    k = 0
    for r in range(V * H):
        if row_count[r] == 0:
            continue
        v = r // H
        y = r % H
        for x in range(W):
            for d in range(2):
                a = alpha[v, y, x, d]
                if a != 0.0:
                    items[k] = ((r * W) + x) * 2 + d
                    alphas[k] = a
                    infos[k] = info[v, y, x, d]
                    k += 1
    return items, alphas, infos


@nb.njit(**_OPTS)
def aa_apply(color, items, alphas, H, W, out):
    """out (already a copy of color) += alpha (c1 - c0) on the pixel the edge crosses into."""
    C = color.shape[3]
    for k in range(items.shape[0]):
        it = items[k]
        d = it % 2
        p = it // 2
        x = p % W
        y = (p // W) % H
        v = p // (W * H)
        qx = x + 1 - d
        qy = y + d
        a = alphas[k]
        if a > 0.0:
            mx, my = x, y
        else:
            mx, my = qx, qy
        for c in range(C):
            out[v, my, mx, c] += a * (color[v, qy, qx, c] - color[v, y, x, c])


@nb.njit(**_OPTS)
def aa_bwd(color, rast, pos, tri, items, alphas, infos, gout, boost, gcolor, gpos):
    """Gradients of antialias: gcolor (a copy of gout on entry) and gpos ((V, N, 4), zeroed).

    Position gradients come from d alpha / d(edge crossing); none where alpha saturated.
    """
    H, W = rast.shape[1], rast.shape[2]
    C = color.shape[3]
    hw = 0.5 * W
    hh = 0.5 * H
    for k in range(items.shape[0]):
        it = items[k]
        d = it % 2
        p = it // 2
        x = p % W
        y = (p // W) % H
        v = p // (W * H)
        qx = x + 1 - d
        qy = y + d
        a = alphas[k]
        mx, my = (x, y) if a > 0.0 else (qx, qy)
        dd = 0.0
        for c in range(C):
            g = gout[v, my, mx, c]
            if g != 0.0:
                dd += g * (color[v, qy, qx, c] - color[v, y, x, c])
                gcolor[v, y, x, c] -= a * g
                gcolor[v, qy, qx, c] += a * g
        if dd == 0.0 or abs(a) >= 0.5:
            continue
        inf = infos[k]
        di = inf & 3
        use1 = (inf & 4) != 0
        px, py = (qx, qy) if use1 else (x, y)
        f = int(rast[v, py, px, 3]) - 1
        ia = tri[f, (di + 1) % 3]
        ib = tri[f, (di + 2) % 3]
        cx = px + 0.5
        cy = py + 0.5
        Xa, Ya, Za, Wa = _load(pos, v, ia)
        Xb, Yb, Zb, Wb = _load(pos, v, ib)
        # Pixel coordinates relative to the chosen centre; (s, r) = (along, across) the pair.
        xa, ya = Xa / Wa * hw + hw - cx, Ya / Wa * hh + hh - cy
        xb, yb = Xb / Wb * hw + hw - cx, Yb / Wb * hh + hh - cy
        if d == 1:
            sa, ra, sb, rb = ya, xa, yb, xb
        else:
            sa, ra, sb, rb = xa, ya, xb, yb
        dr = rb - ra
        ds_ = sb - sa
        # alpha = +-0.5 - crossing, crossing = (sa rb - sb ra) / (rb - ra).
        g = -dd * boost
        gsa = g * rb / dr
        gsb = -g * ra / dr
        gra = -g * rb * ds_ / (dr * dr)
        grb = g * ra * ds_ / (dr * dr)
        if d == 1:
            gxa, gya, gxb, gyb = gra, gsa, grb, gsb
        else:
            gxa, gya, gxb, gyb = gsa, gra, gsb, grb
        gpos[v, ia, 0] += gxa * hw / Wa
        gpos[v, ia, 1] += gya * hh / Wa
        gpos[v, ia, 3] -= (gxa * hw * Xa + gya * hh * Ya) / (Wa * Wa)
        gpos[v, ib, 0] += gxb * hw / Wb
        gpos[v, ib, 1] += gyb * hh / Wb
        gpos[v, ib, 3] -= (gxb * hw * Xb + gyb * hh * Yb) / (Wb * Wb)
