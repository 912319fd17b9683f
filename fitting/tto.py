"""Test-time optimisation (TTO) of a whole sequence of one hand side, shape fixed.

Why: per-frame predictions are made one frame at a time, each with its own guess of the shape,
so they jitter and their depths disagree. With the calibrated shape (``fitting.identity``) fixed,
every frame's translation, then pose and global orientation, are refined against the frames' 2D
keypoints together, with the pose prior and a temporal smoothness term tying neighbouring frames.
All frames go through one batched ``HandModel`` forward per step.

Schedule: translation first — the closed-form 2D-1D registration of ``networks.geometry`` (robust,
multi-view) with the new shape, then ``iterations_transl`` Adam steps of the translations alone
(reprojection + temporal terms) — then ``iterations`` Adam steps of pose, orientation and
translation on every term. From one view the closed-form depths of noisy frames come out tens of
millimetres off (mostly too close), so the translation steps are as large as the rotations'
(``transl_lr_scale`` = 1) and the translation phase is long. With ``frame_weighting`` each
frame's reprojection term is weighted by min(1, (median frame residual / its own residual)^2),
residuals of the registered predictions: a frame with several times noisier detections than
usual pulls its own depth and pose much less, and the temporal terms carry it between its
neighbours. Terms are named and weighted (``tto.weights``) like ``hand_fit``'s:

- ``reprojection``: robust (``tto.robust``) pixel distance, in pixels of the original images, of
  the projected joints to the detections, confidence-weighted, averaged per frame then over frames
  (pseudo-Huber by default: on synthetic sequences it kept the 3D pose better than Geman-McClure),
  times the frame weights;
- ``pose_prior``: the hand model's anatomical prior;
- ``pose_anchor``: robust rotation distance of every joint to the per-frame prediction — one view
  leaves each finger's depth to the predictor's learned 3D hand;
- ``temporal``: squared joint velocity between neighbouring frames, in units of
  ``temporal_sigma`` metres (neighbours = consecutive frame numbers); off by default — it brakes
  real motion;
- ``acceleration``: squared second difference of the joints over three consecutive frames (smooth
  motion costs nothing at constant velocity), same unit; the default smoothing term;
- ``silhouette``: squared antialiased-coverage error against the frames' masks through the
  renderer (one rasterization of every frame and view per step); weight 0 by default — it costs
  far more than the rest on a CPU — and used only for single-hand sequences with masks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from handmodel.params import HandParams
from handmodel.prior import PosePrior

log = logging.getLogger("handrecon")
TTO_PARAMS = ("hand_pose", "global_orient", "transl")
CONF_TERMS = ("reprojection", "pose_prior", "pose_anchor", "temporal", "acceleration", "silhouette")  # weighted by tto.weights
BETAS_LR_SCALE = 10.0  # Adam step of a free shape (units of the betas' std) relative to the rotations'


@dataclass
class TTOConf:
    """Keys of the ``tto`` conf section (read with :meth:`from_tree`)."""

    iterations_transl: int = 100
    iterations: int = 150
    lr: float = 0.02  # Adam step of the rotations (radians), decaying to a tenth
    transl_lr_scale: float = 1.0  # Adam step of the translations (metres) relative to lr
    reprojection_sigma: float = 6.0  # pixels of the original images: robust scale
    robust: str = "huber"  # huber (pseudo-Huber) | gmof (Geman-McClure)
    temporal_sigma: float = 0.005  # metres: the unit of the temporal terms
    anchor_sigma: float = 0.3  # radians: robust scale of the pose anchor to the per-frame prediction
    frame_weighting: bool = True  # weight each frame's reprojection by (typical / its own residual)^2, at most 1
    weights: dict[str, float] = field(
        default_factory=lambda: {"reprojection": 1.0, "pose_prior": 0.1, "pose_anchor": 0.3, "temporal": 0.0, "acceleration": 0.005,
                                 "silhouette": 0.0}
    )

    @staticmethod
    def from_tree(conf: Mapping[str, Any] | None) -> "TTOConf":
        from fitting.conf import section_dataclass

        out: TTOConf = section_dataclass(TTOConf, conf, "tto", CONF_TERMS)
        if out.robust not in ("gmof", "huber"):
            raise ValueError(f"tto.robust must be gmof or huber, got {out.robust!r}")
        return out


# ------------------------------------------------------------------------------------------ data
@dataclass
class SequenceTargets:
    """What the frames of one side are fitted to. ``uv`` (F,V,21,2) pixels of the loaded images,
    ``weight`` (F,V,21) (0 = unused: missing joint or padding view), cameras ``K``/``R``/``t``
    (F,V,...) world->camera, ``frame_index`` (F,) frame numbers (neighbours differ by 1),
    ``scale`` loaded / original image size. Optional silhouettes: ``masks`` (F,V,H,W) float with
    ``mask_weight`` (F,V) (0 = no mask in that view) and the frames' ``cameras`` [F][V]."""

    uv: torch.Tensor
    weight: torch.Tensor
    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    frame_index: torch.Tensor
    scale: float = 1.0
    masks: torch.Tensor | None = None
    mask_weight: torch.Tensor | None = None
    cameras: list[list[Any]] | None = None

    @property
    def num_frames(self) -> int:
        return int(self.uv.shape[0])

    @property
    def P(self) -> torch.Tensor:
        """(F,V,3,4) projection matrices K [R | t]."""
        return self.K @ torch.cat([self.R, self.t[..., None]], -1)

    def subset(self, idx: list[int] | torch.Tensor) -> "SequenceTargets":
        i = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        cams = None if self.cameras is None else [self.cameras[int(k)] for k in i]
        return SequenceTargets(self.uv[i], self.weight[i], self.K[i], self.R[i], self.t[i], self.frame_index[i], self.scale,
                               pick(self.masks), pick(self.mask_weight), cams)


