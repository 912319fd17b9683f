"""Stage ``hand_fit``: the parametric hand of each side fitted to the pose fit's keypoints.

Why this shape: the loss is a weighted sum of *named terms* (``TERMS``; weights from
``hand_fit.weights``), so later terms (silhouettes) plug in with ``register_term`` without
touching the optimisation. The data terms are robust (pseudo-Huber by default, Geman-McClure on
request) because accepted detections can still be tens of pixels off; the priors keep the shape
and the unobserved finger twists plausible.

Schedule: an initialisation (``state.params`` if an initializer left one, else the mean hand
sized to the observed bones, oriented by a Kabsch fit of its palm joints to the 3D keypoints,
fingers bent by analytic inverse kinematics), then ``global`` (orientation and translation
against the palm joints only: a wrong finger pose must not tilt the palm), then ``full`` (all
parameters, all joints), both with Adam. Both hands are optimised together, one bar.

From an initializer's parameters (the GCN: ~1 mm from clean keypoints) the ``warm_*`` schedule
runs instead: no global phase and damped Newton steps on the exact Hessian (``_newton``), which
converge from a close start in a few iterations where Adam's fixed-size first steps move a close
start away and its decaying steps then creep (scripts/eval_gcn.py --iterations measures both).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

import handmodel
from capture.scan import Scan
from fitting.conf import section_dataclass
from fitting.geometry import matrix_to_axis_angle, projection_matrices, similarity_transform
from fitting.pipeline import progress
from fitting.pose_fit import image_scale
from fitting.state import State
from handmodel.joint_orders import PARENTS
from handmodel.params import NUM_BETAS, HandParams
from handmodel.prior import PosePrior, shape_prior

PALM_JOINTS = (0, 1, 5, 9, 13, 17)  # wrist, thumb CMC, index/middle/ring/pinky MCP
PARAM_NAMES = ("betas", "hand_pose", "global_orient", "transl")
OPTIMIZERS = ("adam", "newton")
NEWTON_TRIES = 8  # damping increases (x10 each) tried before a Newton step is given up
NEWTON_MAX_STEP = 0.25  # radians (x transl/betas_lr_scale for those) a Newton step may move a parameter
NEWTON_RTOL = 1e-6  # a Newton step gaining less than this fraction of the loss ends the phase (float32 loss)


@dataclass
class HandFitConf:
    """Keys of the ``hand_fit`` conf section."""

    iterations_global: int = 40
    iterations_full: int = 150
    lr_global: float = 0.02  # Adam's (Newton sizes its own steps)
    lr_full: float = 0.01
    keypoint_sigma: float = 0.005  # metres: robust scale of the 3D keypoint term
    reprojection_sigma: float = 3.0  # pixels of the original image: robust scale of the 2D term
    min_valid_joints: int = 6  # a side with fewer valid 3D keypoints is not fitted
    robust: str = "huber"  # huber (pseudo-Huber) | gmof (Geman-McClure)
    transl_lr_scale: float = 0.1  # Adam steps of transl (metres) relative to the rotations' (radians)
    betas_lr_scale: float = 10.0  # Adam steps of betas (units of their std) relative to the rotations'
    joint_weights: list[float] = field(default_factory=lambda: [1.0] * 21)  # per joint of the data terms
    ik_init: bool = True  # finger rotations from the 3D keypoints before optimising
    optimizer: str = "adam"  # of both phases from the mean hand: adam | newton
    # Schedule when an initializer (the GCN ``init`` stage) left parameters: a close start needs no
    # global phase, and Newton steps converge from it in a few iterations.
    warm_iterations_global: int = 0
    warm_iterations_full: int = 10  # Newton steps stop early once converged
    warm_lr_full: float = 0.005  # used by warm_optimizer = adam
    warm_optimizer: str = "newton"
    weights: dict[str, float] = field(
        default_factory=lambda: {"keypoints3d": 1.0, "reprojection": 1.0, "pose_prior": 0.002, "shape_prior": 0.001}
    )

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "HandFitConf":
        out: HandFitConf = section_dataclass(HandFitConf, conf, "hand_fit", sorted(TERMS))
        out.joint_weights = [float(x) for x in out.joint_weights]
        if len(out.joint_weights) != 21 or min(out.joint_weights) < 0:
            raise ValueError(f"hand_fit.joint_weights must be 21 non-negative numbers, got {out.joint_weights}")
        for key in ("optimizer", "warm_optimizer"):
            if getattr(out, key) not in OPTIMIZERS:
                raise ValueError(f"hand_fit.{key} must be one of {OPTIMIZERS}, got {getattr(out, key)!r}")
        return out


# ----------------------------------------------------------------------------------------- targets
@dataclass
class SideTargets:
    """What one side is fitted to, as tensors on the fitting device."""

    keypoints3d: torch.Tensor  # (21,3) metres
    valid3d: torch.Tensor  # (21,) float
    uv: torch.Tensor  # (V,21,2) pixels of the loaded images
    weight2d: torch.Tensor  # (V,21) detection confidence x accepted (0 = unused)


@dataclass
class FitContext:
    """Everything a loss term may read. ``joint_mask`` (21,) restricts the data terms in a phase."""

    scan: Scan
    state: State
    cfg: HandFitConf
    scale: float
    P: torch.Tensor  # (V,3,4)
    targets: dict[str, SideTargets]
    joint_mask: torch.Tensor
    prior: dict[str, PosePrior]  # per side
    evaluations: int = 0  # forward passes of the loss so far (Adam: one per iteration; Newton: more)


LossTerm = Callable[[FitContext, dict[str, HandParams], dict[str, Any]], torch.Tensor]


def robust(r2: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """Robust penalty of squared residuals, ~r²/(2σ²) near 0 for both kinds.

    ``huber`` (pseudo-Huber): grows like r/σ, so its gradient never vanishes and the fit is
    pulled towards the median of the residuals — the safe default once the pose fit has removed
    the gross outliers. ``gmof`` (Geman-McClure): saturates at 1/2, ignoring residuals beyond a
    few σ; stronger against outliers, but a joint that starts far away gets no pull back."""
    if kind == "huber":
        return torch.sqrt(1.0 + r2 / sigma**2) - 1.0
    if kind == "gmof":
        return 0.5 * r2 / (r2 + sigma**2)
    raise ValueError(f"hand_fit.robust must be huber or gmof, got {kind!r}")


def term_keypoints3d(ctx: FitContext, params: dict[str, HandParams], out: dict[str, Any]) -> torch.Tensor:
    """Robust distance of the model joints to the valid triangulated keypoints."""
    total = torch.zeros((), device=ctx.P.device)
    for side, o in out.items():
        t = ctx.targets[side]
        w = t.valid3d * ctx.joint_mask
        r2 = ((o.joints[0] - t.keypoints3d) ** 2).sum(-1)
        total = total + (w * robust(r2, ctx.cfg.keypoint_sigma, ctx.cfg.robust)).sum() / w.sum().clamp(min=1.0)
    return total


def term_reprojection(ctx: FitContext, params: dict[str, HandParams], out: dict[str, Any]) -> torch.Tensor:
    """Robust pixel distance (original image size) of the projected joints to the accepted
    detections, confidence-weighted."""
    total = torch.zeros((), device=ctx.P.device)
    for side, o in out.items():
        t = ctx.targets[side]
        uv = project_torch(ctx.P, o.joints[0])
        w = t.weight2d * ctx.joint_mask[None]
        r2 = ((uv - t.uv) ** 2).sum(-1) / ctx.scale**2
        total = total + (w * robust(r2, ctx.cfg.reprojection_sigma, ctx.cfg.robust)).sum() / w.sum().clamp(min=1.0)
    return total


def term_pose_prior(ctx: FitContext, params: dict[str, HandParams], out: dict[str, Any]) -> torch.Tensor:
    """The hand model's pose prior (plausible finger articulation), summed over sides."""
    total = torch.zeros((), device=ctx.P.device)
    for side, p in params.items():
        total = total + ctx.prior[side](p.hand_pose).mean()
    return total


