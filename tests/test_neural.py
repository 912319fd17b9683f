"""neural: gradients reach the features and the network (both heads), the renderer learns a known
appearance the Lambertian model lacks and beats HAM's shading on a held-out view, the stage
resumes from its checkpoint, the exporter writes its files, bad confs are errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import handmodel
from capture.scan import Scan, View
from fitting import losses as Lo
from fitting import neural as NR
from fitting.ham import box_down
from fitting.state import State
from networks.neural_renderer import NeuralRenderer, NeuralRendererSpec, PixelInputs, fibonacci_sphere, positional_encoding
from renderer import make_context
from renderer.mesh_ops import loop_subdivide
from test_silhouette_fit import ring_cameras, true_params

HW = (48, 64)


def _conf(**neural) -> dict:
    section = {"iterations": 150, "iterations_geometry": 4, "lr_network": 0.005}
    section.update(neural)
    return {"device": "cpu", "data": {"scale": 1.0}, "log": {"progress": False}, "neural": section,
            "ham": {"mask_update_every": 0}}


def _sh() -> torch.Tensor:
    sh = torch.zeros(9, 3)
    sh[0] = 2.6
    sh[2] = torch.tensor([-1.0, -0.9, -0.9])
    sh[1] = torch.tensor([-0.5, -0.5, -0.4])
    return sh


@pytest.fixture(scope="module")
def scene():
    """One hand (model mesh, one Loop level) in 7 views of 64x48, the last held out. The photos
    show a striped albedo times the SH shading plus a view-dependent rim brightening; the HAM
    state the stage starts from has the right mesh and light but a stripe-less albedo, so the
    shaded render misses both and the neural renderer can learn them."""
    torch.manual_seed(0)
    model = handmodel.load("builtin", "right")
    with torch.no_grad():
        v0 = model.forward(true_params()).vertices[0]
    sub = loop_subdivide(model.faces, model.num_vertices, 1)
    verts, faces = sub.apply(v0), sub.faces
    c = verts - verts.mean(0)
    base = torch.tensor([0.62, 0.42, 0.33]).expand(len(verts), 3)
    stripes = 0.5 + 0.5 * torch.sin(c[:, 0] * 250.0)[:, None] * torch.tensor([1.0, 0.8, 0.7])
    albedo = (base * (0.6 + 0.6 * stripes)).clamp(0, 1)
    sh = _sh()
    cams = ring_cameras(7, (HW[1], HW[0]), verts.mean(0).numpy().astype(np.float64), dist=0.4, f=110.0, elevation=0.6)
    ctx = make_context("cpu")
    with torch.no_grad():
        sc = Lo.merge([verts], [faces])
        fr = NR.make_frame(ctx, sc, cams, HW)
        net = NeuralRenderer(len(verts), NeuralRendererSpec())
        x = NR.pixel_inputs(net, fr, sc.verts, sc.tri, albedo, sh)
        rim = 0.25 * (1.0 - (x.normal * -x.normal.new_tensor([0.0, 0.0, 1.0])).sum(-1).abs()) ** 2
        img, cov = NR.image_of(fr, x.lambertian + rim[:, None], sc, ctx)
    photos, masks = Lo.linear_to_srgb(img).numpy(), (cov > 0.5).numpy()
    views = [View(cm.name, cm, image=photos[i], mask=masks[i]) for i, cm in enumerate(cams)]
    scan = Scan(views, sides=("right",), scan_id="t", source="test").hold_out([cams[-1].name])
    st = State()
    st.refined["right"] = {"vertices": verts.clone(), "faces": faces.clone(), "albedo": base.clone()}
    fitted = [cm.name for cm in cams[:-1]]
    st.lighting = {"sh": sh.expand(len(fitted), 9, 3).clone(), "sh_mean": sh.clone(), "views": fitted}
    return scan, st, verts, faces


@pytest.fixture(scope="module")
def trained(scene):
    scan, st, _, _ = scene
    torch.manual_seed(0)
    # no pull towards the Lambertian colour: the scene's stripes and rim are real departures
    return NR.run(scan, copy.deepcopy(st), _conf(weights={"photometric": 1.0, "feature_smooth": 0.01, "correction": 0.0}))


# --------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_gradients_reach_features_network_and_geometry(scene, kind):
    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    v = verts.clone().requires_grad_(True)
    albedo = st.refined["right"]["albedo"].clone().requires_grad_(True)
    net = NeuralRenderer(len(verts), NeuralRendererSpec(kind=kind, unet_channels=4))
    with torch.no_grad():  # a non-zero last layer, so the gradient passes through it
        net.head.out.weight.normal_(0, 0.1)
    sc = Lo.Scene(v, faces.to(torch.int32), [0, len(verts)])
    fr = NR.make_frame(ctx, sc, [vw.camera for vw in scan.views[:2]], HW, multiple=net.spec.multiple)
    rgb = NR.shade_pixels(net, fr, NR.pixel_inputs(net, fr, v, sc.tri, albedo, _sh()))
    img, cov = NR.image_of(fr, rgb, sc, ctx)
    assert img.shape == (2, *HW, 3) and torch.isfinite(img).all()
    (img ** 2).sum().backward()
    seen = torch.unique(fr.tri)
    assert net.features.grad[seen].abs().sum(1).gt(0).float().mean() > 0.9  # every visible vertex learns
    assert net.features.grad.abs().sum() > 0
    body = [p for n, p in net.head.named_parameters() if not n.startswith("out")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body)
    assert net.head.out.weight.grad.abs().sum() > 0
    assert v.grad[seen].abs().sum() > 0 and albedo.grad[seen].abs().sum() > 0


def test_untrained_renderer_is_the_lambertian_render(scene):
    """The zero-initialised correction: before training the neural image is HAM's shading."""
    from fitting.ham import render_views

    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    cams = [vw.camera for vw in scan.views[:3]]
    for kind in ("mlp", "unet"):
        net = NeuralRenderer(len(verts), NeuralRendererSpec(kind=kind))
        img, cov = NR.render_neural(net, ctx, [verts], [faces], [st.refined["right"]["albedo"]], _sh(), cams, HW)
        rv = render_views(ctx, [verts], [faces], [st.refined["right"]["albedo"]], _sh().expand(3, 9, 3), cams, HW)
        assert np.abs(img - rv.shaded).max() < 1e-5 and np.abs(cov - rv.coverage).max() < 1e-6


