"""ham: inverse rendering recovers what a tiny rendered scene was made with; texture baking and
the refined-hand files round-trip through trimesh."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import handmodel
from capture.scan import GroundTruth, Scan, View
from fitting import ham as HAM
from fitting import losses as Lo
from fitting.masks import MaskConf
from fitting.state import State
import renderer as R
from renderer import make_context
from renderer.mesh_ops import loop_subdivide
from renderer.shading import vertex_normals
from test_silhouette_fit import ring_cameras, true_params


def _photos(ctx, verts, faces, albedo, sh, cams, hw):
    """sRGB photos (V,H,W,3) and masks (V,H,W) of a mesh, as a camera would see them."""
    with torch.no_grad():
        scene = Lo.merge([verts], [faces])
        out = Lo.render_shaded(ctx, scene, albedo, sh, cams, hw)
    return Lo.linear_to_srgb(out.image).numpy(), (out.coverage > 0.5).numpy()


def test_photometric_fit_recovers_sh_lighting_on_a_known_albedo_sphere():
    import trimesh

    ctx = make_context("cpu")
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    verts = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.as_tensor(sphere.faces, dtype=torch.long)
    albedo = torch.full((len(verts), 3), 0.55)
    albedo[:, 2] = 0.35
    true_sh = torch.zeros(9, 3)
    true_sh[0] = torch.tensor([2.4, 2.2, 2.0])  # ambient
    true_sh[1:4] = torch.tensor([[0.5, 0.45, 0.4], [-0.6, -0.5, -0.5], [0.3, 0.3, 0.2]])  # a key light
    true_sh[4:9] = torch.tensor([[0.15, 0.1, 0.1], [-0.1, -0.1, -0.05], [0.2, 0.15, 0.1], [0.05, 0.05, 0.0],
                                 [-0.1, -0.05, -0.05]])
    cams = ring_cameras(6, (64, 64), np.zeros(3), dist=0.3, f=90.0, elevation=0.4) + \
        ring_cameras(2, (64, 64), np.zeros(3), dist=0.3, f=90.0, elevation=-1.1)
    images, masks = _photos(ctx, verts, faces, albedo, true_sh, cams, (64, 64))
    scan = Scan([View(f"{i:02d}", c, image=images[i], mask=masks[i]) for i, c in enumerate(cams)], sides=("right",))
    mesh = HAM.plain_mesh(verts, faces)
    prob = HAM.Problem(scan, [mesh], ctx, MaskConf(), 1.0, torch.device("cpu"))
    cfg = HAM.HamConf(sh_per_view=False, lr_sh=0.05)
    unk = HAM.init_unknowns(prob, cfg)
    unk.albedo["right"] = albedo.clone()
    HAM.optimize_appearance(prob, unk, cfg, list(range(len(cams))), 100, "test sh", fixed_albedo=True)
    err = (unk.sh - true_sh).abs()
    assert float(err[0].max()) < 0.05  # ambient within 2 %
    assert float(err[1:4].max()) < 0.06  # the key light's direction and strength
    assert float(err.max()) < 0.12  # band 2 (attenuated to 1/4 by the Lambertian kernel)
    # and the initial (uniform) guess was far from it
    assert float((HAM.sh_ambient(1.0, rgb=True) - true_sh).abs().max()) > 0.5


def _displaced_hand(levels: int = 1):
    """True fine hand: the posed model subdivided and displaced along its normals by smooth
    bumps (+-2.5 mm) plus 1 mm of thickness; with a two-tone albedo."""
    model = handmodel.load("builtin", "right")
    p = true_params()
    with torch.no_grad():
        v = model.forward(p).vertices[0]
    sub = loop_subdivide(model.faces, model.num_vertices, levels)
    base = sub.apply(v)
    n = vertex_normals(base, sub.faces)
    c = base - base.mean(0)
    d = 0.001 + 0.0025 * torch.sin(c[:, 0] * 160.0) * torch.cos(c[:, 2] * 120.0)
    fine = base + d[:, None] * n
    albedo = torch.stack([0.75 + 0.1 * torch.sin(c[:, 1] * 90.0), 0.5 + 0.05 * torch.cos(c[:, 0] * 70.0),
                          0.4 * torch.ones(len(c))], -1).clamp(0, 1)
    return model, p, sub.faces, fine, albedo


@pytest.fixture(scope="module")
def ham_run():
    """HAM on a rendered hand with a known fine surface, albedo and SH; 6 views of 128x112."""
    ctx = make_context("cpu")
    model, p, faces, fine, albedo = _displaced_hand()
    sh = torch.zeros(9, 3)
    sh[0] = 2.6
    sh[2] = torch.tensor([-1.0, -0.9, -0.9])  # light from -z (the cameras' side)
    sh[1] = torch.tensor([-0.5, -0.5, -0.4])  # and from above (-y)
    target = fine.mean(0).numpy().astype(np.float64)
    cams = ring_cameras(6, (128, 112), target, dist=0.4, f=220.0, elevation=0.6)
    # one more camera, higher above the hand than the ring, held out of the fit (novel view)
    hc = ring_cameras(1, (128, 112), target, dist=0.4, f=220.0, elevation=1.0)[0]
    held_cam = type(hc)(hc.K, hc.R, hc.t, hc.width, hc.height, "10")
    images, masks = _photos(ctx, fine, faces, albedo, sh, cams + [held_cam], (112, 128))
    gt = GroundTruth(vertices={"right": fine.numpy().astype(np.float64)}, faces={"right": faces.numpy()})
    views = [View(c.name, c, image=images[i], mask=masks[i]) for i, c in enumerate(cams + [held_cam])]
    scan = Scan(views, sides=("right",), gt=gt).hold_out(["10"])
    st = State()
    st.params["right"] = p.detach()
    conf = {"device": "cpu", "data": {"scale": 1.0}, "hand_model": {"name": "builtin"}, "log": {"progress": False},
            "ham": {"levels": 1, "iterations_appearance": 40, "iterations_geometry": 120, "mask_update_every": 0}}
    st = HAM.run(scan, st, conf)
    return scan, st, fine, faces, cams


def test_ham_reduces_surface_and_normal_error_on_a_rendered_hand(ham_run):
    scan, st, fine, faces, cams = ham_run
    m = st.metrics["ham"]
    before, after = m["gt"]["input"], m["gt"]["after"]
    assert after["p2s_mm"] < 0.8 * before["p2s_mm"], (before, after)
    assert after["normal_error_deg"] < before["normal_error_deg"], (before, after)
    assert m["iou_mean"] > 0.9 and m["psnr_mean"] > 25.0
    rec = st.refined["right"]
    assert rec["vertices"].shape == (len(fine), 3) and rec["faces"].shape == faces.shape
    assert torch.isfinite(rec["vertices"]).all() and torch.isfinite(rec["albedo"]).all()
    assert rec["skin_weights"].shape == (len(fine), 16)
    assert torch.allclose(rec["skin_weights"].sum(1), torch.ones(len(fine)), atol=1e-4)
    assert st.lighting["sh"].shape == (6, 9, 3) and st.lighting["views"] == [c.name for c in cams]


def test_held_out_view_is_evaluated_with_the_mean_lighting(ham_run):
    """A view kept out of the fit is rendered with the refined hand and the fitted views' mean SH:
    it matches the photo it never saw, and its numbers sit under metrics["ham"]["holdout"]."""
    scan, st, fine, faces, cams = ham_run
    assert [v.name for v in scan.holdout] == ["10"] and "10" not in st.lighting["views"]
    m = st.metrics["ham"]
    assert "10" not in m["views"]
    h = m["holdout"]
    rec = h["views"]["10"]
    assert rec["region"] == "mask" and rec["status"] != "dropped"
    assert rec["iou"] > 0.9 and rec["iou_raw"] > 0.9 and rec["psnr"] > 22.0 and rec["ssim"] > 0.5
    assert h["psnr_mean"] == rec["psnr"] and h["iou_mean"] == rec["iou"] and h["ssim_mean"] == rec["ssim"]
    # the best per-channel gain can only bring the render closer to the photo
    assert rec["psnr_exposure_matched"] >= rec["psnr"] - 1e-6


def test_run_outputs_load_back_with_trimesh(ham_run, tmp_path):
    """write_outputs of a run with ham: textured OBJ/MTL/PNG, PLY, the two-hand scene, per-view
    images, metrics.json and report.html, all readable."""
    import json

    import trimesh

    from export.outputs import write_outputs
    from export.texture import load_refined

    scan, st, fine, faces, cams = ham_run
    st.metrics.setdefault("silhouette_fit", {"views": {c.name: {"iou": 0.9, "status": "ok"} for c in cams}})
    conf = {"device": "cpu", "data": {"scale": 1.0}, "hand_model": {"name": "builtin"}, "masks": {},
            "output": {"mesh_formats": ["obj", "ply"], "scene_format": "glb", "overlays": True, "report": True,
                       "texture_size": 128}}
    write_outputs(scan, st, conf, tmp_path, {"conf": "test", "scan_id": "t"})
    obj = trimesh.load(tmp_path / "hand_right_refined.obj", process=False, force="mesh")
    assert len(obj.faces) == len(faces) and obj.visual.material.image.size == (128, 128)
    ply = trimesh.load(tmp_path / "hand_right_refined.ply", process=False)
    assert np.allclose(ply.vertices, st.refined["right"]["vertices"].numpy(), atol=1e-6)
    scene = trimesh.load(tmp_path / "hands_refined.glb")
    assert isinstance(scene, trimesh.Scene) and len(scene.geometry) == 1
    refined, light = load_refined(tmp_path / "refined.npz")
    assert np.allclose(refined["right"]["vertices"], st.refined["right"]["vertices"].numpy())
    assert np.allclose(refined["right"]["displacement"], st.refined["right"]["displacement"].numpy())
    assert light["views"] == [c.name for c in cams]
    for kind in ("shaded", "albedo", "normals", "overlay_render"):
        assert all((tmp_path / "images" / "ham" / f"{kind}_{c.name}.png").is_file() for c in cams)
    assert all((tmp_path / "images" / "silhouette_fit" / f"silhouette_{c.name}.png").is_file() for c in cams)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stages"]["ham"]["views"]["00"]["psnr"] > 20
    html = (tmp_path / "report.html").read_text()
    assert "images/ham/shaded_00.png" in html and "per view after ham" in html


def test_subdivision_keeps_topology_family_and_carries_uvs():
    model = handmodel.load("builtin", "left")
    h = HAM.subdivide_hand(model, true_params(), 2, torch.device("cpu"))
    assert h.faces.shape[0] == 16 * model.faces.shape[0]
    assert h.uv_faces.shape == h.faces.shape
    assert float(h.uv.min()) >= 0.0 and float(h.uv.max()) <= 1.0
    # the same hand model gives the same subdivided topology (any pose)
    h2 = HAM.subdivide_hand(model, handmodel.HandParams.zeros(1), 2, torch.device("cpu"))
    assert torch.equal(h.faces, h2.faces)


def test_conf_rejects_bad_values():
    with pytest.raises(KeyError, match="unknown terms"):
        HAM.HamConf.from_conf({"ham": {"weights": {"photo": 1.0}}})
    with pytest.raises(ValueError, match="normal or free"):
        HAM.HamConf.from_conf({"ham": {"displacement": "along"}})
    with pytest.raises(ValueError, match="levels"):
        HAM.HamConf.from_conf({"ham": {"levels": 4}})
    with pytest.raises(ValueError, match="inpaint or black"):
        HAM.HamConf.from_conf({"ham": {"background": "photo"}})
    with pytest.raises(ValueError, match="supersample"):
        HAM.HamConf.from_conf({"ham": {"supersample": 0}})
    with pytest.raises(ValueError, match="photometric_eps"):
        HAM.HamConf.from_conf({"ham": {"photometric_eps": 0.0}})
    with pytest.raises(ValueError, match="albedo_fill_pixels must be >= 0"):
        HAM.HamConf.from_conf({"ham": {"albedo_fill_pixels": -1.0}})


# -------------------------------------------------------------------------------------- exports
def test_baked_texture_and_refined_files_round_trip_through_trimesh(tmp_path):
    import trimesh
    from PIL import Image

    from export.texture import bake_texture, linear_to_srgb_np, load_refined, save_refined, write_refined_hand

    model = handmodel.load("builtin", "right")
    h = HAM.subdivide_hand(model, true_params(), 1, torch.device("cpu"))
    c = h.base - h.base.mean(0)
    albedo = torch.stack([0.5 + 0.4 * torch.tanh(c[:, 0] * 30), 0.5 + 0.4 * torch.tanh(c[:, 1] * 30),
                          torch.full((len(c),), 0.3)], -1)
    rec = {"vertices": h.base, "faces": h.faces, "albedo": albedo, "displacement": torch.zeros_like(h.base),
           "base_vertices": h.base, "uv": h.uv, "uv_faces": h.uv_faces, "skin_weights": h.skin_weights}
    files = write_refined_hand(tmp_path, "right", rec, 256, ["obj", "ply"])
    assert {f.name for f in files} == {"hand_right_refined.obj", "hand_right_refined.mtl", "hand_right_refined.png",
                                       "hand_right_refined.ply"}
    tex = np.asarray(Image.open(tmp_path / "hand_right_refined.png").convert("RGB"), np.float64) / 255.0
    # every texel is filled (gutters dilated), and the texture at each vertex's uv is its albedo
    assert tex.shape == (256, 256, 3) and (tex.sum(-1) > 0).all()
    obj = trimesh.load(tmp_path / "hand_right_refined.obj", process=False, force="mesh")
    assert len(obj.faces) == len(h.faces)
    assert obj.visual.uv is not None and obj.visual.material.image is not None
    uv = np.asarray(obj.visual.uv)
    cols = tex[np.clip(((1 - uv[:, 1]) * 256).astype(int), 0, 255), np.clip((uv[:, 0] * 256).astype(int), 0, 255)]
    # trimesh splits vertices at UV seams: match each loaded vertex to its original by position
    from scipy.spatial import cKDTree

    _, idx = cKDTree(h.base.numpy()).query(np.asarray(obj.vertices))
    expect = linear_to_srgb_np(albedo.numpy()[idx])
    assert np.median(np.abs(cols - expect)) < 0.03
    ply = trimesh.load(tmp_path / "hand_right_refined.ply", process=False)
    assert np.allclose(ply.vertices, h.base.numpy(), atol=1e-6)
    assert np.abs(ply.visual.vertex_colors[:, :3] / 255.0 - linear_to_srgb_np(albedo.numpy())).max() < 0.005
    # bake_texture alone: a constant field bakes to that constant everywhere
    const = bake_texture(np.full((len(h.base), 3), 0.25), h.faces, h.uv, h.uv_faces, 64)
    assert np.allclose(const, 0.25, atol=1e-5)
    # refined.npz reloads exactly
    light = {"sh": torch.zeros(2, 9, 3), "sh_mean": torch.zeros(9, 3), "views": ["00", "03"]}
    save_refined(tmp_path / "refined.npz", {"right": rec}, light)
    back, lback = load_refined(tmp_path / "refined.npz")
    assert np.array_equal(back["right"]["faces"], h.faces.numpy())
    assert np.allclose(back["right"]["albedo"], albedo.numpy())
    assert lback["views"] == ["00", "03"] and lback["sh"].shape == (2, 9, 3)


def test_refined_files_refuse_nan(tmp_path):
    from export.atomic import NonFiniteError
    from export.texture import save_refined

    v = torch.zeros(3, 3)
    v[0, 0] = math.nan
    with pytest.raises(NonFiniteError):
        save_refined(tmp_path / "refined.npz", {"right": {"vertices": v}}, {})
    assert not (tmp_path / "refined.npz").exists()


def test_without_masks_silhouette_fit_passes_and_ham_uses_the_render_coverage():
    """A capture without segmentation (InterHand2.6M): nothing breaks, colour is still fitted."""
    from fitting import silhouette_fit as SF

    ctx = make_context("cpu")
    model, p, faces, fine, albedo = _displaced_hand()
    sh = torch.zeros(9, 3)
    sh[0] = 2.6
    cams = ring_cameras(3, (64, 56), fine.mean(0).numpy().astype(np.float64), dist=0.4, f=110.0)
    images, _ = _photos(ctx, fine, faces, albedo, sh, cams, (56, 64))
    scan = Scan([View(c.name, c, image=images[i], mask=None) for i, c in enumerate(cams)], sides=("right",))
    st = State()
    st.params["right"] = p.detach()
    conf = {"device": "cpu", "data": {"scale": 1.0}, "hand_model": {"name": "builtin"}, "log": {"progress": False},
            "ham": {"levels": 1, "iterations_appearance": 30, "iterations_geometry": 5}}
    st = SF.run(scan, st, conf)
    assert st.metrics["silhouette_fit"]["skipped"]
    st = HAM.run(scan, st, conf)
    m = st.metrics["ham"]
    assert all(v["region"] == "render" for v in m["views"].values())
    assert m["psnr_mean"] is not None and m["psnr_mean"] > 22.0
    assert "silhouette" not in m["losses"]["geometry"] and "contour" not in m["losses"]["geometry"]


# ------------------------------------------------------------------------- resume and bad input
def test_crash_in_ham_resumes_from_the_silhouette_fit_checkpoint(ham_run, tmp_path, monkeypatch):
    """A run that dies inside ham keeps silhouette_fit's checkpoint; the next run recomputes only
    ham, and a third run resumes both (the refined hands and lighting survive the checkpoint)."""
    from pathlib import Path

    from fitting import silhouette_fit as SF
    from fitting.conf import load_conf
    from fitting.pipeline import run_pipeline

    scan, st, fine, faces, cams = ham_run
    repo = Path(__file__).resolve().parents[1]
    tree = load_conf(repo / "conf" / "demo_sfs.conf", [
        "pipeline.stages=[silhouette_fit, ham]", "log.progress=false", "silhouette_fit.iterations=5",
        "ham.levels=1", "ham.iterations_appearance=5", "ham.iterations_geometry=5", "ham.iterations_final=2"]).tree
    calls: list[str] = []
    real_sf, real_ham = SF.run, HAM.run

    def counted(name, fn):
        def run(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return run

    def crash(*a, **k):
        calls.append("ham")
        raise RuntimeError("simulated crash inside ham")

    model = handmodel.load("builtin", "right")
    with torch.no_grad():
        joints = model.forward(st.params["right"]).joints[0].numpy().astype(np.float64)

    def start() -> State:
        """What the keypoint stages would leave: parameters and triangulated joints."""
        s = State()
        s.params["right"] = copy.deepcopy(st.params["right"])
        s.keypoints3d["right"] = joints
        s.keypoints3d_valid["right"] = np.ones(21, bool)
        return s

    monkeypatch.setattr(SF, "run", counted("silhouette_fit", real_sf))
    monkeypatch.setattr(HAM, "run", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(scan, tree, tmp_path, state=start())
    assert (tmp_path / "stages" / "00_silhouette_fit.pt").is_file()
    assert not (tmp_path / "stages" / "01_ham.pt").exists()
    monkeypatch.setattr(HAM, "run", counted("ham", real_ham))
    done = run_pipeline(scan, tree, tmp_path, state=start())
    assert calls == ["silhouette_fit", "ham", "ham"]  # silhouette_fit ran once
    again = run_pipeline(scan, tree, tmp_path, state=start())
    assert calls == ["silhouette_fit", "ham", "ham"]  # everything resumed
    assert torch.equal(again.refined["right"]["vertices"], done.refined["right"]["vertices"])
    assert torch.equal(again.lighting["sh"], done.lighting["sh"])
    assert again.metrics["ham"]["holdout"]["views"]["10"]["psnr"] == done.metrics["ham"]["holdout"]["views"]["10"]["psnr"]


def test_bad_input_gets_a_clear_error(ham_run):
    scan, st, fine, faces, cams = ham_run
    conf = {"device": "cpu", "data": {"scale": 1.0}, "hand_model": {"name": "builtin"}, "log": {"progress": False}}
    with pytest.raises(ValueError, match="needs fitted hands"):
        HAM.run(scan, State(), conf)
    blind = Scan([View(v.name, v.camera, image=None, mask=v.mask) for v in scan.views], sides=("right",))
    with pytest.raises(ValueError, match="needs photos"):
        HAM.run(blind, st, conf)
    with pytest.raises(ValueError, match="connected, proxy or both"):
        MaskConf.from_conf({"masks": {"forearm": "tube"}})
    with pytest.raises(ValueError, match="needs fitted hands"):
        from fitting import silhouette_fit as SF

        SF.run(scan, State(), conf)


def test_surface_no_fitted_view_saw_takes_its_albedo_and_features_from_around_it():
    """Six cameras above a hand never see its underside. Whatever albedo (and neural features)
    the fit left there (here: blue garbage) is replaced by the surface around it, close to the
    truth; vertices seen over many pixels keep theirs exactly. The seen-pixel count is the
    barycentric share of the weighted pixels: it sums to their total weight."""
    from fitting import neural as NR
    from networks.neural_renderer import NeuralRenderer, NeuralRendererSpec

    ctx = make_context("cpu")
    model, p, faces, fine, albedo = _displaced_hand()
    sh = torch.zeros(9, 3)
    sh[0] = 2.6
    cams = ring_cameras(6, (128, 112), fine.mean(0).numpy().astype(np.float64), dist=0.4, f=220.0, elevation=0.6)
    images, masks = _photos(ctx, fine, faces, albedo, sh, cams, (112, 128))
    scan = Scan([View(c.name, c, image=images[i], mask=masks[i]) for i, c in enumerate(cams)], sides=("right",))
    prob = HAM.Problem(scan, [HAM.plain_mesh(fine, faces)], ctx, MaskConf(), 1.0, torch.device("cpu"))
    unk = HAM.init_unknowns(prob, HAM.HamConf())

    seen = HAM.seen_pixels(prob, unk)
    with torch.no_grad():
        scene = prob.scene([fine])
        pos = Lo.clip_positions(scene.verts, cams)
        rast, _ = R.rasterize(ctx, pos, scene.tri, prob.hw, grad_db=False)
        weight = prob.photo_weight * ~Lo.back_facing(scene.verts, scene.tri, rast, cams)
    assert abs(float(seen.sum()) - float((weight * (rast[..., 3] > 0)).sum())) < 1e-2 * float(seen.sum())

    unseen, well_seen = seen < 0.01, seen > 3.0
    assert int(unseen.sum()) > 200 and int(well_seen.sum()) > 200
    garbage = torch.tensor([0.1, 0.2, 0.9])
    unk.albedo["right"] = albedo.clone()
    unk.albedo["right"][unseen] = garbage
    spec = NeuralRendererSpec(feature_dim=3)
    net = NeuralRenderer(len(fine), spec)
    with torch.no_grad():
        net.features.copy_(albedo)
        net.features[unseen] = garbage
    before = (unk.albedo["right"][unseen] - albedo[unseen]).abs().mean()
    HAM.fill_unseen_albedo(prob, unk, 3.0)
    after = (unk.albedo["right"][unseen] - albedo[unseen]).abs().mean()
    assert before > 0.3 and after < 0.1 * before, (before, after)
    assert torch.equal(unk.albedo["right"][well_seen], albedo[well_seen])
    # the neural stage's fill does the same to its vertex features (and the albedo again)
    NR.fill_unseen(prob, unk, net, 3.0)
    assert (net.features[unseen] - albedo[unseen]).abs().mean() < 0.1 * before
    assert torch.allclose(net.features[well_seen], albedo[well_seen])
    # 0 keeps every fitted value
    unk.albedo["right"][unseen] = garbage
    HAM.fill_unseen_albedo(prob, unk, 0.0)
    assert torch.equal(unk.albedo["right"][unseen], garbage.expand(int(unseen.sum()), 3))