@dataclass
class Context:
    """What every term may read."""

    targets: SequenceTargets
    cfg: TTOConf
    P: torch.Tensor
    prior: PosePrior
    neighbours: torch.Tensor  # (E,2) frame pairs (f, f+1)
    triples: torch.Tensor  # (T,3) consecutive frame triples
    silhouette: Any = None  # _Silhouette when the term is active
    shape_anchor: tuple[torch.Tensor, torch.Tensor] | None = None  # (betas (1,10), Gram (10,10)) when the shape is free
    pose_anchor: torch.Tensor | None = None  # (F,16,3,3) rotations of the initial (predicted) wrist and joints
    anchor_frame_weight: torch.Tensor | None = None  # (F,) 1 for frames seen by one view, else 0
    frame_weight: torch.Tensor | None = None  # (F,) reprojection weight of each frame (None = all 1)


def project(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Points (F,N,3) through (F,V,3,4) -> pixels (F,V,N,2), depth clamped away from zero."""
    Xh = torch.cat([X, torch.ones_like(X[..., :1])], -1)
    x = torch.einsum("fvij,fnj->fvni", P, Xh)
    return x[..., :2] / x[..., 2:3].clamp(min=1e-6)


def robust(r2: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """~ r^2 / (2 sigma^2) near 0; gmof saturates at 1/2 (hallucinated joints stop pulling),
    huber grows like r / sigma."""
    if kind == "gmof":
        return 0.5 * r2 / (r2 + sigma**2)
    return torch.sqrt(1.0 + r2 / sigma**2) - 1.0


def term_reprojection(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    t = ctx.targets
    r2 = ((project(ctx.P, out.joints) - t.uv) ** 2).sum(-1) / t.scale**2
    rho = robust(r2, ctx.cfg.reprojection_sigma, ctx.cfg.robust)
    per_frame = (t.weight * rho).sum((1, 2)) / t.weight.sum((1, 2)).clamp(min=1e-6)
    has = (t.weight.sum((1, 2)) > 0).float()
    fw = has if ctx.frame_weight is None else has * ctx.frame_weight
    return (per_frame * fw).sum() / has.sum().clamp(min=1.0)


def term_pose_prior(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    return ctx.prior(p.hand_pose).mean()


def term_temporal(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    if len(ctx.neighbours) == 0:
        return out.joints.new_zeros(())
    J = out.joints
    d = J[ctx.neighbours[:, 1]] - J[ctx.neighbours[:, 0]]
    return (d**2).sum(-1).mean() / ctx.cfg.temporal_sigma**2


def term_acceleration(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    if len(ctx.triples) == 0:
        return out.joints.new_zeros(())
    J = out.joints
    a = J[ctx.triples[:, 2]] - 2 * J[ctx.triples[:, 1]] + J[ctx.triples[:, 0]]
    return (a**2).sum(-1).mean() / ctx.cfg.temporal_sigma**2


def term_silhouette(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    if ctx.silhouette is None:
        return out.vertices.new_zeros(())
    return ctx.silhouette(out.vertices)


def term_pose_anchor(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    """Robust (pseudo-Huber, scale ``anchor_sigma`` radians) rotation distance of every joint and
    of the wrist to the per-frame prediction: from one view the keypoints cannot say how deep each
    finger lies, the predictor's learned 3D hand can. Only frames seen by a single view are anchored
    (with two views the keypoints pin the depth, and the anchor only held the fit back)."""
    if ctx.pose_anchor is None:
        return p.hand_pose.new_zeros(())
    from handmodel import axis_angle_to_matrix

    R0 = ctx.pose_anchor
    R = axis_angle_to_matrix(torch.cat([p.global_orient[:, None], p.hand_pose], 1))
    theta2 = ((R - R0) ** 2).sum((-1, -2)) / 2.0  # ~ angle^2 for small angles
    per_frame = robust(theta2, ctx.cfg.anchor_sigma, "huber").sum(1)
    return (per_frame * ctx.anchor_frame_weight).mean()


def term_shape_anchor(ctx: Context, p: HandParams, out: Any) -> torch.Tensor:
    """Squared RMS mean-pose vertex distance of the (shared) shape to its anchor, in
    ``temporal_sigma`` units; only when the shape is optimised (``fit_sequence(shape_anchor=...)``)."""
    if ctx.shape_anchor is None:
        return p.betas.new_zeros(())
    anchor, G = ctx.shape_anchor
    d = p.betas[:1] - anchor
    return (d @ G @ d.T)[0, 0] / ctx.cfg.temporal_sigma**2


LossTerm = Callable[[Context, HandParams, Any], torch.Tensor]
TERMS: dict[str, LossTerm] = {
    "reprojection": term_reprojection,
    "pose_prior": term_pose_prior,
    "temporal": term_temporal,
    "acceleration": term_acceleration,
    "silhouette": term_silhouette,
    "pose_anchor": term_pose_anchor,
    "shape_anchor": term_shape_anchor,
}


class _Silhouette:
    """Coverage of every frame's mesh in every view with a mask, one rasterization of all of them
    (instanced: each (frame, view) its own vertex positions), against the masks; each view's error
    is divided by its mask area (``silhouette_loss`` of the image stages, restated here)."""

    def __init__(self, targets: SequenceTargets, faces: torch.Tensor, verts0: torch.Tensor, backend: str, device: torch.device) -> None:
        from capture.camera import scene_depth_range
        from renderer import antialias_construct_topology_hash, make_context

        assert targets.masks is not None and targets.mask_weight is not None and targets.cameras is not None
        self.ctx = make_context(backend, device)
        self.tri = faces.to(torch.int32).contiguous()
        self.topology = antialias_construct_topology_hash(self.tri)
        F, V = targets.mask_weight.shape
        self.pairs = [(f, v) for f in range(F) for v in range(V) if float(targets.mask_weight[f, v]) > 0]
        pts = verts0.detach().reshape(-1, 3).cpu().double().numpy()
        cams = [targets.cameras[f][v] for f, v in self.pairs]
        near, far = scene_depth_range(pts, cams, margin=2.0)
        self.clip = torch.stack([torch.as_tensor(c.clip_matrix(near, far), dtype=torch.float32) for c in cams]).to(device)
        self.frame = torch.as_tensor([f for f, _ in self.pairs], dtype=torch.long, device=device)
        self.target = torch.stack([targets.masks[f, v] for f, v in self.pairs]).to(device)
        self.area = self.target.flatten(1).sum(1).clamp(min=1.0)
        self.hw = tuple(self.target.shape[1:])

    def __call__(self, verts: torch.Tensor) -> torch.Tensor:
        from renderer import antialias, rasterize

        v = verts[self.frame]
        pos = torch.einsum("kij,knj->kni", self.clip, torch.cat([v, torch.ones_like(v[..., :1])], -1)).contiguous()
        rast, _ = rasterize(self.ctx, pos, self.tri, self.hw, grad_db=False)
        cov = antialias((rast[..., 3:4] > 0).to(pos.dtype), rast, pos, self.tri, self.topology, ctx=self.ctx)[..., 0]
        return (((cov - self.target) ** 2).flatten(1).sum(1) / self.area).mean()


# ------------------------------------------------------------------------------------ optimising
def neighbour_pairs(frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,2) pairs and (T,3) triples of positions whose frame numbers are consecutive."""
    fi = frame_index.long()
    pairs = [(i, i + 1) for i in range(len(fi) - 1) if int(fi[i + 1] - fi[i]) == 1]
    triples = [(i, i + 1, i + 2) for i in range(len(fi) - 2) if int(fi[i + 1] - fi[i]) == 1 and int(fi[i + 2] - fi[i + 1]) == 1]
    as_t = lambda x, k: torch.as_tensor(x, dtype=torch.long).reshape(-1, k)  # noqa: E731
    return as_t(pairs, 2), as_t(triples, 3)


def register_translations(model: Any, params: HandParams, targets: SequenceTargets, sigma_px: float = 4.0) -> torch.Tensor:
    """Closed-form robust multi-view 2D-1D registration of every frame's translation (F,3) for the
    current shape, pose and orientation (``networks.geometry.register_translation``); its Cauchy
    scale is 2 ``sigma_px`` (original pixels) over the focal length."""
    from networks.geometry import normalised_image_coords, register_translation

    with torch.no_grad():
        zero = HandParams(params.betas, params.hand_pose, params.global_orient, torch.zeros_like(params.transl))
        joints = model(zero).joints
    F, V = targets.weight.shape[:2]
    obs = normalised_image_coords(targets.uv.reshape(F * V, 21, 2), targets.K.reshape(F * V, 3, 3)).reshape(F, V, 21, 2)
    focal = float(targets.K[..., 0, 0].mean()) / targets.scale  # original pixels
    return register_translation(joints, obs, targets.weight, targets.R, targets.t, scale=2.0 * sigma_px / focal)


def _optimise(model: Any, ctx: Context, v: dict[str, torch.Tensor], names: tuple[str, ...], iterations: int, lr: float,
              weights: Mapping[str, float], desc: str) -> dict[str, float]:
    """Adam on the named tensors of ``v`` (``betas`` (1,10) shared by all frames, per-frame
    ``hand_pose``, ``global_orient``, ``transl``; translation steps scaled by ``transl_lr_scale``,
    shape steps by ``betas_lr_scale``), step size decaying from ``lr`` to ``lr``/10. Returns the
    last value of each term."""
    from fitting.pipeline import progress

    if iterations <= 0:
        return {}
    scale = {"transl": ctx.cfg.transl_lr_scale, "betas": BETAS_LR_SCALE}
    groups = []
    for n, t in v.items():
        t.requires_grad_(n in names)
        if n in names:
            groups.append({"params": [t], "lr": lr * scale.get(n, 1.0)})
    active = {k: w for k, w in weights.items() if w > 0}
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / iterations))
    terms: dict[str, torch.Tensor] = {}
    bar = progress(range(iterations), desc)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        p = _params(v)
        out = model(p)
        terms = {k: TERMS[k](ctx, p, out) for k in active}
        loss = sum(active[k] * t for k, t in terms.items())
        loss.backward()
        opt.step()
        sched.step()
        bar.losses(total=loss.detach(), **{k: t.detach() for k, t in terms.items()})
    for t in v.values():
        t.requires_grad_(False)
    return {k: float(t.detach()) for k, t in terms.items()}


