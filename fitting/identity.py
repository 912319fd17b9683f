"""Identity: one hand shape per side, calibrated from a sequence's per-frame shape estimates.

Why: a person's hand does not change between frames, so its shape is estimated once, from every
frame, and each frame's pose is then fitted with it (``fitting.tto``). Per-frame estimates differ
in quality (noise, occlusion, viewpoint), so frames are weighted by the predictor's confidence
(``networks.confidence``: softmax of score / ``temperature``), and frames that still disagree with
the consensus are down-weighted by an iteratively reweighted mean (Cauchy weights of each frame's
distance to the current estimate, scale = ``robust_scale`` x the weighted median distance) or cut
by a trimmed mean. Distances are mean-pose vertex distances — RMS over the vertices of the flat
hands of two betas, exact through the Gram matrix of the shape directions, since the rest mesh is
linear in the betas — so "far" means millimetres of hand, whatever the shape basis. For the same
reason the weighted mean of betas IS the weighted mean of the mean-pose meshes. The plain mean is
kept beside it for comparison.

Size: one view cannot tell a hand's size from its distance, so what a one-view predictor says
about the size component (beta 0, ~8 mm of mean-pose vertex error per unit; the others 0.1-1.1
mm) comes only from the hand's proportions, and weakly. The confidence weights are no good for
it: the head ranks frames by shape error, which is mostly size error, so it prefers frames whose
predicted size is near the predictor's usual one and pulls the calibrated size there. Over 2000
training sequences (30 frames, one view, seeds 600000+) the true beta 0 correlates 0.32 with the
plain mean of the per-frame beta 0 but only 0.12 with the weighted robust estimate's, and the
plain mean is biased (+0.69: hands predicted ~4 % small). With ``size_prior`` (:class:`SizePrior`;
:data:`GCN_SIZE_PRIOR` for the committed GCN, used by ``fitting.sequence``) beta 0 is therefore
set to the posterior mean given the plain mean of the per-frame beta 0 — linear under a joint
Gaussian, ``gain`` x mean + ``offset``, fitted on those training sequences
(:func:`fit_size_prior`; ``scripts/eval_identity.py --fit-size-prior 2000``) — and the other
components keep the weighted robust estimate. Why not the hand model's own prior: within it the
proportions do fix the size (R^2 of log-size on the scale-free mean-pose mesh 0.999), but beta 0's
scale-free part is only 0.48 mm RMS of mesh (0.35 mm over the 21 joints) per unit, and the
calibrated shapes' scale-free error is ~1.45 mm (the mean hand's ~1.5): the prior's posterior
size given them did not beat the calibrated size (6.12-6.22 mm against 6.14 on the confidence
head's 100 validation sequences, whatever the assumed noise).

Caveat, measured: most of that 0.32 comes from the synthetic detection model, whose noise is a
fraction of a nominal 0.18 m hand at the true depth, so a smaller hand is relatively noisier and
the predictor (trained on the same model) reads noise as size; with noise scaled to the true hand
the plain mean's correlation falls to 0.06-0.11 (2500 sequences). Real detectors' noise follows
the hand's size in the image, so on real captures expect the size prior to know little and one
view's calibrated size to stay near the mean hand. What one view still misses: with the true
beta 0 substituted, the 100 held-out sequences' calibrated error is 1.35 mm (15 % of per-frame)
instead of 5.98 mm (67 %); reaching 60 % would need a size estimate correlating ~0.52 with the
truth. Refining the shape against every frame's keypoints with one view does not give it (scaling
the scene about the camera centre leaves every projection unchanged): 6.61 -> 7.07 mm on 60
training sequences.

Optionally (``refine_iterations`` > 0) the estimate is then refined
against every frame's keypoints at once (``fitting.tto.fit_sequence`` with the shape free and held
to the estimate by ``refine_anchor``): with two or more calibrated views this recovers the hand's
absolute size, which no single view can tell from its distance.

The result is saved (``identity.json`` + ``identity.npz``, :func:`save_identity`) and read back by
:func:`load_identity`: sequence runs take it instead of calibrating (``identity.betas_file``), and
the pipeline stage ``identity`` (:func:`run`, between ``init`` and ``hand_fit``) puts it into a
single-frame fit's starting parameters; ``conf/identity.conf`` then keeps it fixed through
``hand_fit.betas_lr_scale = 0``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from handmodel.params import NUM_BETAS, SIDES, HandParams, check_side

log = logging.getLogger("handrecon")
REPO_ROOT = Path(__file__).resolve().parent.parent
IDENTITY_FORMAT = "handrecon.identity/1"
ROBUST_KINDS = ("cauchy", "trim", "none")
MM = 1000.0


@dataclass
class IdentityConf:
    """Keys of the ``identity`` conf section (read with :meth:`from_tree`)."""

    confidence_weights: str = ""  # "" = networks/data/confidence.pt; relative paths from the repo root
    use_confidence: bool = True  # off: every frame starts with the same weight
    temperature: float = 0.25  # softmax(score / temperature); chosen on the head's validation sequences
    robust: str = "cauchy"  # cauchy (iteratively reweighted) | trim (trimmed mean) | none
    robust_scale: float = 2.0  # Cauchy scale, times the weighted median distance to the estimate
    trim_fraction: float = 0.2  # trim: share of the weight mass dropped, farthest frames first
    iterations: int = 10  # reweighting rounds
    refine_iterations: int = 0  # > 0: then refine the shape against every frame's keypoints (fitting.tto)
    refine_anchor: float = 0.01  # weight holding the refined shape to the calibrated one
    betas_file: str = ""  # identity.json/.npz of an earlier calibration: used instead of calibrating

    @staticmethod
    def from_tree(conf: Mapping[str, Any] | None) -> "IdentityConf":
        from fitting.conf import section_dataclass

        out: IdentityConf = section_dataclass(IdentityConf, conf, "identity")
        if out.robust not in ROBUST_KINDS:
            raise ValueError(f"identity.robust = {out.robust!r}; expected one of {ROBUST_KINDS}")
        if not out.temperature > 0:
            raise ValueError(f"identity.temperature must be positive, got {out.temperature}")
        if not 0.0 <= out.trim_fraction < 1.0:
            raise ValueError(f"identity.trim_fraction must be in [0, 1), got {out.trim_fraction}")
        return out


@dataclass(frozen=True)
class SizePrior:
    """Posterior mean of the size component (beta 0) of a person's shape given the plain mean
    ``m`` of a one-view predictor's per-frame beta 0: ``gain * m + offset`` (the linear
    regression of the true beta 0 on ``m`` over training sequences, :func:`fit_size_prior`).
    Specific to the predictor that made the estimates: refit after retraining it."""

    gain: float
    offset: float
    source: str = ""

    def __call__(self, mean_beta0: float) -> float:
        return float(self.gain * mean_beta0 + self.offset)


# The committed GCN (networks/data/gcn_weights.pt) on 2000 single-view 30-frame sequences of the
# default detection model, seeds 600000..601999 (sides alternating; no other use of these seeds):
# `scripts/eval_identity.py --fit-size-prior 2000`. Correlation of the plain-mean beta 0 with the
# truth 0.32 (the weighted robust beta 0: 0.12), residual std of beta 0 0.92 (of the true beta 0: 0.97).
GCN_SIZE_PRIOR = SizePrior(1.2866, -0.8890, "GCN, 2000 x 30-frame one-view sequences, seeds 600000+")
SIZE_COMPONENT = 0  # beta 0: the size direction (a shape's least-squares scale against the mean hand depends on it alone)


def fit_size_prior(per_frame_betas: list[np.ndarray] | np.ndarray, betas_true: np.ndarray, source: str = "") -> SizePrior:
    """:class:`SizePrior` from sequences: ``per_frame_betas`` (one (F,10) array per sequence) and
    their true betas (S,10). Least squares of the true beta 0 on the plain mean of the per-frame
    beta 0 (with an intercept)."""
    m = np.array([np.asarray(b, np.float64).reshape(-1, NUM_BETAS)[:, SIZE_COMPONENT].mean() for b in per_frame_betas])
    t = np.asarray(betas_true, np.float64).reshape(len(m), -1)[:, SIZE_COMPONENT]
    if len(m) < 3 or np.ptp(m) <= 0:
        raise ValueError("fit_size_prior needs at least 3 sequences whose mean beta 0 differs")
    gain, offset = np.linalg.lstsq(np.c_[m, np.ones_like(m)], t, rcond=None)[0]
    return SizePrior(float(gain), float(offset), source)


@dataclass
class Calibration:
    """One side's calibrated shape. ``betas`` (10,) the robust confidence-weighted estimate (its
    beta 0 from the size prior when one was given; ``betas_weighted`` then keeps the estimate
    before), ``plain_mean`` (10,) the unweighted mean; per frame: ``prior_weights`` (softmax of the
    confidences), final ``weights`` (sum 1) and ``distances_mm`` (RMS mean-pose vertex distance to
    ``betas``)."""

    betas: np.ndarray
    plain_mean: np.ndarray
    weights: np.ndarray
    prior_weights: np.ndarray
    distances_mm: np.ndarray
    confidence: np.ndarray | None = None
    frames: list[str] = field(default_factory=list)
    method: str = ""
    betas_before_refinement: np.ndarray | None = None  # the robust mean, when refined afterwards
    betas_weighted: np.ndarray | None = None  # the weighted robust estimate before the size prior set beta 0

    def to_record(self) -> dict[str, Any]:
        return {
            "betas": self.betas.tolist(),
            "plain_mean_betas": self.plain_mean.tolist(),
            "method": self.method,
            "frames": list(self.frames),
            "weights": self.weights.round(6).tolist(),
            "prior_weights": self.prior_weights.round(6).tolist(),
            "distances_mm": self.distances_mm.round(4).tolist(),
            "confidence": None if self.confidence is None else self.confidence.round(5).tolist(),
            "betas_before_refinement": None if self.betas_before_refinement is None else self.betas_before_refinement.tolist(),
            "betas_weighted": None if self.betas_weighted is None else self.betas_weighted.tolist(),
        }


# ------------------------------------------------------------------------------------ calibration
def shape_gram(model: Any) -> torch.Tensor:
    """(10,10) G with (a-b)^T G (a-b) = mean squared mean-pose vertex distance (m^2) of betas a, b."""
    S = model.shapedirs.detach().double().cpu()  # (V,3,10)
    V = S.shape[0]
    S = S.reshape(-1, S.shape[-1])
    return S.T @ S / V


def shape_distances_mm(model: Any, betas: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N,) RMS mean-pose vertex distance (mm) of each row of ``betas`` (N,10) to ``ref`` (10,)."""
    G = shape_gram(model)
    d = torch.as_tensor(np.asarray(betas), dtype=torch.float64) - torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return (torch.einsum("ni,ij,nj->n", d, G, d).clamp(min=0.0).sqrt() * MM).numpy()


