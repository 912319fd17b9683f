"""Exports of the ``neural`` stage.

Files (``<out>``)::

    neural.pt                            the trained renderer with its meshes and lighting
                                         (``fitting.neural.load_record``; read by
                                         scripts/render_views.py --renderer neural)
    images/neural/neural_<view>.png      neural render of every view, fitted and held out (on black)
    images/neural/compare_<view>.png     held-out views: photo | neural | HAM shaded (mean SH)

The report gets one line per view with both renders' masked PSNR / SSIM.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from export.atomic import write_bytes, write_image
from export.report import ReportSection

log = logging.getLogger("handrecon")


def save_neural(path: str | Path, record: Mapping[str, Any]) -> Path:
    """``record`` (state.neural) as a weights_only-loadable torch file, written atomically."""
    from fitting.pipeline import weights_only_safe

    buf = io.BytesIO()
    torch.save({"format": "handrecon.neural/1", "neural": weights_only_safe(dict(record), "neural")}, buf)
    return write_bytes(path, buf.getvalue())


def load_neural(path: str | Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "handrecon.neural/1":
        raise ValueError(f"{path}: not a neural renderer file (expected format handrecon.neural/1)")
    return payload["neural"]


def export_neural(ctx: Any) -> list[ReportSection]:
    """neural.pt, per-view neural renders (fitted and held-out views), held-out comparisons."""
    st = ctx.state
    if not st.neural:
        return []
    from fitting import losses as Lo
    from fitting.ham import HamConf, render_views
    from fitting.masks import pad_cameras
    from fitting.neural import load_record, render_neural
    from fitting.pose_fit import image_scale
    from fitting.silhouette_fit import camera_offsets

    ctx.files.append(save_neural(ctx.out_dir / "neural.pt", st.neural))
    rctx = Lo.render_context(ctx.conf, Lo.stage_device(ctx.conf))
    dev = rctx.device
    net, verts, faces, albedo, sh = load_record(st.neural, dev)
    views = list(ctx.scan.views) + list(ctx.scan.holdout)
    cams, hw = pad_cameras([v.camera for v in views])
    # fitted views with silhouette_fit's camera corrections, held-out ones as calibrated (zero)
    off = camera_offsets(st, [v.name for v in views], image_scale(ctx.scan, ctx.conf), dev)
    ss = HamConf.from_conf(ctx.conf).supersample
    imgs, _ = render_neural(net, rctx, verts, faces, albedo, sh, cams, hw, off, supersample=ss)
    d = ctx.out_dir / "images" / "neural"
    paths: list[Path] = []
    held = {v.name for v in ctx.scan.holdout}
    shaded = None
    if held and st.refined:
        sides = [str(s) for s in st.neural["sides"]]
        t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt, device=dev)  # noqa: E731
        hcams = [c for c, v in zip(cams, views) if v.name in held]
        shaded = render_views(rctx, [t(st.refined[s]["vertices"]) for s in sides],
                              [t(st.refined[s]["faces"], torch.long) for s in sides],
                              [t(st.refined[s]["albedo"]) for s in sides],
                              sh.expand(len(hcams), -1, -1).contiguous(), hcams, hw, supersample=ss).shaded
    k = 0
    for i, view in enumerate(views):
        H, W = view.camera.height, view.camera.width
        paths.append(write_image(d / f"neural_{view.name}.png", imgs[i, :H, :W]))
        if view.name in held and shaded is not None:
            photo = np.asarray(view.image if view.image is not None else np.zeros((H, W, 3)), np.float64)
            row = np.concatenate([photo, imgs[i, :H, :W], shaded[k, :H, :W]], 1)
            paths.append(write_image(d / f"compare_{view.name}.png", row))
            k += 1
    ctx.images.setdefault("neural", []).extend(paths)
    ctx.files += paths
    return [summary_section(st.metrics.get("neural", {}))] if "neural" in st.metrics else []


def summary_section(m: Mapping[str, Any]) -> ReportSection:
    """One line per view: neural and shaded PSNR / SSIM on the same pixels."""
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    rows: dict[str, str] = {}
    for part, label in (("holdout", "held out"), ("train", "fitted")):
        for name, v in m.get(part, {}).get("views", {}).items():
            n, s = v["neural"], v["shaded"]
            rows[f"{name} ({label})"] = (f"neural PSNR {f(n.get('psnr'), '.2f')} dB SSIM {f(n.get('ssim'), '.3f')}; "
                                         f"shaded PSNR {f(s.get('psnr'), '.2f')} dB SSIM {f(s.get('ssim'), '.3f')}"
                                         + (f"; {v['status']}" if v.get("status", "ok") != "ok" else ""))
    ho, tr = m.get("holdout", {}), m.get("train", {})
    text = (f"held-out views: neural {f(ho.get('neural_psnr_mean'), '.2f')} dB / shaded "
            f"{f(ho.get('shaded_psnr_mean'), '.2f')} dB (SSIM {f(ho.get('neural_ssim_mean'), '.3f')} / "
            f"{f(ho.get('shaded_ssim_mean'), '.3f')}); fitted views: neural {f(tr.get('neural_psnr_mean'), '.2f')} dB / "
            f"shaded {f(tr.get('shaded_psnr_mean'), '.2f')} dB. Same pixels for both renders: the usable mask covered by "
            "both; held-out views shaded with the mean SH of the fitted views.")
    return ReportSection("neural renderer: per view", metrics=rows, text=text)
