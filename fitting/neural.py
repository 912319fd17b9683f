"""Stage ``neural``: a neural renderer trained with the HAM meshes, for photoreal novel views.

Input: the ``ham`` stage's refined hands (``state.refined``) and lighting (``state.lighting``).
The renderer (``networks/neural_renderer.py``) reads per-vertex learned features and real
per-pixel quantities (HAM albedo, the Lambertian colour under the mean SH of the fitted views;
with ``neural.view_inputs`` also the camera-space normal, view direction, their cosine and
positional encodings) and outputs linear RGB as a learned correction of the Lambertian colour plus
highlights of learnt specular lobes (``neural.specular_lobes``, ``neural.specular_model``, their
own rate ``neural.lr_specular``). One lighting for every view (the mean SH), so a
held-out camera gets exactly the inputs a fitted one does. The correction is scaled per vertex by
a confidence (``observation_confidence``: how many fitted pixels saw the vertex, over
``neural.confidence_pixels``), so surface the fitted views hardly saw keeps the Lambertian colour
in a novel view instead of an extrapolation.

Phases (iterations and rates in the ``neural`` conf section):
1. features + network against the fitted views' photos, geometry and albedo fixed: the raster is
   made once and only the interior pixels of the renders count (coverage eroded by a pixel, inside
   ham's photometric weights, front faces), so antialiasing is not needed;
2. features + network + a normal displacement of the HAM vertices + the albedo, through the
   antialiased neural render over the photo's inpainted background (as ham), with ham's
   silhouette and contour terms and ham's regularisers (``fitting.ham._regularisers``, weights
   from ``ham.weights``).
After phase 2 the albedo and the features of surface the fitted views saw over fewer than
``neural.fill_pixels`` pixels are taken partly or wholly from the surface around it, as ham does
for its albedo (``fill_unseen``): what the fitted views do not pin down is otherwise free to fit
their noise and misregistration, which a held-out view then shows.
Both phases can add ``neural.weights.correction`` x the squared departure of the neural colour
from the Lambertian one, so a head that sees the view departs from HAM's shading only where the
photos pay for it (with view inputs and without it, corrections learnt for the fitted view
directions cost held-out views up to 1.6 dB); 0 by default, where only the lobes see the view.

Evaluation (``state.metrics["neural"]``): masked PSNR (= 20 log10(1/RMSE)) and SSIM of the
neural render and of the HAM shaded render, on the fitted views (shaded with their own SH) and on
``Scan.holdout`` (never fitted by any stage; shaded with the mean SH, which does not look at the
held-out photo). Both renders are measured on the same pixels: usable mask (forearm and
missing-hand regions excluded) covered by both renders, where they show the hand's outside (not
the inside of the open wrist, ``losses.back_facing``), both over the photo's inpainted background
(``fitting.background``) and, as every render of both phases, averaged from ``ham.supersample``
samples per pixel side (the MLP head; the UNet runs at one); ``psnr_full_mask`` over the whole
usable mask. Mixed precision (autocast) for the network on CUDA.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from capture.camera import Camera
from capture.scan import Scan
from fitting import losses as Lo
from fitting.conf import section_dataclass
from fitting.background import estimate_background, srgb_over_background
from fitting.ham import (HamConf, Problem, Unknowns, _adam, _regularisers, clamp_albedo, crop_views,
                         fill_unseen_albedo, mask_terms, photo_metrics, plain_mesh, render_views)
from fitting.masks import MaskBuilder, MaskConf, pad_stack
from fitting.pipeline import progress
from fitting.pose_fit import image_scale
from fitting.silhouette_fit import camera_offsets
from fitting.state import State
from networks.neural_renderer import NeuralRenderer, NeuralRendererSpec, PixelInputs
from renderer.mesh_ops import apply_sparse, confidence_fill, loop_subdivide
from renderer.ops import antialias
from renderer.shading import sh_shading, vertex_normals

log = logging.getLogger("handrecon")
TERMS = ("photometric", "feature_smooth", "correction")
# ham.weights terms phase 2 uses besides the photometric one
GEOMETRY_TERMS = ("silhouette", "contour", "laplacian", "edge", "normal", "albedo_smooth", "displacement")


@dataclass
class NeuralConf:
    """Keys of the ``neural`` conf section."""

    renderer: str = "mlp"  # mlp | unet
    feature_dim: int = 8
    hidden: int = 64
    layers: int = 3
    pe_frequencies: int = 2
    unet_channels: int = 16
    unet_depth: int = 2
    specular_lobes: int = 8
    view_inputs: bool = False
    damp_specular: bool = False
    specular_model: str = "half_vector"
    crop_margin_px: int = 4
    subdivide: int = 0
    confidence_pixels: float = 2.0
    fill_pixels: float = 3.0
    iterations: int = 600
    iterations_geometry: int = 60
    lr_network: float = 0.003
    lr_features: float = 0.02
    lr_specular: float = 0.1
    lr_albedo: float = 0.002
    lr_displacement: float = 0.00002
    batch_pixels: int = 0
    mixed_precision: bool = True
    weights: dict[str, float] = field(default_factory=lambda: {"photometric": 1.0, "feature_smooth": 0.3,
                                                                                  "correction": 0.0})

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "NeuralConf":
        out: NeuralConf = section_dataclass(NeuralConf, conf, "neural", TERMS)
        out.spec()  # validates the architecture keys
        if not 0 <= out.subdivide <= 2:
            raise ValueError(f"neural.subdivide must be 0..2, got {out.subdivide}")
        for name in ("iterations", "iterations_geometry", "batch_pixels", "crop_margin_px"):
            if getattr(out, name) < 0:
                raise ValueError(f"neural.{name} must be >= 0, got {getattr(out, name)}")
        for name in ("lr_network", "lr_features", "lr_specular", "lr_albedo", "lr_displacement", "confidence_pixels", "fill_pixels"):
            if not getattr(out, name) >= 0:
                raise ValueError(f"neural.{name} must be >= 0, got {getattr(out, name)}")
        if any(v < 0 for v in out.weights.values()):
            raise ValueError(f"neural.weights must be >= 0, got {out.weights}")
        return out

    def spec(self) -> NeuralRendererSpec:
        return NeuralRendererSpec(self.renderer, self.feature_dim, self.hidden, self.layers, self.pe_frequencies,
                                  self.unet_channels, self.unet_depth, self.specular_lobes,
                                  self.view_inputs, self.damp_specular, self.specular_model).validate()


# ------------------------------------------------------------------------------------ the raster
@dataclass
class Frame:
    """One rasterization of a scene from a set of cameras, and where its covered samples are:
    ``index`` (P,) flat indices into (V*H*W) of the sampled raster (``hw``: ``s`` times the image
    size per side), ``view`` (P,) their view, ``tri`` (P,3) the vertices of their triangle,
    ``bary`` (P,3) perspective-correct barycentrics (differentiable w.r.t. the vertices through
    the rasterizer), per-view crop boxes for the unet, and with s > 1 the raster at the image size
    (``image_rast``: back faces, contours, which pixels count)."""

    rast: torch.Tensor
    pos: torch.Tensor
    hw: tuple[int, int]
    index: torch.Tensor
    view: torch.Tensor
    tri: torch.Tensor
    bary: torch.Tensor
    R: torch.Tensor  # (V,3,3) world -> camera
    centres: torch.Tensor  # (V,3) camera centres, world
    crops: list[tuple[int, int]] = field(default_factory=list)
    crop_hw: tuple[int, int] = (0, 0)
    s: int = 1  # samples per pixel side
    image_rast: torch.Tensor | None = None  # (V,H/s,W/s,4) when s > 1

    @property
    def V(self) -> int:
        return int(self.rast.shape[0])

    @property
    def pixel_rast(self) -> torch.Tensor:
        """The raster at the image size."""
        return self.rast if self.image_rast is None else self.image_rast

    @property
    def pixel(self) -> torch.Tensor:
        """(P,) flat index into (V*H*W) at the image size of the pixel each sample lies in."""
        if self.s == 1:
            return self.index
        Hs, Ws = self.hw
        s = self.s
        rem = self.index % (Hs * Ws)
        return self.view * (Hs // s) * (Ws // s) + (rem // Ws // s) * (Ws // s) + (rem % Ws) // s

    def subset(self, keep: torch.Tensor) -> "Frame":
        """The same raster with only the samples ``keep`` (indices or a mask over P)."""
        return Frame(self.rast, self.pos, self.hw, self.index[keep], self.view[keep], self.tri[keep], self.bary[keep],
                     self.R, self.centres, self.crops, self.crop_hw, self.s, self.image_rast)


def make_frame(ctx: Any, scene: Lo.Scene, cameras: Sequence[Camera], hw: tuple[int, int],
               offsets: torch.Tensor | None = None, multiple: int = 1, margin: int = 4, supersample: int = 1) -> Frame:
    """Rasterize ``scene`` (with gradient to the vertices) with ``supersample`` samples per pixel
    side (``losses.Raster``) and index its covered samples; crop boxes of one size (multiple of
    ``multiple``) around each view's hands when multiple > 1."""
    r = Lo.raster_scene(ctx, scene, cameras, hw, offsets, supersample)
    rast = r.sampled
    cov = rast[..., 3] > 0
    index = torch.nonzero(cov.reshape(-1)).squeeze(1)
    flat = rast.reshape(-1, 4)[index]
    tri = scene.tri.long()[flat[:, 3].long() - 1]
    u, v = flat[:, 0:1], flat[:, 1:2]
    bary = torch.cat([u, v, 1.0 - u - v], 1)
    H, W = rast.shape[1], rast.shape[2]
    dev = scene.verts.device
    R = torch.as_tensor(np.stack([c.R for c in cameras]), dtype=torch.float32, device=dev)
    C = torch.as_tensor(np.stack([c.center for c in cameras]), dtype=torch.float32, device=dev)
    fr = Frame(rast, r.pos, (H, W), index, torch.div(index, H * W, rounding_mode="floor"), tri, bary, R, C,
               s=r.s, image_rast=r.rast if r.s > 1 else None)
    if multiple > 1:
        fr.crops, fr.crop_hw = crop_boxes(cov, multiple, margin)
    return fr