def test_positional_encoding_and_spec_round_trip():
    x = torch.tensor([[0.25, -0.5, 1.0]])
    pe = positional_encoding(x, 2)
    assert pe.shape == (1, 12)
    assert torch.allclose(pe[0, :3], torch.sin(np.pi * x[0]), atol=1e-6)
    assert positional_encoding(x, 0).shape == (1, 0)
    net = NeuralRenderer(10, NeuralRendererSpec(kind="unet", unet_depth=1))
    with torch.no_grad():
        net.features.normal_()
    back = NeuralRenderer.from_record(net.to_record())
    assert back.spec == net.spec and torch.equal(back.features, net.features)
    with pytest.raises(ValueError, match="multiples of 2"):
        z = torch.zeros(1, 5, 6, 1)
        back(PixelInputs(z.expand(1, 5, 6, 8), z.expand(1, 5, 6, 3), z.expand(1, 5, 6, 3), z.expand(1, 5, 6, 3),
                         z.expand(1, 5, 6, 3), z))


def test_confidence_follows_what_the_fitted_views_saw(scene):
    """Vertices no fitted view sees get confidence 0 and render as the Lambertian colour
    whatever the network learned; squarely seen ones get 1."""
    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    sc = Lo.merge([verts], [faces])
    fr = NR.make_frame(ctx, sc, [scan.views[0].camera], HW)
    conf = NR.observation_confidence(fr, torch.ones(len(fr.index)), len(verts), 2.0)
    seen = torch.zeros(len(verts), dtype=torch.bool)
    seen[fr.tri.reshape(-1)] = True
    assert conf.shape == (len(verts), 1) and float(conf[~seen].abs().max()) == 0.0
    assert float(conf[seen].max()) == 1.0 and float(conf.min()) >= 0.0
    assert torch.equal(NR.observation_confidence(fr, torch.ones(len(fr.index)), len(verts), 0.0),
                       torch.ones(len(verts), 1))
    net = NeuralRenderer(len(verts), NeuralRendererSpec())
    with torch.no_grad():
        net.head.out.bias[3:].fill_(0.2)
        net.confidence.copy_(conf)
    x = NR.pixel_inputs(net, fr, sc.verts, sc.tri, st.refined["right"]["albedo"], _sh())
    out = NR.shade_pixels(net, fr, x)
    full = (conf[fr.tri].squeeze(-1).min(1).values == 1.0).float()
    assert torch.allclose(out[full > 0], x.lambertian[full > 0] + 0.2, atol=1e-5)
    assert (out <= x.lambertian + 0.2 + 1e-5).all()