def _params(v: dict[str, torch.Tensor]) -> HandParams:
    F = v["transl"].shape[0]
    return HandParams(v["betas"].expand(F, -1), v["hand_pose"], v["global_orient"], v["transl"])


@dataclass
class TTOResult:
    """Refined per-frame ``params`` (batch F), the last loss terms per phase, the reprojection
    error (median, original pixels) before and after, and the phases' seconds."""

    params: HandParams
    losses: dict[str, dict[str, float]]
    reprojection_before_px: float
    reprojection_after_px: float
    seconds: dict[str, float]


def frame_residuals_px(model: Any, params: HandParams, targets: SequenceTargets) -> torch.Tensor:
    """(F,) median distance (original pixels) of each frame's projected joints to its used
    detections (NaN for a frame without any)."""
    with torch.no_grad():
        err = (project(targets.P, model(params).joints) - targets.uv).norm(dim=-1) / targets.scale
    err = torch.where(targets.weight > 0, err, torch.full_like(err, float("nan")))
    return err.flatten(1).nanmedian(1).values


def noise_weights(residuals: torch.Tensor) -> torch.Tensor:
    """(F,) frame weights min(1, (typical / own residual)^2), typical = the median over frames:
    a frame whose detections are several times noisier than usual (blur, fast motion, a confused
    detector) pulls its own depth and pose much less, and the temporal terms carry it between its
    neighbours. Frames without detections get 1 (their reprojection term is 0 anyway)."""
    ok = torch.isfinite(residuals)
    if not bool(ok.any()):
        return torch.ones_like(residuals)
    typical = residuals[ok].median().clamp(min=1e-3)
    w = (typical / residuals.clamp(min=1e-3)) ** 2
    return torch.where(ok, w.clamp(max=1.0), torch.ones_like(w))


