"""Stage ``ham``: hand albedo and mesh refinement by inverse rendering (FMHR's HAM, per hand).

Each fitted hand is Loop-subdivided (``ham.levels``; the topology family is kept, skinning weights
and UVs are carried by the same sparse matrix), then three unknowns are optimised against the
photos: a per-vertex albedo, per-view SH lighting (9 coefficients, RGB; per view because cameras
differ in exposure and white balance, tied to their mean by a regulariser) and a per-vertex
displacement: a fine one (along the subdivided mesh's normals, or free) plus a coarse one on the
model's vertices carried by the subdivision (free by default: it can move a finger the keypoint
and silhouette fits left a few millimetres off, which normal offsets can only fake by bulging),
so that shape corrections of millimetres converge as fast as the fine detail. Two phases as in FMHR:

(a) albedo + lighting with the geometry fixed (the raster is computed once and reused);
(b) geometry + albedo + lighting;
then (a) once more on the final geometry (``iterations_final``), which costs little. Last, surface
the fitted views saw over fewer than ``ham.albedo_fill_pixels`` pixels takes its albedo partly or
wholly from the surface around it (``fill_unseen_albedo``): a per-vertex albedo fitted to a pixel
or less at a grazing angle explains that pixel's misfit, not the skin, and a new camera sees it.

Both hands are one scene (one rasterization; occlusion between them is right). Data terms:
photometric (the antialiased render composited over the photo's inpainted background,
``fitting.background``, converted to sRGB once at the loss, against the photo inside the usable
masks, outline pixels included; pixels showing the inside of the open wrist left out), silhouette
(antialiased coverage) and contour chamfer against the masks, with
the mask handling of ``fitting.masks`` (forearm, broken views, missing hands). Regularisers:
Laplacian of the displacements, relative edge length, normal consistency, albedo smoothness,
displacement magnitude and lighting consistency. All weights, iterations and learning rates are
in the ``ham`` conf section. With ``ham.supersample`` s > 1 every render (fitted, measured,
exported; the neural stage's too) takes s x s samples per pixel and averages them, as a camera
pixel integrates its area (``losses.Raster``).

Outputs: ``state.refined[side]`` (subdivided vertices, faces, albedo, displacement, uv, uv_faces,
skinning weights) and ``state.lighting`` (SH per view, their mean for novel views); metrics per
view (IoU three ways, masked PSNR / SSIM of the shaded render), their means, and ground-truth
surface errors when the scan has a true mesh.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from capture.camera import Camera
from capture.scan import Scan, View
from fitting import losses as Lo
from fitting.background import estimate_background, over_background, srgb_over_background
from fitting.conf import section_dataclass
from fitting.geometry import projection_matrices
from fitting.hand_fit import _load_model, _model_name, _progress
from fitting.masks import MaskBuilder, MaskConf, ViewMasks, iou_report, pad_stack
from fitting.pose_fit import image_scale
from fitting.silhouette_fit import camera_offsets, gt_errors
from fitting.state import State
from renderer.mesh_ops import (apply_sparse, confidence_fill, edge_lengths, face_adjacency, loop_subdivide, mesh_edges,
                               uniform_laplacian)
from renderer.ops import antialias_construct_topology_hash, rasterize
from renderer.shading import sh_ambient, vertex_normals

log = logging.getLogger("handrecon")
TERMS = ("photometric", "silhouette", "contour", "laplacian", "edge", "normal", "albedo_smooth", "displacement",
         "light")


@dataclass
class HamConf:
    """Keys of the ``ham`` conf section."""

    levels: int = 2  # Loop subdivision levels of the fitted meshes (1..3)
    displacement: str = "normal"  # normal (along the subdivided mesh's normals) | free (3D)
    coarse_displacement: str = "free"  # none | normal | free: a displacement of the model's vertices
    sh_per_view: bool = True  # per-view SH (tied by the light term), else one SH for all views
    iterations_appearance: int = 80  # phase (a): albedo + lighting, geometry fixed
    iterations_geometry: int = 250  # phase (b): displacements + albedo (+ lighting)
    iterations_final: int = 60  # albedo + lighting again on the final geometry
    supersample: int = 1  # samples per pixel side of every fitted, measured and exported render (ham, neural); 1 = one sample + antialiasing
    lr_albedo: float = 0.02
    lr_sh: float = 0.02
    lr_displacement: float = 0.00005  # metres per Adam step, fine displacement
    lr_coarse_displacement: float = 0.0003  # metres per Adam step, coarse displacement
    geometry_lighting: bool = True  # phase (b) also refines the lighting
    mask_update_every: int = 50  # move the forearm maps with the refined hands (0 = never)
    crop_margin_px: int = 12  # fit on each view's box around its mask and hands (+margin, fitted px); -1 = whole images
    contour_sigma_px: float = 3.0
    contour_reverse_sigma_px: float = 20.0
    contour_points: int = 3000
    contour_margin_px: int = 2
    # what renders are composited over for the photometric terms and the metrics: "inpaint" (each
    # photo's background inpainted from its pixels away from masks and hands, fitting.background:
    # the outline pixels then model the photo's mix of hand and background, and count) or "black"
    # (outline pixels left out of the photometric terms)
    background: str = "inpaint"
    photometric_eps: float = 0.05  # Charbonnier: quadratic below, linear above (losses.photometric_loss)
    # a vertex's fitted albedo is kept in full once the fitted views saw it over this many pixels
    # (barycentric share) and less below, the rest from the surface around it (fill_unseen_albedo);
    # 0 = keep every fitted albedo
    albedo_fill_pixels: float = 1.0
    weights: dict[str, float] = field(default_factory=lambda: {
        "photometric": 1.0, "silhouette": 1.0, "contour": 1.0, "laplacian": 0.5, "edge": 1.0, "normal": 0.1,
        "albedo_smooth": 0.02, "displacement": 0.001, "light": 0.01})

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "HamConf":
        out: HamConf = section_dataclass(HamConf, conf, "ham", TERMS)
        if out.displacement not in ("normal", "free"):
            raise ValueError(f"ham.displacement must be normal or free, got {out.displacement!r}")
        if out.coarse_displacement not in ("none", "normal", "free"):
            raise ValueError(f"ham.coarse_displacement must be none, normal or free, got {out.coarse_displacement!r}")
        if out.background not in ("inpaint", "black"):
            raise ValueError(f"ham.background must be inpaint or black, got {out.background!r}")
        if not out.albedo_fill_pixels >= 0:
            raise ValueError(f"ham.albedo_fill_pixels must be >= 0, got {out.albedo_fill_pixels}")
        if not out.photometric_eps > 0:
            raise ValueError(f"ham.photometric_eps must be > 0, got {out.photometric_eps}")
        if not 1 <= out.supersample <= 8:
            raise ValueError(f"ham.supersample must be 1..8, got {out.supersample}")
        if not 1 <= out.levels <= 3:
            raise ValueError(f"ham.levels must be 1..3, got {out.levels}")
        return out


# ------------------------------------------------------------------------------------ per-hand set-up
@dataclass
class HandMesh:
    """One hand's subdivided mesh and the constant tensors its regularisers need."""

    side: str
    faces: torch.Tensor  # (F,3) long
    S: torch.Tensor  # sparse (N, N_model): model vertices -> subdivided
    base: torch.Tensor  # (N,3) subdivided fitted mesh (no displacement)
    normals: torch.Tensor  # (N,3) its unit vertex normals (direction of normal displacements)
    uv: torch.Tensor
    uv_faces: torch.Tensor
    skin_weights: torch.Tensor  # (N,16)
    laplacian: torch.Tensor  # sparse (N,N)
    laplacian_coarse: torch.Tensor  # sparse (N_model, N_model)
    edges: torch.Tensor
    rest_lengths: torch.Tensor
    adjacency: torch.Tensor

    @property
    def num_vertices(self) -> int:
        return int(self.base.shape[0])


