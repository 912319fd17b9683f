#!/usr/bin/env python
"""Render a finished run from any cameras: ``OUT/<view>.png`` (neural or shaded, on black) and
``OUT/<view>_mask.png`` (0/255 coverage) for every camera of an FMHR ``param.npz``.

    .venv/bin/python scripts/render_views.py --run runs/demo_sfs/1 \\
        --cameras ../shared/data/fmhr_demo/1/camera/param.npz --out renders [--size 1280x1024] [--scale 0.25] \\
        [--renderer neural|shaded]

- ``--renderer shaded``: the run's refined hands and lighting come from ``<run>/refined.npz``
  (written by the ham stage's exporter). A view the run fitted is shaded with its own SH; any
  other view (a held-out camera) with the mean SH of the fitted views.
- ``--renderer neural``: the neural stage's renderer from ``<run>/neural.pt`` (its meshes, the
  mean SH, learned features and network; every camera is rendered the same way). The default is
  the best the run has: neural when ``neural.pt`` exists, else shaded.
- A camera's image size is its ``size_i`` in the file, else ``--size WxH`` (the size its K refers
  to); ``--scale`` renders at a fraction of it (K scaled with it).
- Per-view principal-point corrections that the run estimated (``silhouette_fit`` in
  ``<run>/metrics.json``) are applied to the views they belong to, so a fitted view renders as it
  was fitted; other views use the file's cameras as they are.
- Samples per pixel: the run's own (``ham.supersample``) unless ``--supersample`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from capture.camera import Camera  # noqa: E402
from capture.fmhr import read_camera_file  # noqa: E402
from export.atomic import write_image  # noqa: E402
from export.texture import load_refined  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects WxH, e.g. 1280x1024, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return w, h


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Render a finished run from the cameras of a param.npz.")
    ap.add_argument("--run", required=True, type=Path, help="output folder of fit.py (holds refined.npz)")
    ap.add_argument("--cameras", required=True, type=Path, help="FMHR camera file (param.npz)")
    ap.add_argument("--out", required=True, type=Path, help="folder for <view>.png and <view>_mask.png")
    ap.add_argument("--size", type=parse_size, default=None, help="WxH image size of cameras without size_i")
    ap.add_argument("--scale", type=float, default=1.0, help="render at this fraction of each camera's size")
    ap.add_argument("--views", nargs="*", default=None, help="only these view ids (default: all in the file)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (nvdiffrast when available)")
    ap.add_argument("--renderer", choices=("neural", "shaded"), default=None,
                    help="neural (neural.pt) or shaded (refined.npz); default: neural when the run has it")
    ap.add_argument("--supersample", type=int, default=None,
                    help="samples per pixel side, box-filtered (1 = one sample with antialiasing); "
                         "default: the run's ham.supersample, what it was fitted with")
    return ap.parse_args(argv)


def run_offsets(run: Path) -> dict[str, list[float]]:
    """Camera corrections (original pixels) silhouette_fit estimated, by view id."""
    path = run / "metrics.json"
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text()).get("stages", {})
    return dict(stages.get("silhouette_fit", {}).get("camera_offsets_px") or {})


def run_supersample(run: Path) -> int:
    """The ``ham.supersample`` a run was fitted with (its conf.resolved.conf; 1 without one)."""
    path = run / "conf.resolved.conf"
    if not path.is_file():
        return 1
    from pyhocon import ConfigFactory

    return int(ConfigFactory.parse_file(str(path)).get("ham.supersample", 1))


def render_run(run: Path, cameras: dict[str, Camera], device: str = "cpu",
               offsets_px: dict[str, tuple[float, float]] | None = None,
               supersample: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{view: (shaded sRGB (H,W,3) on black, coverage (H,W) in [0,1])} for each camera;
    ``offsets_px`` principal-point corrections in the cameras' own pixels, by view."""
    from fitting.ham import render_views
    from renderer import make_context

    refined, lighting = load_refined(run / "refined.npz")
    if not refined:
        raise SystemExit(f"{run / 'refined.npz'} holds no refined hands")
    names = [str(v) for v in lighting.get("views", [])]
    sh_views = torch.as_tensor(np.asarray(lighting["sh"]), dtype=torch.float32) if "sh" in lighting else None
    sh_mean = torch.as_tensor(np.asarray(lighting["sh_mean"]), dtype=torch.float32)
    ctx = make_context("auto", device)
    sides = sorted(refined)
    verts = [torch.as_tensor(refined[s]["vertices"], dtype=torch.float32, device=ctx.device) for s in sides]
    faces = [torch.as_tensor(refined[s]["faces"], dtype=torch.long, device=ctx.device) for s in sides]
    albedo = [torch.as_tensor(refined[s]["albedo"], dtype=torch.float32, device=ctx.device) for s in sides]
    offsets_px = offsets_px or {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for hw, group in by_size(cameras).items():
        cams = [cameras[n] for n in group]
        sh = torch.stack([sh_views[names.index(n)] if (sh_views is not None and n in names) else sh_mean for n in group])
        off = None
        if any(n in offsets_px for n in group):
            off = torch.tensor([list(offsets_px.get(n, (0.0, 0.0))) for n in group], dtype=torch.float32,
                               device=ctx.device)
        rv = render_views(ctx, verts, faces, albedo, sh.to(ctx.device), cams, hw, off, supersample)
        for i, n in enumerate(group):  # the render is on black already (antialiased edges included)
            out[n] = (rv.shaded[i], rv.coverage[i])
    return out


def by_size(cameras: dict[str, Camera]) -> dict[tuple[int, int], list[str]]:
    """Camera names grouped by image size (H, W): one batched render per group."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, cam in cameras.items():
        groups.setdefault((cam.height, cam.width), []).append(name)
    return groups


def render_run_neural(run: Path, cameras: dict[str, Camera], device: str = "cpu",
                      offsets_px: dict[str, tuple[float, float]] | None = None,
                      supersample: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """As ``render_run`` with the neural stage's renderer (``<run>/neural.pt``)."""
    from export.neural import load_neural
    from fitting.neural import load_record, render_neural
    from renderer import make_context

    ctx = make_context("auto", device)
    net, verts, faces, albedo, sh = load_record(load_neural(run / "neural.pt"), ctx.device)
    offsets_px = offsets_px or {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for hw, group in by_size(cameras).items():
        off = torch.tensor([list(offsets_px.get(n, (0.0, 0.0))) for n in group], dtype=torch.float32, device=ctx.device)
        img, cov = render_neural(net, ctx, verts, faces, albedo, sh, [cameras[n] for n in group], hw, off,
                                 supersample=supersample)
        for i, n in enumerate(group):
            out[n] = (img[i], cov[i])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    renderer = args.renderer or ("neural" if (args.run / "neural.pt").is_file() else "shaded")
    needed = {"neural": ("neural.pt", "neural"), "shaded": ("refined.npz", "ham")}[renderer]
    if not (args.run / needed[0]).is_file():
        print(f"error: {args.run / needed[0]} not found; run fit.py with a conf that includes the {needed[1]} stage",
              file=sys.stderr)
        return 2
    if not args.scale > 0:
        print(f"error: --scale must be positive, got {args.scale}", file=sys.stderr)
        return 2
    if args.supersample is None:
        args.supersample = run_supersample(args.run)
    if not 1 <= args.supersample <= 8:
        print(f"error: --supersample must be 1..8, got {args.supersample}", file=sys.stderr)
        return 2
    try:
        cams = read_camera_file(args.cameras, args.size)
    except Exception as e:  # a bad camera file: one line, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.views:
        wanted = {f"{int(v):02d}" if str(v).isdigit() else str(v) for v in args.views}
        unknown = sorted(wanted - set(cams))
        if unknown:
            print(f"error: no camera(s) {unknown} in {args.cameras}; it has {sorted(cams)}", file=sys.stderr)
            return 2
        cams = {n: c for n, c in cams.items() if n in wanted}
    # the run's corrections are in pixels of the capture's images, i.e. of this file's cameras
    offsets = {n: (o[0] * args.scale, o[1] * args.scale) for n, o in run_offsets(args.run).items() if n in cams}
    if args.scale != 1.0:
        cams = {n: c.scaled(args.scale) for n, c in cams.items()}
    renders = (render_run_neural if renderer == "neural" else render_run)(args.run, cams, args.device, offsets,
                                                                           args.supersample)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (img, cov) in renders.items():
        write_image(args.out / f"{name}.png", img)
        write_image(args.out / f"{name}_mask.png", np.where(cov > 0.5, 255, 0).astype(np.uint8))
    print(f"rendered {len(renders)} views ({renderer}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
