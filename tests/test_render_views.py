"""scripts/render_views.py: a finished run rendered from the cameras of a param.npz gives the same
silhouettes as rendering its meshes directly, applies the run's camera corrections to the views
they belong to, shades fitted views with their SH and novel views with the mean SH."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import handmodel
from capture.camera import Camera
from export.texture import save_refined
from fitting import ham as HAM
from fitting import losses as Lo
from fitting.metrics import silhouette_iou
from renderer import make_context
from conftest import load_script
from test_silhouette_fit import ring_cameras, true_params


def _script():
    return load_script("render_views")


def _write_cameras(path: Path, cams: dict[int, Camera], with_size: bool = True) -> None:
    arrays = {}
    for i, c in cams.items():
        intr, ext = np.eye(4), np.eye(4)
        intr[:3, :3] = c.K
        ext[:3, :3], ext[:3, 3] = c.R, c.t
        arrays[f"int_{i}"], arrays[f"ext_{i}"], arrays[f"world_mat_{i}"] = intr, ext, intr @ ext
        if with_size:
            arrays[f"size_{i}"] = np.array([c.width, c.height])
    np.savez(path, **arrays)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, list, dict[int, Camera]]:
    """A run folder with one refined hand, per-view SH for views 00 and 01 and a camera
    correction of view 01, and a camera file with views 00, 01 and an unseen 05."""
    root = tmp_path_factory.mktemp("run")
    model = handmodel.load("builtin", "right")
    h = HAM.subdivide_hand(model, true_params(), 1, torch.device("cpu"))
    albedo = torch.full_like(h.base, 0.6)
    rec = {"vertices": h.base, "faces": h.faces, "albedo": albedo, "displacement": torch.zeros_like(h.base),
           "base_vertices": h.base, "uv": h.uv, "uv_faces": h.uv_faces, "skin_weights": h.skin_weights}
    sh = torch.zeros(2, 9, 3)
    sh[:, 0] = torch.tensor([[1.0], [3.0]]) * 2 * np.sqrt(np.pi) / 2  # view 01 twice as bright as 00
    save_refined(root / "refined.npz", {"right": rec}, {"sh": sh, "sh_mean": sh.mean(0), "views": ["00", "01"]})
    (root / "metrics.json").write_text(json.dumps(
        {"run": {"scale": 0.5}, "stages": {"silhouette_fit": {"camera_offsets_px": {"00": [0.0, 0.0], "01": [6.0, 0.0]}}}}))
    cams = ring_cameras(3, (120, 96), h.base.mean(0).numpy().astype(np.float64), dist=0.45, f=150.0)
    cams = {i: c for i, c in zip((0, 1, 5), cams)}
    _write_cameras(root / "param.npz", cams)
    return root, [h.base, h.faces], cams


def test_renders_every_camera_and_matches_direct_rendering(run_dir, tmp_path):
    root, (verts, faces), cams = run_dir
    mod = _script()
    assert mod.main(["--run", str(root), "--cameras", str(root / "param.npz"), "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00.png", "00_mask.png", "01.png", "01_mask.png", "05.png", "05_mask.png"]
    ctx = make_context("cpu")
    for i, name in ((0, "00"), (5, "05")):
        mask = np.asarray(Image.open(tmp_path / f"{name}_mask.png")) > 127
        with torch.no_grad():
            cov, _ = Lo.render_silhouette(ctx, Lo.merge([verts], [faces]), [cams[i]], (96, 120))
        assert mask.shape == (96, 120)
        assert silhouette_iou(mask, cov[0] > 0.5) > 0.99
        img = np.asarray(Image.open(tmp_path / f"{name}.png"))
        near = np.zeros_like(mask)  # the mask grown by a pixel: antialiased edges blend to black
        near[1:-1, 1:-1] = mask[:-2, 1:-1] | mask[2:, 1:-1] | mask[1:-1, :-2] | mask[1:-1, 2:] | mask[1:-1, 1:-1]
        assert (img[~near] == 0).all() and img[mask].mean() > 20  # shaded hand on black
    # view 01 carries the run's correction of +6 px (original pixels; the run's K is the file's)
    mask1 = np.asarray(Image.open(tmp_path / "01_mask.png")) > 127
    with torch.no_grad():
        plain, _ = Lo.render_silhouette(ctx, Lo.merge([verts], [faces]), [cams[1]], (96, 120))
        moved, _ = Lo.render_silhouette(ctx, Lo.merge([verts], [faces]), [cams[1]], (96, 120),
                                        offsets=torch.tensor([[6.0, 0.0]]))
    assert silhouette_iou(mask1, moved[0] > 0.5) > 0.99
    assert silhouette_iou(mask1, plain[0] > 0.5) < 0.95
    # lighting: view 01's SH is brighter than view 00's; the unseen view 05 gets their mean
    mean = {n: np.asarray(Image.open(tmp_path / f"{n}.png"), np.float64)[
        np.asarray(Image.open(tmp_path / f"{n}_mask.png")) > 127].mean() for n in ("00", "01", "05")}
    assert mean["00"] < mean["05"] < mean["01"]


def test_size_flag_scale_and_errors(run_dir, tmp_path):
    root, (verts, faces), cams = run_dir
    mod = _script()
    _write_cameras(tmp_path / "nosize.npz", cams, with_size=False)
    out = tmp_path / "out"
    # a file without size_i needs --size
    assert mod.main(["--run", str(root), "--cameras", str(tmp_path / "nosize.npz"), "--out", str(out)]) == 2
    assert mod.main(["--run", str(root), "--cameras", str(tmp_path / "nosize.npz"), "--out", str(out),
                     "--size", "120x96", "--scale", "0.5", "--views", "5"]) == 0
    mask = np.asarray(Image.open(out / "05_mask.png")) > 127
    assert mask.shape == (48, 60)
    ctx = make_context("cpu")
    with torch.no_grad():
        cov, _ = Lo.render_silhouette(ctx, Lo.merge([verts], [faces]), [cams[5].scaled(0.5)], (48, 60))
    assert silhouette_iou(mask, cov[0] > 0.5) > 0.97
    assert mod.main(["--run", str(tmp_path), "--cameras", str(root / "param.npz"), "--out", str(out)]) == 2
    assert mod.main(["--run", str(root), "--cameras", str(root / "param.npz"), "--out", str(out), "--views", "9"]) == 2


def test_neural_renderer_is_the_default_when_the_run_has_one(run_dir, tmp_path):
    """With ``neural.pt`` in the run, the default renders through the neural renderer (here one
    whose correction brightens every pixel by a known amount); ``--renderer shaded`` still gives
    the HAM shading; asking for neural on a run without it is an error."""

    from export.neural import save_neural
    from networks.neural_renderer import NeuralRenderer, NeuralRendererSpec

    root, (verts, faces), cams = run_dir
    run = tmp_path / "run"
    shutil.copytree(root, run)
    net = NeuralRenderer(len(verts), NeuralRendererSpec())
    with torch.no_grad():
        net.head.out.bias[3:].fill_(0.1)  # offset + 0.1 linear on every covered pixel
    sh = torch.zeros(9, 3)
    sh[0] = 2.0 * np.sqrt(np.pi) / 2
    save_neural(run / "neural.pt", {"renderer": net.to_record(), "sides": ["right"], "vertices": {"right": verts},
                                    "faces": {"right": faces}, "albedo": {"right": torch.full_like(verts, 0.6)},
                                    "sh": sh, "views": ["00", "01"]})
    mod = _script()
    outs = {}
    for name, extra in (("default", []), ("shaded", ["--renderer", "shaded"])):
        outs[name] = tmp_path / name
        assert mod.main(["--run", str(run), "--cameras", str(root / "param.npz"), "--out", str(outs[name]),
                         "--views", "5"] + extra) == 0
    masks = {k: np.asarray(Image.open(p / "05_mask.png")) > 127 for k, p in outs.items()}
    assert silhouette_iou(masks["default"], masks["shaded"]) > 0.99
    inner = masks["default"] & masks["shaded"]
    inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    img = {k: np.asarray(Image.open(p / "05.png"), np.float64)[inner] / 255.0 for k, p in outs.items()}
    # the neural image is albedo 0.6 x the (constant) irradiance of its SH + 0.1 everywhere, in sRGB
    from renderer.shading import sh_shading

    lin = 0.6 * float(sh_shading(torch.tensor([[0.0, 0.0, 1.0]]), sh)[0, 0]) + 0.1
    expect = 1.055 * lin ** (1 / 2.4) - 0.055
    assert abs(img["default"].mean() - expect) < 0.01 and img["default"].std() < 0.01
    assert abs(img["shaded"].mean() - img["default"].mean()) > 0.05
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    assert mod.main(["--run", str(plain), "--cameras", str(root / "param.npz"), "--out", str(tmp_path / "x"),
                     "--renderer", "neural"]) == 2


def test_supersampled_renders_agree_inside_and_soften_only_the_outline(run_dir, tmp_path):
    root = run_dir[0]
    mod = _script()
    args = ["--run", str(root), "--cameras", str(root / "param.npz"), "--views", "00", "--renderer", "shaded"]
    assert mod.main(args + ["--out", str(tmp_path / "one")]) == 0
    assert mod.main(args + ["--out", str(tmp_path / "four"), "--supersample", "4"]) == 0
    assert mod.main(args + ["--out", str(tmp_path / "bad"), "--supersample", "0"]) == 2
    one = np.asarray(Image.open(tmp_path / "one" / "00.png"), np.float64)
    four = np.asarray(Image.open(tmp_path / "four" / "00.png"), np.float64)
    m1 = np.asarray(Image.open(tmp_path / "one" / "00_mask.png")) > 127
    m4 = np.asarray(Image.open(tmp_path / "four" / "00_mask.png")) > 127
    assert silhouette_iou(m1, m4) > 0.95
    inner = m1.copy()
    inner[1:-1, 1:-1] = m1[:-2, 1:-1] & m1[2:, 1:-1] & m1[1:-1, :-2] & m1[1:-1, 2:] & m1[1:-1, 1:-1]
    inner[[0, -1]] = False
    inner[:, [0, -1]] = False
    assert np.abs(one[inner] - four[inner]).mean() < 3.0  # same shading inside (8-bit levels)
    assert (one != four).any()
    # without --supersample a run renders at the samples it was fitted with (its ham.supersample)
    fitted = tmp_path / "fitted"
    shutil.copytree(root, fitted)
    (fitted / "conf.resolved.conf").write_text("ham {\n  supersample = 4\n}\n")
    args[1] = str(fitted)
    assert mod.main(args + ["--out", str(tmp_path / "own")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "own" / "00.png"), np.float64), four)