# ------------------------------------------------------------------------------------------ stage
def test_renderer_learns_the_appearance_and_beats_shading_on_the_held_out_view(trained):
    m = trained.metrics["neural"]
    ho, tr = m["holdout"], m["train"]
    assert list(ho["views"]) == ["06"] and ho["views"]["06"]["status"] != "dropped"
    assert ho["views"]["06"]["pixels"] > 300
    # the photos hold stripes and a rim the shaded render cannot show: the neural render can
    assert tr["neural_psnr_mean"] > tr["shaded_psnr_mean"] + 3.0, tr
    assert ho["neural_psnr_mean"] > ho["shaded_psnr_mean"] + 2.0, ho
    assert ho["neural_ssim_mean"] > ho["shaded_ssim_mean"], ho
    assert m["losses"]["appearance"]["photometric"] < 0.02
    rec = trained.neural
    assert rec["vertices"]["right"].shape == rec["albedo"]["right"].shape
    assert torch.isfinite(rec["vertices"]["right"]).all() and 0 < m["displacement_mm"]["right"] < 1.0
    conf = rec["renderer"]["weights"]["confidence"]
    assert conf.shape == (len(rec["vertices"]["right"]), 1) and 0.0 < float(conf.mean()) < 1.0


def test_correction_weight_keeps_the_render_near_the_lambertian_colour(scene, trained):
    """The penalty on the departure from HAM's shading shrinks the learnt correction."""
    scan, st, _, _ = scene
    torch.manual_seed(0)
    held = NR.run(scan, copy.deepcopy(st), _conf(iterations_geometry=0,
                                                 weights={"photometric": 1.0, "feature_smooth": 0.01, "correction": 50.0}))

    def departure(state):
        tr = state.metrics["neural"]["train"]
        return np.mean([abs(v["neural"]["psnr"] - v["shaded"]["psnr"]) for v in tr["views"].values()])

    assert departure(held) < 0.5 * departure(trained), (departure(held), departure(trained))
    assert held.metrics["neural"]["losses"]["appearance"]["correction"] > 0


def test_unet_renderer_trains(scene):
    scan, st, _, _ = scene
    torch.manual_seed(0)
    out = NR.run(scan, copy.deepcopy(st), _conf(renderer="unet", unet_channels=8, unet_depth=1, iterations=80,
                                                 iterations_geometry=0, lr_network=0.01, view_inputs=True))
    tr = out.metrics["neural"]["train"]
    assert tr["neural_psnr_mean"] > tr["shaded_psnr_mean"] + 1.0, tr
    assert out.neural["renderer"]["spec"]["kind"] == "unet"