def shape_error_mm(model: Any, betas: np.ndarray | torch.Tensor, betas_true: np.ndarray | torch.Tensor) -> float:
    """Mean per-vertex error (mm, ``fitting.metrics.mpvpe``) of the mean-pose mesh of ``betas``
    against that of ``betas_true``: the shape error the calibration is judged by."""
    from fitting import metrics as M

    f = lambda b: torch.as_tensor(np.asarray(b, np.float32).reshape(1, -1), dtype=model.template.dtype)  # noqa: E731
    with torch.no_grad():
        a, b = model.rest_vertices(f(betas))[0], model.rest_vertices(f(betas_true))[0]
    return M.mpvpe(a, b)


def softmax_weights(confidence: np.ndarray | None, n: int, temperature: float) -> np.ndarray:
    """Per-frame prior weights: softmax(confidence / temperature), uniform without confidences."""
    if confidence is None:
        return np.full(n, 1.0 / n)
    z = np.asarray(confidence, np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    c = np.cumsum(w[order])
    return float(x[order][np.searchsorted(c, 0.5 * c[-1])])


def calibrate(
    model: Any,
    betas: np.ndarray | torch.Tensor,
    confidence: np.ndarray | torch.Tensor | None = None,
    cfg: IdentityConf | None = None,
    frames: list[str] | None = None,
    size_prior: SizePrior | None = None,
) -> Calibration:
    """One shape from per-frame estimates ``betas`` (N,10) and confidence scores (N,) (higher =
    better; None = all equal). With ``size_prior`` beta 0 is its posterior mean given the plain
    mean of the per-frame beta 0, the rest the weighted robust estimate. See the module docstring."""
    cfg = cfg or IdentityConf()
    B = np.asarray(betas.detach().cpu() if isinstance(betas, torch.Tensor) else betas, np.float64).reshape(-1, NUM_BETAS)
    N = len(B)
    if N == 0:
        raise ValueError("calibrate needs at least one frame's betas")
    conf = None
    if confidence is not None and cfg.use_confidence:
        conf = np.asarray(confidence.detach().cpu() if isinstance(confidence, torch.Tensor) else confidence, np.float64).reshape(N)
    prior = softmax_weights(conf, N, cfg.temperature)
    G = shape_gram(model).numpy()

    def dist(ref: np.ndarray) -> np.ndarray:
        d = B - ref
        return np.sqrt(np.clip(np.einsum("ni,ij,nj->n", d, G, d), 0.0, None)) * MM

    w = prior.copy()
    est = (w[:, None] * B).sum(0) / w.sum()
    if cfg.robust != "none" and N > 2:
        for _ in range(max(1, cfg.iterations)):
            d = dist(est)
            if cfg.robust == "cauchy":
                s = max(cfg.robust_scale * _weighted_median(d, prior), 1e-6)
                w = prior / (1.0 + (d / s) ** 2)
            else:  # trim: keep the nearest frames holding (1 - trim_fraction) of the prior weight
                order = np.argsort(d)
                keep = np.cumsum(prior[order]) <= (1.0 - cfg.trim_fraction) * prior.sum() + 1e-12
                keep[0] = True
                w = np.zeros(N)
                w[order[keep]] = prior[order[keep]]
            new = (w[:, None] * B).sum(0) / w.sum()
            if np.abs(new - est).max() < 1e-7:
                est = new
                break
            est = new
    method = f"{'confidence' if conf is not None else 'uniform'}-weighted, {cfg.robust}"
    weighted = None
    if size_prior is not None:
        weighted = est.astype(np.float32)
        est = est.copy()
        est[SIZE_COMPONENT] = size_prior(B[:, SIZE_COMPONENT].mean())
        method += f"; size (beta 0) from the plain mean through the size prior ({size_prior.source or 'given'})"
    return Calibration(
        betas=est.astype(np.float32),
        plain_mean=B.mean(0).astype(np.float32),
        weights=w / w.sum(),
        prior_weights=prior,
        distances_mm=dist(est),
        confidence=conf,
        frames=list(frames or []),
        method=method,
        betas_weighted=weighted,
    )


# ---------------------------------------------------------------------------------------- files
def save_identity(path_stem: str | Path, calibrations: Mapping[str, Calibration], extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """``<stem>.json`` (betas per side, method, per-frame weights) and ``<stem>.npz`` (``<side>/betas``)."""
    import io

    from export.atomic import write_bytes, write_json

    stem = Path(path_stem)
    doc = {"format": IDENTITY_FORMAT, "model": "builtin", "hands": {check_side(s): c.to_record() for s, c in calibrations.items()},
           **dict(extra or {})}
    j = write_json(stem.with_suffix(".json"), doc)
    buf = io.BytesIO()
    np.savez(buf, **{f"{s}/betas": c.betas.astype(np.float32) for s, c in calibrations.items()})
    n = write_bytes(stem.with_suffix(".npz"), buf.getvalue())
    return j, n


def load_identity(path: str | Path) -> dict[str, np.ndarray]:
    """Calibrated betas (10,) per side from a file written by :func:`save_identity` (.json or .npz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identity file not found: {path} (write one with a sequence run: fit.py --scan_id A-B)")
    out: dict[str, np.ndarray] = {}
    if path.suffix == ".npz":
        with np.load(path) as z:
            for key in z.files:
                side, name = key.split("/", 1)
                if name == "betas":
                    out[check_side(side)] = np.asarray(z[key], np.float32).reshape(NUM_BETAS)
    else:
        doc = json.loads(path.read_text())
        if doc.get("format") != IDENTITY_FORMAT:
            raise ValueError(f"{path}: not an identity file (format {doc.get('format')!r}, expected {IDENTITY_FORMAT!r})")
        for side, rec in doc["hands"].items():
            out[check_side(side)] = np.asarray(rec["betas"], np.float32).reshape(NUM_BETAS)
    if not out:
        raise ValueError(f"{path}: holds no calibrated hand")
    return out


def resolve_path(value: str) -> Path:
    """A conf path: absolute as given, relative against the current directory when it exists
    there, else against the repo root."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


# ---------------------------------------------------------------------------------------- stage
def run(scan: Any, state: Any, conf: Mapping[str, Any] | None) -> Any:
    """Pipeline stage ``identity``: start each side's single-frame fit from the calibrated shape of
    ``identity.betas_file``. Pose and orientation come from ``init`` when it ran (else from
    ``hand_fit``'s own initialisation on the pose fit's keypoints); the translation is re-solved
    on the 3D keypoints, since a new shape moves the joints."""
    from fitting import hand_fit as HF

    cfg = IdentityConf.from_tree(conf)
    if not cfg.betas_file:
        raise ValueError("the identity stage needs identity.betas_file (an identity.json from a sequence run)")
    path = resolve_path(cfg.betas_file)
    shapes = load_identity(path)
    device = torch.device("cpu")
    min_valid = HF.HandFitConf.from_conf(conf).min_valid_joints
    per_side: dict[str, Any] = {}
    for side in SIDES:
        if side not in scan.sides:
            continue
        if side not in shapes:
            per_side[side] = {"skipped": f"{path.name} holds no {side} hand"}
            continue
        n_valid = int(np.asarray(state.keypoints3d_valid.get(side, [])).sum()) if side in state.keypoints3d else 0
        if n_valid < min_valid:  # hand_fit leaves such a side out; no start is put in for it either
            per_side[side] = {"skipped": f"{n_valid} valid 3D keypoints (hand_fit needs {min_valid}; one view gives none)"}
            continue
        model = HF._load_model(HF._model_name(conf), side, device)
        betas = torch.as_tensor(shapes[side], dtype=torch.float32)[None]
        if side in state.params:
            p = state.params[side].detach()
            source = "init"
        elif side in state.keypoints3d:
            targets = HF.side_targets(scan, state, side, device)
            p = HF.initial_params(model, state, side, targets, device, True, None)
            source = "hand_fit initialisation"
        else:
            per_side[side] = {"skipped": "no starting pose (list init or pose_fit before identity)"}
            continue
        p = HandParams(betas.clone(), p.hand_pose.clone(), p.global_orient.clone(), p.transl.clone())
        if side in state.keypoints3d:
            valid = torch.as_tensor(np.asarray(state.keypoints3d_valid.get(side, np.ones(21, bool)), np.float32))
            kp = torch.as_tensor(np.asarray(state.keypoints3d[side], np.float32))
            with torch.no_grad():
                j = model(p).joints[0]
            if valid.sum() > 0:
                p.transl = p.transl + ((kp - j) * valid[:, None]).sum(0, keepdim=True) / valid.sum()
        state.params[side] = p
        per_side[side] = {"betas": shapes[side].round(5).tolist(), "pose_from": source}
    state.metrics["identity"] = {"betas_file": str(path), "sides": per_side}
    return state


__all__ = [
    "GCN_SIZE_PRIOR", "SIZE_COMPONENT", "Calibration", "IdentityConf", "SizePrior", "calibrate", "fit_size_prior", "load_identity", "resolve_path", "run", "save_identity",
    "shape_distances_mm", "shape_error_mm", "shape_gram", "softmax_weights",
]
