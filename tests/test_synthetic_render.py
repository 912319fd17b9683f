"""Rendered synthetic scans: photos and masks agree with the written truth, detail where intended."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic
from capture.fmhr import read_fmhr
from renderer import make_context, render_mesh
from renderer.shading import sh_shading, vertex_normals
from scripts.make_synthetic_scan import main as make_scan_main
from synthetic.appearance import DISPLACEMENT_RANGE_MM, SKIN_HUES_DEG, linear_to_srgb
from synthetic.render import load_appearance, render_scan, subdivision

SIZE = (112, 96)
ARGS = ["--scan_id", "3", "--views", "3", "--size", f"{SIZE[0]}x{SIZE[1]}", "--seed", "4", "--texture_size", "128"]


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    assert make_scan_main(["--out", str(out)] + ARGS) == 0
    return out


@pytest.fixture(scope="module")
def rendered() -> synthetic.SyntheticScan:
    synth = synthetic.generate(views=2, size=(96, 80), seed=8)
    render_scan(synth, seed=8, texture_size=64, supersample=1)
    return synth


def test_scan_loads_with_images_masks_and_fine_truth(scan_dir: Path):
    scan = read_fmhr(scan_dir, 3)
    assert len(scan.views) == 3
    for v in scan.views:
        assert v.image is not None and v.image.shape == (SIZE[1], SIZE[0], 3)
        assert np.isfinite(v.image).all() and v.image.min() >= 0.0 and v.image.max() <= 1.0
        assert v.mask is not None and 0.01 < v.mask.mean() < 0.6
    syn = synthetic.read_synthetic(scan_dir, 3)
    app = load_appearance(scan_dir / "3")
    for side in ("left", "right"):
        # gt holds the fine mesh (2 Loop levels: 16x the faces), not the model's
        fine = app["hands"][side]
        assert syn.gt.faces[side].shape[0] == 16 * fine["base_faces"].shape[0]
        np.testing.assert_allclose(syn.gt.vertices[side], fine["vertices"])
        assert fine["texture"].shape == (128, 128, 3) and fine["albedo"].shape == (len(fine["vertices"]), 3)
    assert app["sh"].shape == (9, 3)


def test_masks_are_the_silhouettes_of_the_true_meshes(scan_dir: Path):
    scan = synthetic.read_synthetic(scan_dir, 3)
    sides = sorted(scan.gt.vertices)
    res = render_mesh(make_context("cpu"), [torch.as_tensor(scan.gt.vertices[s], dtype=torch.float32) for s in sides],
                      [torch.as_tensor(scan.gt.faces[s]) for s in sides], scan.cameras, (SIZE[1], SIZE[0]))
    for vi, view in enumerate(scan.views):
        sil = res.mesh_ids[vi].numpy() >= 0
        iou = (sil & view.mask).sum() / (sil | view.mask).sum()
        assert iou > 0.99, (view.name, iou)
    # and the base model's silhouette is not the same thing at this precision everywhere: the mask
    # would not tell fine from coarse if the test could not fail
    app = load_appearance(scan_dir / "3")
    base = render_mesh(make_context("cpu"), [torch.as_tensor(app["hands"][s]["base_vertices"], dtype=torch.float32)
                                             for s in sides], [torch.as_tensor(app["hands"][s]["base_faces"]) for s in sides],
                       scan.cameras, (SIZE[1], SIZE[0]))
    assert any(((base.mesh_ids[vi].numpy() >= 0) != v.mask).any() for vi, v in enumerate(scan.views))


def test_photos_are_shaded_albedo_in_linear_light_then_srgb(scan_dir: Path):
    """Interior pixels = sRGB(albedo x SH shading) of the true mesh, albedo and SH read from gt/."""
    scan = synthetic.read_synthetic(scan_dir, 3)
    app = load_appearance(scan_dir / "3")
    sides = sorted(app["hands"])
    verts = [torch.as_tensor(app["hands"][s]["vertices"], dtype=torch.float32) for s in sides]
    res = render_mesh(make_context("cpu"), verts, [torch.as_tensor(app["hands"][s]["faces"]) for s in sides],
                      scan.cameras, (SIZE[1], SIZE[0]),
                      albedo=[torch.as_tensor(app["hands"][s]["albedo"], dtype=torch.float32) for s in sides],
                      sh=torch.as_tensor(app["sh"], dtype=torch.float32))
    errs, wrong = [], []
    for vi, view in enumerate(scan.views):
        inner = (res.mask[vi].numpy() > 0.999) & view.mask
        # skip the inside of the wrist opening (drawn shadowed): surfaces facing away from the camera
        facing = res.normals[vi].numpy() @ scan.cameras[vi].R[2] < -0.05
        sel = inner & facing
        lin = res.images[vi].numpy()[sel]
        errs.append(np.abs(linear_to_srgb(lin) - view.image[sel]).mean(1))
        wrong.append(np.abs(lin - view.image[sel]).mean(1))  # forgetting the sRGB encoding
    e = np.concatenate(errs)
    assert len(e) > 200
    assert np.median(e) < 0.03, np.median(e)
    assert np.median(np.concatenate(wrong)) > 3 * np.median(e)


def test_backgrounds_are_not_skin_coloured(scan_dir: Path):
    scan = read_fmhr(scan_dir, 3)
    skin_hits, bg_hits, n_bg, n_skin = 0, 0, 0, 0
    for v in scan.views:
        bg = v.image[~v.mask][::7]
        hues = np.array([colorsys.rgb_to_hsv(*p)[0] * 360.0 for p in bg])
        bg_hits += int(((hues >= SKIN_HUES_DEG[0]) & (hues <= SKIN_HUES_DEG[1])).sum())
        n_bg += len(hues)
        fg = v.image[v.mask]
        fh = np.array([colorsys.rgb_to_hsv(*p)[0] * 360.0 for p in fg])
        skin_hits += int(((fh >= 0.0) & (fh <= 60.0) | (fh >= 340.0)).sum())
        n_skin += len(fh)
    assert bg_hits / n_bg < 0.01
    assert skin_hits / n_skin > 0.8


def test_same_seed_gives_identical_files(scan_dir: Path, tmp_path: Path):
    assert make_scan_main(["--out", str(tmp_path)] + ARGS) == 0
    a_root, b_root = scan_dir / "3", tmp_path / "3"
    files = sorted(p.relative_to(a_root) for p in a_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b_root) for p in b_root.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".npz":  # zip members carry a time stamp: compare the arrays
            with np.load(a_root / rel) as a, np.load(b_root / rel) as b:
                assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
        else:
            assert (a_root / rel).read_bytes() == (b_root / rel).read_bytes(), rel
    # another seed: other photos
    other = tmp_path / "other"
    assert make_scan_main(["--out", str(other)] + ARGS[:-4] + ["--seed", "5", "--texture_size", "128"]) == 0
    assert (other / "3" / "img" / "00.png").read_bytes() != (a_root / "img" / "00.png").read_bytes()


def _displacement_from_files(scan_dir: Path, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal displacement mm, tangential offset mm, smooth posed vertices) of the written fine mesh
    relative to the written base mesh subdivided the same way."""
    import handmodel

    app = load_appearance(scan_dir)
    h = app["hands"][side]
    levels = app["record"]["subdivision_levels"]
    sub = subdivision(handmodel.load("builtin", side=side), levels)
    smooth = sub.apply(torch.as_tensor(h["base_vertices"]))
    n = vertex_normals(smooth, sub.faces).numpy()
    d = (h["vertices"] - smooth.numpy()) * 1000.0
    normal = (d * n).sum(1)
    tangential = np.linalg.norm(d - normal[:, None] * n, axis=1)
    return normal, tangential, smooth.numpy()