def test_stage_resumes_from_its_checkpoint_and_the_exporter_writes_its_files(scene, tmp_path, monkeypatch):
    """A crash in neural keeps ham's checkpoint; the rerun computes only neural; a third run
    resumes everything and its renderer draws the same images; outputs hold the neural files."""
    from fitting.conf import load_conf
    from fitting.pipeline import REGISTRY, StageSpec, run_pipeline
    from export.outputs import write_outputs
    from export.neural import export_neural, load_neural
    from pathlib import Path

    scan, st, verts, faces = scene
    repo = Path(__file__).resolve().parents[1]
    tree = load_conf(repo / "conf" / "demo_neural.conf", [
        "pipeline.stages=[ham, neural]", "log.progress=false", "device=cpu", "data.holdout_views=[]",
        "neural.iterations=20", "neural.iterations_geometry=2", "ham.mask_update_every=0"]).tree
    calls: list[str] = []

    def fake_ham(scan, state, conf):  # the ham stage's outputs, as the fixture made them
        calls.append("ham")
        state.refined = copy.deepcopy(st.refined)
        state.lighting = copy.deepcopy(st.lighting)
        return state

    def crash(*a, **k):
        calls.append("neural")
        raise RuntimeError("simulated crash inside neural")

    def counted(*a, **k):
        calls.append("neural")
        return NR.run(*a, **k)

    reg = {"ham": StageSpec("ham", fake_ham), "neural": StageSpec("neural", crash, REGISTRY["neural"].conf_sections)}
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(scan, tree, tmp_path, registry=reg)
    assert (tmp_path / "stages" / "00_ham.pt").is_file() and not (tmp_path / "stages" / "01_neural.pt").exists()
    reg["neural"] = StageSpec("neural", counted, REGISTRY["neural"].conf_sections)
    done = run_pipeline(scan, tree, tmp_path, registry=reg)
    assert calls == ["ham", "neural", "neural"]
    again = run_pipeline(scan, tree, tmp_path, registry=reg)
    assert calls == ["ham", "neural", "neural"]  # resumed
    assert torch.equal(again.neural["renderer"]["weights"]["features"], done.neural["renderer"]["weights"]["features"])
    assert again.metrics["neural"]["holdout"]["neural_psnr_mean"] == done.metrics["neural"]["holdout"]["neural_psnr_mean"]
    ctx = make_context("cpu")
    cams = [scan.holdout[0].camera]
    imgs = []
    for s in (done, again):
        net, v, f, a, sh = NR.load_record(s.neural)
        imgs.append(NR.render_neural(net, ctx, v, f, a, sh, cams, HW)[0])
    assert np.array_equal(imgs[0], imgs[1])
    out = tmp_path / "out"
    write_outputs(scan, again, tree, out, {"conf": "t", "scan_id": "t"}, exporters=[export_neural])
    names = sorted(p.name for p in (out / "images" / "neural").iterdir())
    assert "neural_06.png" in names and "compare_06.png" in names and "neural_00.png" in names
    rec = load_neural(out / "neural.pt")
    assert torch.equal(rec["renderer"]["weights"]["features"], again.neural["renderer"]["weights"]["features"])
    assert "neural renderer" in (out / "report.html").read_text()


def test_bad_conf_and_input_are_errors(scene):
    scan, st, _, _ = scene
    with pytest.raises(ValueError, match="neural.renderer must be one of"):
        NR.NeuralConf.from_conf({"neural": {"renderer": "cnn"}})
    with pytest.raises(KeyError, match="unknown terms"):
        NR.NeuralConf.from_conf({"neural": {"weights": {"perceptual": 1.0}}})
    with pytest.raises(ValueError, match="feature_dim must be >= 1"):
        NR.NeuralConf.from_conf({"neural": {"feature_dim": 0}})
    with pytest.raises(ValueError, match="subdivide must be 0..2"):
        NR.NeuralConf.from_conf({"neural": {"subdivide": 3}})
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        NR.NeuralConf.from_conf({"neural": {"iterations": -1}})
    with pytest.raises(ValueError, match="fill_pixels must be >= 0"):
        NR.NeuralConf.from_conf({"neural": {"fill_pixels": -0.5}})
    with pytest.raises(KeyError, match="unknown key"):
        NeuralRendererSpec.from_dict({"kind": "mlp", "depth": 3})
    with pytest.raises(ValueError, match="needs the ham stage"):
        NR.run(scan, State(), _conf())
    from fitting.conf import ConfError, load_conf
    from pathlib import Path

    with pytest.raises(ConfError, match="neural.lr_netwrk"):
        load_conf(Path(__file__).resolve().parents[1] / "conf" / "demo_neural.conf", ["neural.lr_netwrk=0.1"])