def crop_boxes(covered: torch.Tensor, multiple: int, margin: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Top-left corners of one (h, w) box per view holding its covered pixels plus ``margin``;
    h, w are multiples of ``multiple`` (the canvas is padded at the bottom/right when needed)."""
    V, H, W = covered.shape
    boxes = []
    for v in range(V):
        yx = torch.nonzero(covered[v])
        if len(yx) == 0:
            boxes.append((0, 0, 1, 1))
            continue
        y0, x0 = (yx.min(0).values - margin).clamp_min(0).tolist()
        y1, x1 = (yx.max(0).values + margin + 1).tolist()
        boxes.append((y0, x0, min(y1, H), min(x1, W)))
    rnd = lambda n: -(-n // multiple) * multiple  # noqa: E731
    h = rnd(max(b[2] - b[0] for b in boxes))
    w = rnd(max(b[3] - b[1] for b in boxes))
    corners = [(max(0, min(b[0], rnd(H) - h)), max(0, min(b[1], rnd(W) - w))) for b in boxes]
    return corners, (h, w)


def pixel_inputs(net: NeuralRenderer, fr: Frame, verts: torch.Tensor, tri: torch.Tensor, albedo: torch.Tensor,
                 sh: torch.Tensor) -> PixelInputs:
    """The renderer's inputs at the covered pixels of ``fr`` (P, k): differentiable w.r.t. the
    features, the albedo and the vertices."""
    n = vertex_normals(verts, tri)
    lam = albedo * sh_shading(n, sh)
    attr = torch.cat([net.features.to(verts.dtype), albedo, lam, n, verts, net.confidence.to(verts.dtype)], 1)
    px = (attr[fr.tri] * fr.bary[..., None].to(attr.dtype)).sum(1)
    C = net.spec.feature_dim
    feats, alb, lamb, nw, X = px[:, :C], px[:, C:C + 3], px[:, C + 3:C + 6], px[:, C + 6:C + 9], px[:, C + 9:C + 12]
    nw = torch.nn.functional.normalize(nw, dim=-1, eps=1e-9)
    n_cam = torch.einsum("pij,pj->pi", fr.R[fr.view], nw)
    vdir = torch.nn.functional.normalize(X - fr.centres[fr.view], dim=-1, eps=1e-9)
    cos = (nw * vdir).sum(-1, keepdim=True)
    reflection = vdir - 2.0 * cos * nw
    return PixelInputs(feats, alb, lamb, n_cam, vdir, cos, px[:, C + 12:], reflection)


def _autocast(device: torch.device, enabled: bool) -> Any:
    """Mixed precision for the network on CUDA (bfloat16 where supported: no loss scaling)."""
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def shade_pixels(net: NeuralRenderer, fr: Frame, x: PixelInputs, mixed: bool = False,
                 select: torch.Tensor | None = None) -> torch.Tensor:
    """Linear RGB (P,3) at the covered pixels (or at ``select`` of them, mlp only)."""
    dev = x.features.device
    with _autocast(dev, mixed):
        if net.spec.kind == "mlp":
            if select is not None:
                x = PixelInputs(*(None if t is None else t[select] for t in _fields(x)))
            return net(x).float()
        # unet: scatter the inputs into per-view crops, run, gather back at the covered pixels
        H, W = fr.hw
        h, w = fr.crop_hw
        m = net.spec.multiple
        Hp, Wp = -(-H // m) * m, -(-W // m) * m
        imgs = []
        for t in _fields(x):
            if t is None:
                imgs.append(None)
                continue
            canvas = t.new_zeros(fr.V * Hp * Wp, t.shape[1])
            y, xx = (fr.index % (H * W)) // W, fr.index % W
            canvas = canvas.index_put((fr.view * Hp * Wp + y * Wp + xx,), t)
            canvas = canvas.reshape(fr.V, Hp, Wp, -1)
            imgs.append(torch.stack([canvas[v, y0:y0 + h, x0:x0 + w] for v, (y0, x0) in enumerate(fr.crops)]))
        out = net(PixelInputs(*imgs)).float()
        y, xx = (fr.index % (H * W)) // W, fr.index % W
        y0 = torch.tensor([c[0] for c in fr.crops], device=dev)[fr.view]
        x0 = torch.tensor([c[1] for c in fr.crops], device=dev)[fr.view]
        return out[fr.view, y - y0, xx - x0]


def _fields(x: PixelInputs) -> tuple[torch.Tensor | None, ...]:
    return (x.features, x.albedo, x.lambertian, x.normal, x.view_dir, x.facing, x.confidence, x.reflection)


def image_of(fr: Frame, rgb: torch.Tensor, scene: Lo.Scene, ctx: Any, topology: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased linear image (V,H,W,3) and coverage (V,H,W) at the image size of per-sample
    colours (P,3) (each pixel the mean of its samples)."""
    H, W = fr.hw
    vals = torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1)
    img = vals.new_zeros(fr.V * H * W, 4).index_put((fr.index,), vals).reshape(fr.V, H, W, 4)
    aa = Lo.box_pool(antialias(img, fr.rast, fr.pos, scene.tri, topology, ctx=ctx), fr.s)
    return aa[..., :3], aa[..., 3]


