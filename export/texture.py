"""Refined-hand exports: per-vertex albedo baked into a UV texture, textured OBJ + MTL + PNG, PLY
with vertex colours, a reloadable ``refined.npz``, the two-hand scene, and per-view images.

Baking: the UV layout is rasterized with the renderer (uv as clip positions, one view), the
albedo of each texel is interpolated from the triangle's corners, and every texel outside the
layout takes the colour of the nearest texel inside (so bilinear and mipmapped lookups never
bleed background into the seams). Colour spaces: the fitted albedo is linear reflectance; PNG
textures and PLY colours are sRGB-encoded (what viewers expect for base colour).

Files (``<out>``)::

    hand_<side>_refined.obj/.mtl/.png   textured refined mesh (UV seams kept: ``v/vt`` faces)
    hand_<side>_refined.ply             same mesh, sRGB vertex colours
    hands_refined.<scene_format>        both refined hands in one scene, vertex colours
    refined.npz                         per side vertices, faces, albedo (linear), displacement,
                                        base_vertices, uv, uv_faces, skin_weights; lighting/sh
                                        (V,9,3), lighting/views, lighting/sh_mean (see load_refined)
    images/ham/{shaded,albedo,normals,overlay_render}_<view>.png
    images/silhouette_fit/silhouette_<view>.png   mask (red), ignored pixels (yellow), fit (cyan)
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from export.atomic import assert_finite, write_bytes, write_image
from export.mesh_io import write_obj, write_ply
from export.report import ReportSection
from export.scene import SceneMesh, write_scene

log = logging.getLogger("handrecon")
REFINED_FORMAT = "handrecon.refined/1"
REFINED_KEYS = ("vertices", "faces", "albedo", "displacement", "base_vertices", "uv", "uv_faces", "skin_weights")


# ------------------------------------------------------------------------------------------ baking
def linear_to_srgb_np(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


def uv_vertex_values(values: np.ndarray, faces: np.ndarray, uv_faces: np.ndarray, n_uv: int) -> np.ndarray:
    """Per-vertex values carried to the UV vertices (a UV vertex belongs to exactly one mesh
    vertex; seams split UV vertices, never mesh vertices)."""
    idx = np.zeros(n_uv, np.int64)
    idx[np.asarray(uv_faces, np.int64).reshape(-1)] = np.asarray(faces, np.int64).reshape(-1)
    return np.asarray(values)[idx]


def bake_texture(values: Any, faces: Any, uv: Any, uv_faces: Any, size: int = 1024, ctx: Any = None) -> np.ndarray:
    """(size, size, C) texture of per-vertex ``values`` (N,C) through the UV atlas ``uv`` (T,2)
    (OBJ convention: v up, so row 0 is v = 1), ``uv_faces`` (F,3) matching ``faces`` (F,3).
    Texels outside the atlas take the nearest atlas texel's value."""
    from scipy.ndimage import distance_transform_edt

    from renderer import interpolate, make_context, rasterize

    vals = assert_finite("texture values", values).astype(np.float32)
    uvn = assert_finite("uv", uv).astype(np.float64)
    f = np.asarray(faces.detach().cpu() if hasattr(faces, "detach") else faces, np.int64)
    uf = np.asarray(uv_faces.detach().cpu() if hasattr(uv_faces, "detach") else uv_faces, np.int64)
    ctx = ctx if ctx is not None else make_context("cpu")
    dev = ctx.device
    per_uv = torch.as_tensor(uv_vertex_values(vals, f, uf, len(uvn)), device=dev)
    pos = np.zeros((len(uvn), 4), np.float32)
    pos[:, 0] = 2.0 * uvn[:, 0] - 1.0
    pos[:, 1] = 1.0 - 2.0 * uvn[:, 1]
    pos[:, 3] = 1.0
    tri = torch.as_tensor(uf, dtype=torch.int32, device=dev)
    with torch.no_grad():
        rast, _ = rasterize(ctx, torch.as_tensor(pos, device=dev)[None], tri, (size, size), grad_db=False)
        img, _ = interpolate(per_uv[None].contiguous(), rast, tri, ctx=ctx)
    img = img[0].cpu().numpy()
    covered = rast[0, ..., 3].cpu().numpy() > 0
    if not covered.any():
        raise ValueError("UV layout covers no texel; check uv (expected coordinates in [0, 1])")
    if not covered.all():
        _, (iy, ix) = distance_transform_edt(~covered, return_indices=True)
        img = img[iy, ix]
    return img