# ----------------------------------------------------------------------------------- specular
def test_specular_lobes_start_dark_and_evaluate_spherical_gaussians():
    axes = fibonacci_sphere(8)
    assert torch.allclose(axes.norm(dim=1), torch.ones(8), atol=1e-6)
    assert float((axes @ axes.t() - 2 * torch.eye(8)).max()) < 0.8  # spread: no two within ~37 degrees
    net = NeuralRenderer(4, NeuralRendererSpec(specular_lobes=1, specular_model="reflection"))
    r = torch.nn.functional.normalize(torch.randn(50, 3), dim=1)
    assert torch.equal(net.specular(r), torch.zeros(50, 3))  # the weight starts at 0: HAM's shading
    with torch.no_grad():
        net.lobe_axis.copy_(torch.tensor([[0.0, 0.0, 2.0]]))  # normalised in use
        net.lobe_sharpness.fill_(10.0)
        net.lobe_log_amplitude.copy_(torch.log(torch.tensor([[0.5, 0.25, 0.125]])))
        net.specular_weight.fill_(2.0)
    expect = 2.0 * torch.exp(10.0 * (r[:, 2:3] - 1.0)) * torch.tensor([0.5, 0.25, 0.125])
    assert torch.allclose(net.specular(r), expect, atol=1e-6)
    assert torch.equal(NeuralRenderer(4, NeuralRendererSpec(specular_lobes=0)).specular(r), torch.zeros(50, 3))
    back = NeuralRenderer.from_record(net.to_record())
    assert torch.allclose(back.specular(r), expect, atol=1e-6)
    # a record written before the lobes existed has no such key: it loads without lobes
    old = NeuralRendererSpec.from_dict({k: v for k, v in NeuralRendererSpec().to_dict().items() if k != "specular_lobes"})
    assert old.specular_lobes == 0
    # nor, before the half-vector lobes, a lobe model: its lobes were over the reflected ray
    old = NeuralRendererSpec.from_dict({k: v for k, v in NeuralRendererSpec().to_dict().items() if k != "specular_model"})
    assert old.specular_model == "reflection"
    with pytest.raises(ValueError, match="specular_model"):
        NeuralRendererSpec(specular_model="phong").validate()


def test_half_vector_lobes_are_blinn_phong_lights():
    """A half-vector lobe is a light: a exp(s (n.h - 1)) with h between the direction to the
    camera and the light, where the light reaches the surface; brightest where the normal is the
    half vector, wherever the camera is."""
    net = NeuralRenderer(4, NeuralRendererSpec(specular_lobes=1))
    assert net.spec.specular_model == "half_vector" and float(net.lobe_sharpness.detach()) == 8.0
    light = torch.nn.functional.normalize(torch.tensor([0.3, -0.2, 1.0]), dim=0)
    with torch.no_grad():
        net.lobe_axis.copy_(3.0 * light[None])
        net.lobe_sharpness.fill_(30.0)
        net.lobe_log_amplitude.copy_(torch.log(torch.tensor([[0.5, 0.25, 0.125]])))
        net.specular_weight.fill_(2.0)
    gen = torch.Generator().manual_seed(3)
    n = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(200, 3, generator=gen), dim=1)
    v = torch.where((v * n).sum(1, keepdim=True) < 0, v, -v)  # camera -> point, on the front side
    r = v - 2 * (v * n).sum(1, keepdim=True) * n
    h = torch.nn.functional.normalize(light - v, dim=1)
    lit = ((n @ light) > 0).float()[:, None]
    expect = 2.0 * lit * torch.exp(30.0 * ((n * h).sum(1, keepdim=True) - 1.0)) * torch.tensor([0.5, 0.25, 0.125])
    assert torch.allclose(net.specular(r, v), expect, atol=1e-5)
    assert float(expect.max()) > 0.05 and float((lit == 0).sum()) > 20  # some lit highlights, some unlit points
    # the peak: a normal halfway between the direction to the camera and the light, from any camera
    for cam in (torch.tensor([0.0, 0.0, 1.0]), torch.nn.functional.normalize(torch.tensor([-0.8, 0.1, 0.3]), dim=0)):
        hn = torch.nn.functional.normalize(cam + light, dim=0)[None]
        vv = -cam[None]
        rr = vv - 2 * (vv * hn).sum(1, keepdim=True) * hn
        assert torch.allclose(net.specular(rr, vv), torch.tensor([[1.0, 0.5, 0.25]]), atol=1e-5)
    with pytest.raises(ValueError, match="view directions"):
        net.specular(r)
    # lights add light: after a step that took the weight below 0 it is projected back to 0
    with torch.no_grad():
        net.specular_weight.fill_(-0.5)
    net.project_()
    assert float(net.specular_weight.detach()) == 0.0 and torch.equal(net.specular(r, v), torch.zeros(200, 3))