def subdivide_hand(model: Any, params: Any, levels: int, device: torch.device) -> HandMesh:
    """Subdivide the posed model mesh of ``params``, carrying UVs and skinning weights."""
    with torch.no_grad():
        v = model.forward(params.to(device)).vertices[0]
    uvf = model.uv_faces if getattr(model, "uv_faces", None) is not None else None
    sub = loop_subdivide(model.faces, model.num_vertices, levels, uv_faces=uvf,
                         n_uv=None if uvf is None else int(model.uv.shape[0]))
    S = sub.matrix.to(device)
    faces = sub.faces.to(device)
    base = sub.apply(v)
    if uvf is not None:
        uv, uv_faces = sub.apply_uv(model.uv.to(device)), sub.uv_faces.to(device)
    else:  # a model without UVs: a trivial atlas (every face on one texel row) keeps exports valid
        uv, uv_faces = torch.full((base.shape[0], 2), 0.5, device=device), faces.clone()
    edges = mesh_edges(faces).to(device)
    return HandMesh(
        side=model.side, faces=faces, S=S, base=base, normals=vertex_normals(base, faces), uv=uv, uv_faces=uv_faces,
        skin_weights=sub.apply(model.weights.to(device)),
        laplacian=uniform_laplacian(faces, base.shape[0]).to(device),
        laplacian_coarse=uniform_laplacian(model.faces, model.num_vertices).to(device),
        edges=edges, rest_lengths=edge_lengths(base, edges), adjacency=face_adjacency(faces).to(device),
    )


def plain_mesh(verts: torch.Tensor, faces: torch.Tensor, side: str = "right") -> HandMesh:
    """A HandMesh of any mesh without a hand model (no subdivision, one-texel UVs, uniform skin
    weights): for refining other shapes with the same machinery, e.g. a calibration sphere."""
    dev = verts.device
    N = int(verts.shape[0])
    idx = torch.arange(N, device=dev)
    S = torch.sparse_coo_tensor(torch.stack([idx, idx]), torch.ones(N, device=dev), (N, N), check_invariants=False).coalesce()
    faces = faces.long().to(dev)
    edges = mesh_edges(faces).to(dev)
    return HandMesh(side=side, faces=faces, S=S, base=verts, normals=vertex_normals(verts, faces),
                    uv=torch.full((N, 2), 0.5, device=dev), uv_faces=faces.clone(),
                    skin_weights=torch.ones(N, 1, device=dev), laplacian=uniform_laplacian(faces, N).to(dev),
                    laplacian_coarse=uniform_laplacian(faces, N).to(dev), edges=edges,
                    rest_lengths=edge_lengths(verts, edges), adjacency=face_adjacency(faces).to(dev))


@dataclass
class Unknowns:
    """The optimised tensors: per side albedo (N,3) and displacements, and the SH."""

    albedo: dict[str, torch.Tensor]
    fine: dict[str, torch.Tensor]  # (N,1) normal or (N,3) free
    coarse: dict[str, torch.Tensor]  # (N_model,1|3)
    sh: torch.Tensor  # (V,9,3) or (9,3)

    def displacement(self, h: HandMesh) -> torch.Tensor:
        """Displacement vectors (N,3) of hand ``h``: fine and coarse (subdivided), each along the
        normals when it has one component."""
        d = self.fine[h.side]
        d = d * h.normals if d.shape[1] == 1 else d
        if self.coarse:
            c = Lo.spmm(h.S, self.coarse[h.side])
            d = d + (c * h.normals if c.shape[1] == 1 else c)
        return d

    def vertices(self, h: HandMesh) -> torch.Tensor:
        return h.base + self.displacement(h)

    def albedo_of(self, side: str) -> torch.Tensor:
        return self.albedo[side].clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- stage
