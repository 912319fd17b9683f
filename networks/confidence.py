"""Confidence head of the GCN predictor: how far off is this frame's predicted hand SHAPE?

Why: a person's shape is the same in every frame, so a sequence can afford to trust its best
frames. Which frames are best is not visible in the betas themselves; it shows in how the
prediction sits on its input — 2D keypoints the registered hand does not explain (noise,
hallucinated fingers), the GCN mesh and the parameter mesh disagreeing, a hand seen edge-on or
small in the image, a prediction that moves when the input is nudged. The head is a small MLP over
such features (``_geometric_features``) and the predictor's own global keypoint feature, trained after
the predictor, with the predictor frozen, to RANK frames by their shape error (the mean vertex
error of the mean-pose mesh of the predicted vs the true betas), see ``scripts/train_confidence.py``
and ``networks/data/TRAINING.md``. Higher score = better shape. A small regression term ties the
score loosely to -log(shape error in mm), so that it has a scale; ``fitting.identity`` weights
frames by ``softmax(score / temperature)``. Not for the size, though: the shape error is mostly the
size error, which one view cannot see, so the head learned to favour frames whose predicted size
is near the predictor's usual one; weighting by it pulls a sequence's size there (``fitting.identity``
takes beta 0 from the plain mean through ``GCN_SIZE_PRIOR`` instead).

Left hands are described as the mirrored right hand they are for the predictor (pose, camera-frame
orientation), so one head serves both sides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from handmodel.prior import PosePrior

from .geometry import mirror_matrix, normalised_image_coords
from .predictor import AA_MIRROR, GCNPredictor, Prediction

CONFIDENCE_FILE = Path(__file__).resolve().parent / "data" / "confidence.pt"
CONFIDENCE_FORMAT = "handrecon.confidence/1"
NUM_JOINTS = 21
LATENT_DIM = 256  # the mesh network's global keypoint feature (HandMeshGCN.global_mlp output)
TTA_NOISE = 0.01  # input nudge of the stability feature, fraction of the keypoints' box diagonal
TTA_SEED = 12345
MM = 1000.0


# ----------------------------------------------------------------------------------- shape error
def mean_pose_vertices(model: Any, betas: torch.Tensor) -> torch.Tensor:
    """(B,V,3) vertices of the flat mean pose for ``betas`` (B,10): the shape alone."""
    return model.rest_vertices(betas.to(model.template.dtype))


def shape_error_mm(model: Any, betas: torch.Tensor, betas_true: torch.Tensor) -> torch.Tensor:
    """(B,) mean per-vertex distance (mm) between the mean-pose meshes of two sets of betas."""
    d = mean_pose_vertices(model, betas) - mean_pose_vertices(model, betas_true.expand_as(betas))
    return d.norm(dim=-1).mean(-1) * MM


# -------------------------------------------------------------------------------------- features
@dataclass
class FeatureConf:
    """Which feature groups the head sees; stored with the weights so inference matches."""

    latent: bool = True
    tta: int = 0  # nudged re-predictions of the stability feature (0 = off: it added little, at 3x the cost)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Capture:
    """Forward hook keeping the last output of a module (the predictor's files stay untouched)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.value = output.detach()

    def close(self) -> None:
        self.handle.remove()


def _right_prior(pred: GCNPredictor) -> PosePrior:
    prior = getattr(pred, "_confidence_prior", None)
    if prior is None:
        prior = PosePrior(pred.models["right"])
        pred._confidence_prior = prior  # type: ignore[attr-defined]
    return prior


def predict_with_features(
    pred: GCNPredictor,
    uv: torch.Tensor,
    valid: torch.Tensor,
    K: torch.Tensor,
    side: str,
    R_cam: torch.Tensor | None = None,
    t_cam: torch.Tensor | None = None,
    views: dict[str, torch.Tensor] | None = None,
    conf: FeatureConf | None = None,
) -> tuple[Prediction, torch.Tensor]:
    """``pred.predict_2d`` of one view's keypoints plus the (B, D) confidence features of each
    frame, computed in that (predicting) view. Arguments as ``GCNPredictor.predict_2d``."""
    conf = conf or FeatureConf()
    dev = pred.device
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev)  # noqa: E731
    uv, vis, K = f32(uv), f32(valid), f32(K)
    B = uv.shape[0]
    R_cam = torch.eye(3, device=dev).expand(B, 3, 3) if R_cam is None else f32(R_cam)
    t_cam = torch.zeros(B, 3, device=dev) if t_cam is None else f32(t_cam)
    cap = _Capture(pred.nets["3d"].global_mlp)
    try:
        p = pred.predict_2d(uv, vis, K, side, R_cam, t_cam, views=views)
        latent = cap.value
    finally:
        cap.close()
    feats = [_geometric_features(pred, p, uv, vis, K, R_cam, t_cam, side)]
    if conf.tta > 0:
        feats.append(_stability(pred, p, uv, vis, K, R_cam, t_cam, side, conf.tta))
    if conf.latent:
        assert latent is not None and latent.shape == (B, LATENT_DIM)
        feats.append(latent)
    return p, torch.cat(feats, -1)