def test_fine_mesh_differs_from_the_base_by_the_intended_displacement(scan_dir: Path):
    lo, hi = DISPLACEMENT_RANGE_MM
    for side in ("left", "right"):
        normal, tangential, _ = _displacement_from_files(scan_dir / "3", side)
        assert tangential.max() < 1e-3  # float32 PLY: along the normals only
        assert lo - 1e-3 <= normal.min() and normal.max() <= hi + 1e-3
        assert normal.min() < -0.3  # creases of a few tenths of a millimetre at least
        assert np.abs(normal).mean() > 0.02
        assert np.abs(normal).mean() < 0.3  # relief is low-amplitude: most skin is near the base surface


def test_crease_displacement_sits_at_the_joints(scan_dir: Path, rendered: synthetic.SyntheticScan):
    from synthetic.appearance import CREASE_JOINTS

    gt = synthetic.load_gt(scan_dir / "3")
    for side in ("left", "right"):
        normal, _, smooth = _displacement_from_files(scan_dir / "3", side)
        joints = gt.keypoints3d[side][list(CREASE_JOINTS)]
        dist = np.linalg.norm(smooth[:, None] - joints[None], axis=-1).min(1) * 1000.0  # mm to nearest crease joint
        deep = normal < -0.35  # deeper than the relief can go
        assert deep.sum() > 20
        assert np.percentile(dist[deep], 99) < 22.0, np.percentile(dist[deep], 99)
        assert (dist[deep] < 16.0).mean() > 0.9
    # the crease part alone (in memory): zero away from the joints, present at every crease joint
    for side, h in rendered.appearance.hands.items():
        J = h.joints[list(CREASE_JOINTS)]
        dist = np.linalg.norm(h.smooth_vertices[:, None] - J[None], axis=-1) * 1000.0
        assert (h.crease_mm[dist.min(1) > 25.0] == 0).all()
        for k, j in enumerate(CREASE_JOINTS):
            near = dist[:, k] < 15.0
            assert h.crease_mm[near].max() > 0.2, (side, j)