def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Refine every fitted hand; fill ``state.refined``, ``state.lighting`` and metrics."""
    cfg = HamConf.from_conf(conf)
    if not state.params:
        raise ValueError("ham needs fitted hands: list hand_fit (and silhouette_fit) before ham in pipeline.stages")
    if all(v.image is None for v in scan.views):
        raise ValueError("ham needs photos: the scan has no images")
    device = Lo.stage_device(conf)
    ctx = Lo.render_context(conf, device)
    scale = image_scale(scan, conf)
    sides = [s for s in scan.sides if s in state.params]
    models = {s: _load_model(_model_name(conf), s, device) for s in sides}
    hands = [subdivide_hand(models[s], state.params[s], cfg.levels, device) for s in sides]
    offsets = camera_offsets(state, [v.name for v in scan.views], scale, device)
    work = crop_views(scan, [h.base for h in hands], offsets, cfg.crop_margin_px) if cfg.crop_margin_px >= 0 else scan
    prob = Problem(work, hands, ctx, MaskConf.from_conf(conf), scale, device, offsets, cfg.background)
    gt_input = gt_errors(scan, {h.side: (h.base, h.faces) for h in hands})

    unk = init_unknowns(prob, cfg)
    losses_a = optimize_appearance(prob, unk, cfg, prob.kept, cfg.iterations_appearance, "ham appearance")
    losses_b = optimize_geometry(prob, unk, cfg)
    # albedo and lighting once more on the final geometry (its raster reused: cheap)
    losses_c = optimize_appearance(prob, unk, cfg, prob.kept, cfg.iterations_final, "ham appearance (final)")
    fill_unseen_albedo(prob, unk, cfg.albedo_fill_pixels)
    dropped = [i for i in range(prob.V) if i not in prob.kept]
    if dropped and cfg.sh_per_view:  # lighting of views without a usable mask, on the render's own coverage
        prob.use_render_coverage(unk, dropped)
        optimize_appearance(prob, unk, cfg, dropped, max(cfg.iterations_appearance // 2, 1), "ham lighting (dropped views)",
                            lighting_only=True)

    metrics = evaluate(prob, unk, cfg.supersample)
    if scan.holdout:
        metrics["holdout"] = evaluate_holdout(prob, unk, scan.holdout, MaskConf.from_conf(conf), cfg.supersample)
    metrics["losses"] = {"appearance": losses_a, "geometry": losses_b, "final": losses_c}
    metrics["levels"] = cfg.levels
    metrics["vertices"] = {h.side: h.num_vertices for h in hands}
    metrics["faces"] = {h.side: int(h.faces.shape[0]) for h in hands}
    gt_out = gt_errors(scan, {h.side: (unk.vertices(h).detach(), h.faces) for h in hands})
    if gt_out:
        gt_rec: dict[str, Any] = {"input": gt_input, "after": gt_out}
        hf = state.metrics.get("silhouette_fit", {}).get("gt", {}).get("before")
        if hf:
            gt_rec["hand_fit"] = hf
        ref = hf or gt_input
        if ref.get("p2s_mm"):
            gt_rec["p2s_ratio_vs_hand_fit" if hf else "p2s_ratio_vs_input"] = gt_out["p2s_mm"] / ref["p2s_mm"]
        metrics["gt"] = gt_rec
    for h in hands:
        state.refined[h.side] = refined_record(h, unk, cfg)
    state.lighting = lighting_record(prob, unk)
    state.metrics["ham"] = metrics
    log.info("ham: IoU mean %.3f (min %.3f), PSNR mean %.2f dB, SSIM mean %.3f over the kept views",
             metrics["iou_mean"] or 0.0, metrics["iou_min"] or 0.0, metrics["psnr_mean"] or 0.0,
             metrics["ssim_mean"] or 0.0)
    return state


@torch.no_grad()
def crop_views(scan: Scan, verts: Sequence[torch.Tensor], offsets: torch.Tensor | None, margin_px: int) -> Scan:
    """The scan with each view cut to the box around its whole mask and its projected hands, grown
    by ``margin_px`` (pixels at the fitted size), the principal point moved with the cut.

    Why: the hands fill a tenth of a photo, and every image operation of the optimisation
    (rasterization, interpolation, antialiasing, losses and their gradients) costs per pixel of the
    common canvas. No mask pixel is cut away, so IoU and masked PSNR are those of the whole images
    (the margin keeps the refined hands, which move millimetres, inside the box)."""
    X = torch.cat([v.detach().to(torch.float64).cpu() for v in verts], 0).numpy()
    Xh = np.concatenate([X, np.ones_like(X[:, :1])], 1)
    views = []
    for i, v in enumerate(scan.views):
        cam = v.camera
        W, H = cam.width, cam.height
        uvw = Xh @ cam.projection.T
        uv = uvw[:, :2] / np.maximum(uvw[:, 2:3], 1e-9)
        if offsets is not None:
            uv = uv + offsets[i].detach().cpu().numpy()[None].astype(np.float64)
        front = uvw[:, 2] > 0
        if not front.any():
            views.append(v)
            continue
        x0, y0 = np.floor(uv[front].min(0)).astype(int)
        x1, y1 = np.ceil(uv[front].max(0)).astype(int)
        if v.mask is not None and v.mask.any():
            ys, xs = np.nonzero(v.mask)
            x0, y0 = min(x0, int(xs.min())), min(y0, int(ys.min()))
            x1, y1 = max(x1, int(xs.max()) + 1), max(y1, int(ys.max()) + 1)
        x0, y0 = max(x0 - margin_px, 0), max(y0 - margin_px, 0)
        x1, y1 = min(x1 + margin_px, W), min(y1 + margin_px, H)
        if x1 - x0 < 2 or y1 - y0 < 2 or (x0, y0, x1, y1) == (0, 0, W, H):
            views.append(v)
            continue
        K = cam.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        c = Camera(K, cam.R, cam.t, x1 - x0, y1 - y0, cam.name)
        views.append(View(v.name, c, image=None if v.image is None else v.image[y0:y1, x0:x1],
                          mask=None if v.mask is None else v.mask[y0:y1, x0:x1],
                          keypoints={k: kp - np.array([x0, y0, 0], kp.dtype) for k, kp in v.keypoints.items()}))
    return Scan(views, scan.sides, scan.scan_id, scan.source, scan.scale_mat, scan.gt, list(scan.holdout))


def refined_record(h: HandMesh, unk: Unknowns, cfg: HamConf) -> dict[str, Any]:
    """What later stages and the exporters read: CPU tensors."""
    with torch.no_grad():
        disp = unk.displacement(h)
        rec = {
            "vertices": (h.base + disp).cpu(),
            "faces": h.faces.cpu(),
            "albedo": unk.albedo_of(h.side).cpu(),
            "displacement": disp.cpu(),
            "base_vertices": h.base.cpu(),
            "uv": h.uv.cpu(),
            "uv_faces": h.uv_faces.cpu(),
            "skin_weights": h.skin_weights.cpu(),
            "levels": cfg.levels,
            "displacement_mode": cfg.displacement,
        }
    return rec


def lighting_record(prob: "Problem", unk: Unknowns) -> dict[str, Any]:
    sh = unk.sh.detach()
    per_view = sh if sh.ndim == 3 else sh.unsqueeze(0).expand(prob.V, -1, -1)
    kept = per_view[prob.kept] if prob.kept else per_view
    return {"sh": per_view.cpu().clone(), "views": list(prob.names), "sh_mean": kept.mean(0).cpu(),
            "convention": "SH of incident radiance (9 real orthonormal functions, RGB, linear), world frame"}


# ----------------------------------------------------------------------------------------- problem
class Problem:
    """The fixed inputs of the optimisation on the render canvas: cameras, photos, masks, the
    merged scene's faces and topology, and the weight maps."""

    def __init__(self, scan: Scan, hands: list[HandMesh], ctx: Any, mcfg: MaskConf, scale: float, device: torch.device,
                 offsets: torch.Tensor | None = None, background: str = "inpaint"):
        self.scan, self.hands, self.ctx, self.scale, self.device = scan, hands, ctx, scale, device
        self.names = [v.name for v in scan.views]
        self.V = len(self.names)
        self.offsets = offsets  # (V,2) camera corrections of silhouette_fit, pixels at the loaded size
        self.builder = MaskBuilder(scan, mcfg, ctx, scale, device)
        self.builder.offsets = offsets
        self.cameras, self.hw = self.builder.cameras, self.builder.hw
        P = torch.as_tensor(projection_matrices(self.cameras), dtype=torch.float32, device=device)
        self.P = Lo.offset_projections(P, offsets)
        self.photo = pad_stack([v.image for v in scan.views], self.hw, channels=3, device=device)
        base = Lo.merge([h.base for h in hands], [h.faces for h in hands])
        self.tri, self.vertex_offsets = base.tri, base.offsets
        self.topology = antialias_construct_topology_hash(self.tri)
        self.vm: ViewMasks = self.builder.build([(h.base, h.faces) for h in hands], [h.side for h in hands], decide=True)
        self.kept = [i for i in range(self.V) if float(self.vm.view_weight[i]) > 0]
        # without any usable mask (a capture without segmentation), the photos are compared on
        # the render's own coverage and the silhouette terms are off
        self.maskless = not self.kept
        if self.maskless:
            self.kept = [i for i, v in enumerate(scan.views) if v.image is not None]
            log.warning("ham: no usable mask in any view; photometric terms on the render's own coverage, "
                        "no silhouette terms")
        self.background = self._background([(h.base, h.faces) for h in hands]) if background == "inpaint" else None
        self.photo_weight = self._photo_weight()
        if self.maskless:
            self.use_render_coverage_of([(h.base, h.faces) for h in hands], self.kept)

    @torch.no_grad()
    def _background(self, meshes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Each photo's background (linear, ``fitting.background``), read away from the masks and
        from the fitted hands' renders (a view whose mask misses a hand)."""
        scene = self.scene([m[0] for m in meshes])
        rast, _ = rasterize(self.ctx, Lo.clip_positions(scene.verts, self.cameras, offsets=self.offsets), scene.tri,
                            self.hw, grad_db=False)
        occupied = (self.vm.target > 0.5) | (rast[..., 3] > 0)
        return estimate_background(self.photo, self.vm.inside, occupied)

    def composite(self, image: torch.Tensor, coverage: torch.Tensor, views: list[int]) -> torch.Tensor:
        """A linear render of ``views`` over their photos' backgrounds (unchanged without one)."""
        return over_background(image, coverage, None if self.background is None else self.background[views])

    def off(self, views: list[int]) -> torch.Tensor | None:
        return None if self.offsets is None else self.offsets[views]

    def scene(self, verts: Sequence[torch.Tensor]) -> Lo.Scene:
        return Lo.Scene(torch.cat(list(verts), 0), self.tri, self.vertex_offsets)

    def update_masks(self, unk: Unknowns) -> None:
        """Move the forearm maps with the refined hands (decisions kept)."""
        if self.maskless:
            self.use_render_coverage(unk, self.kept)
            return
        with torch.no_grad():
            self.vm = self.builder.build([(unk.vertices(h), h.faces) for h in self.hands], [h.side for h in self.hands],
                                         decide=False, previous=self.vm)
        self.photo_weight = self._photo_weight()

    def _photo_weight(self) -> torch.Tensor:
        """Usable mask pixels. Over a background estimate their one-pixel rim counts too (a render
        composited over the backdrop models the photo's mix of hand and backdrop there: on the demo
        capture +0.4 dB over the mask at unchanged IoU); over black the rim is left out, as a
        render over black cannot model it."""
        if self.background is not None:
            return self.vm.weight
        inner = Lo.erode(self.vm.target > 0.5).float()
        return self.vm.weight * inner

    @torch.no_grad()
    def use_render_coverage(self, unk: Unknowns, views: list[int]) -> None:
        """For views whose mask was dropped: photometric weights = the render's own coverage,
        eroded by a pixel (edge pixels mix hand and background)."""
        self.use_render_coverage_of([(unk.vertices(h), h.faces) for h in self.hands], views)

    @torch.no_grad()
    def use_render_coverage_of(self, meshes: list[tuple[torch.Tensor, torch.Tensor]], views: list[int]) -> None:
        scene = self.scene([m[0] for m in meshes])
        cams = [self.cameras[i] for i in views]
        rast, _ = rasterize(self.ctx, Lo.clip_positions(scene.verts, cams, offsets=self.off(views)), scene.tri, self.hw,
                            grad_db=False)
        cov = Lo.erode(rast[..., 3] > 0).float() * self.vm.inside[views]
        self.photo_weight = self.photo_weight.clone()
        self.photo_weight[views] = cov

    def albedo(self, unk: Unknowns) -> torch.Tensor:
        return torch.cat([unk.albedo_of(h.side) for h in self.hands], 0)

    def sh_for(self, unk: Unknowns, views: list[int]) -> torch.Tensor:
        return unk.sh[views] if unk.sh.ndim == 3 else unk.sh


def init_unknowns(prob: Problem, cfg: HamConf) -> Unknowns:
    """Albedo: the mean linear colour inside the usable masks (shading 1 under the initial
    ambient light); SH: uniform environment; displacements: zero."""
    w = prob.photo_weight[prob.kept] if prob.kept else prob.photo_weight
    lin = Lo.srgb_to_linear(prob.photo[prob.kept] if prob.kept else prob.photo)
    mean = (lin * w[..., None]).flatten(0, 2).sum(0) / w.sum().clamp_min(1.0)
    mean = mean.clamp(0.05, 0.95)
    dev = prob.device
    albedo = {h.side: mean.expand(h.num_vertices, 3).clone().to(dev) for h in prob.hands}
    k = 1 if cfg.displacement == "normal" else 3
    fine = {h.side: torch.zeros(h.num_vertices, k, device=dev) for h in prob.hands}
    coarse = {}
    if cfg.coarse_displacement != "none":
        kc = 1 if cfg.coarse_displacement == "normal" else 3
        coarse = {h.side: torch.zeros(h.S.shape[1], kc, device=dev) for h in prob.hands}
    sh0 = sh_ambient(1.0, rgb=True).to(dev)
    sh = sh0.expand(prob.V, 9, 3).clone() if cfg.sh_per_view else sh0.clone()
    return Unknowns(albedo, fine, coarse, sh)


# ------------------------------------------------------------------------------------ optimisation
def _adam(groups: list[dict[str, Any]], iterations: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / max(iterations, 1)))
    return opt, sched