def _geometric_features(
    pred: GCNPredictor, p: Prediction, uv: torch.Tensor, vis: torch.Tensor, K: torch.Tensor,
    R_cam: torch.Tensor, t_cam: torch.Tensor, side: str,
) -> torch.Tensor:
    """Hand-made features: betas and how far their mesh is from the mean hand, pose angles,
    camera-frame orientation, reprojection residuals of the registered hand, GCN-vs-parameter mesh
    disagreement, apparent size, depth, visibility."""
    B = uv.shape[0]
    dev = uv.device
    model = pred.models[side]
    params = p.params
    with torch.no_grad():
        param_verts = model(params).vertices
    pose_r = params.hand_pose * torch.tensor(AA_MIRROR, device=dev) if side == "left" else params.hand_pose
    angles = _right_prior(pred).angles(pose_r).reshape(B, -1)
    from handmodel import axis_angle_to_matrix

    Rc = R_cam @ axis_angle_to_matrix(params.global_orient)
    if side == "left":
        M = mirror_matrix(device=dev)
        Rc = M @ Rc @ M
    # reprojection of the registered model joints in the predicting view, in units of the box size
    cam = torch.einsum("bij,bnj->bni", R_cam, p.joints) + t_cam[:, None]
    proj = torch.einsum("bij,bnj->bni", K, cam)
    uv_hat = proj[..., :2] / proj[..., 2:3].clamp(min=1e-6)
    v = vis > 0
    big = 1e9
    lo = torch.where(v[..., None], uv, torch.full_like(uv, big)).amin(1)
    hi = torch.where(v[..., None], uv, torch.full_like(uv, -big)).amax(1)
    diag = (hi - lo).norm(dim=-1).clamp(min=1.0)
    res = (uv_hat - uv).norm(dim=-1) / diag[:, None] * vis  # (B,21)
    nvis = vis.sum(1).clamp(min=1.0)
    masked = torch.where(v, res, torch.full_like(res, float("nan")))
    res_stats = torch.stack([res.sum(1) / nvis, masked.nanmedian(1).values.nan_to_num(0.0), res.amax(1),
                             ((res**2).sum(1) / nvis).sqrt()], -1)
    xy = normalised_image_coords(uv, K)
    xlo = torch.where(v[..., None], xy, torch.full_like(xy, big)).amin(1)
    xhi = torch.where(v[..., None], xy, torch.full_like(xy, -big)).amax(1)
    half = 0.5 * (xhi - xlo).amax(-1).clamp(min=1e-6)
    gcn_gap = (p.vertices - param_verts).norm(dim=-1).mean(-1) / pred.palm_size
    # how unusual the predicted shape is: RMS mean-pose distance (mm) to the mean hand (shapes ~ N(0, I))
    S = model.shapedirs
    unusual = torch.einsum("vck,bk->bvc", S, params.betas).norm(dim=-1).pow(2).mean(-1).sqrt() * MM
    depth = cam[:, 0, 2].clamp(min=1e-3)
    return torch.cat([
        params.betas, params.betas.norm(dim=-1, keepdim=True), angles, Rc.reshape(B, 9),
        torch.log1p(50.0 * res), torch.log(res_stats + 1e-4), torch.log(gcn_gap + 1e-4)[:, None], torch.log(unusual + 0.1)[:, None],
        torch.log(half)[:, None], torch.log(depth)[:, None], (vis.sum(1, keepdim=True) / NUM_JOINTS), vis,
    ], -1)