def test_confidence_damps_the_head_but_not_the_highlights():
    """A pixel of confidence c gets L + c * (head's correction) + specular; a record written
    before ``damp_specular`` existed keeps damping the specular term too."""
    net = NeuralRenderer(4, NeuralRendererSpec(specular_lobes=1, view_inputs=False, specular_model="reflection"))
    with torch.no_grad():
        net.head.out.bias[3:].fill_(0.1)  # offset 0.1 on every channel
        net.lobe_axis.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
        net.lobe_sharpness.fill_(5.0)
        net.lobe_log_amplitude.fill_(0.0)
        net.specular_weight.fill_(0.3)
    P = 20
    gen = torch.Generator().manual_seed(0)
    r = torch.nn.functional.normalize(0.3 * torch.randn(P, 3, generator=gen) + torch.tensor([0.0, 0.0, 1.0]), dim=1)
    lam = torch.full((P, 3), 0.4)
    c = torch.linspace(0.0, 1.0, P)[:, None]
    x = PixelInputs(torch.zeros(P, 8), lam, lam, torch.zeros(P, 3), torch.zeros(P, 3), torch.zeros(P, 1), c, r)
    spec = net.specular(r).detach()
    assert float(spec.min()) > 0.01
    assert torch.allclose(net(x), lam + 0.1 * c + spec, atol=1e-6)
    spec_dict = {k: v for k, v in net.spec.to_dict().items() if k != "damp_specular"}
    rec = {"spec": spec_dict, "weights": net.to_record()["weights"]}
    old = NeuralRenderer.from_record(rec)
    assert old.spec.damp_specular
    assert torch.allclose(old(x), lam + c * (0.1 + spec), atol=1e-6)


def test_specular_lobes_learn_a_highlight_that_carries_to_the_held_out_view(scene):
    """Photos = the Lambertian render plus a highlight of a distant light (a lobe around one world
    direction of the reflected view ray); the HAM state has the right albedo and light, so the
    shaded render misses only the highlight. The lobes learn it from the fitted views and draw it
    in the held-out one; without lobes the (view-independent) head cannot."""
    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    cams = [vw.camera for vw in scan.views] + [vw.camera for vw in scan.holdout]
    centre = verts.mean(0).double().numpy()
    light = torch.tensor(cams[3].center - centre, dtype=torch.float32)  # every view then shows a highlight
    light = light / light.norm()
    albedo = st.refined["right"]["albedo"]
    with torch.no_grad():
        sc = Lo.merge([verts], [faces])
        fr = NR.make_frame(ctx, sc, cams, HW)
        x = NR.pixel_inputs(NeuralRenderer(len(verts), NeuralRendererSpec()), fr, sc.verts, sc.tri, albedo, _sh())
        highlight = 0.3 * torch.exp(12.0 * ((x.reflection @ light)[:, None] - 1.0)).expand(-1, 3)
        img, cov = NR.image_of(fr, x.lambertian + highlight, sc, ctx)
    photos = Lo.linear_to_srgb(img).numpy()
    views = [View(c.name, c, image=photos[i], mask=(cov[i] > 0.5).numpy()) for i, c in enumerate(cams)]
    shiny = Scan(views, sides=("right",), scan_id="t", source="test").hold_out([cams[-1].name])
    held = {}
    for lobes in (8, 0):
        torch.manual_seed(0)
        out = NR.run(shiny, copy.deepcopy(st), _conf(iterations_geometry=0, specular_lobes=lobes))
        held[lobes] = out.metrics["neural"]["holdout"]
    assert held[8]["neural_psnr_mean"] > held[8]["shaded_psnr_mean"] + 5.0, held[8]  # measured 36.0 vs 27.3
    assert held[8]["neural_psnr_mean"] > held[0]["neural_psnr_mean"] + 5.0, (held[8], held[0])  # 36.0 vs 27.9
    w = out.neural["renderer"]["weights"]
    assert "lobe_axis" not in w  # the last run had none