def optimize_appearance(prob: Problem, unk: Unknowns, cfg: HamConf, views: list[int], iterations: int, desc: str,
                        lighting_only: bool = False, fixed_albedo: bool = False) -> dict[str, float]:
    """Phase (a): albedo and SH of ``views`` with the geometry fixed; the raster is made once.
    ``lighting_only`` / ``fixed_albedo`` keep the albedo as it is."""
    if iterations <= 0 or not views:
        return {}
    w = {k: v for k, v in cfg.weights.items() if v > 0}
    cams = [prob.cameras[i] for i in views]
    with torch.no_grad():
        scene = prob.scene([unk.vertices(h) for h in prob.hands])
        raster = Lo.raster_scene(prob.ctx, scene, cams, prob.hw, prob.off(views), cfg.supersample)
        front = ~Lo.back_facing(scene.verts, scene.tri, raster.rast, cams)
    photo, weight = prob.photo[views], prob.photo_weight[views] * front
    sh_param = unk.sh
    sh_param.requires_grad_(True)
    groups = [{"params": [sh_param], "lr": cfg.lr_sh}]
    train_albedo = not (lighting_only or fixed_albedo)
    if train_albedo:
        for a in unk.albedo.values():
            a.requires_grad_(True)
        groups.append({"params": list(unk.albedo.values()), "lr": cfg.lr_albedo})
    opt, sched = _adam(groups, iterations)
    terms: dict[str, torch.Tensor] = {}
    bar = _progress(range(iterations), desc)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        albedo = prob.albedo(unk) if train_albedo else prob.albedo(unk).detach()
        sh = prob.sh_for(unk, views)
        shaded = Lo.render_shaded(prob.ctx, scene, albedo, sh, cams, prob.hw, prob.topology, raster=raster)
        terms = {"photometric": Lo.photometric_loss(prob.composite(shaded.image, shaded.coverage, views), photo, weight,
                                                    eps=cfg.photometric_eps)}
        if train_albedo and "albedo_smooth" in w:
            terms["albedo_smooth"] = sum(Lo.laplacian_loss(unk.albedo[h.side], h.laplacian) for h in prob.hands)
        if "light" in w and unk.sh.ndim == 3 and not lighting_only:
            terms["light"] = Lo.sh_consistency(unk.sh[prob.kept])
        loss = sum(w.get(k, 0.0) * v for k, v in terms.items())
        loss.backward()
        opt.step()
        sched.step()
        clamp_albedo(unk)
        if hasattr(bar, "losses"):
            bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
    _freeze(unk)
    return {k: float(v.detach()) for k, v in terms.items()}


