"""Stage ``silhouette_fit``: the keypoint-fitted hands refined against the scan's masks.

Why after ``hand_fit``: keypoints fix the pose but not the shape, the finger thickness or the
exact placement; silhouettes do. Both hands are rendered in one scene
(``losses.render_silhouette``: one rasterization, so where one hand occludes the other the mask
is explained by the front one). The loss is the keypoint terms and priors of ``fitting.hand_fit``
(imported, same definitions, weights from ``silhouette_fit.weights``), the antialiased coverage
and contour terms of ``fitting.losses`` over the weight maps of ``fitting.masks`` (forearm,
broken views, missing hands and, from halfway on, the parts of hands a mask misses, ignored) and
an interpenetration penalty between the two hands.

Keypoints or silhouettes: detections carry a few pixels of noise and a detector's own idea of
where a joint sits inside the skin, and on synthetic scans with exact masks they held the fit
~19 degrees of normal error off the true surface (IoU 0.94-0.96) where the silhouettes alone
reach ~7 (IoU 0.99). Broken or partial masks (the real demo capture) need them throughout. So
the masks are trusted (``mask_trust``) only when the first mask judgement finds every view whole:
then the keypoint terms fade out over the first part of the fit, only choosing the basin, and the
priors are softened; otherwise both keep their weights.

Camera corrections: a per-view principal-point shift is estimated with the hands (prior std
``camera_sigma_px``). Calibrations are rarely consistent to a pixel, and one bad camera (the demo
capture's view 06 is ~40 px off the others, seen both in the keypoints' reprojections and in the
silhouettes) otherwise pulls both hands out of place in every view. Halfway, corrections under
``camera_min_px`` are set to 0 for the rest of the fit: a sub-pixel shift cannot be told from the
hands' own error, which it would absorb in the fitted views and leave in a held-out camera (on
exactly calibrated synthetic scans they came to 0.05-0.35 px). The corrections are stored
in the metrics (``camera_offsets_px``, pixels of the original images) and applied by ``ham``, the
exporters and ``scripts/render_views.py`` (``camera_offsets``).

Metrics: IoU per view before and after (three ways, see ``fitting.masks.iou_report``), the views
dropped or partial and why, the camera corrections, the last loss terms, and errors against the
ground truth when the scan has it (point-to-surface from the true mesh, normal angle).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from capture.scan import Scan
from fitting import losses as Lo
from fitting.conf import section_dataclass
from fitting.hand_fit import TERMS as KEYPOINT_TERMS
from fitting.hand_fit import FitContext, HandFitConf, _load_model, _model_name, _progress, side_targets
from fitting.geometry import projection_matrices
from fitting.masks import MaskBuilder, MaskConf, ViewMasks, iou_report
from fitting.pose_fit import image_scale
from fitting.state import State
from handmodel.params import HandParams
from handmodel.prior import PosePrior
from renderer.mesh_ops import Subdivision, loop_subdivide
from renderer.ops import antialias_construct_topology_hash, rasterize

log = logging.getLogger("handrecon")
PARAM_NAMES = ("betas", "hand_pose", "global_orient", "transl")
KEYPOINT_DATA_TERMS = ("keypoints3d", "reprojection")
PRIOR_TERMS = ("pose_prior", "shape_prior")
MASK_TRUST = ("auto", "always", "never")
IMAGE_TERMS = ("silhouette", "contour", "interpenetration", "camera")


@dataclass
class SilhouetteFitConf:
    """Keys of the ``silhouette_fit`` conf section."""

    iterations: int = 400
    lr: float = 0.01
    # Adam step of transl (metres) and betas (std units) relative to the rotations' (radians).
    transl_lr_scale: float = 0.1
    betas_lr_scale: float = 3.0
    # Recompute the forearm maps from the moving hands every this many iterations.
    mask_update_every: int = 25
    # Loop subdivision levels of the meshes rendered for the silhouettes (0 = the model mesh).
    subdivision: int = 0
    # Contour chamfer: robust scales of the rendered->mask and mask->rendered distances (pixels of
    # the original image), most contour points per view, and how far (pixels at the loaded size)
    # a usable mask contour pixel stays from ignored pixels.
    contour_sigma_px: float = 4.0
    contour_reverse_sigma_px: float = 40.0
    contour_points: int = 3000
    contour_margin_px: int = 2
    # Per-view principal-point corrections (calibration errors of a few pixels, or tens in a bad
    # camera), estimated with the hands: their prior std (pixels of the original image) and Adam
    # step (pixels at the loaded size: the noise of the contour gradients is in those pixels).
    refine_cameras: bool = True
    camera_sigma_px: float = 40.0
    lr_camera_px: float = 0.25
    # corrections under this (pixels of the original image) are set to 0 halfway (see the module
    # docstring); 0 keeps every correction
    camera_min_px: float = 1.0
    # Whether the masks may outweigh the keypoints and priors: 'auto' trusts them when the first
    # mask judgement finds every view's mask whole (none dropped, none partial), or always / never.
    # Trusted, the keypoint terms fade (half cosine) to zero over the first ``keypoint_decay`` of
    # the iterations (the detections only pick the basin) and the pose and shape priors' weights
    # are scaled by ``trusted_prior_scale``; untrusted, both keep their weights throughout.
    mask_trust: str = "auto"
    keypoint_decay: float = 0.3
    trusted_prior_scale: float = 0.1
    # Pairs of vertices farther apart than this (metres) never count as interpenetrating.
    interpenetration_radius: float = 0.02
    # Parameters optimised (any of betas, hand_pose, global_orient, transl).
    optimize: list[str] = field(default_factory=lambda: list(PARAM_NAMES))
    weights: dict[str, float] = field(default_factory=lambda: {
        "silhouette": 1.0, "contour": 0.2, "keypoints3d": 0.1, "reprojection": 0.05, "pose_prior": 0.002,
        "shape_prior": 0.001, "interpenetration": 0.1, "camera": 0.1})

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "SilhouetteFitConf":
        known = sorted(set(KEYPOINT_TERMS) | set(IMAGE_TERMS))
        out: SilhouetteFitConf = section_dataclass(SilhouetteFitConf, conf, "silhouette_fit", known)
        out.optimize = [str(x) for x in out.optimize]
        out.mask_trust = str(out.mask_trust)
        if not out.camera_min_px >= 0:
            raise ValueError(f"silhouette_fit.camera_min_px must be >= 0, got {out.camera_min_px}")
        if out.mask_trust not in MASK_TRUST:
            raise ValueError(f"silhouette_fit.mask_trust is {out.mask_trust!r}; use one of {list(MASK_TRUST)}")
        bad = sorted(set(out.optimize) - set(PARAM_NAMES))
        if bad:
            raise KeyError(f"silhouette_fit.optimize names unknown parameters {bad}; known: {list(PARAM_NAMES)}")
        return out


# ------------------------------------------------------------------------------------------ stage
def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Refine ``state.params`` of every fitted side against the masks; fill metrics (with the
    per-view camera corrections, which later stages apply through ``camera_offsets``)."""
    cfg = SilhouetteFitConf.from_conf(conf)
    if not state.params:
        raise ValueError("silhouette_fit needs fitted hands: list hand_fit before silhouette_fit in pipeline.stages")
    if all(v.mask is None for v in scan.views):  # e.g. InterHand2.6M: nothing to fit against
        log.warning("silhouette_fit: the scan has no masks; the hands are left as the keypoint fit made them")
        state.metrics["silhouette_fit"] = {"skipped": "the scan has no masks", "iou_mean": None}
        return state
    device = Lo.stage_device(conf)
    ctx = Lo.render_context(conf, device)
    sides = [s for s in scan.sides if s in state.params]
    models = {s: _load_model(_model_name(conf), s, device) for s in sides}
    params = {s: state.params[s].detach().to(device) for s in sides}
    scale = image_scale(scan, conf)
    hcfg = HandFitConf.from_conf(conf)
    P = torch.as_tensor(projection_matrices(scan.cameras), dtype=torch.float32, device=device)
    fit_ctx = FitContext(scan, state, hcfg, scale, P, {s: side_targets(scan, state, s, device) for s in sides},
                         torch.ones(21, device=device), {s: PosePrior(models[s]).to(device) for s in sides})
    subdiv = {s: _subdivision(models[s], cfg.subdivision) for s in sides}
    builder = MaskBuilder(scan, MaskConf.from_conf(conf), ctx, scale, device)
    offsets = torch.zeros(len(scan.views), 2, device=device)  # pixels at the loaded size

    def meshes(out: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        res = []
        for s in sides:
            v = out[s].vertices[0]
            sub = subdiv[s]
            res.append((sub.apply(v), sub.faces.to(device)) if sub is not None else (v, models[s].faces))
        return res

    with torch.no_grad():
        out0 = {s: models[s].forward(params[s]) for s in sides}
    hands0 = meshes(out0)
    vm = builder.build(hands0, sides, decide=True, consensus=False)
    before = iou_report(_coverage(ctx, builder, hands0), vm)
    gt_before = gt_errors(scan, {s: (out0[s].vertices[0], models[s].faces) for s in sides})
    trusted, why = masks_trusted(cfg, vm)
    log.info("silhouette_fit: masks %s (%s)", "trusted over the keypoints" if trusted else "held by the keypoints", why)

    losses, vm = _optimise(cfg, fit_ctx, ctx, builder, models, params, sides, meshes, vm, offsets, trusted)

    with torch.no_grad():
        out1 = {s: models[s].forward(params[s]) for s in sides}
    hands1 = meshes(out1)
    builder.offsets = offsets
    vm = builder.build(hands1, sides, decide=False, previous=vm)
    after = iou_report(_coverage(ctx, builder, hands1), vm)
    for s in sides:
        state.params[s] = params[s].detach().to("cpu")
    cam = {n: [float(x) / scale for x in offsets[i].tolist()] for i, n in enumerate(vm.names)}
    metrics: dict[str, Any] = {
        "iou_mean_before": before["iou_mean"],
        "iou_mean": after["iou_mean"],
        "iou_min": after["iou_min"],
        "views": {n: {**after["views"][n], "iou_before": before["views"][n]["iou"],
                      "camera_offset_px": cam[n]} for n in vm.names},
        "dropped_views": after["dropped_views"],
        "partial_views": after["partial_views"],
        "camera_offsets_px": cam if cfg.refine_cameras else {},
        "losses": losses,
        "subdivision": cfg.subdivision,
        "masks_trusted": trusted,
        "mask_trust_reason": why,
    }
    gt_after = gt_errors(scan, {s: (out1[s].vertices[0], models[s].faces) for s in sides})
    if gt_after:
        metrics["gt"] = {"before": gt_before, "after": gt_after}
    state.metrics["silhouette_fit"] = metrics
    big = {n: o for n, o in cam.items() if np.hypot(*o) > 2 * cfg.camera_sigma_px}
    if big:
        log.warning("silhouette_fit: views %s needed camera corrections beyond %.0f px (original pixels): %s; "
                    "their calibration disagrees with the other views", sorted(big), 2 * cfg.camera_sigma_px,
                    {n: [round(x, 1) for x in o] for n, o in big.items()})
    log.info("silhouette_fit: IoU mean %.3f -> %.3f over %d kept views; dropped %s, partial %s",
             before["iou_mean"] or 0.0, after["iou_mean"] or 0.0, len(vm.names) - len(after["dropped_views"]),
             after["dropped_views"], after["partial_views"])
    return state


def camera_offsets(state: State, names: list[str], scale: float, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The principal-point corrections silhouette_fit estimated, (V,2) pixels at the loaded size
    for views ``names`` (zero for views it did not see); None when there are none."""
    rec = state.metrics.get("silhouette_fit", {}).get("camera_offsets_px") or {}
    if not rec:
        return None
    return torch.tensor([[float(x) * scale for x in rec.get(n, (0.0, 0.0))] for n in names], dtype=torch.float32,
                        device=device)


def _subdivision(model: Any, levels: int) -> Subdivision | None:
    if levels <= 0:
        return None
    return loop_subdivide(model.faces, model.num_vertices, levels)


@torch.no_grad()
def _coverage(ctx: Any, builder: MaskBuilder, hands: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return Lo.render_silhouette(ctx, Lo.merge([h[0] for h in hands], [h[1] for h in hands]), builder.cameras,
                                builder.hw, offsets=builder.offsets)[0]


def _optimise(
    cfg: SilhouetteFitConf,
    fit_ctx: FitContext,
    ctx: Any,
    builder: MaskBuilder,
    models: dict[str, Any],
    params: dict[str, HandParams],
    sides: list[str],
    meshes: Any,
    vm: ViewMasks,
    offsets: torch.Tensor,
    trusted: bool,
) -> tuple[dict[str, float], ViewMasks]:
    """Adam over the chosen parameters of both hands (and the camera corrections) with the lr
    decaying to a tenth; the image terms only render the views that were not dropped. Returns
    the last loss terms and the mask decisions as they stand at the end."""
    if cfg.iterations <= 0:
        return {}, vm
    kept = [i for i in range(len(vm.names)) if float(vm.view_weight[i]) > 0]
    cams = [builder.cameras[i] for i in kept]
    P_all = torch.as_tensor(projection_matrices(builder.cameras), dtype=torch.float32, device=builder.device)
    P0 = fit_ctx.P
    with torch.no_grad():
        base = Lo.merge(*zip(*meshes({s: models[s].forward(params[s]) for s in sides})))
    topo = antialias_construct_topology_hash(base.tri)
    contours = vm.contours(kept, cfg.contour_margin_px, cfg.contour_points)
    groups = []
    scales = {"transl": cfg.transl_lr_scale, "betas": cfg.betas_lr_scale}
    for p in params.values():
        for n in PARAM_NAMES:
            t = getattr(p, n)
            t.requires_grad_(n in cfg.optimize)
            if n in cfg.optimize:
                groups.append({"params": [t], "lr": cfg.lr * scales.get(n, 1.0)})
    if cfg.refine_cameras:
        offsets.requires_grad_(True)
        groups.append({"params": [offsets], "lr": cfg.lr_camera_px})
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / cfg.iterations))
    active = {k: w for k, w in cfg.weights.items() if w > 0}
    terms: dict[str, torch.Tensor] = {}
    dropped = torch.zeros(len(offsets), dtype=torch.bool, device=offsets.device)  # corrections held at 0
    bar = _progress(range(cfg.iterations), "silhouette_fit")
    for it in bar:
        halfway = it == cfg.iterations // 2
        if halfway and cfg.refine_cameras and cfg.camera_min_px > 0:
            with torch.no_grad():
                dropped = offsets.norm(dim=1) / fit_ctx.scale < cfg.camera_min_px
                offsets[dropped] = 0.0
            log.info("silhouette_fit: camera corrections under %.2g px set to 0 in %d of %d views",
                     cfg.camera_min_px, int(dropped.sum()), len(offsets))
        if it > 0 and (halfway or (cfg.mask_update_every > 0 and it % cfg.mask_update_every == 0)):
            with torch.no_grad():
                builder.offsets = offsets.detach()
                # halfway, with hands and cameras close: judge the parts of hands masks miss
                vm = builder.build(meshes({s: models[s].forward(params[s]) for s in sides}), sides, decide=halfway,
                                   previous=vm)
            contours = vm.contours(kept, cfg.contour_margin_px, cfg.contour_points)
        opt.zero_grad(set_to_none=True)
        off = offsets if cfg.refine_cameras else None
        # the keypoint terms see the corrected cameras too (view order of the scan = canvas order)
        fit_ctx.P = Lo.offset_projections(P0, off)
        out = {s: models[s].forward(params[s]) for s in sides}
        terms = {}
        for name in active:
            if name in KEYPOINT_TERMS:
                terms[name] = KEYPOINT_TERMS[name](fit_ctx, params, out)
        hands = meshes(out)
        scene = Lo.Scene(torch.cat([h[0] for h in hands]), base.tri, base.offsets)
        if kept and ("silhouette" in active or "contour" in active):
            cov, rast = Lo.render_silhouette(ctx, scene, cams, builder.hw, topo, None if off is None else off[kept])
            if "silhouette" in active:
                terms["silhouette"] = Lo.silhouette_loss(cov, vm.target[kept], vm.valid[kept])
            if "contour" in active:
                Pk = Lo.offset_projections(P_all[kept], None if off is None else off[kept])
                pts, pix = Lo.rendered_contour_points(scene, rast.detach(), Pk, cfg.contour_points)
                terms["contour"] = Lo.contour_loss(pts, pix, contours, fit_ctx.scale, cfg.contour_sigma_px,
                                                   cfg.contour_reverse_sigma_px)
        if "interpenetration" in active and len(sides) == 2:
            (va, fa), (vb, fb) = [(out[s].vertices[0], models[s].faces) for s in sides]
            terms["interpenetration"] = Lo.interpenetration_loss(va, fa, vb, fb, cfg.interpenetration_radius)
        if "camera" in active and off is not None:
            terms["camera"] = ((off / fit_ctx.scale / cfg.camera_sigma_px) ** 2).sum(-1).mean()
        scale = term_scales(it, cfg, trusted)
        loss = sum(active[k] * scale.get(k, 1.0) * v for k, v in terms.items())
        loss.backward()
        opt.step()
        sched.step()
        if dropped.any():
            with torch.no_grad():
                offsets[dropped] = 0.0
        if hasattr(bar, "losses"):
            bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
    fit_ctx.P = P0
    offsets.requires_grad_(False)
    for p in params.values():
        for n in PARAM_NAMES:
            getattr(p, n).requires_grad_(False)
    return {k: float(v.detach()) for k, v in terms.items()}, vm


def masks_trusted(cfg: SilhouetteFitConf, vm: ViewMasks) -> tuple[bool, str]:
    """Whether the masks may outweigh keypoints and priors (``mask_trust``), and why."""
    if cfg.mask_trust != "auto":
        return cfg.mask_trust == "always", f"mask_trust = {cfg.mask_trust}"
    doubtful = [f"{n} {st}" for n, st in zip(vm.names, vm.status) if st != "ok"]
    if doubtful:
        return False, "masks not all whole: " + ", ".join(doubtful)
    return True, "every view's mask whole at the first judgement"


def term_scales(it: int, cfg: SilhouetteFitConf, trusted: bool) -> dict[str, float]:
    """Multipliers of the loss weights at iteration ``it``: none with untrusted masks; with
    trusted ones the keypoint data terms fall along a half cosine from 1 to 0 at
    ``keypoint_decay`` of the iterations, and the priors are scaled by ``trusted_prior_scale``."""
    if not trusted:
        return {}
    span = cfg.keypoint_decay * cfg.iterations
    kp = 0.0 if span <= 0 else 0.5 * (1.0 + math.cos(math.pi * min(it / span, 1.0)))
    return {**{k: kp for k in KEYPOINT_DATA_TERMS}, **{k: cfg.trusted_prior_scale for k in PRIOR_TERMS}}


# ----------------------------------------------------------------------------------- ground truth
def closest_surface_normals(points: np.ndarray, verts: np.ndarray, faces: np.ndarray, k: int = 12) -> np.ndarray:
    """Interpolated (smooth) vertex normals of the mesh at the closest point to each point,
    searching the ``k`` faces with the nearest centroids (exact for dense meshes, which is where
    a normal comparison is meaningful)."""
    from scipy.spatial import cKDTree

    from fitting.metrics import closest_points_on_triangles
    from renderer.shading import vertex_normals

    vn = vertex_normals(torch.as_tensor(verts, dtype=torch.float64), torch.as_tensor(faces)).numpy()
    tri = verts[faces]
    cent = tri.mean(1)
    k = min(k, len(faces))
    _, cand = cKDTree(cent).query(points, k=k)
    cand = cand.reshape(len(points), k)
    P = np.repeat(points, k, axis=0)
    f = cand.reshape(-1)
    q = closest_points_on_triangles(P, tri[f, 0], tri[f, 1], tri[f, 2])
    d = np.linalg.norm(P - q, axis=1).reshape(len(points), k)
    best = cand[np.arange(len(points)), d.argmin(1)]
    qb = q.reshape(len(points), k, 3)[np.arange(len(points)), d.argmin(1)]
    a, b, c = tri[best, 0], tri[best, 1], tri[best, 2]
    bary = _barycentric(qb, a, b, c)
    n = (bary[:, :, None] * vn[faces[best]]).sum(1)
    return n / np.clip(np.linalg.norm(n, axis=1, keepdims=True), 1e-12, None)


def _barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    v0, v1, v2 = b - a, c - a, p - a
    d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
    d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
    den = np.where(np.abs(d00 * d11 - d01 * d01) > 1e-30, d00 * d11 - d01 * d01, 1e-30)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    out = np.stack([1 - v - w, v, w], 1)
    return np.clip(out, 0.0, 1.0) / np.clip(np.clip(out, 0.0, 1.0).sum(1, keepdims=True), 1e-12, None)


def gt_errors(scan: Scan, meshes: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Point-to-surface (mm) from the true mesh's vertices to each side's mesh, and the mean angle
    (degrees) between the true vertex normals and the mesh's smooth normals at the closest points;
    per side and averaged. Empty when the scan has no true mesh."""
    from fitting.metrics import normal_angle_error_deg, p2s_mm
    from renderer.shading import vertex_normals

    gt = getattr(scan, "gt", None)
    if gt is None or not gt.vertices:
        return {}
    out: dict[str, Any] = {}
    for side, (v, f) in meshes.items():
        if side not in gt.vertices or side not in gt.faces:
            continue
        gv = np.asarray(gt.vertices[side], np.float64)
        gf = np.asarray(gt.faces[side], np.int64)
        pv = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)
        pf = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        gn = vertex_normals(torch.as_tensor(gv), torch.as_tensor(gf)).numpy()
        pn = closest_surface_normals(gv, pv, pf.astype(np.int64))
        out[side] = {"p2s_mm": p2s_mm(gv, pv, pf), "normal_error_deg": normal_angle_error_deg(pn, gn)}
    if out:
        out["p2s_mm"] = float(np.mean([o["p2s_mm"] for o in out.values()]))
        out["normal_error_deg"] = float(np.mean([o["normal_error_deg"] for s, o in out.items() if isinstance(o, dict)]))
    return out
