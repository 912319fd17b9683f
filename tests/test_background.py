"""Background estimate, compositing over it, back-face pixels and supersampled renders."""
from __future__ import annotations

import numpy as np
import torch

from capture.camera import Camera
from fitting import losses as Lo
from fitting.background import dilate, estimate_background, inpaint_background, over_background, srgb_over_background
from fitting.ham import box_down, render_views
from renderer.shading import sh_ambient
from synthetic import look_at


def _gradient(V: int = 2, H: int = 40, W: int = 50) -> torch.Tensor:
    """sRGB images whose linear values are smooth ramps (a backdrop)."""
    y, x = torch.meshgrid(torch.linspace(0.1, 0.6, H), torch.linspace(0.2, 0.8, W), indexing="ij")
    lin = torch.stack([x, y, 0.5 * (x + y)], -1)
    return Lo.linear_to_srgb(lin).unsqueeze(0).repeat(V, 1, 1, 1)


def test_inpainting_recovers_a_smooth_backdrop_behind_a_hole():
    photo = _gradient()
    truth = Lo.srgb_to_linear(photo)
    hole = torch.zeros(2, 40, 50, dtype=torch.bool)
    hole[:, 12:28, 15:35] = True
    seen = photo.clone()
    seen[hole] = torch.tensor([1.0, 0.0, 0.0])  # a red "hand" the estimate must not read
    bg = inpaint_background(seen, ~hole)
    # the outline pixels, which are all a composite reads, closely; the hole's middle roughly
    near = hole & dilate(~hole, 2)
    err_near = (bg - truth)[near].abs().max()
    err_mean = (bg - truth)[hole].abs().mean()
    assert err_near < 0.05 and err_mean < 0.05, (float(err_near), float(err_mean))
    assert torch.equal(bg[~hole], truth[~hole])
    # a view without a single known pixel gets black, not NaN
    none = inpaint_background(seen, torch.zeros_like(hole))
    assert torch.isfinite(none).all() and none.abs().max() == 0


def test_estimate_reads_only_pixels_away_from_what_is_occupied():
    photo = _gradient(1)
    occupied = torch.zeros(1, 40, 50, dtype=torch.bool)
    occupied[:, 10:30, 10:30] = True
    photo_marked = photo.clone()
    # a one-pixel halo around the occupied region (a mask's rim): excluded by the margin
    halo = dilate(occupied, 1) & ~occupied
    photo_marked[halo] = 1.0
    inside = torch.ones(1, 40, 50)
    bg = estimate_background(photo_marked, inside, occupied, margin_px=2)
    assert (bg[halo] - Lo.srgb_to_linear(photo)[halo]).abs().max() < 0.05


def test_compositing_is_exact_for_constant_backdrops_and_identity_without_one():
    img = torch.rand(1, 4, 5, 3) * 0.5
    cov = torch.rand(1, 4, 5)
    bg = torch.full((1, 4, 5, 3), 0.25)
    out = over_background(img, cov, bg)
    assert torch.allclose(out, img + (1 - cov)[..., None] * 0.25)
    assert over_background(img, cov, None) is img
    srgb = Lo.linear_to_srgb(img).numpy()
    np.testing.assert_allclose(srgb_over_background(srgb, np.ones((1, 4, 5), np.float32), bg.numpy()), srgb, atol=1e-6)