def optimize_geometry(prob: Problem, unk: Unknowns, cfg: HamConf) -> dict[str, float]:
    """Phase (b): displacements + albedo (+ lighting) against photos and masks of the kept views."""
    iterations = cfg.iterations_geometry
    views = prob.kept
    if iterations <= 0 or not views:
        return {}
    w = {k: v for k, v in cfg.weights.items() if v > 0 and not (prob.maskless and k in ("silhouette", "contour"))}
    cams = [prob.cameras[i] for i in views]
    P = prob.P[views]
    groups = [{"params": list(unk.fine.values()), "lr": cfg.lr_displacement},
              {"params": list(unk.albedo.values()), "lr": cfg.lr_albedo}]
    if unk.coarse:
        groups.append({"params": list(unk.coarse.values()), "lr": cfg.lr_coarse_displacement})
    if cfg.geometry_lighting:
        groups.append({"params": [unk.sh], "lr": cfg.lr_sh})
    for g in groups:
        for t in g["params"]:
            t.requires_grad_(True)
    opt, sched = _adam(groups, iterations)
    contours = prob.vm.contours(views, cfg.contour_margin_px, cfg.contour_points)
    terms: dict[str, torch.Tensor] = {}
    bar = _progress(range(iterations), "ham geometry")
    for it in bar:
        if it > 0 and cfg.mask_update_every > 0 and it % cfg.mask_update_every == 0:
            prob.update_masks(unk)
            contours = prob.vm.contours(views, cfg.contour_margin_px, cfg.contour_points)
        opt.zero_grad(set_to_none=True)
        verts = [unk.vertices(h) for h in prob.hands]
        scene = prob.scene(verts)
        shaded = Lo.render_shaded(prob.ctx, scene, prob.albedo(unk), prob.sh_for(unk, views), cams, prob.hw, prob.topology,
                                  offsets=prob.off(views), supersample=cfg.supersample)
        weight = prob.photo_weight[views] * ~Lo.back_facing(scene.verts, scene.tri, shaded.rast, cams)
        terms = {"photometric": Lo.photometric_loss(prob.composite(shaded.image, shaded.coverage, views),
                                                    prob.photo[views], weight, eps=cfg.photometric_eps)}
        terms.update(mask_terms(prob, scene, shaded.coverage, shaded.rast, views, P, contours, cfg, w))
        terms.update(_regularisers(prob, unk, verts, w))
        loss = sum(w.get(k, 0.0) * v for k, v in terms.items())
        loss.backward()
        opt.step()
        sched.step()
        clamp_albedo(unk)
        if hasattr(bar, "losses"):
            bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
    _freeze(unk)
    prob.update_masks(unk)
    return {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def seen_pixels(prob: Problem, unk: Unknowns) -> torch.Tensor:
    """(N,) per vertex of the scene: the usable, front-facing pixels of the kept views it was
    seen over (barycentric share, summed over the views)."""
    views = prob.kept
    cams = [prob.cameras[i] for i in views]
    scene = prob.scene([unk.vertices(h) for h in prob.hands])
    pos = Lo.clip_positions(scene.verts, cams, offsets=prob.off(views))
    rast, _ = rasterize(prob.ctx, pos, scene.tri, prob.hw, grad_db=False)
    weight = prob.photo_weight[views] * ~Lo.back_facing(scene.verts, scene.tri, rast, cams)
    return Lo.vertex_pixel_share(rast, scene.tri, weight, scene.verts.shape[0])


@torch.no_grad()
def fill_unseen_albedo(prob: Problem, unk: Unknowns, pixels: float) -> list[torch.Tensor] | None:
    """Replace the albedo of surface the fitted views hardly saw by that of the surface around it.

    Why: a vertex seen over a fraction of a pixel, at a grazing angle near an outline, gets an
    albedo that explains that pixel's mix of shading error, backdrop and neighbouring surface
    (blue and orange streaks on a palm the fitted views only skimmed), and a new camera that sees
    the surface squarely shows them. Each vertex keeps its fitted albedo in proportion
    min(1, seen pixels / ``pixels``) and takes the rest from its neighbours
    (renderer.mesh_ops.confidence_fill). Returns those per-hand confidences (None when off)."""
    if pixels <= 0 or not prob.kept:
        return None
    seen = seen_pixels(prob, unk)
    confs = [(seen[o:o + h.num_vertices] / pixels).clamp(0.0, 1.0) for h, o in zip(prob.hands, prob.vertex_offsets[:-1])]
    for h, conf in zip(prob.hands, confs):
        unk.albedo[h.side] = confidence_fill(unk.albedo[h.side], conf, h.faces).clamp(0.0, 1.0)
    return confs


def mask_terms(prob: Problem, scene: Any, coverage: torch.Tensor, rast: torch.Tensor, views: list[int],
               P: torch.Tensor, contours: Any, cfg: HamConf, w: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Silhouette (antialiased coverage) and contour chamfer against the usable masks of ``views``,
    the terms of ``w`` among them."""
    out: dict[str, torch.Tensor] = {}
    if "silhouette" in w:
        out["silhouette"] = Lo.silhouette_loss(coverage, prob.vm.target[views], prob.vm.valid[views])
    if "contour" in w:
        pts, pix = Lo.rendered_contour_points(scene, rast.detach(), P, cfg.contour_points)
        out["contour"] = Lo.contour_loss(pts, pix, contours, prob.scale, cfg.contour_sigma_px,
                                         cfg.contour_reverse_sigma_px)
    return out


@torch.no_grad()
def clamp_albedo(unk: Unknowns) -> None:
    """Keep every albedo a reflectance in [0, 1] after an optimiser step."""
    for a in unk.albedo.values():
        a.clamp_(0.0, 1.0)


def _regularisers(prob: Problem, unk: Unknowns, verts: list[torch.Tensor], w: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Geometry and appearance priors, summed over hands; displacements in millimetres so the
    weights do not depend on the units."""
    out: dict[str, torch.Tensor] = {}
    zero = verts[0].new_zeros(())
    lap = edge = nrm = alb = mag = zero
    for h, v in zip(prob.hands, verts):
        fine_mm = 1000.0 * unk.fine[h.side]
        if "laplacian" in w:
            lap = lap + Lo.laplacian_loss(fine_mm, h.laplacian)
            if unk.coarse:
                lap = lap + Lo.laplacian_loss(1000.0 * unk.coarse[h.side], h.laplacian_coarse)
        if "edge" in w:
            edge = edge + Lo.edge_length_loss(v, h.edges, h.rest_lengths)
        if "normal" in w:
            nrm = nrm + Lo.normal_consistency(v, h.faces, h.adjacency)
        if "albedo_smooth" in w:
            alb = alb + Lo.laplacian_loss(unk.albedo[h.side], h.laplacian)
        if "displacement" in w:
            d = 1000.0 * unk.displacement(h)
            mag = mag + (d * d).sum(-1).mean()
    for name, val in (("laplacian", lap), ("edge", edge), ("normal", nrm), ("albedo_smooth", alb), ("displacement", mag)):
        if name in w:
            out[name] = val
    if "light" in w and unk.sh.ndim == 3:
        out["light"] = Lo.sh_consistency(unk.sh[prob.kept])
    return out


def _freeze(unk: Unknowns) -> None:
    for d in (unk.albedo, unk.fine, unk.coarse):
        for t in d.values():
            t.requires_grad_(False)
    unk.sh.requires_grad_(False)


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class ViewRenders:
    """Per-view renders of refined hands: shaded and albedo (sRGB), camera-space normals mapped
    to colours, antialiased coverage, the fraction of each pixel showing a back face (the inside
    of the open wrist, ``losses.back_facing``) and whether the pixel's centre is covered (what a
    mask holds: the IoU's render side, whatever the samples per pixel); numpy, (V,H,W,3) / (V,H,W)."""

    shaded: np.ndarray
    albedo: np.ndarray
    normals: np.ndarray
    coverage: np.ndarray
    back: np.ndarray
    centre: np.ndarray


@torch.no_grad()
def render_views(ctx: Any, verts: Sequence[torch.Tensor], faces: Sequence[torch.Tensor], albedo: Sequence[torch.Tensor],
                 sh: torch.Tensor, cameras: Sequence[Camera], hw: tuple[int, int],
                 offsets: torch.Tensor | None = None, supersample: int = 1) -> ViewRenders:
    """Shaded, albedo, normal and coverage images of meshes (one scene) from ``cameras``; sh is
    (9,3) for all views or (V,9,3); ``offsets`` (V,2) camera corrections in pixels. Used by the
    exporter and by ``scripts/render_views.py``.

    ``supersample`` s > 1 renders at s times the size and box-filters down (linear RGB), as a
    camera integrates over its pixel: outline pixels then hold the true fraction of hand, the way
    a photo resized by area averaging (or any real sensor) holds it, which antialiasing at one
    sample per pixel only approximates."""
    if supersample > 1:
        s = int(supersample)
        big = render_views(ctx, verts, faces, albedo, sh, [c.scaled(s) for c in cameras], (hw[0] * s, hw[1] * s),
                           None if offsets is None else offsets * s)
        scene = Lo.merge(list(verts), list(faces))
        rast = Lo.raster_scene(ctx, scene, cameras, hw, offsets).rast
        return ViewRenders(*(box_down(x, s, srgb=k < 2) for k, x in enumerate(
            (big.shaded, big.albedo, big.normals, big.coverage, big.back))), (rast[..., 3] > 0).cpu().numpy())
    scene = Lo.merge(list(verts), list(faces))
    alb = torch.cat([a.to(scene.verts) for a in albedo], 0)
    shaded = Lo.render_shaded(ctx, scene, alb, sh.to(scene.verts), cameras, hw, offsets=offsets)
    flat = Lo.render_shaded(ctx, scene, alb, sh_ambient(1.0, rgb=True).to(scene.verts), cameras, hw,
                            raster=Lo.Raster(shaded.pos, shaded.rast))
    n = vertex_normals(scene.verts, scene.tri)
    R = torch.as_tensor(np.stack([c.R for c in cameras]), dtype=scene.verts.dtype, device=scene.verts.device)
    n_cam = torch.einsum("vij,nj->vni", R, n)
    # OpenCV camera axes -> the usual normal-map colours (x right, y up, z towards the viewer)
    n_col = (n_cam * torch.tensor([1.0, -1.0, -1.0], device=n.device) * 0.5 + 0.5).contiguous()
    from renderer.ops import antialias, interpolate

    nimg, _ = interpolate(n_col, shaded.rast, scene.tri, ctx=ctx)
    nimg = antialias(nimg, shaded.rast, shaded.pos, scene.tri, ctx=ctx)
    to_np = lambda t: t.clamp(0.0, 1.0).cpu().numpy()  # noqa: E731
    back = Lo.back_facing(scene.verts, scene.tri, shaded.rast, cameras).float()
    return ViewRenders(to_np(Lo.linear_to_srgb(shaded.image)), to_np(Lo.linear_to_srgb(flat.image)), to_np(nimg),
                       to_np(shaded.coverage), to_np(back), (shaded.rast[..., 3] > 0).cpu().numpy())


def box_down(img: np.ndarray, s: int, srgb: bool = False) -> np.ndarray:
    """(V,H*s,W*s[,C]) -> (V,H,W[,C]) by averaging s x s blocks; sRGB images are averaged in linear RGB."""
    x = torch.as_tensor(img)
    if srgb:
        x = Lo.srgb_to_linear(x)
    x = Lo.box_pool(x, s)
    if srgb:
        x = Lo.linear_to_srgb(x).clamp(0.0, 1.0)
    return x.numpy()


def photo_metrics(render_srgb: np.ndarray, photo: np.ndarray, region: np.ndarray) -> dict[str, float | None]:
    """PSNR and SSIM (``fitting.metrics``) of a render against a photo over ``region``; SSIM on
    both images with everything outside the region set to black (the region's bounding box)."""
    from fitting import metrics as M

    if region.sum() == 0:
        return {"psnr": None, "ssim": None}
    r3 = region[..., None]
    ssim = M.ssim(render_srgb * r3, photo * r3, region) if min(region.shape) >= M.SSIM_WIN else None
    return {"psnr": M.psnr(render_srgb, photo, region), "ssim": ssim}


def evaluate(prob: Problem, unk: Unknowns, supersample: int = 1) -> dict[str, Any]:
    """Per view: IoU (``iou_report``), PSNR/SSIM of the shaded render; means over kept views.

    ``psnr`` / ``ssim`` are over the usable mask pixels the render covers (the neural stage measures
    the same pixels), the render composited over the photo's inpainted background
    (``fitting.background``; ``ham.background``) as the photometric terms see it;
    ``psnr_over_black`` the same pixels with the render on black (outline pixels then mix the hand
    with black where the photo mixes it with the backdrop); ``psnr_interior`` leaves out the
    region's one-pixel rim; ``psnr_full_mask`` is over every usable mask pixel (colour and
    silhouette together). Views whose mask was dropped are measured over the render's own coverage and
    flagged ``region: render``; ``mask_judgement`` says which views were dropped or partial, and why."""
    verts = [unk.vertices(h).detach() for h in prob.hands]
    sh = unk.sh.detach() if unk.sh.ndim == 3 else unk.sh.detach().unsqueeze(0).expand(prob.V, -1, -1)
    rv = render_views(prob.ctx, verts, [h.faces for h in prob.hands], [unk.albedo_of(h.side) for h in prob.hands], sh,
                      prob.cameras, prob.hw, prob.offsets, supersample)
    ious = iou_report(torch.as_tensor(rv.centre, dtype=torch.float32, device=prob.device), prob.vm)
    photo = prob.photo.cpu().numpy()
    shown = srgb_over_background(rv.shaded, rv.coverage, None if prob.background is None else prob.background.cpu().numpy())
    usable = (prob.vm.valid * prob.vm.target).cpu().numpy() > 0.5
    inside = prob.vm.inside.cpu().numpy() > 0.5
    covered = (rv.coverage > 0.5) & (rv.back < 0.5)  # the inside of the open wrist is no hand surface
    views: dict[str, Any] = {}
    psnrs, ssims = [], []
    for i, name in enumerate(prob.names):
        rec = dict(ious["views"][name])
        if i in prob.kept and not prob.maskless:
            m = photo_metrics(shown[i], photo[i], usable[i] & covered[i])
            rec.update(m)
            rec["psnr_over_black"] = photo_metrics(rv.shaded[i], photo[i], usable[i] & covered[i])["psnr"]
            rec["psnr_interior"] = photo_metrics(shown[i], photo[i], _erode_np(usable[i] & covered[i]))["psnr"]
            rec["psnr_full_mask"] = photo_metrics(shown[i], photo[i], usable[i])["psnr"]
            rec["region"] = "mask"
            if m["psnr"] is not None:
                psnrs.append(m["psnr"])
            if m["ssim"] is not None:
                ssims.append(m["ssim"])
        else:
            rec.update(photo_metrics(shown[i], photo[i], covered[i] & inside[i]))
            rec["region"] = "render"
            if prob.maskless and rec["psnr"] is not None:
                psnrs.append(rec["psnr"])
                if rec["ssim"] is not None:
                    ssims.append(rec["ssim"])
        views[name] = rec
    kept_full = [views[prob.names[i]]["psnr_full_mask"] for i in prob.kept if views[prob.names[i]].get("psnr_full_mask")]
    kept_interior = [views[prob.names[i]]["psnr_interior"] for i in prob.kept if views[prob.names[i]].get("psnr_interior")]
    kept_black = [views[prob.names[i]]["psnr_over_black"] for i in prob.kept if views[prob.names[i]].get("psnr_over_black")]
    raw = [views[n]["iou_raw"] for n in prob.names]
    return {
        "views": views,
        "iou_mean": ious["iou_mean"],
        "iou_min": ious["iou_min"],
        "iou_raw_mean": float(np.mean(raw)) if raw else None,
        "psnr_mean": float(np.mean(psnrs)) if psnrs else None,
        "psnr_interior_mean": float(np.mean(kept_interior)) if kept_interior else None,
        "psnr_over_black_mean": float(np.mean(kept_black)) if kept_black else None,
        "background": "inpainted" if prob.background is not None else "black",
        "psnr_full_mask_mean": float(np.mean(kept_full)) if kept_full else None,
        "ssim_mean": float(np.mean(ssims)) if ssims else None,
        "dropped_views": ious["dropped_views"],
        "partial_views": ious["partial_views"],
        "mask_judgement": {n: {"status": v["status"], "why": v.get("note", "")} for n, v in views.items()
                           if v["status"] != "ok"},
    }


def evaluate_holdout(prob: Problem, unk: Unknowns, views: Sequence[Any], mcfg: MaskConf | None = None,
                     supersample: int = 1) -> dict[str, Any]:
    """Novel-view check on views kept out of every fit (``scan.holdout``): the refined hands
    rendered with the mean SH of the fitted views (as ``scripts/render_views.py`` renders a camera
    it never saw) and no camera correction; per view IoU (``iou_report``: raw, without forearm,
    usable), PSNR / SSIM over the usable mask pixels the render covers, as in ``evaluate``
    (``psnr_interior`` without their rim, ``psnr_full_mask`` over all usable mask pixels; ``psnr_exposure_matched`` after the best per-channel gain, i.e. with
    the unseen camera's exposure and white balance taken out), and their means. A view without a
    mask is measured on the render's own coverage (``region: render``, no IoU)."""
    held = Scan(list(views), prob.scan.sides, prob.scan.scan_id, prob.scan.source)
    sh_all = unk.sh.detach() if unk.sh.ndim == 3 else unk.sh.detach().unsqueeze(0)
    sh_mean = (sh_all[prob.kept] if unk.sh.ndim == 3 and prob.kept else sh_all).mean(0)
    builder = MaskBuilder(held, mcfg or MaskConf(), prob.ctx, prob.scale, prob.device)
    verts = [unk.vertices(h).detach() for h in prob.hands]
    faces = [h.faces for h in prob.hands]
    meshes = list(zip(verts, faces))
    # broken / partial judgement among the held-out masks themselves (no consensus: it needs the fitted views)
    vm = builder.build(meshes, [h.side for h in prob.hands], decide=True, consensus=False)
    V = len(builder.names)
    rv = render_views(prob.ctx, verts, faces, [unk.albedo_of(h.side) for h in prob.hands],
                      sh_mean.unsqueeze(0).expand(V, -1, -1), builder.cameras, builder.hw, supersample=supersample)
    ious = iou_report(torch.as_tensor(rv.centre, dtype=torch.float32, device=prob.device), vm)
    photo_t = pad_stack([v.image for v in held.views], builder.hw, channels=3, device=prob.device)
    photo = photo_t.cpu().numpy()
    if prob.background is not None:  # each held-out photo's own backdrop, as for the fitted views
        bg = estimate_background(photo_t, builder.inside, (vm.target > 0.5) | torch.as_tensor(rv.coverage > 0, device=prob.device))
        rv.shaded = srgb_over_background(rv.shaded, rv.coverage, bg.cpu().numpy())
    usable = (vm.valid * vm.target).cpu().numpy() > 0.5
    covered = (rv.coverage > 0.5) & (rv.back < 0.5)
    inside = builder.inside.cpu().numpy() > 0.5
    out: dict[str, Any] = {}
    for i, v in enumerate(held.views):
        if v.image is None:
            out[v.name] = {"psnr": None, "ssim": None, "region": "none", "note": "no photo"}
            continue
        if v.mask is not None:
            rec: dict[str, Any] = dict(ious["views"][v.name])
            region = usable[i] & covered[i]
            rec.update(photo_metrics(rv.shaded[i], photo[i], region))
            rec["psnr_exposure_matched"] = photo_metrics(exposure_matched(rv.shaded[i], photo[i], region), photo[i],
                                                         region)["psnr"]
            rec["psnr_interior"] = photo_metrics(rv.shaded[i], photo[i], _erode_np(region))["psnr"]
            rec["psnr_full_mask"] = photo_metrics(rv.shaded[i], photo[i], usable[i])["psnr"]
            rec["region"] = "mask"
        else:
            rec = photo_metrics(rv.shaded[i], photo[i], covered[i] & inside[i])
            rec["region"] = "render"
        out[v.name] = rec

    def mean(key: str, judged: bool = False) -> float | None:
        vals = [r[key] for r in out.values() if r.get(key) is not None and not (judged and r.get("status") == "dropped")]
        return float(np.mean(vals)) if vals else None

    res = {"views": out, "psnr_mean": mean("psnr"), "psnr_interior_mean": mean("psnr_interior"),
           "psnr_exposure_matched_mean": mean("psnr_exposure_matched"),
           "ssim_mean": mean("ssim"), "iou_mean": mean("iou", True),
           "iou_raw_mean": mean("iou_raw"), "lighting": "mean SH of the fitted views", "dropped_views": ious["dropped_views"]}
    log.info("ham: held-out views %s: PSNR mean %s dB, SSIM mean %s, IoU mean %s", list(out),
             *(f"{res[k]:.3f}" if res[k] is not None else "-" for k in ("psnr_mean", "ssim_mean", "iou_mean")))
    return res


def exposure_matched(render_srgb: np.ndarray, photo: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The render with the per-channel linear gain (least squares over ``region``) that best maps
    it to the photo: an unseen camera's exposure and white balance, which no fitted view can
    predict (the demo capture's cameras differ by up to 2x), told apart from shape and albedo."""
    if region.sum() == 0:
        return render_srgb
    lin_r = Lo.srgb_to_linear(torch.as_tensor(render_srgb)).numpy()
    lin_p = Lo.srgb_to_linear(torch.as_tensor(photo)).numpy()
    r, q = lin_r[region], lin_p[region]
    gain = (r * q).sum(0) / np.maximum((r * r).sum(0), 1e-12)
    return Lo.linear_to_srgb(torch.as_tensor(lin_r * gain)).numpy()


def _erode_np(m: np.ndarray) -> np.ndarray:
    t = Lo.erode(torch.as_tensor(m)[None])[0]
    return t.numpy()