# ------------------------------------------------------------------------------------------- files
def save_refined(path: str | Path, refined: Mapping[str, Mapping[str, Any]], lighting: Mapping[str, Any]) -> Path:
    """``refined.npz``: ``<side>/<key>`` for REFINED_KEYS, ``lighting/sh``, ``lighting/views``,
    ``lighting/sh_mean``, ``format``. Everything numeric is finite or the write is refused."""
    arrays: dict[str, np.ndarray] = {"format": np.asarray(REFINED_FORMAT)}
    for side, rec in refined.items():
        for k in REFINED_KEYS:
            if k in rec:
                v = rec[k]
                arrays[f"{side}/{k}"] = assert_finite(f"{side} {k}", v.detach().cpu().numpy() if hasattr(v, "detach") else v)
    if lighting:
        arrays["lighting/sh"] = assert_finite("lighting sh", _np(lighting["sh"]))
        arrays["lighting/sh_mean"] = assert_finite("lighting sh_mean", _np(lighting["sh_mean"]))
        arrays["lighting/views"] = np.asarray([str(v) for v in lighting["views"]])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def load_refined(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """(refined per side, lighting) from a ``refined.npz`` written by ``save_refined``."""
    refined: dict[str, dict[str, np.ndarray]] = {}
    lighting: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as z:
        if "format" not in z.files or str(z["format"]) != REFINED_FORMAT:
            raise ValueError(f"{path}: not a refined-hands file (expected format {REFINED_FORMAT})")
        for key in z.files:
            if key == "format":
                continue
            head, name = key.split("/", 1)
            if head == "lighting":
                lighting[name] = [str(x) for x in z[key]] if name == "views" else z[key]
            else:
                refined.setdefault(head, {})[name] = z[key]
    return refined, lighting


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def write_refined_hand(out_dir: Path, side: str, rec: Mapping[str, Any], texture_size: int, formats: list[str],
                       ctx: Any = None) -> list[Path]:
    """Textured OBJ (+MTL+PNG) and/or vertex-coloured PLY of one refined hand."""
    v, f = _np(rec["vertices"]), _np(rec["faces"]).astype(np.int64)
    albedo = _np(rec["albedo"])
    files: list[Path] = []
    if "obj" in formats:
        tex = bake_texture(albedo, f, _np(rec["uv"]), _np(rec["uv_faces"]), texture_size, ctx)
        obj = write_obj(out_dir / f"hand_{side}_refined.obj", v, f, uvs=_np(rec["uv"]), uv_faces=_np(rec["uv_faces"]),
                        texture=linear_to_srgb_np(tex), material_name=f"hand_{side}")
        files += [obj, obj.with_suffix(".mtl"), obj.with_suffix(".png")]
    if "ply" in formats:
        files.append(write_ply(out_dir / f"hand_{side}_refined.ply", v, f, colors=linear_to_srgb_np(albedo)))
    return files


# ---------------------------------------------------------------------------------------- exporters
def export_silhouettes(ctx: Any) -> list[ReportSection]:
    """Per view: the given mask (red), pixels the silhouette terms ignore (yellow: forearm,
    missing hand; whole view tinted when dropped) and the fitted hands' outline (cyan)."""
    st = ctx.state
    if "silhouette_fit" not in st.metrics or not st.params or not ctx.conf["output"]["overlays"]:
        return []
    import handmodel
    from fitting import losses as Lo
    from fitting.masks import MaskBuilder, MaskConf
    from fitting.pose_fit import image_scale
    from fitting.silhouette_fit import camera_offsets
    from renderer import make_context

    rctx = make_context("cpu")
    hands = []
    for side, p in st.params.items():
        m = handmodel.load(str(ctx.conf["hand_model"]["name"]), side=side)
        with torch.no_grad():
            hands.append((m.forward(p).vertices[0], m.faces))
    scale = image_scale(ctx.scan, ctx.conf)
    builder = MaskBuilder(ctx.scan, MaskConf.from_conf(ctx.conf), rctx, scale, "cpu")
    builder.offsets = camera_offsets(st, [v.name for v in ctx.scan.views], scale)
    status = {n: v.get("status", "ok") for n, v in st.metrics["silhouette_fit"].get("views", {}).items()}
    with torch.no_grad():
        vm = builder.build(hands, list(st.params), decide=True)
        cov = Lo.render_silhouette(rctx, Lo.merge([h[0] for h in hands], [h[1] for h in hands]), builder.cameras,
                                   builder.hw, offsets=builder.offsets)[0].numpy() > 0.5
    paths = []
    for i, view in enumerate(ctx.scan.views):
        H, W = view.camera.height, view.camera.width
        img = np.asarray(view.image if view.image is not None else np.zeros((H, W, 3)), np.float64).copy()
        ignored = (vm.valid[i].numpy() < 0.5)[:H, :W] & (vm.inside[i].numpy() > 0.5)[:H, :W]
        if status.get(view.name) == "dropped":
            img = 0.5 * img + 0.5 * np.array([1.0, 1.0, 0.0])
        img[ignored] = 0.5 * img[ignored] + 0.5 * np.array([1.0, 1.0, 0.0])
        if view.mask is not None:
            img[_outline(view.mask)] = [1.0, 0.0, 0.0]
        img[_outline(cov[i][:H, :W])] = [0.0, 1.0, 1.0]
        paths.append(write_image(ctx.out_dir / "images" / "silhouette_fit" / f"silhouette_{view.name}.png", img))
    ctx.images.setdefault("silhouette_fit", []).extend(paths)
    ctx.files += paths
    return []


def export_refined(ctx: Any) -> list[ReportSection]:
    """Everything of the ``ham`` stage: meshes, texture, npz, scene and per-view images."""
    st = ctx.state
    if not st.refined:
        return []
    out = ctx.conf["output"]
    formats = [str(f) for f in out["mesh_formats"]]
    size = int(out.get("texture_size", 1024))
    from fitting import losses as Lo

    rctx = Lo.render_context(ctx.conf, Lo.stage_device(ctx.conf))  # nvdiffrast on a GPU run
    for side, rec in st.refined.items():
        ctx.files += write_refined_hand(ctx.out_dir, side, rec, size, formats, rctx)
    ctx.files.append(save_refined(ctx.out_dir / "refined.npz", st.refined, st.lighting))
    scene = {s: SceneMesh(_np(r["vertices"]), _np(r["faces"]), linear_to_srgb_np(_np(r["albedo"])))
             for s, r in st.refined.items()}
    ctx.files.append(write_scene(ctx.out_dir / f"hands_refined.{out['scene_format']}", scene))
    if out["overlays"] and st.lighting:
        paths = _view_images(ctx, rctx)
        ctx.images.setdefault("ham", []).extend(paths)
        ctx.files += paths
    return [summary_section(st.metrics)] if "ham" in st.metrics else []


def summary_section(metrics: Mapping[str, Any]) -> ReportSection:
    """One line per view: IoU before HAM (silhouette_fit) and after, PSNR, SSIM, status."""
    ham = metrics.get("ham", {})
    sil = metrics.get("silhouette_fit", {}).get("views", {})
    rows: dict[str, str] = {}
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for name, v in ham.get("views", {}).items():
        line = (f"IoU {f(sil.get(name, {}).get('iou'), '.3f')} -> {f(v.get('iou'), '.3f')} "
                f"(against the raw mask {f(v.get('iou_raw'), '.3f')}), "
                f"PSNR {f(v.get('psnr'), '.2f')} dB (interior {f(v.get('psnr_interior'), '.2f')}), "
                f"SSIM {f(v.get('ssim'), '.3f')}, {v.get('status', '')}")
        if v.get("region") == "render":
            line += " (colour measured on the render's coverage: the mask is unusable)"
        if v.get("note"):
            line += f"; {v['note']}"
        rows[name] = line
    for name, v in ham.get("holdout", {}).get("views", {}).items():
        rows[f"{name} (held out)"] = (f"never fitted, mean lighting: IoU {f(v.get('iou'), '.3f')} (raw "
                                      f"{f(v.get('iou_raw'), '.3f')}), PSNR {f(v.get('psnr'), '.2f')} dB, "
                                      f"SSIM {f(v.get('ssim'), '.3f')}, {v.get('status', '')}")
    text = (f"mean over the views with a usable mask: IoU {f(ham.get('iou_mean'), '.3f')}, "
            f"PSNR {f(ham.get('psnr_mean'), '.2f')} dB, SSIM {f(ham.get('ssim_mean'), '.3f')} (PSNR/SSIM over the "
            "usable mask pixels the render covers; interior: less their one-pixel rim); dropped views "
            f"{ham.get('dropped_views', [])}, partial {ham.get('partial_views', [])}")
    return ReportSection("per view after ham", metrics=rows, text=text)


def _view_images(ctx: Any, rctx: Any) -> list[Path]:
    from fitting.ham import HamConf, render_views
    from fitting.masks import pad_cameras

    st = ctx.state
    cams, hw = pad_cameras(ctx.scan.cameras)
    names = [str(v) for v in st.lighting["views"]]
    sh_all = torch.as_tensor(_np(st.lighting["sh"]), dtype=torch.float32)
    sh = torch.stack([sh_all[names.index(v.name)] if v.name in names else torch.as_tensor(_np(st.lighting["sh_mean"]))
                      for v in ctx.scan.views])
    sides = list(st.refined)
    from fitting.pose_fit import image_scale
    from fitting.silhouette_fit import camera_offsets

    off = camera_offsets(st, [v.name for v in ctx.scan.views], image_scale(ctx.scan, ctx.conf))
    dev = rctx.device
    t = lambda x, dt=torch.float32: torch.as_tensor(_np(x), dtype=dt, device=dev)  # noqa: E731
    rv = render_views(rctx, [t(st.refined[s]["vertices"]) for s in sides], [t(st.refined[s]["faces"], torch.long) for s in sides],
                      [t(st.refined[s]["albedo"]) for s in sides], sh.to(dev), cams, hw,
                      None if off is None else off.to(dev), HamConf.from_conf(ctx.conf).supersample)
    paths = []
    d = ctx.out_dir / "images" / "ham"
    for i, view in enumerate(ctx.scan.views):
        H, W = view.camera.height, view.camera.width
        cov = rv.coverage[i, :H, :W, None]
        paths.append(write_image(d / f"shaded_{view.name}.png", rv.shaded[i, :H, :W]))
        paths.append(write_image(d / f"albedo_{view.name}.png", rv.albedo[i, :H, :W]))
        paths.append(write_image(d / f"normals_{view.name}.png", rv.normals[i, :H, :W] * cov))
        photo = np.asarray(view.image if view.image is not None else np.zeros((H, W, 3)), np.float64)
        over = photo * (1 - 0.7 * cov) + 0.7 * cov * rv.shaded[i, :H, :W]
        if view.mask is not None:
            over[_outline(view.mask)] = [1.0, 0.0, 0.0]
        over[_outline(rv.coverage[i, :H, :W] > 0.5)] = [0.0, 1.0, 1.0]
        paths.append(write_image(d / f"overlay_render_{view.name}.png", over))
    return paths


def _outline(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, bool)
    inner = np.zeros_like(m)
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~inner