def _open_tube(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """A cylinder of radius 0.03 m along z, open at both ends, faces wound outwards."""
    a = torch.arange(n) * 2 * np.pi / n
    ring = torch.stack([0.03 * torch.cos(a), 0.03 * torch.sin(a)], 1)
    v = torch.cat([torch.cat([ring, torch.full((n, 1), z)], 1) for z in (-0.05, 0.05)]).float()
    f = []
    for i in range(n):
        j = (i + 1) % n
        f += [[i, j, n + j], [i, n + j, n + i]]
    return v, torch.tensor(f)


def _camera(pos: np.ndarray, size: int = 64) -> Camera:
    """A camera at ``pos`` looking at the origin."""
    R = look_at(pos, np.zeros(3))
    K = np.array([[120.0, 0, size / 2], [0, 120.0, size / 2], [0, 0, 1]])
    return Camera(K, R, -R @ pos, size, size, "c")


def test_back_faces_are_the_inside_seen_through_an_open_end():
    from renderer.context import RenderContext
    from renderer.ops import rasterize

    v, f = _open_tube()
    ctx = RenderContext("cpu", torch.device("cpu"))
    for pos, expect_inside in ((np.array([0.0, 0.0, 0.4]), True), (np.array([0.4, 0.0, 0.0]), False)):
        cam = _camera(pos)
        rast, _ = rasterize(ctx, Lo.clip_positions(v, [cam]), f.int(), (64, 64), grad_db=False)
        back = Lo.back_facing(v, f, rast, [cam])
        covered = rast[..., 3] > 0
        if expect_inside:  # looking down the tube (open at both ends): its inside wall, the centre empty
            assert covered.sum() > 50 and back.sum() > 0.8 * covered.sum() and not covered[0, 32, 32]
        else:  # from the side: only the outside
            assert covered.sum() > 100 and back.sum() < 0.03 * covered.sum()


def test_supersampled_coverage_is_the_area_fraction_of_an_edge():
    # a large square whose left edge crosses the image at a quarter of a pixel
    v = torch.tensor([[-0.0, -1, 0], [1, -1, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float32) * 0.05
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    from renderer.context import RenderContext

    ctx = RenderContext("cpu", torch.device("cpu"))
    cam = _camera(np.array([0.0, 0.0, 0.3]), 16)
    # move the principal point so the square's left edge sits 0.25 px into pixel column 8
    K = cam.K.copy()
    K[0, 2] = 8.25
    cam = Camera(K, cam.R, cam.t, 16, 16, "c")
    albedo = torch.ones(4, 3) * 0.5
    rv = render_views(ctx, [v], [f], [albedo], sh_ambient(1.0, rgb=True), [cam], (16, 16), supersample=4)
    row = rv.coverage[0, 8]  # this camera mirrors x: the square lies left of the edge
    assert row[7] > 0.99 and abs(float(row[8]) - 0.25) < 0.02 and row[9] < 0.01, row[5:11]
    # box_down averages sRGB images in linear light
    hi = np.zeros((1, 2, 2, 3), np.float32)
    hi[0, 0, 0] = 1.0
    lo = box_down(hi, 2, srgb=True)
    np.testing.assert_allclose(lo[0, 0, 0], Lo.linear_to_srgb(torch.tensor(0.25)).item(), atol=1e-5)


def _edge_square(edge_px: float, size: int = 16):
    """A large square whose left edge sits ``edge_px`` px into pixel column 8 of a ``size``-pixel camera."""
    v = torch.tensor([[0.0, -1, 0], [1, -1, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float32) * 0.05
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cam = _camera(np.array([0.0, 0.0, 0.3]), size)
    K = cam.K.copy()
    K[0, 2] = 8.0 + edge_px
    return v, f, Camera(K, cam.R, cam.t, size, size, "c")


def test_fitting_render_with_samples_is_the_measured_render_and_has_the_edge_gradient():
    """losses.render_shaded(supersample=s), what ham fits with, gives the image and coverage of
    ham.render_views(supersample=s), what it measures; its coverage holds the area fraction of an
    edge, and its gradient w.r.t. the vertices is that of finite differences."""
    from renderer.context import RenderContext

    ctx = RenderContext("cpu", torch.device("cpu"))
    v, f, cam = _edge_square(0.3)
    albedo = torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    sh = torch.zeros(9, 3)
    sh[0], sh[2] = 2.0, -0.6  # ambient plus light from one side: the colour varies over the square
    scene = Lo.merge([v], [f])
    fit = Lo.render_shaded(ctx, scene, albedo, sh, [cam], (16, 16), supersample=4)
    meas = render_views(ctx, [v], [f], [albedo], sh, [cam], (16, 16), supersample=4)
    np.testing.assert_allclose(Lo.linear_to_srgb(fit.image).clamp(0, 1).numpy(), meas.shaded, atol=2e-5)
    np.testing.assert_allclose(fit.coverage.numpy(), meas.coverage, atol=1e-6)
    assert fit.rast.shape == (1, 16, 16, 4)  # the raster callers index pixels with stays at the image size
    # what the IoU compares with a mask, the covered pixel centres, does not depend on the samples
    one = render_views(ctx, [v], [f], [albedo], sh, [cam], (16, 16))
    assert np.array_equal(meas.centre, one.centre) and one.centre[0, 8, 7] and not one.centre[0, 8, 8]
    assert abs(float(fit.coverage[0, 8, 8]) - 0.3) < 0.02  # one sample + antialiasing: only near it
    # d(coverage of the edge pixels) / d(x of the square's vertices), autograd against finite differences
    vv = v.clone().requires_grad_(True)
    col = lambda x: Lo.render_shaded(ctx, Lo.merge([x], [f]), albedo, sh, [cam], (16, 16),  # noqa: E731
                                     supersample=4).coverage[0, 4:12, 8].sum()
    col(vv).backward()
    g = float(vv.grad[:, 0].sum())
    h = 2e-5  # a hundredth of a pixel at this distance: no sample centre is crossed
    with torch.no_grad():
        d = torch.zeros_like(v)
        d[:, 0] = h
        fd = float(col(v + d) - col(v - d)) / (2 * h)
    assert abs(fd) > 1.0 and abs(g - fd) < 0.05 * abs(fd), (g, fd)