@torch.no_grad()
def render_neural(net: NeuralRenderer, ctx: Any, verts: Sequence[torch.Tensor], faces: Sequence[torch.Tensor],
                  albedo: Sequence[torch.Tensor], sh: torch.Tensor, cameras: Sequence[Camera], hw: tuple[int, int],
                  offsets: torch.Tensor | None = None, chunk: int = 4, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Neural renders (sRGB (V,H,W,3), on black) and coverage (V,H,W) of meshes from ``cameras``
    (``chunk`` views at a time); ``sh`` (9,3) the scene's lighting. Used by the stage's
    evaluation, the exporter and ``scripts/render_views.py``. ``supersample`` samples per pixel
    side as in ``ham.render_views`` (``sample_count``: the per-pixel MLP only)."""
    ss = sample_count(net, supersample)
    net.eval()
    dev = ctx.device
    scene = Lo.merge([v.to(dev) for v in verts], list(faces))
    alb = torch.cat([a.to(dev) for a in albedo], 0)
    if scene.verts.shape[0] != net.num_vertices:
        raise ValueError(f"the neural renderer has features for {net.num_vertices} vertices, the meshes have "
                         f"{scene.verts.shape[0]}")
    imgs, covs = [], []
    for s in range(0, len(cameras), chunk):
        cams = list(cameras[s:s + chunk])
        off = None if offsets is None else offsets[s:s + chunk].to(dev)
        fr = make_frame(ctx, scene, cams, hw, off, net.spec.multiple, supersample=ss)
        rgb = shade_pixels(net, fr, pixel_inputs(net, fr, scene.verts, scene.tri, alb, sh.to(dev)))
        img, cov = image_of(fr, rgb, scene, ctx)
        imgs.append(Lo.linear_to_srgb(img).clamp(0, 1).cpu().numpy())
        covs.append(cov.clamp(0, 1).cpu().numpy())
    return np.concatenate(imgs), np.concatenate(covs)


def sample_count(net: NeuralRenderer, supersample: int) -> int:
    """Samples per pixel side the renderer runs at: ``supersample`` for the per-pixel MLP, 1 for
    the UNet (its receptive field is counted in pixels of the image it was trained on)."""
    return int(supersample) if net.spec.kind == "mlp" else 1


# ------------------------------------------------------------------------------------------ stage
def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Train the neural renderer (phase 1), refine geometry and albedo through it (phase 2),
    evaluate on fitted and held-out views; fill ``state.neural`` and ``state.metrics['neural']``."""
    cfg = NeuralConf.from_conf(conf)
    hcfg = HamConf.from_conf(conf)
    if not state.refined or not state.lighting:
        raise ValueError("neural needs the ham stage's refined hands: list ham before neural in pipeline.stages")
    device = Lo.stage_device(conf)
    ctx = Lo.render_context(conf, device)
    scale = image_scale(scan, conf)
    sides = [s for s in scan.sides if s in state.refined] or list(state.refined)
    meshes = {s: feature_mesh(state.refined[s], cfg.subdivide, device) for s in sides}
    hands = [plain_mesh(meshes[s][0], meshes[s][1], s) for s in sides]
    offsets = camera_offsets(state, [v.name for v in scan.views], scale, device)
    # each fitted view cut to the box around its mask and hands, as ham does (no mask pixel is lost)
    work = crop_views(scan, [h.base for h in hands], offsets, hcfg.crop_margin_px) if hcfg.crop_margin_px >= 0 else scan
    prob = Problem(work, hands, ctx, MaskConf.from_conf(conf), scale, device, offsets, hcfg.background)
    sh = torch.as_tensor(state.lighting["sh_mean"], dtype=torch.float32, device=device)
    unk = Unknowns({s: meshes[s][2] for s in sides}, {h.side: torch.zeros(h.num_vertices, 1, device=device) for h in hands},
                   {}, sh)
    net = NeuralRenderer(sum(h.num_vertices for h in hands), cfg.spec()).to(device)

    ss = sample_count(net, hcfg.supersample)
    losses_1 = train_appearance(prob, unk, net, cfg, ss)
    losses_2 = train_geometry(prob, unk, net, cfg, hcfg, ss)
    fill_unseen(prob, unk, net, cfg.fill_pixels)

    metrics: dict[str, Any] = {"renderer": cfg.renderer, "feature_dim": cfg.feature_dim,
                               "parameters": int(sum(p.numel() for p in [*net.head.parameters(), *net.specular_parameters()])),
                               "vertices": int(net.num_vertices), "losses": {"appearance": losses_1, "geometry": losses_2}}
    with torch.no_grad():
        disp = {h.side: unk.displacement(h) for h in hands}
        metrics["displacement_mm"] = {h.side: float(1000.0 * disp[h.side].norm(dim=-1).mean()) for h in hands}
    metrics["train"] = evaluate_fitted(prob, unk, net, state, hcfg.supersample)
    if scan.holdout:
        metrics["holdout"] = evaluate_holdout(scan, prob, unk, net, state, conf, scale, hcfg.supersample)
    state.neural = neural_record(net, prob, unk, sides)
    state.metrics["neural"] = metrics
    tr, ho = metrics["train"], metrics.get("holdout", {})
    log.info("neural: fitted views PSNR neural %.2f / shaded %.2f dB; held-out views PSNR neural %s / shaded %s dB",
             tr.get("neural_psnr_mean") or 0.0, tr.get("shaded_psnr_mean") or 0.0,
             _f(ho.get("neural_psnr_mean")), _f(ho.get("shaded_psnr_mean")))
    return state


def feature_mesh(rec: Mapping[str, Any], levels: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vertices, faces, albedo) of a ham hand, midpoint-subdivided ``levels`` times: the surface
    stays ham's exactly (so the neural and the shaded renders see one geometry) while the
    features get several samples per pixel; ham's per-vertex albedo is carried linearly."""
    v = torch.as_tensor(rec["vertices"], dtype=torch.float32, device=device)
    f = torch.as_tensor(rec["faces"], dtype=torch.long, device=device)
    a = torch.as_tensor(rec["albedo"], dtype=torch.float32, device=device)
    if levels <= 0:
        return v, f, a.clone()
    # loop_subdivide splits ``uv_faces`` with linear (midpoint) weights: faces as their own UV
    # mesh give the midpoint subdivision of the vertices
    sub = loop_subdivide(f.cpu(), int(v.shape[0]), levels, uv_faces=f.cpu(), n_uv=int(v.shape[0]))
    M = sub.uv_matrix.to(device)
    return apply_sparse(M, v), sub.uv_faces.to(device), apply_sparse(M, a).clamp(0.0, 1.0)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def neural_record(net: NeuralRenderer, prob: Problem, unk: Unknowns, sides: list[str]) -> dict[str, Any]:
    """What the exporter and scripts/render_views.py read back (CPU tensors, plain values)."""
    with torch.no_grad():
        return {
            "renderer": net.to_record(),
            "sides": list(sides),
            "vertices": {h.side: unk.vertices(h).cpu() for h in prob.hands},
            "faces": {h.side: h.faces.cpu() for h in prob.hands},
            "albedo": {h.side: unk.albedo_of(h.side).cpu() for h in prob.hands},
            "sh": unk.sh.detach().cpu(),
            "views": list(prob.names),
        }


def load_record(rec: Mapping[str, Any], device: torch.device | str = "cpu"
                ) -> tuple[NeuralRenderer, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(renderer, vertices, faces, albedo per side in ``rec['sides']`` order, sh) of a record."""
    net = NeuralRenderer.from_record(rec["renderer"], device)
    sides = [str(s) for s in rec["sides"]]
    t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
    return (net, [t(rec["vertices"][s]) for s in sides], [t(rec["faces"][s], torch.long) for s in sides],
            [t(rec["albedo"][s]) for s in sides], t(rec["sh"]))


# ---------------------------------------------------------------------------------------- phases
def _charbonnier(rgb_lin: torch.Tensor, photo: torch.Tensor, weight: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Lo.photometric_loss on pixel lists: sRGB-encoded render against the photo, weighted mean."""
    d = Lo.linear_to_srgb(rgb_lin) - photo
    rho = torch.sqrt(d * d + eps * eps) - eps
    return (weight[:, None] * rho).sum() / (3.0 * weight.sum().clamp_min(1.0))


def _correction(rgb_lin: torch.Tensor, lambertian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared difference (sRGB) between the neural colour and the Lambertian one:
    the renderer departs from HAM's shading only where the photos pay for it, so a view direction
    no fitted view had gets little of a correction learnt for other directions."""
    d = Lo.linear_to_srgb(rgb_lin) - Lo.linear_to_srgb(lambertian)
    return ((d * d).sum(-1) * weight).sum() / (3.0 * weight.sum().clamp_min(1.0))


def _feature_smooth(prob: Problem, net: NeuralRenderer) -> torch.Tensor:
    """Laplacian of the features per hand: vertices few views see borrow their neighbours'."""
    total = net.features.new_zeros(())
    for h, o in zip(prob.hands, prob.vertex_offsets[:-1]):
        total = total + Lo.laplacian_loss(net.features[o:o + h.num_vertices], h.laplacian)
    return total


def observation_confidence(fr: Frame, weight: torch.Tensor, num_vertices: int, pixels: float) -> torch.Tensor:
    """(N,1) per vertex: its barycentric share of the fitted pixels (samples with weight > 0, each
    1/s^2 of a pixel) over all views, divided by ``pixels`` and capped at 1. A vertex about one
    pixel apart from its neighbours that one view sees squarely gets ~1 per view; surface the
    fitted views hardly saw gets ~0."""
    if pixels <= 0:
        return torch.ones(num_vertices, 1, device=fr.bary.device)
    count = Lo.barycentric_share(fr.tri, fr.bary, (weight > 0).float() / fr.s ** 2, num_vertices)
    return (count / pixels).clamp(0.0, 1.0)[:, None].float()


@torch.no_grad()
def fill_unseen(prob: Problem, unk: Unknowns, net: NeuralRenderer, pixels: float) -> None:
    """ham's fill_unseen_albedo for the albedo, and with the same confidences for the features."""
    confs = fill_unseen_albedo(prob, unk, pixels)
    for h, o, conf in zip(prob.hands, prob.vertex_offsets[:-1], confs or []):
        net.features[o:o + h.num_vertices] = confidence_fill(net.features[o:o + h.num_vertices], conf, h.faces)


def _specular_group(net: NeuralRenderer, cfg: NeuralConf) -> list[dict[str, Any]]:
    return [{"params": net.specular_parameters(), "lr": cfg.lr_specular}] if net.lobe_axis is not None else []


def interior_samples(prob: Problem, scene: Lo.Scene, cams: Sequence[Camera], views: list[int], net: NeuralRenderer,
                     cfg: NeuralConf, supersample: int) -> tuple[Frame, torch.Tensor, torch.Tensor]:
    """Phase 1's pixels: the interior ones (coverage eroded by a pixel, all s x s samples
    covered), front faces, inside ham's photometric weights. Returns the frame of their samples,
    ordered pixel by pixel (s^2 consecutive samples each), the pixels' flat indices (Q,) into
    (V*H*W) and their weights (Q,); with one sample per pixel, every covered pixel, the others at
    weight 0."""
    fr = make_frame(prob.ctx, scene, cams, prob.hw, prob.off(views), net.spec.multiple, cfg.crop_margin_px,
                    supersample)
    pr = fr.pixel_rast
    interior = Lo.erode(pr[..., 3] > 0) & ~Lo.back_facing(scene.verts, scene.tri, pr, cams)
    weight = (prob.photo_weight[views] * interior).reshape(-1)
    if fr.s == 1:  # every covered pixel (a unet sees the others around the counted ones)
        return fr, fr.index, weight[fr.index]
    owner = fr.pixel
    n = torch.zeros_like(weight).index_add_(0, owner, torch.ones_like(owner, dtype=weight.dtype))
    weight = weight * (n == fr.s ** 2)
    keep = torch.nonzero(weight[owner] > 0).squeeze(1)
    keep = keep[torch.argsort(owner[keep], stable=True)]
    sub = fr.subset(keep)
    pix = owner[keep][::fr.s ** 2]
    return sub, pix, weight[pix]


def pixel_mean(x: torch.Tensor, s: int) -> torch.Tensor:
    """(Q*s^2, k) samples ordered pixel by pixel -> (Q, k) their pixel means."""
    return x if s == 1 else x.reshape(-1, s * s, x.shape[-1]).mean(1)


def samples_of(pixels: torch.Tensor, s: int) -> torch.Tensor:
    """Sample indices of pixels (B,) in a pixel-by-pixel ordered frame."""
    if s == 1:
        return pixels
    return (pixels[:, None] * (s * s) + torch.arange(s * s, device=pixels.device)).reshape(-1)


def train_appearance(prob: Problem, unk: Unknowns, net: NeuralRenderer, cfg: NeuralConf, supersample: int = 1
                     ) -> dict[str, float]:
    """Phase 1: features and network on the interior pixels of the fitted views; one raster. With
    ``supersample`` s the network runs on the s x s samples of each pixel and the pixel's colour
    is their mean, as a camera pixel integrates (``losses.Raster``)."""
    views = prob.kept
    if cfg.iterations <= 0 or not views:
        return {}
    cams = [prob.cameras[i] for i in views]
    verts = torch.cat([unk.vertices(h) for h in prob.hands]).detach()
    scene = prob.scene([unk.vertices(h).detach() for h in prob.hands])
    with torch.no_grad():
        fr, pix, weight = interior_samples(prob, scene, cams, views, net, cfg, supersample)
        photo = prob.photo[views].reshape(-1, 3)[pix]
        net.confidence.copy_(observation_confidence(fr, weight.repeat_interleave(fr.s ** 2), net.num_vertices,
                                                     cfg.confidence_pixels))
        static = pixel_inputs(net, fr, verts, scene.tri, prob.albedo(unk).detach(), unk.sh)
        lambertian = pixel_mean(static.lambertian, fr.s)
    opt, sched = _adam([{"params": [net.features], "lr": cfg.lr_features},
                        {"params": list(net.head.parameters()), "lr": cfg.lr_network}, *_specular_group(net, cfg)],
                       cfg.iterations)
    w = cfg.weights
    P = int(pix.shape[0])
    gen = torch.Generator(device="cpu").manual_seed(0)
    terms: dict[str, torch.Tensor] = {}
    net.train()
    bar = progress(range(cfg.iterations), f"neural appearance ({net.spec.kind})")
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        feats = (net.features[fr.tri] * fr.bary[..., None]).sum(1)
        x = PixelInputs(feats, static.albedo, static.lambertian, static.normal, static.view_dir, static.facing,
                        static.confidence, static.reflection)
        sel = None
        if cfg.batch_pixels and net.spec.kind == "mlp" and cfg.batch_pixels < P:
            sel = torch.randint(0, P, (cfg.batch_pixels,), generator=gen).to(fr.index.device)
        rgb = pixel_mean(shade_pixels(net, fr, x, cfg.mixed_precision, None if sel is None else samples_of(sel, fr.s)), fr.s)
        wsel = weight if sel is None else weight[sel]
        terms = {"photometric": _charbonnier(rgb, photo if sel is None else photo[sel], wsel)}
        if w.get("correction", 0) > 0:
            terms["correction"] = _correction(rgb, lambertian if sel is None else lambertian[sel], wsel)
        if w.get("feature_smooth", 0) > 0:
            terms["feature_smooth"] = _feature_smooth(prob, net)
        loss = sum(w.get(k, 0.0) * v for k, v in terms.items())
        loss.backward()
        opt.step()
        net.project_()
        sched.step()
        bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
    return {k: float(v.detach()) for k, v in terms.items()}


def train_geometry(prob: Problem, unk: Unknowns, net: NeuralRenderer, cfg: NeuralConf, hcfg: HamConf,
                   supersample: int = 1) -> dict[str, float]:
    """Phase 2: features, network, a normal displacement and the albedo through the antialiased
    neural render (``supersample`` samples per pixel side), with ham's silhouette / contour terms
    and regularisers (``ham.weights``)."""
    views = prob.kept
    if cfg.iterations_geometry <= 0 or not views:
        return {}
    w = {k: v for k, v in hcfg.weights.items() if k in GEOMETRY_TERMS and v > 0
         and not (prob.maskless and k in ("silhouette", "contour"))}
    w["photometric"] = cfg.weights["photometric"]
    for k in ("feature_smooth", "correction"):
        if cfg.weights.get(k, 0) > 0:
            w[k] = cfg.weights[k]
    cams = [prob.cameras[i] for i in views]
    P = prob.P[views]
    for t in list(unk.fine.values()) + list(unk.albedo.values()):
        t.requires_grad_(True)
    opt, sched = _adam([{"params": [net.features], "lr": cfg.lr_features},
                        {"params": list(net.head.parameters()), "lr": cfg.lr_network}, *_specular_group(net, cfg),
                        {"params": list(unk.fine.values()), "lr": cfg.lr_displacement},
                        {"params": list(unk.albedo.values()), "lr": cfg.lr_albedo}], cfg.iterations_geometry)
    contours = prob.vm.contours(views, hcfg.contour_margin_px, hcfg.contour_points)
    terms: dict[str, torch.Tensor] = {}
    net.train()
    bar = progress(range(cfg.iterations_geometry), "neural geometry")
    for it in bar:
        if it > 0 and hcfg.mask_update_every > 0 and it % hcfg.mask_update_every == 0:
            prob.update_masks(unk)
            contours = prob.vm.contours(views, hcfg.contour_margin_px, hcfg.contour_points)
        opt.zero_grad(set_to_none=True)
        verts = [unk.vertices(h) for h in prob.hands]
        scene = prob.scene(verts)
        fr = make_frame(prob.ctx, scene, cams, prob.hw, prob.off(views), net.spec.multiple, cfg.crop_margin_px,
                        supersample)
        x = pixel_inputs(net, fr, scene.verts, scene.tri, prob.albedo(unk), unk.sh)
        rgb = shade_pixels(net, fr, x, cfg.mixed_precision)
        img, cov = image_of(fr, rgb, scene, prob.ctx, prob.topology)
        weight = prob.photo_weight[views] * ~Lo.back_facing(scene.verts, scene.tri, fr.pixel_rast, cams)
        terms = {"photometric": Lo.photometric_loss(prob.composite(img, cov, views), prob.photo[views], weight,
                                                    eps=hcfg.photometric_eps)}
        terms.update(mask_terms(prob, scene, cov, fr.pixel_rast, views, P, contours, hcfg, w))
        if "feature_smooth" in w:
            terms["feature_smooth"] = _feature_smooth(prob, net)
        if "correction" in w:
            terms["correction"] = _correction(rgb, x.lambertian, weight.reshape(-1)[fr.pixel])
        terms.update(_regularisers(prob, unk, verts, w))
        loss = sum(w.get(k, 0.0) * v for k, v in terms.items())
        loss.backward()
        opt.step()
        net.project_()
        sched.step()
        clamp_albedo(unk)
        bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
    for t in list(unk.fine.values()) + list(unk.albedo.values()):
        t.requires_grad_(False)
    prob.update_masks(unk)
    return {k: float(v.detach()) for k, v in terms.items()}


# ------------------------------------------------------------------------------------ evaluation
def _compare(neural: np.ndarray, shaded: np.ndarray, photo: np.ndarray, usable: np.ndarray,
             both: np.ndarray) -> dict[str, Any]:
    """Metrics of the two renders of one view on the same pixels."""
    out: dict[str, Any] = {}
    for name, img in (("neural", neural), ("shaded", shaded)):
        m = photo_metrics(img, photo, usable & both)
        m["psnr_full_mask"] = photo_metrics(img, photo, usable)["psnr"]
        out[name] = m
    out["pixels"] = int((usable & both).sum())
    return out


def _means(views: Mapping[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for r in ("neural", "shaded"):
        for k in ("psnr", "ssim", "psnr_full_mask"):
            vals = [views[n][r][k] for n in names if views[n][r].get(k) is not None]
            out[f"{r}_{k}_mean"] = float(np.mean(vals)) if vals else None
    if out["neural_psnr_mean"] is not None and out["shaded_psnr_mean"] is not None:
        out["psnr_gain_db"] = out["neural_psnr_mean"] - out["shaded_psnr_mean"]
    return out


def _ham_meshes(state: State, sides: Sequence[str], device: torch.device) -> tuple[list, list, list]:
    t = lambda x, dt=torch.float32: torch.as_tensor(x, dtype=dt, device=device)  # noqa: E731
    return ([t(state.refined[s]["vertices"]) for s in sides], [t(state.refined[s]["faces"], torch.long) for s in sides],
            [t(state.refined[s]["albedo"]) for s in sides])


@torch.no_grad()
def evaluate_fitted(prob: Problem, unk: Unknowns, net: NeuralRenderer, state: State, supersample: int = 1) -> dict[str, Any]:
    """Fitted views with a usable mask: the neural render against HAM's shaded render (each
    view's own SH, as HAM fitted it) on the same pixels, both over the photo's background
    (``ham.background``) as ham measures."""
    views = prob.kept if not prob.maskless else []
    if not views:
        return {"views": {}}
    sides = [h.side for h in prob.hands]
    cams = [prob.cameras[i] for i in views]
    off = prob.off(views)
    nimg, ncov = render_neural(net, prob.ctx, [unk.vertices(h) for h in prob.hands], [h.faces for h in prob.hands],
                               [unk.albedo_of(h.side) for h in prob.hands], unk.sh, cams, prob.hw, off,
                               supersample=supersample)
    names = [str(n) for n in state.lighting["views"]]
    sh_all = torch.as_tensor(state.lighting["sh"], dtype=torch.float32)
    sh = torch.stack([sh_all[names.index(prob.names[i])] if prob.names[i] in names else unk.sh.cpu() for i in views])
    v, f, a = _ham_meshes(state, sides, prob.device)
    rv = render_views(prob.ctx, v, f, a, sh.to(prob.device), cams, prob.hw, off, supersample)
    photo = prob.photo[views].cpu().numpy()
    if prob.background is not None:
        bg = prob.background[views].cpu().numpy()
        nimg, rv.shaded = srgb_over_background(nimg, ncov, bg), srgb_over_background(rv.shaded, rv.coverage, bg)
    usable = ((prob.vm.valid * prob.vm.target)[views] > 0.5).cpu().numpy()
    both = (ncov > 0.5) & (rv.coverage > 0.5) & (rv.back < 0.5)
    per = {prob.names[i]: _compare(nimg[k], rv.shaded[k], photo[k], usable[k], both[k]) for k, i in enumerate(views)}
    return {"views": per, **_means(per, list(per))}


@torch.no_grad()
def evaluate_holdout(scan: Scan, prob: Problem, unk: Unknowns, net: NeuralRenderer, state: State,
                     conf: Mapping[str, Any] | None, scale: float, supersample: int = 1) -> dict[str, Any]:
    """Held-out views: masks judged against the hands as for fitted views (forearm and missing
    hands ignored; a broken mask is flagged 'dropped' and left out of the means), no camera
    corrections (none was estimated), the shaded render under the mean SH of the fitted views."""
    hs = Scan(list(scan.holdout), scan.sides, scan.scan_id, scan.source)
    sides = [h.side for h in prob.hands]
    v, f, a = _ham_meshes(state, sides, prob.device)
    builder = MaskBuilder(hs, MaskConf.from_conf(conf), prob.ctx, scale, prob.device)
    vm = builder.build(list(zip(v, f)), sides, decide=True, consensus=False)
    cams, hw = builder.cameras, builder.hw
    nimg, ncov = render_neural(net, prob.ctx, [unk.vertices(h) for h in prob.hands], [h.faces for h in prob.hands],
                               [unk.albedo_of(h.side) for h in prob.hands], unk.sh, cams, hw, supersample=supersample)
    rv = render_views(prob.ctx, v, f, a, unk.sh.expand(len(cams), -1, -1).contiguous(), cams, hw, supersample=supersample)
    photo_t = pad_stack([vw.image for vw in hs.views], hw, channels=3, device=prob.device)
    photo = photo_t.cpu().numpy()
    if prob.background is not None:  # each held-out photo's own backdrop, as ham's evaluate_holdout
        occupied = (vm.target > 0.5) | torch.as_tensor((rv.coverage > 0) | (ncov > 0), device=prob.device)
        bg = estimate_background(photo_t, builder.inside, occupied).cpu().numpy()
        nimg, rv.shaded = srgb_over_background(nimg, ncov, bg), srgb_over_background(rv.shaded, rv.coverage, bg)
    usable = ((vm.valid * vm.target) > 0.5).cpu().numpy()
    both = (ncov > 0.5) & (rv.coverage > 0.5) & (rv.back < 0.5)
    per: dict[str, Any] = {}
    for k, vw in enumerate(hs.views):
        rec = _compare(nimg[k], rv.shaded[k], photo[k], usable[k], both[k])
        rec["status"] = vm.status[k]
        if vm.notes[k]:
            rec["note"] = vm.notes[k]
        per[vw.name] = rec
    counted = [n for n in per if per[n]["status"] != "dropped"]
    return {"views": per, **_means(per, counted), "views_counted": counted}