def test_texture_and_vertex_albedo_agree(rendered: synthetic.SyntheticScan):
    """The atlas texture sampled at a vertex's uv is that vertex's albedo (same procedural skin)."""
    for h in rendered.appearance.hands.values():
        T = h.texture.shape[0]
        uv2v = np.zeros(len(h.uv), np.int64)
        uv2v[h.uv_faces.reshape(-1)] = h.faces.reshape(-1)
        col = np.clip((h.uv[:, 0] * T).astype(int), 0, T - 1)
        row = np.clip(((1.0 - h.uv[:, 1]) * T).astype(int), 0, T - 1)
        diff = np.abs(h.texture[row, col] - h.albedo[uv2v]).mean(1)
        assert np.median(diff) < 0.02
        # the skin has visible detail: not one flat colour
        assert h.albedo.std(0).mean() > 0.01


def test_lighting_is_plausible(rendered: synthetic.SyntheticScan):
    light = rendered.appearance.lighting
    i = np.arange(500) + 0.5
    z = 1 - 2 * i / 500
    phi = np.pi * (1 + 5**0.5) * i
    dirs = torch.as_tensor(np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], 1))
    s = sh_shading(dirs, torch.as_tensor(light.sh)).numpy()
    assert s.min() > 0.0  # never negative light
    key = (dirs.numpy() @ light.key_direction).argmax()
    assert s[key].mean() > 2.0 * s.min(1).mean()  # a dominant key light, not a uniform glow
    assert light.key_direction[1] < 0  # from above (world y is down)


def test_rendering_leaves_the_keypoints_alone(rendered: synthetic.SyntheticScan):
    plain = synthetic.generate(views=2, size=(96, 80), seed=8)
    for a, b in zip(plain.scan.views, rendered.scan.views):
        assert a.image is None and b.image is not None
        for side in a.keypoints:
            np.testing.assert_array_equal(a.keypoints[side], b.keypoints[side])


def test_appearance_record(scan_dir: Path):
    rec = json.loads((scan_dir / "3" / "gt" / "appearance.json").read_text())
    assert rec["subdivision_levels"] == 2 and set(rec["hands"]) == {"left", "right"}
    base, palm = np.asarray(rec["skin"]["base"]), np.asarray(rec["skin"]["palm"])
    assert np.all((0 < base) & (base < 1)) and base[0] > base[1] > base[2]  # skin: red > green > blue
    assert palm.sum() >= base.sum()  # palms are lighter than the backs of the hands
    for side, h in rec["hands"].items():
        assert DISPLACEMENT_RANGE_MM[0] <= h["displacement_mm"]["min"] < -0.3


def test_embedded_demo_data_loads(repo_root: Path):
    """demo_data/1, the README's default input: 8 photos of two hands with masks and its truth."""
    root = repo_root / "demo_data"
    scan = synthetic.read_synthetic(root, 1)
    assert len(scan.views) == 8 and scan.sides == ("left", "right")
    for v in scan.views:
        assert v.image is not None and v.image.shape == (256, 320, 3) and v.mask is not None and v.mask.any()
    assert all(len(scan.gt.vertices[s]) > 16 * 1000 for s in scan.sides)  # the fine meshes
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 3.2e6


def test_highlights_peak_at_the_mirror_direction_and_vanish_unlit():
    from synthetic.render import highlights

    light = np.array([0.0, 0.0, 1.0])  # towards the light: +z
    cam = np.array([0.0, 0.0, 5.0])  # camera on the light's side
    pts = torch.zeros(3, 3)
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.6, 0.8], [0.0, 0.0, -1.0]])
    out = highlights(normals, pts, cam, (0.15, 30.0, [(light, np.array([1.0, 0.5, 0.25]))]))
    np.testing.assert_allclose(out[0].numpy(), [0.15, 0.075, 0.0375], rtol=1e-5)  # n = h: the full lobe
    assert 0 < out[1, 0] < 0.01  # 37 degrees off: cos^30 of that is ~0.001
    assert torch.all(out[2] == 0)  # facing away from the light
