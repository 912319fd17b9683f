"""The contour targets of ``ViewMasks.contours``: rendered contour points deep inside a mask (the
rims of a gap the render opens between fingers that the mask shows touching) get no pull toward
the mask's nearest contour, which would widen the gap (``masks.contour_inner_px``)."""
from __future__ import annotations

import numpy as np
import torch

from capture.camera import Camera
from fitting import losses as Lo
from fitting.geometry import projection_matrices
from fitting.masks import MaskConf, ViewMasks
from renderer import make_context

W, H, F = 64, 48, 64.0


def camera() -> Camera:
    K = np.array([[F, 0.0, W / 2], [0.0, F, H / 2], [0.0, 0.0, 1.0]])
    return Camera(K, np.eye(3), np.array([0.0, 0.0, 0.5]), W, H, "00")


def quad(x0: float, x1: float, y0: float, y1: float) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor([[x0, y0, 0.0], [x1, y0, 0.0], [x1, y1, 0.0], [x0, y1, 0.0]], dtype=torch.float64)
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]])


def bars(gap: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two 'fingers' side by side (rows of the image), ``gap`` metres apart (1 px = 7.8 mm)."""
    return [quad(-0.08, 0.08, -0.06, -gap / 2), quad(-0.08, 0.08, gap / 2, 0.06)]


def masks_of(meshes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    ctx = make_context("cpu")
    with torch.no_grad():
        cov, _ = Lo.render_silhouette(ctx, Lo.merge(*zip(*meshes)), [camera()], (H, W))
    return (cov > 0.5).double()


def view_masks(target: torch.Tensor, inner: float) -> ViewMasks:
    ones = torch.ones_like(target)
    return ViewMasks(["00"], target, ones, ones, torch.ones(1), ["ok"], [""], [1.0], contour_inner_px=inner)


def contour_grad(meshes: list[tuple[torch.Tensor, torch.Tensor]], vm: ViewMasks) -> float:
    """d(contour loss)/d(y translation of the first bar), pixels of a 1:1 image."""
    ctx = make_context("cpu")
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    verts = [meshes[0][0] + torch.stack([t * 0, t, t * 0])] + [m[0] for m in meshes[1:]]
    scene = Lo.merge(verts, [m[1] for m in meshes])
    _, rast = Lo.render_silhouette(ctx, scene, [camera()], (H, W))
    P = torch.as_tensor(projection_matrices([camera()]))
    pts, pix = Lo.rendered_contour_points(scene, rast, P)
    Lo.contour_loss(pts, pix, vm.contours([0], 0, 4000), 1.0).backward()
    return float(t.grad)


def test_gap_between_touching_fingers_is_not_widened_by_the_contour_term():
    target = masks_of([quad(-0.08, 0.08, -0.06, 0.06)])  # the mask: the two fingers touching
    opened = bars(0.03)  # the render opens a ~4 px gap between them, ~5 px inside the mask
    rendered = masks_of(opened)
    assert int((target - rendered).clamp_min(0).sum()) >= 3 * 20  # the gap is mask pixels the render lacks
    old = contour_grad(opened, view_masks(target, -1.0))
    new = contour_grad(opened, view_masks(target, MaskConf().contour_inner_px))
    # the old pull: the first bar's rim is dragged toward the mask's far contour, i.e. away from the
    # other bar (a gradient step moves it to -y): the gap widens
    assert old > 1.0
    # now nothing drags it away from the other finger: what is left (the mask contour's pull on the
    # bar's ends beside the gap) moves it toward the other bar, closing the gap
    assert new < 0.0


def test_contour_points_near_the_mask_contour_keep_their_pull():
    target = masks_of([quad(-0.08, 0.08, -0.06, 0.06)])
    vm_old, vm_new = view_masks(target, -1.0), view_masks(target, 1.0)
    c_old, c_new = vm_old.contours([0], 0, 4000), vm_new.contours([0], 0, 4000)
    field = c_old.field[0]
    # identical outside the mask and on its first inner pixel; points deeper inside lose the pull
    near = field >= -1.0
    assert torch.equal(c_old.inner_ok[0][near], c_new.inner_ok[0][near])
    assert not c_new.inner_ok[0][field < -1.0].any() and c_old.inner_ok[0][field < -1.0].all()
    # a render one pixel too small all round (its contour on the mask's second row) is still pulled out
    shrunk = [quad(-0.08 + 0.0078, 0.08 - 0.0078, -0.06 + 0.0078, 0.06 - 0.0078)]
    assert contour_grad_shrink(shrunk, vm_new) < 0


def contour_grad_shrink(meshes: list[tuple[torch.Tensor, torch.Tensor]], vm: ViewMasks) -> float:
    """d(contour loss)/d(scale) of a mesh grown about the origin: < 0 means the loss wants it larger."""
    ctx = make_context("cpu")
    s = torch.ones((), dtype=torch.float64, requires_grad=True)
    v, f = meshes[0]
    scene = Lo.merge([v * torch.stack([s, s, s * 0 + 1])], [f])
    _, rast = Lo.render_silhouette(ctx, scene, [camera()], (H, W))
    pts, pix = Lo.rendered_contour_points(scene, rast, torch.as_tensor(projection_matrices([camera()])))
    Lo.contour_loss(pts, pix, vm.contours([0], 0, 4000), 1.0).backward()
    return float(s.grad)


def test_conf_key_reaches_the_view_masks():
    assert MaskConf.from_conf({"masks": {"contour_inner_px": 2.5}}).contour_inner_px == 2.5
    assert MaskConf().contour_inner_px == 2.0


# ------------------------------------------------------------------------------ visual-hull support
def test_mask_pixels_no_other_view_supports_are_ignored_and_reported():
    from fitting.masks import MaskBuilder, iou_report
    from tests.test_silhouette_fit import hand_scene, scan_with

    model, p, cams, masks, joints = hand_scene(n_views=6)
    with torch.no_grad():
        v = model.forward(p).vertices[0]
    junk = masks.copy()
    yy, xx = np.mgrid[: masks.shape[1], : masks.shape[2]]
    blob = (yy - 8) ** 2 + (xx - 10) ** 2 <= 16  # a shadow in a corner of view 1, away from the hand
    assert not (blob & masks[1]).any()
    junk[1] |= blob
    scan, _ = scan_with(cams, junk, joints)
    ctx = make_context("cpu")
    vm = MaskBuilder(scan, MaskConf(), ctx, 1.0, "cpu").build([(v, model.faces)], ["right"])
    un = vm.unsupported.numpy()
    assert un[1][blob].mean() > 0.9  # the shadow is found ...
    assert not un[masks].any()  # ... and no pixel of the hand, in any view
    assert vm.status[1] == "partial" and "visual hull" in vm.notes[1]
    assert all(vm.status[i] == "ok" for i in (0, 2, 3, 4, 5))
    # the render of the true hand is judged against the hand: IoU 1 over the usable pixels, the
    # shadow still counts against it in the mask as given
    with torch.no_grad():
        cov, _ = Lo.render_silhouette(ctx, Lo.merge([v], [model.faces]), cams, masks.shape[1:])
    rep = iou_report(cov, vm)
    assert rep["views"]["01"]["iou"] > 0.99 > rep["views"]["01"]["iou_raw"]
    # switched off: nothing ignored
    off = MaskBuilder(scan, MaskConf(hull_ratio=0.0), ctx, 1.0, "cpu").build([(v, model.faces)], ["right"])
    assert not off.unsupported.any() and off.status[1] == "ok"
    # the decision is kept while the forearm maps move with the hands
    moved = MaskBuilder(scan, MaskConf(), ctx, 1.0, "cpu").build([(v, model.faces)], ["right"], decide=False,
                                                                 previous=vm)
    assert torch.equal(moved.unsupported, vm.unsupported) and float(moved.valid[1][torch.from_numpy(blob)].max()) == 0