# ----------------------------------------------------------------------------- samples per pixel
def test_supersampled_frames_pool_their_samples_into_their_pixels(scene):
    """A frame at s x s samples per pixel: the neural render is the box filter of the render at s
    times the size, phase 1's pixels have their s^2 samples, all inside them, ordered pixel by pixel."""
    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    cams = [vw.camera for vw in scan.views[:2]]
    net = NeuralRenderer(len(verts), NeuralRendererSpec())
    torch.manual_seed(1)
    with torch.no_grad():
        net.head.out.weight.normal_(0, 0.2)
        net.features.normal_(0, 1.0)
    alb = [st.refined["right"]["albedo"]]
    img2, cov2 = NR.render_neural(net, ctx, [verts], [faces], alb, _sh(), cams, HW, supersample=2)
    big, bcov = NR.render_neural(net, ctx, [verts], [faces], alb, _sh(), [c.scaled(2) for c in cams],
                                 (2 * HW[0], 2 * HW[1]))
    np.testing.assert_allclose(img2, box_down(big, 2, srgb=True), atol=2e-5)
    np.testing.assert_allclose(cov2, box_down(bcov, 2), atol=1e-6)

    prob = SimpleNamespace(ctx=ctx, hw=HW, off=lambda views: None, photo_weight=torch.ones(2, *HW))
    sc = Lo.merge([verts], [faces])
    cfg = NR.NeuralConf()
    fr, pix, w = NR.interior_samples(prob, sc, cams, [0, 1], net, cfg, 2)
    assert fr.s == 2 and len(fr.index) == 4 * len(pix) and (w > 0).all() and len(pix) > 200
    rem = fr.index % (4 * HW[0] * HW[1])
    y, x = rem // (2 * HW[1]) // 2, (rem % (2 * HW[1])) // 2
    assert torch.equal(fr.view * HW[0] * HW[1] + y * HW[1] + x, pix.repeat_interleave(4))
    one, pix1, w1 = NR.interior_samples(prob, sc, cams, [0, 1], net, cfg, 1)
    assert torch.equal(pix1, one.index) and set(pix.tolist()) <= set(pix1[w1 > 0].tolist())


def test_fitting_with_samples_per_pixel_fits_photos_that_integrate_their_pixels(scene):
    """Photos formed as a camera forms them (each pixel the mean over its area): the stage fitted
    at 2 x 2 samples per pixel (ham.supersample) reproduces them, fitted and held-out views,
    better than at one sample plus antialiasing."""
    scan, st, verts, faces = scene
    ctx = make_context("cpu")
    cams = [vw.camera for vw in scan.views]
    with torch.no_grad():
        sc = Lo.merge([verts], [faces])
        fr = NR.make_frame(ctx, sc, cams, HW, supersample=4)
        net = NeuralRenderer(len(verts), NeuralRendererSpec())
        c = verts - verts.mean(0)
        stripes = 0.5 + 0.5 * torch.sin(c[:, 0] * 250.0)[:, None] * torch.tensor([1.0, 0.8, 0.7])
        albedo = (st.refined["right"]["albedo"] * (0.6 + 0.6 * stripes)).clamp(0, 1)
        x = NR.pixel_inputs(net, fr, sc.verts, sc.tri, albedo, _sh())
        img, cov = NR.image_of(fr, x.lambertian, sc, ctx)
    photos = Lo.linear_to_srgb(img).numpy()
    views = [View(v.name, v.camera, image=photos[i], mask=v.mask) for i, v in enumerate(scan.views)]
    area = Scan(views, sides=("right",), scan_id="t", source="test").hold_out([cams[-1].name])
    res = {}
    for s in (1, 2):
        torch.manual_seed(0)
        conf = _conf(iterations=120, iterations_geometry=0, weights={"photometric": 1.0, "feature_smooth": 0.01,
                                                                     "correction": 0.0})
        conf["ham"]["supersample"] = s
        m = NR.run(area, copy.deepcopy(st), conf).metrics["neural"]
        res[s] = (m["train"]["neural_psnr_mean"], m["holdout"]["neural_psnr_mean"])
    assert res[2][0] > res[1][0] + 1.0 and res[2][1] > res[1][1] + 1.0, res
