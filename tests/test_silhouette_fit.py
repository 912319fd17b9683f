"""silhouette_fit, mask handling and the shared loss terms, on tiny rendered scenes with known truth.

The scenes are rendered here with our own renderer (a posed built-in hand seen by a ring of
small cameras), so every test knows the true parameters, masks and cameras.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import handmodel
from capture.camera import Camera
from capture.scan import Scan, View
from fitting import losses as Lo
from fitting.geometry import projection_matrices
from fitting.masks import MaskBuilder, MaskConf, forearm_proxy, wrist_loop
from fitting.state import State
from handmodel.params import HandParams
from renderer import make_context


# ------------------------------------------------------------------------------------ tiny scenes
def look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    z = (target - center) / np.linalg.norm(target - center)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])


def ring_cameras(n: int, size: tuple[int, int], target: np.ndarray, dist: float = 0.45, f: float = 140.0,
                 elevation: float = 0.5) -> list[Camera]:
    """``n`` cameras around ``target`` at ``elevation`` radians above it (y is down)."""
    W, H = size
    cams = []
    for k in range(n):
        a = 2 * math.pi * k / n + 0.3
        c = target + dist * np.array([math.sin(a) * math.cos(elevation), -math.sin(elevation), math.cos(a) * math.cos(elevation)])
        R = look_at(c, target)
        K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
        cams.append(Camera(K, R, -R @ c, W, H, f"{k:02d}"))
    return cams


def true_params(side: str = "right") -> HandParams:
    """A relaxed hand: fingers slightly flexed, palm towards -y (down the image of the ring)."""
    p = HandParams.zeros(1)
    p.hand_pose[0, :, 0] = 0.25  # flexion about +x for every joint
    p.hand_pose[0, 0:3, 0] = 0.1
    p.global_orient[0] = torch.tensor([-1.2, 0.2, 0.1])
    return p


def hand_scene(n_views: int = 5, size: tuple[int, int] = (96, 80), side: str = "right"):
    """(model, params, cameras, masks (V,H,W) bool, joints (21,3)) of one rendered hand."""
    model = handmodel.load("builtin", side)
    p = true_params(side)
    with torch.no_grad():
        out = model.forward(p)
    v = out.vertices[0]
    target = v.mean(0).numpy().astype(np.float64)
    cams = ring_cameras(n_views, size, target)
    ctx = make_context("cpu")
    with torch.no_grad():
        cov, _ = Lo.render_silhouette(ctx, Lo.merge([v], [model.faces]), cams, (size[1], size[0]))
    return model, p, cams, (cov > 0.5).numpy(), out.joints[0].numpy()


def scan_with(cams: list[Camera], masks: np.ndarray, joints: np.ndarray, side: str = "right") -> tuple[Scan, State]:
    """A Scan with masks and exact keypoints, and the State a keypoint fit would leave."""
    views = []
    for c, m in zip(cams, masks):
        uv = c.project(torch.as_tensor(joints, dtype=torch.float64)).numpy()
        kp = np.concatenate([uv, np.ones((21, 1))], 1).astype(np.float32)
        views.append(View(c.name, c, image=None, mask=m, keypoints={side: kp}))
    scan = Scan(views, sides=(side,), scan_id="t", source="test")
    st = State()
    st.keypoints3d[side] = joints.astype(np.float64)
    st.keypoints3d_valid[side] = np.ones(21, bool)
    st.assignment = {c.name: {side: side} for c in cams}
    st.accepted = {c.name: {side: np.ones(21, bool)} for c in cams}
    return scan, st


def conf(**section) -> dict:
    return {"device": "cpu", "data": {"scale": 1.0}, "hand_model": {"name": "builtin"}, "log": {"progress": False},
            "silhouette_fit": section}


# ------------------------------------------------------------------------------------ mask handling
def test_wrist_loop_and_forearm_proxy_point_away_from_the_hand():
    model = handmodel.load("builtin", "right")
    loop = wrist_loop(model.faces)
    assert len(loop) == 20 and len(set(loop.tolist())) == 20
    with torch.no_grad():
        out = model.forward(true_params())
    v = out.vertices[0]
    pv, pf = forearm_proxy(v, loop, MaskConf())
    wrist, middle_mcp = out.joints[0, 0], out.joints[0, 9]
    axis = (wrist - middle_mcp) / torch.linalg.norm(wrist - middle_mcp)
    # the far end of the tube lies ~forearm_length beyond the wrist, on the forearm side
    assert float((pv[-1] - wrist) @ axis) > 0.2
    assert int(pf.max()) == len(pv) - 1


def test_broken_view_dropped_and_forearm_ignored():
    model, p, cams, masks, joints = hand_scene(n_views=5)
    ctx = make_context("cpu")
    with torch.no_grad():
        v = model.forward(p).vertices[0]
        pv, pf = forearm_proxy(v, wrist_loop(model.faces), MaskConf(forearm_scale_start=1.0, forearm_scale_end=1.2))
        arm, _ = Lo.render_silhouette(ctx, Lo.merge([pv], [pf]), cams, masks.shape[1:])
    with_arm = masks | (arm.numpy() > 0.5)
    broken = with_arm.copy()
    broken[2] = False
    broken[2, 5:9, 5:9] = True  # a fragment where no hand is
    scan, _ = scan_with(cams, broken, joints)
    b = MaskBuilder(scan, MaskConf(), ctx, 1.0, "cpu")
    vm = b.build([(v, model.faces)], ["right"])
    assert vm.status[2] == "dropped" and float(vm.view_weight[2]) == 0
    assert all(vm.status[i] == "ok" for i in (0, 1, 3, 4))
    # forearm pixels of the mask are ignored; hand pixels are not, unless the (generous) proxy
    # passes in front of them (hand seen from the arm's side): few
    with torch.no_grad():
        scene = Lo.merge([v, pv], [model.faces, pf])
        rast, _ = Lo.rasterize(ctx, Lo.clip_positions(scene.verts, cams), scene.tri, masks.shape[1:])
    hand_visible = ((rast[..., 3] > 0) & (rast[..., 3] <= model.faces.shape[0])).numpy()
    arm_only = with_arm & ~masks
    fore = vm.forearm.numpy()
    kept = [0, 1, 3, 4]
    assert fore[kept][arm_only[kept]].mean() > 0.9
    assert fore[kept][hand_visible[kept]].mean() < 0.05
    assert fore[kept][masks[kept]].mean() < 0.2


# ------------------------------------------------------------------------------------------ losses
def test_contour_loss_is_minimal_at_the_true_silhouette():
    model, p, cams, masks, _ = hand_scene(n_views=2)
    ctx = make_context("cpu")
    with torch.no_grad():
        v0 = model.forward(p).vertices[0].double()
    base = Lo.merge([v0], [model.faces])
    target = torch.as_tensor(masks, dtype=torch.float64)
    contours = Lo.mask_contours(target, torch.ones_like(target))
    P = torch.as_tensor(projection_matrices(cams))

    def loss(shift: float) -> torch.Tensor:
        scene = Lo.Scene(v0 + torch.tensor([shift, 0.0, 0.0], dtype=torch.float64), base.tri, base.offsets)
        _, rast = Lo.render_silhouette(ctx, scene, cams, masks.shape[1:])
        pts, pix = Lo.rendered_contour_points(scene, rast, P)
        return Lo.contour_loss(pts, pix, contours, 1.0)

    values = [float(loss(s)) for s in (-0.01, -0.005, 0.0, 0.005, 0.01)]
    assert values[2] < 1e-6
    assert values[0] > values[1] > values[2] < values[3] < values[4]
    # the gradient points back to the truth
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    scene = Lo.Scene(v0 + torch.tensor([0.006, 0.0, 0.0], dtype=torch.float64) + x, base.tri, base.offsets)
    _, rast = Lo.render_silhouette(ctx, scene, cams, masks.shape[1:])
    pts, pix = Lo.rendered_contour_points(scene, rast, P)
    Lo.contour_loss(pts, pix, contours, 1.0).backward()
    assert float(x.grad[0]) > 0


def test_interpenetration_zero_apart_positive_inside_and_pushes_apart():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.03)
    va = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    f = torch.as_tensor(sphere.faces, dtype=torch.long)
    assert float(Lo.interpenetration_loss(va, f, va + torch.tensor([0.07, 0, 0]), f)) == 0.0
    shift = torch.tensor([0.05, 0.0, 0.0], requires_grad=True)
    loss = Lo.interpenetration_loss(va, f, va + shift, f)  # 1 cm of overlap
    assert float(loss.detach()) > 0
    loss.backward()
    assert float(shift.grad[0]) < 0  # descending moves the second sphere away (+x)
    deeper = Lo.interpenetration_loss(va, f, va + torch.tensor([0.045, 0, 0]), f)
    assert float(deeper) > float(loss.detach())
    # two hands: nothing when apart, something when one is pushed into the other
    right, left = handmodel.load("builtin", "right"), handmodel.load("builtin", "left")
    p = true_params()
    with torch.no_grad():
        vr = right.forward(p).vertices[0]
        vl = left.forward(handmodel.mirror_params(p)).vertices[0]
    assert float(Lo.interpenetration_loss(vr, right.faces, vl - torch.tensor([0.3, 0, 0]), left.faces)) == 0.0
    assert float(Lo.interpenetration_loss(vr, right.faces, vr + torch.tensor([0.0, 0.004, 0.0]), right.faces)) > 0.0


def test_srgb_round_trip_and_finite_gradient_at_zero():
    x = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    y = Lo.linear_to_srgb(Lo.srgb_to_linear(x))
    assert torch.allclose(y, x, atol=1e-9)
    Lo.linear_to_srgb(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------- stage
def test_silhouette_fit_recovers_a_perturbed_hand_despite_forearm_and_broken_mask():
    from fitting import silhouette_fit as SF
    from fitting.metrics import silhouette_iou

    model, p, cams, masks, joints = hand_scene(n_views=5)
    ctx = make_context("cpu")
    with torch.no_grad():
        v = model.forward(p).vertices[0]
        pv, pf = forearm_proxy(v, wrist_loop(model.faces), MaskConf(forearm_scale_start=1.0, forearm_scale_end=1.3))
        arm, _ = Lo.render_silhouette(ctx, Lo.merge([pv], [pf]), cams, masks.shape[1:])
    given = masks | (arm.numpy() > 0.5)
    given[4] = False
    given[4, 2:10, 2:10] = True
    scan, st = scan_with(cams, given, joints)
    start = p.detach()
    start.transl = start.transl + torch.tensor([[0.006, -0.004, 0.003]])
    start.hand_pose = start.hand_pose + 0.15 * torch.randn(1, 15, 3, generator=torch.Generator().manual_seed(0))
    st.params["right"] = start
    # keypoint terms off: what moves the hand here is the silhouette alone
    c = conf(iterations=100, lr=0.01, refine_cameras=False, weights={"keypoints3d": 0.0, "reprojection": 0.0})
    st = SF.run(scan, st, c)
    m = st.metrics["silhouette_fit"]
    assert m["dropped_views"] == ["04"]
    assert m["iou_mean"] > m["iou_mean_before"] + 0.05
    assert m["iou_mean"] > 0.93
    with torch.no_grad():
        out_true, out0, out1 = model.forward(p), model.forward(start), model.forward(st.params["right"])
    v1 = out1.vertices[0]
    err0 = float(torch.linalg.norm(out0.vertices[0] - out_true.vertices[0], dim=1).mean())
    err1 = float(torch.linalg.norm(v1 - out_true.vertices[0], dim=1).mean())
    assert err1 < 0.5 * err0, (err0, err1)
    # not dragged up the forearm: the wrist did not move towards the elbow
    axis = out_true.joints[0, 0] - out_true.joints[0, 9]
    axis = axis / torch.linalg.norm(axis)
    assert float((out1.joints[0, 0] - out_true.joints[0, 0]) @ axis) < 0.004
    def true_iou(v: torch.Tensor) -> float:
        with torch.no_grad():
            cov, _ = Lo.render_silhouette(ctx, Lo.merge([v], [model.faces]), cams, masks.shape[1:])
        return float(np.mean([silhouette_iou(cov[i] > 0.5, masks[i]) for i in range(4)]))

    # against the hand-only masks (which the fit never saw): clearly better
    assert true_iou(v1) > true_iou(out0.vertices[0]) + 0.15


def test_camera_correction_recovers_a_shifted_principal_point():
    from fitting import silhouette_fit as SF

    model, p, cams, masks, joints = hand_scene(n_views=4)
    wrong = [c for c in cams]
    K = cams[1].K.copy()
    K[0, 2] += 4.0  # this camera's file says the principal point is 4 px further right
    wrong[1] = Camera(K, cams[1].R, cams[1].t, cams[1].width, cams[1].height, cams[1].name)
    scan, st = scan_with(wrong, masks, joints)
    st.params["right"] = p.detach()
    c = conf(iterations=100, optimize=[], refine_cameras=True, weights={"keypoints3d": 0.0, "reprojection": 0.0})
    c["masks"] = {"bad_view_ratio": 0.3}  # 4 px on a 96 px image costs 40 % IoU; keep the view
    start = copy.deepcopy(st)
    st = SF.run(scan, st, c)
    off = st.metrics["silhouette_fit"]["camera_offsets_px"]
    assert abs(off["01"][0] + 4.0) < 0.5 and abs(off["01"][1]) < 0.5
    # the right cameras' sub-pixel corrections are set to 0 halfway (camera_min_px 1) and stay 0
    assert all(off[n] == [0.0, 0.0] for n in ("00", "02", "03")), off
    c["silhouette_fit"]["camera_min_px"] = 0.0  # keep every correction: they drift a little off 0
    kept = SF.run(scan, start, c).metrics["silhouette_fit"]["camera_offsets_px"]
    assert abs(kept["01"][0] + 4.0) < 0.5
    assert all(abs(kept[n][0]) < 0.5 and abs(kept[n][1]) < 0.5 for n in ("00", "02", "03"))
    assert any(kept[n] != [0.0, 0.0] for n in ("00", "02", "03")), kept
    with pytest.raises(ValueError, match="camera_min_px"):
        SF.SilhouetteFitConf.from_conf({"silhouette_fit": {"camera_min_px": -1.0}})


def test_conf_rejects_unknown_terms_and_parameters():
    from fitting.silhouette_fit import SilhouetteFitConf

    with pytest.raises(KeyError, match="unknown terms"):
        SilhouetteFitConf.from_conf({"silhouette_fit": {"weights": {"silhuette": 1.0}}})
    with pytest.raises(KeyError, match="unknown parameters"):
        SilhouetteFitConf.from_conf({"silhouette_fit": {"optimize": ["pose"]}})


def test_trusted_masks_fade_the_keypoints_and_scale_the_priors():
    from fitting.masks import ViewMasks
    from fitting.silhouette_fit import SilhouetteFitConf, masks_trusted, term_scales

    cfg = SilhouetteFitConf(iterations=100, keypoint_decay=0.3, trusted_prior_scale=0.1)
    assert term_scales(0, cfg, trusted=False) == {}
    s0, mid, end = (term_scales(i, cfg, trusted=True) for i in (0, 15, 30))
    assert s0["keypoints3d"] == 1.0 and s0["reprojection"] == 1.0
    assert abs(mid["keypoints3d"] - 0.5) < 1e-9 and end["reprojection"] < 1e-12
    assert term_scales(99, cfg, trusted=True)["keypoints3d"] < 1e-12
    assert s0["pose_prior"] == 0.1 and s0["shape_prior"] == 0.1 and "silhouette" not in s0
    z = torch.zeros(2, 4, 4)
    vm = ViewMasks(["00", "01"], z, z, z, torch.ones(2), status=["ok", "ok"])
    assert masks_trusted(cfg, vm)[0]
    vm.status = ["ok", "partial"]
    trusted, why = masks_trusted(cfg, vm)
    assert not trusted and "01 partial" in why
    cfg.mask_trust = "always"
    assert masks_trusted(cfg, vm)[0]
    with pytest.raises(ValueError, match="mask_trust"):
        SilhouetteFitConf.from_conf({"silhouette_fit": {"mask_trust": "sometimes"}})


def test_trusted_masks_recover_the_hand_that_biased_keypoints_pull_away():
    """Detections whose joints sit a few millimetres off the model's (as a detector's guesses do)
    hold an untrusted fit off the true hand; trusting the clean masks lets the silhouettes decide."""
    from fitting import silhouette_fit as SF

    model, p, cams, masks, joints = hand_scene(n_views=5)
    rng = np.random.default_rng(3)
    biased = joints + rng.normal(0.0, 0.004, joints.shape)
    errors = {}
    for trust in ("never", "always"):
        scan, st = scan_with(cams, masks, biased)
        start = p.detach()
        start.hand_pose = start.hand_pose + 0.1 * torch.randn(1, 15, 3, generator=torch.Generator().manual_seed(1))
        st.params["right"] = start
        st = SF.run(scan, st, conf(iterations=150, refine_cameras=False, mask_trust=trust))
        assert st.metrics["silhouette_fit"]["masks_trusted"] == (trust == "always")
        with torch.no_grad():
            v1, vt = model.forward(st.params["right"]).vertices[0], model.forward(p).vertices[0]
        errors[trust] = float(torch.linalg.norm(v1 - vt, dim=1).mean())
    assert errors["always"] < 0.6 * errors["never"], errors