def term_shape_prior(ctx: FitContext, params: dict[str, HandParams], out: dict[str, Any]) -> torch.Tensor:
    """betas ~ N(0, I): keeps the shape plausible where the keypoints do not pin it down."""
    total = torch.zeros((), device=ctx.P.device)
    for p in params.values():
        total = total + shape_prior(p.betas).mean()
    return total


TERMS: dict[str, LossTerm] = {
    "keypoints3d": term_keypoints3d,
    "reprojection": term_reprojection,
    "pose_prior": term_pose_prior,
    "shape_prior": term_shape_prior,
}


# Terms that read only the joints and the parameters (not ``out[side].vertices``): when every
# active term does, Newton computes its Hessian on a joints-only copy of the model (joints_model).
JOINT_TERMS: set[str] = {"keypoints3d", "reprojection", "pose_prior", "shape_prior"}


def register_term(name: str, fn: LossTerm, joints_only: bool = False) -> None:
    """Add a loss term (e.g. ``silhouette``); its weight is ``hand_fit.weights.<name>``.
    ``joints_only``: the term reads no vertices (see ``JOINT_TERMS``)."""
    TERMS[name] = fn
    if joints_only:
        JOINT_TERMS.add(name)
    else:
        JOINT_TERMS.discard(name)


def joints_model(model: Any) -> Any:
    """A copy of ``model`` that poses only the vertices its fingertip joints are read from: the
    same ``joints``, ``vertices`` reduced to those few. Its second derivatives cost a third of the
    full mesh's (the double backward through 1609 skinned vertices dominates a Newton step).
    Models without the built-in layout (``tip_vertex_ids``) are returned as they are."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "tip_vertex_ids", None) is None:
        return model
    ids = torch.unique(model.tip_vertex_ids.reshape(-1))
    m = copy.copy(model)
    m.__dict__ = dict(model.__dict__)
    m._buffers = dict(model._buffers)
    m.template, m.shapedirs, m.weights = model.template[ids], model.shapedirs[ids], model.weights[ids]
    if model.posedirs is not None:  # (135, V*3) -> the rows' columns of the kept vertices
        m.posedirs = model.posedirs.reshape(model.posedirs.shape[0], -1, 3)[:, ids].reshape(model.posedirs.shape[0], -1)
    m.tip_vertex_ids = torch.searchsorted(ids, model.tip_vertex_ids)
    m.faces = model.faces[:0]
    return m


# ------------------------------------------------------------------------------------------- stage
def run(scan: Scan, state: State, conf: Mapping[str, Any] | None) -> State:
    """Fit each side with enough valid keypoints; fill ``state.params`` and metrics."""
    cfg = HandFitConf.from_conf(conf)
    if not state.keypoints3d:
        raise ValueError("hand_fit needs the 3D keypoints of pose_fit: list pose_fit before hand_fit in pipeline.stages")
    device = torch.device(str(conf.get("device", "cpu")) if conf is not None and hasattr(conf, "get") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    scale = image_scale(scan, conf)
    model_name = _model_name(conf)
    sides = [
        s for s in scan.sides
        if s in state.keypoints3d and int(np.asarray(state.keypoints3d_valid.get(s, [])).sum()) >= cfg.min_valid_joints
    ]
    skipped = [s for s in scan.sides if s not in sides]
    models = {s: _load_model(model_name, s, device) for s in sides}
    P = torch.as_tensor(projection_matrices(scan.cameras), dtype=torch.float32, device=device)
    targets = {s: side_targets(scan, state, s, device) for s in sides}
    prior = {s: PosePrior(models[s]).to(device) for s in sides}
    joint_w = torch.as_tensor(cfg.joint_weights, dtype=torch.float32, device=device)
    ctx = FitContext(scan, state, cfg, scale, P, targets, joint_w, prior)

    warm = bool(sides) and all(s in state.params for s in sides)
    params = {s: initial_params(models[s], state, s, targets[s], device, cfg.ik_init, prior[s]) for s in sides}
    it_global, it_full, lr_full, optimizer = (
        (cfg.warm_iterations_global, cfg.warm_iterations_full, cfg.warm_lr_full, cfg.warm_optimizer) if warm
        else (cfg.iterations_global, cfg.iterations_full, cfg.lr_full, cfg.optimizer)
    )
    losses: dict[str, float] = {}
    if sides:
        palm = torch.zeros(21, device=device)
        palm[list(PALM_JOINTS)] = 1.0
        ctx.joint_mask = palm * joint_w
        _optimise(ctx, models, params, ("global_orient", "transl"), it_global, cfg.lr_global,
                  {k: w for k, w in cfg.weights.items() if k in ("keypoints3d", "reprojection")}, "hand_fit global",
                  optimizer)
        ctx.joint_mask = joint_w
        losses = _optimise(ctx, models, params, PARAM_NAMES, it_full, lr_full, cfg.weights,
                           "hand_fit full", optimizer)
    for s in sides:
        state.params[s] = params[s].detach().to("cpu")
    state.metrics["hand_fit"] = _metrics(scan, state, models, params, targets, scale, losses, skipped)
    state.metrics["hand_fit"].update(start="initializer" if warm else "mean_hand", optimizer=optimizer,
                                     evaluations=ctx.evaluations)
    return state


def _optimise(
    ctx: FitContext,
    models: dict[str, Any],
    params: dict[str, HandParams],
    names: tuple[str, ...],
    iterations: int,
    lr: float,
    weights: Mapping[str, float],
    desc: str,
    optimizer: str = "adam",
) -> dict[str, float]:
    """Minimise the weighted terms over the named parameters of every side, ``iterations`` steps
    of ``optimizer``; returns the last value of each term (see :func:`_adam`, :func:`_newton`)."""
    if iterations <= 0:
        return {}
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"hand_fit optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    scales = {"transl": ctx.cfg.transl_lr_scale, "betas": ctx.cfg.betas_lr_scale}
    # (side, name, step scale, optimised copy); a step scale of 0 freezes the parameter
    leaves = [
        (side, n, scales.get(n, 1.0), getattr(p, n).detach().clone().requires_grad_(True))
        for side, p in params.items() for n in PARAM_NAMES if n in names and scales.get(n, 1.0) != 0.0
    ]
    active = {k: w for k, w in weights.items() if w > 0}
    bar = progress(range(iterations), desc)

    light = {s: joints_model(m) for s, m in models.items()} if set(active) <= JOINT_TERMS else models

    def loss_of(values: list[torch.Tensor], joints_only: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cur = {side: HandParams(p.betas, p.hand_pose, p.global_orient, p.transl) for side, p in params.items()}
        for (side, n, _, _), v in zip(leaves, values):
            setattr(cur[side], n, v)
        use = light if joints_only else models
        out = {s: use[s].forward(p.betas, p.hand_pose, p.global_orient, p.transl) for s, p in cur.items()}
        terms = {k: TERMS[k](ctx, cur, out) for k in active}
        ctx.evaluations += 1
        return sum(active[k] * v for k, v in terms.items()), terms

    run_fn = _newton if optimizer == "newton" else _adam
    terms = run_fn(loss_of, leaves, iterations, lr, bar)
    for side, n, _, t in leaves:
        setattr(params[side], n, t.detach().clone())
    return {k: float(v.detach()) for k, v in terms.items()}


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (values, joints_only=False)


def _adam(loss_of: LossFn, leaves: list, iterations: int, lr: float, bar: Any) -> dict[str, torch.Tensor]:
    """Adam, the step size decaying from ``lr`` to ``lr``/10 (large steps to get there, small ones
    to settle), transl and betas steps scaled by ``transl_lr_scale`` / ``betas_lr_scale``. Robust
    from a far start: every step is about ``lr`` whatever the gradient."""
    tensors = [t for *_, t in leaves]
    opt = torch.optim.Adam([{"params": [t], "lr": lr * s} for *_, s, t in leaves], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / iterations))
    terms: dict[str, torch.Tensor] = {}
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        loss, terms = loss_of(tensors)
        loss.backward()
        bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
        opt.step()
        sched.step()
    return terms


def _newton(loss_of: LossFn, leaves: list, iterations: int, lr: float, bar: Any) -> dict[str, torch.Tensor]:
    """Damped Newton on the exact Hessian (:func:`_hessian`, recomputed every step: the squared
    hinges of the pose prior and the robust kernels change curvature quickly, and quasi-Newton
    updates of it were measured to stall). Each step is Levenberg-Marquardt,
    ``(H + lambda diag|H|) d = -g``, solved by eigen-decomposition in coordinates scaled by the
    diagonal (the step does not depend on the units: metres, radians, shape std); where that
    matrix is not positive definite (far from a minimum), ``|eigenvalues| + lambda`` instead. A
    step that lowers the loss is taken and lambda shrinks, otherwise lambda grows and the step is
    solved again (one forward each). A step is shortened so that no parameter moves more than
    ``NEWTON_MAX_STEP`` (radians; times the transl/betas step scales for those): directions the
    keypoints barely see (a fingertip joint's twist) have almost no curvature, and an unbounded
    Newton step along them winds an axis-angle past pi into a pose the prior cannot recognise.
    Stops early once a step gains less than ``NEWTON_RTOL`` of the loss. Near the answer the loss
    is nearly quadratic, so from a close start (the GCN's) a few steps reach the minimum where
    Adam's fixed-size steps first move away from it, then creep. ``loss_of(..., joints_only=True)`` evaluates on :func:`joints_model` copies when every
    active term reads joints only (the same values at a third of the cost). ``lr`` is unused."""
    tensors = [t for *_, t in leaves]
    shapes = [t.shape for t in tensors]
    sizes = [t.numel() for t in tensors]
    x = torch.cat([t.detach().reshape(-1) for t in tensors])
    owner = [side for (side, *_), k in zip(leaves, sizes) for _ in range(k)]
    blocks = [torch.tensor([i for i, o in enumerate(owner) if o == side], device=x.device) for side in dict.fromkeys(owner)]
    unorder = torch.argsort(torch.cat(blocks))
    # trust region: no parameter moves more than NEWTON_MAX_STEP x its step scale in one step
    reach = torch.cat([torch.full((k,), NEWTON_MAX_STEP * scale) for (_, _, scale, _), k in zip(leaves, sizes)]).to(x)

    def split(v: torch.Tensor) -> list[torch.Tensor]:
        return [c.reshape(sh) for c, sh in zip(torch.split(v, sizes), shapes)]

    lam = 1e-3
    terms: dict[str, torch.Tensor] = {}
    for _ in bar:
        g = torch.zeros_like(x, dtype=torch.float64)
        H = torch.zeros(x.numel(), x.numel(), dtype=torch.float64, device=x.device)
        for i, idx in enumerate(blocks):  # per side, the others constant: one hand's graph per double backward
            xs = [x[b].clone().requires_grad_(j == i) for j, b in enumerate(blocks)]
            loss, terms = loss_of(split(torch.cat(xs)[unorder]), joints_only=True)
            g[idx], H[idx[:, None], idx[None]] = _hessian(loss, xs[i])
        bar.losses(total=loss.detach(), **{k: v.detach() for k, v in terms.items()})
        f0 = float(loss.detach())
        diag = H.diagonal().abs()
        sc = 1.0 / torch.sqrt(diag + 1e-9 * float(diag.max().clamp(min=1e-30)))
        w, Q = torch.linalg.eigh(sc[:, None] * H * sc[None])
        gq = Q.T @ (sc * g)
        f1 = f0
        for _ in range(NEWTON_TRIES):
            # Levenberg-Marquardt on H where H + lambda diag(H) is positive definite; else on |H|
            curv = w + lam if float(w.min()) + lam > 0 else w.abs() + lam
            d = (sc * (Q @ (-gq / curv))).to(x.dtype)
            d = d * min(1.0, float((reach / d.abs().clamp(min=1e-30)).min()))
            with torch.no_grad():
                f1 = float(loss_of(split(x + d), joints_only=True)[0])
            if f1 < f0:
                x = x + d
                lam = max(lam / 10.0, 1e-9)
                break
            lam *= 10.0
        if f0 - f1 <= NEWTON_RTOL * abs(f0):  # converged (or no step lowers the loss at any damping)
            break
    with torch.no_grad():  # the terms where the fit ends
        terms = loss_of(split(x), joints_only=True)[1]
    for t, v in zip(tensors, split(x)):
        t.data.copy_(v)
    return terms


def _hessian(loss: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and symmetric Hessian (float64) of ``loss`` with respect to the vector ``x``: double
    backward, one batched Hessian-vector product per parameter. :func:`_newton` calls it per
    side, the other side held constant: a block-diagonal Hessian, exact because the terms do not
    couple the hands (one that did would only lose its cross-side second derivatives, the
    accepted-step test keeping the fit descending)."""
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    (rows,) = torch.autograd.grad(g, x, eye, is_grads_batched=True)
    return g.detach().double(), 0.5 * (rows + rows.T).detach().double()


# ---------------------------------------------------------------------------------- initialisation
def side_targets(scan: Scan, state: State, side: str, device: torch.device) -> SideTargets:
    """The 3D keypoints and the detections the pose fit assigned to ``side`` and accepted."""
    V = len(scan.views)
    uv = np.zeros((V, 21, 2), np.float32)
    w = np.zeros((V, 21), np.float32)
    for vi, view in enumerate(scan.views):
        for label, s in state.assignment.get(view.name, {}).items():
            if s != side or label not in view.keypoints:
                continue
            kp = view.keypoints[label]
            acc = np.asarray(state.accepted.get(view.name, {}).get(side, np.zeros(21, bool)), bool)
            uv[vi] = kp[:, :2]
            w[vi] = np.where(acc, kp[:, 2], 0.0)
    f = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)  # noqa: E731
    return SideTargets(f(state.keypoints3d[side]), f(np.asarray(state.keypoints3d_valid[side], np.float32)), f(uv), f(w))


def initial_params(
    model: Any, state: State, side: str, target: SideTargets, device: torch.device, ik: bool = True,
    prior: PosePrior | None = None,
) -> HandParams:
    """``state.params[side]`` when an initializer provided it; else the mean hand placed on the
    keypoints: betas of the mean hand scaled to the observed bone lengths, rotation by Kabsch on
    the palm joints, finger rotations by analytic inverse kinematics (``ik``; clamped to the
    prior's limits), translation solved exactly last (so any model convention for the root of
    the rotation works). Starting near the answer is what lets the robust terms converge in few
    iterations: their gradients vanish for joints tens of millimetres away."""
    if side in state.params:
        return state.params[side].detach().to(device)
    kp = target.keypoints3d.cpu().numpy().astype(np.float64)
    valid = target.valid3d.cpu().numpy() > 0
    p = HandParams.zeros(1, device=device)
    flat = -model.pose_mean[None].detach().to(device)  # full pose 0 = the model's flat rest pose
    p.hand_pose = flat.clone()
    with torch.no_grad():
        rest = _joints(model, p)
        basis = np.stack([_joints(model, _with_beta(p, k)) - rest for k in range(p.betas.shape[1])], axis=-1)
    # size: ratio of observed to mean bone lengths; betas = ridge fit of the scaled mean hand
    bones = [(int(a), b) for b, a in enumerate(PARENTS) if a >= 0 and valid[a] and valid[b]]
    if bones:
        ratio = [np.linalg.norm(kp[b] - kp[a]) / max(np.linalg.norm(rest[b] - rest[a]), 1e-6) for a, b in bones]
        size = float(np.clip(np.median(ratio), 0.7, 1.4))
        A = basis.reshape(-1, basis.shape[-1])
        betas = np.linalg.solve(A.T @ A + 1e-6 * np.eye(A.shape[1]), A.T @ ((size - 1.0) * rest).reshape(-1))
        p.betas = torch.as_tensor(np.clip(betas, -3, 3)[None], dtype=torch.float32, device=device)
    with torch.no_grad():
        rest = _joints(model, p)
    idx = [j for j in PALM_JOINTS if valid[j]]
    if len(idx) < 3:  # a palm hidden in every view: align what is there
        idx = [j for j in range(21) if valid[j]]
    _, R, _ = similarity_transform(rest[idx], kp[idx], with_scale=False)
    p.global_orient = torch.as_tensor(matrix_to_axis_angle(R)[None], dtype=torch.float32, device=device)
    if ik:
        rel = finger_ik(R, rest, kp, valid)  # (15,3,3) rotations relative to the parents
        full = torch.as_tensor(matrix_to_axis_angle(rel)[None], dtype=torch.float32, device=device)
        if prior is not None:
            a = prior.angles(full - prior.pose_mean)
            a = torch.maximum(torch.minimum(a, prior.high), prior.low)
            full = prior.angles_to_pose(a) + prior.pose_mean
        p.hand_pose = full - model.pose_mean[None].to(device)
    with torch.no_grad():
        posed = _joints(model, p)
    p.transl = torch.as_tensor((kp[idx] - posed[idx]).mean(axis=0)[None], dtype=torch.float32, device=device)
    return p


def finger_ik(R_root: np.ndarray, rest: np.ndarray, kp: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Joint rotations (15,3,3) relative to their parents (model order: thumb..pinky, proximal
    to distal) that turn each rest bone (``rest`` (21,3), flat pose, MediaPipe order) onto the
    observed bone of ``kp`` with the smallest rotation (a chain of keypoints cannot see the
    twist). A joint whose bone is not observed keeps its parent's frame."""
    out = np.tile(np.eye(3), (15, 1, 1))
    for f in range(5):
        G = R_root
        for k in range(3):
            a, b = 1 + 4 * f + k, 2 + 4 * f + k
            if valid[a] and valid[b]:
                u = G @ (rest[b] - rest[a])
                Q = _min_rotation(u, kp[b] - kp[a])
                out[3 * f + k] = G.T @ Q @ G
            G = G @ out[3 * f + k]
    return out


def _min_rotation(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smallest rotation taking the direction of ``u`` to that of ``v``."""
    u = u / max(np.linalg.norm(u), 1e-12)
    v = v / max(np.linalg.norm(v), 1e-12)
    axis = np.cross(u, v)
    s, c = np.linalg.norm(axis), float(np.clip(u @ v, -1.0, 1.0))
    if s < 1e-9:
        if c > 0:
            return np.eye(3)
        perp = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis, s = perp / np.linalg.norm(perp), 0.0
        return _rodrigues(axis, np.pi)
    return _rodrigues(axis / s, float(np.arctan2(s, c)))


def _rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def _joints(model: Any, p: HandParams) -> np.ndarray:
    return model.forward(p.betas, p.hand_pose, p.global_orient, p.transl).joints[0].detach().cpu().numpy().astype(np.float64)


def _with_beta(p: HandParams, k: int) -> HandParams:
    b = p.betas.clone()
    b[0, k] += 1.0
    return HandParams(b, p.hand_pose, p.global_orient, p.transl)


# ----------------------------------------------------------------------------------------- helpers
def project_torch(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """World points (N,3) -> pixels (V,N,2) for every camera; depth clamped away from zero."""
    Xh = torch.cat([X, torch.ones_like(X[:, :1])], dim=-1)
    x = torch.einsum("vij,nj->vni", P, Xh)
    return x[..., :2] / x[..., 2:3].clamp(min=1e-6)


def _model_name(conf: Mapping[str, Any] | None) -> str:
    if conf is not None and "hand_model" in conf:
        section = conf["hand_model"]
        if isinstance(section, Mapping) and "name" in section:
            return str(section["name"])
    return "builtin"


def _load_model(name: str, side: str, device: torch.device) -> Any:
    model = handmodel.load(name, side=side)
    return model.to(device) if hasattr(model, "to") else model


# the later fitting stages (silhouette_fit, ham) draw their bars through this module too
_progress = progress


def _metrics(
    scan: Scan,
    state: State,
    models: dict[str, Any],
    params: dict[str, HandParams],
    targets: dict[str, SideTargets],
    scale: float,
    losses: dict[str, float],
    skipped: list[str],
) -> dict[str, Any]:
    """Median reprojection error (original px) of the fitted joints against the accepted
    detections, 3D keypoint error, ground-truth errors when the scan has them."""
    from fitting import metrics as M

    per_side: dict[str, Any] = {}
    pooled: list[np.ndarray] = []
    P = projection_matrices(scan.cameras)
    for side, p in params.items():
        with torch.no_grad():
            joints = models[side].forward(p.betas, p.hand_pose, p.global_orient, p.transl).joints[0].cpu().numpy()
        t = targets[side]
        uv = project_torch(torch.as_tensor(P, dtype=torch.float64), torch.as_tensor(joints, dtype=torch.float64)).numpy()
        used = t.weight2d.cpu().numpy() > 0
        err = np.linalg.norm(uv - t.uv.cpu().numpy(), axis=-1)[used] / scale
        pooled.append(err)
        valid = t.valid3d.cpu().numpy() > 0
        rec: dict[str, Any] = {
            "reprojection_median_px": float(np.median(err)) if err.size else None,
            "reprojection_mean_px": float(np.mean(err)) if err.size else None,
            "keypoints3d_error_mm": M.mpjpe(joints, state.keypoints3d[side], valid),
            "betas_norm": float(p.betas.norm()),
        }
        if scan.gt is not None and side in scan.gt.keypoints3d:
            gt = np.asarray(scan.gt.keypoints3d[side], np.float64)
            rec["mpjpe_mm"] = M.mpjpe(joints, gt)
            rec["pa_mpjpe_mm"] = M.pa_mpjpe(joints, gt)
        per_side[side] = rec
    all_err = np.concatenate(pooled) if pooled else np.zeros(0)
    detected = int(sum((v.keypoints[l][:, 2] > 0).sum() for v in scan.views for l in v.keypoints))
    accepted = int(sum(np.asarray(a).sum() for d in state.accepted.values() for a in d.values()))
    return {
        "sides": per_side,
        "skipped_sides": skipped,
        "reprojection_median_px": float(np.median(all_err)) if all_err.size else None,
        "accepted_fraction": accepted / max(detected, 1),
        "losses": losses,
        "num_betas": NUM_BETAS,
    }