def _stability(
    pred: GCNPredictor, p: Prediction, uv: torch.Tensor, vis: torch.Tensor, K: torch.Tensor,
    R_cam: torch.Tensor, t_cam: torch.Tensor, side: str, n: int,
) -> torch.Tensor:
    """log RMS shape change (mm, mean-pose mesh) of the betas when the 2D keypoints are nudged by
    ``TTA_NOISE`` of their box: a frame whose shape hangs on a few pixels is not to be trusted.
    The nudges are one fixed table, so a frame gets the same feature in any batch."""
    model = pred.models[side]
    v = vis > 0
    lo = torch.where(v[..., None], uv, torch.full_like(uv, 1e9)).amin(1)
    hi = torch.where(v[..., None], uv, torch.full_like(uv, -1e9)).amax(1)
    diag = (hi - lo).norm(dim=-1).clamp(min=1.0)
    table = torch.randn(n, NUM_JOINTS, 2, generator=torch.Generator().manual_seed(TTA_SEED)).to(uv.device)
    base = mean_pose_vertices(model, p.params.betas)
    sq = torch.zeros(uv.shape[0], device=uv.device)
    for k in range(n):
        q = pred.predict_2d(uv + table[k] * (TTA_NOISE * diag)[:, None, None], vis, K, side, R_cam, t_cam)
        sq = sq + ((mean_pose_vertices(model, q.params.betas) - base).norm(dim=-1).mean(-1) * MM) ** 2
    return torch.log((sq / n).sqrt() + 0.05)[:, None]


# ------------------------------------------------------------------------------------------ head
class ConfidenceHead(nn.Module):
    """MLP on standardised features -> (B,) score; higher = smaller expected shape error."""

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.1, feature_conf: FeatureConf | None = None) -> None:
        super().__init__()
        self.feature_conf = feature_conf or FeatureConf()
        self.in_dim, self.hidden, self.dropout = in_dim, hidden, dropout
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden // 2), nn.ELU(),
            nn.Linear(hidden // 2, 1),
        )

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Standardise inputs by the training features' statistics (constant columns stay 1)."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = ((features - self.mean) / self.std).clamp(-8.0, 8.0)
        return self.net(x)[:, 0]

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        torch.save({
            "format": CONFIDENCE_FORMAT, "in_dim": self.in_dim, "hidden": self.hidden, "dropout": self.dropout,
            "features": self.feature_conf.to_dict(), "state": self.state_dict(), "meta": meta or {},
        }, str(path))

    @staticmethod
    def load(path: str | Path | None = None, device: str | torch.device = "cpu") -> "ConfidenceHead":
        path = Path(path) if path else CONFIDENCE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"confidence weights not found: {path}; train them with `python scripts/train_confidence.py` "
                                    "(see networks/data/TRAINING.md)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CONFIDENCE_FORMAT:
            raise ValueError(f"{path} is not a confidence head file (format {CONFIDENCE_FORMAT})")
        head = ConfidenceHead(int(blob["in_dim"]), int(blob["hidden"]), float(blob["dropout"]), FeatureConf(**blob["features"]))
        head.load_state_dict(blob["state"])
        head.meta = dict(blob.get("meta", {}))  # type: ignore[attr-defined]
        return head.to(device).eval()


@torch.no_grad()
def predict_with_confidence(
    pred: GCNPredictor, head: ConfidenceHead, uv: torch.Tensor, valid: torch.Tensor, K: torch.Tensor, side: str,
    R_cam: torch.Tensor | None = None, t_cam: torch.Tensor | None = None, views: dict[str, torch.Tensor] | None = None,
) -> tuple[Prediction, torch.Tensor]:
    """``predict_2d`` plus each frame's confidence score (B,) from ``head``."""
    p, feats = predict_with_features(pred, uv, valid, K, side, R_cam, t_cam, views, head.feature_conf)
    return p, head(feats.to(head.mean.device))


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(spearmanr(a, b).statistic)


__all__ = [
    "CONFIDENCE_FILE", "ConfidenceHead", "FeatureConf", "mean_pose_vertices", "predict_with_confidence",
    "predict_with_features", "shape_error_mm", "spearman",
]