def reprojection_median_px(model: Any, params: HandParams, targets: SequenceTargets) -> float:
    """Median distance (original pixels) of the projected joints to the used detections."""
    with torch.no_grad():
        uv = project(targets.P, model(params).joints)
    err = (uv - targets.uv).norm(dim=-1) / targets.scale
    used = targets.weight > 0
    return float(err[used].median()) if bool(used.any()) else float("nan")


def fit_sequence(
    model: Any,
    betas: torch.Tensor,
    init: HandParams,
    targets: SequenceTargets,
    cfg: TTOConf | None = None,
    renderer_backend: str = "auto",
    shape_anchor: float | None = None,
) -> TTOResult:
    """Refine the F frames of ``init`` (HandParams, batch F, in frame order) with the shape fixed to
    ``betas`` (10,) or (1,10); see the module docstring.

    ``shape_anchor``: free the shape too (one for all frames) in the pose phase, held to ``betas``
    by ``shape_anchor`` x the squared mean-pose vertex distance in ``temporal_sigma`` units — what
    ``fitting.identity.refine`` uses; the views then say what they can about the shape (all of it
    with two or more calibrated views; one view cannot tell the hand's size from its distance)."""
    cfg = cfg or TTOConf()
    dev = model.template.device
    F = targets.num_frames
    if init.batch_size != F:
        raise ValueError(f"{init.batch_size} initial frames for {F} frames of targets")
    f32 = lambda a: a.detach().to(device=dev, dtype=torch.float32).clone()  # noqa: E731
    anchor = f32(torch.as_tensor(betas).reshape(1, -1))
    v = {"betas": anchor.clone(), "hand_pose": f32(init.hand_pose), "global_orient": f32(init.global_orient), "transl": f32(init.transl)}
    targets = SequenceTargets(*(f32(getattr(targets, k)) if isinstance(getattr(targets, k), torch.Tensor) else getattr(targets, k)
                                for k in targets.__dataclass_fields__))
    targets.frame_index = targets.frame_index.long()
    pairs, triples = neighbour_pairs(targets.frame_index)
    prior = PosePrior(model).to(dev)
    ctx = Context(targets, cfg, targets.P, prior, pairs.to(dev), triples.to(dev))
    from handmodel import axis_angle_to_matrix

    ctx.pose_anchor = axis_angle_to_matrix(torch.cat([v["global_orient"][:, None], v["hand_pose"]], 1)).detach()
    ctx.anchor_frame_weight = ((targets.weight > 0).any(-1).sum(-1) <= 1).float()
    seconds: dict[str, float] = {}
    before = reprojection_median_px(model, _params(v), targets)
    t0 = time.perf_counter()
    v["transl"] = register_translations(model, _params(v), targets, cfg.reprojection_sigma).to(dev)
    seconds["registration"] = time.perf_counter() - t0
    if cfg.frame_weighting:
        ctx.frame_weight = noise_weights(frame_residuals_px(model, _params(v), targets)).to(dev)
    if cfg.weights.get("silhouette", 0.0) > 0:
        if targets.masks is not None and targets.mask_weight is not None and float(targets.mask_weight.sum()) > 0:
            with torch.no_grad():
                v0 = model(_params(v)).vertices
            ctx.silhouette = _Silhouette(targets, model.faces, v0, renderer_backend, dev)
        else:
            log.info("tto: silhouette weight > 0 but the frames have no masks; term skipped")
    losses: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    transl_terms = {k: w for k, w in cfg.weights.items() if k in ("reprojection", "temporal", "acceleration")}
    losses["translation"] = _optimise(model, ctx, v, ("transl",), cfg.iterations_transl, cfg.lr, transl_terms, "tto translation")
    seconds["translation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    names, weights = TTO_PARAMS, dict(cfg.weights)
    if shape_anchor is not None:
        names = ("betas",) + TTO_PARAMS
        ctx.shape_anchor = (anchor, shape_gram_torch(model).to(dev))
        weights["shape_anchor"] = float(shape_anchor)
    losses["full"] = _optimise(model, ctx, v, names, cfg.iterations, cfg.lr, weights, "tto shape+pose" if shape_anchor is not None else "tto pose")
    seconds["pose"] = time.perf_counter() - t0
    after = reprojection_median_px(model, _params(v), targets)
    return TTOResult(_params({k: t.detach() for k, t in v.items()}), losses, before, after, seconds)


def shape_gram_torch(model: Any) -> torch.Tensor:
    """(10,10) Gram matrix of the shape directions over the vertices (mean squared vertex distance)."""
    S = model.shapedirs.detach()
    return torch.einsum("vck,vcl->kl", S, S) / S.shape[0]


__all__ = [
    "SequenceTargets", "TERMS", "TTOConf", "TTOResult", "fit_sequence", "neighbour_pairs", "project",
    "register_translations", "reprojection_median_px", "robust",
]
