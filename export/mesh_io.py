"""Mesh files: OBJ (optionally with MTL + PNG texture and separate UV faces) and PLY (binary or
ASCII, optional vertex colours). Written by hand rather than through trimesh so the vertex order,
face order and float precision are exactly what the fit produced.

Floats are written with 9 significant digits, which round-trips any float32 exactly. Every file is
written atomically and nothing with NaN/Inf is written.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from export.atomic import assert_finite, write_bytes, write_image, write_text

__all__ = ["write_obj", "write_ply", "assert_finite", "colors_to_uint8"]


def _faces(name: str, faces: Any, n_vertices: int) -> np.ndarray:
    f = assert_finite(name, faces)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{name} must be (F,3) triangles, got {f.shape}")
    f = f.astype(np.int64)
    if f.size and (f.min() < 0 or f.max() >= n_vertices):
        raise ValueError(f"{name} index out of range [0, {n_vertices}): min {f.min()}, max {f.max()}")
    return f


def _vertices(name: str, vertices: Any, dim: int = 3) -> np.ndarray:
    v = assert_finite(name, vertices)
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"{name} must be (N,{dim}), got {v.shape}")
    return v


def colors_to_uint8(name: str, colors: Any, n: int) -> np.ndarray:
    """(N,3|4) colours, uint8 or float in [0,1], -> uint8 (rounded)."""
    c = assert_finite(name, colors)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] not in (3, 4):
        raise ValueError(f"{name} must be (N,3) or (N,4) with N = {n}, got {c.shape}")
    if c.dtype == np.uint8:
        return c
    if c.dtype.kind in "iu":
        if c.min() < 0 or c.max() > 255:
            raise ValueError(f"{name}: integer colours must be in 0..255")
        return c.astype(np.uint8)
    return np.clip(np.rint(c.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def _rows(fmt: str, a: np.ndarray) -> str:
    buf = io.StringIO()
    np.savetxt(buf, a, fmt=fmt)
    return buf.getvalue()


def write_obj(
    path: str | Path,
    vertices: Any,
    faces: Any,
    *,
    uvs: Any = None,
    uv_faces: Any = None,
    texture: Any = None,
    material_name: str = "material0",
) -> Path:
    """Write a triangle mesh as OBJ. With ``uvs`` (T,2) and ``uv_faces`` (F,3) the faces read
    ``v/vt`` (UV seams need their own indices); with a ``texture`` image (H,W,3) too,
    ``<stem>.mtl`` and ``<stem>.png`` are written beside it and referenced. UV v points up (OBJ)."""
    path = Path(path)
    v = _vertices(f"{path.name} vertices", vertices)
    f = _faces(f"{path.name} faces", faces, len(v))
    lines = [f"# handrecon mesh: {len(v)} vertices, {len(f)} faces, metres\n"]
    has_uv = uvs is not None
    if texture is not None and not has_uv:
        raise ValueError(f"{path.name}: a texture needs uvs (and uv_faces)")
    if has_uv:
        uv = _vertices(f"{path.name} uvs", uvs, 2)
        uf = _faces(f"{path.name} uv_faces", uv_faces if uv_faces is not None else faces, len(uv))
        if uf.shape != f.shape:
            raise ValueError(f"{path.name}: uv_faces {uf.shape} must match faces {f.shape}")
    if texture is not None:
        tex = assert_finite(f"{path.name} texture", texture)
        png = path.with_suffix(".png")
        mtl = path.with_suffix(".mtl")
        write_image(png, tex)
        write_text(
            mtl,
            f"newmtl {material_name}\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd {png.name}\n",
        )
        lines.append(f"mtllib {mtl.name}\n")
    lines.append(_rows("v %.9g %.9g %.9g", v))
    if has_uv:
        lines.append(_rows("vt %.9g %.9g", uv))
        if texture is not None:
            lines.append(f"usemtl {material_name}\n")
        idx = np.stack([f + 1, uf + 1], axis=2).reshape(len(f), 6)
        lines.append(_rows("f %d/%d %d/%d %d/%d", idx))
    else:
        lines.append(_rows("f %d %d %d", f + 1))
    return write_text(path, "".join(lines))


def write_ply(path: str | Path, vertices: Any, faces: Any, *, colors: Any = None, binary: bool = True) -> Path:
    """Write a triangle mesh as PLY (float32 positions, uint8 colours, int32 face indices)."""
    path = Path(path)
    v = _vertices(f"{path.name} vertices", vertices)
    f = _faces(f"{path.name} faces", faces, len(v))
    c = colors_to_uint8(f"{path.name} colors", colors, len(v)) if colors is not None else None
    fmt = "binary_little_endian" if binary else "ascii"
    header = [f"ply\nformat {fmt} 1.0\ncomment handrecon mesh, metres\n", f"element vertex {len(v)}\n",
              "property float x\nproperty float y\nproperty float z\n"]
    if c is not None:
        header.append("property uchar red\nproperty uchar green\nproperty uchar blue\n")
        if c.shape[1] == 4:
            header.append("property uchar alpha\n")
    header.append(f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    head = "".join(header).encode("ascii")
    if binary:
        vfields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (c.shape[1],))] if c is not None else [])
        vrec = np.empty(len(v), dtype=np.dtype(vfields))
        vrec["xyz"] = v.astype(np.float32)
        if c is not None:
            vrec["rgb"] = c
        frec = np.empty(len(f), dtype=np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
        frec["n"] = 3
        frec["idx"] = f.astype(np.int32)
        return write_bytes(path, head + vrec.tobytes() + frec.tobytes())
    v32 = v.astype(np.float32)
    if c is not None:
        body = "".join(
            " ".join(f"{x:.9g}" for x in p) + " " + " ".join(str(int(k)) for k in col) + "\n"
            for p, col in zip(v32.tolist(), c)
        )
    else:
        body = _rows("%.9g %.9g %.9g", v32)
    body += _rows("3 %d %d %d", f)
    return write_bytes(path, head + body.encode("ascii"))
