"""Synthetic sequences: one person (fixed betas) moving a hand in front of a static camera rig.

Why: identity calibration and test-time optimisation are judged by recovering a shape and a
motion that were put in. A sequence has ``frames`` instants of the same hand(s): poses, wrist
rotations and wrist positions are keyframed every ``key_every`` frames and joined by Catmull-Rom
splines (poses in the pose prior's anatomical angles, clamped to its limits), so the motion is
smooth. The rig (``views`` cameras from ``synthetic.random_cameras``) frames the whole motion.

Detections model a per-frame detector whose quality changes over time, so that frames differ in
how far they can be trusted (what the confidence head learns to tell): each frame draws its own
noise level (log-uniform up to 3 % of the hand's size; a quarter of the frames are bad — blur,
fast motion — with 5-20 %) and occlusion level; occluded fingers are
*hallucinated* — reported, like MediaPipe does, at a plausible wrong place that drifts more
towards the tip — and a few joints are gross outliers. Every joint is reported with confidence 1
(the FMHR format keeps no confidences), except with ``miss_rate`` > 0, which drops joints with
confidence 0. Noise scales with the hand's size in pixels (0.18 m at the focal length over the
wrist depth, as in ``networks.synthetic_pairs``).

On disk each frame is a synthetic scan (``synthetic.write_synthetic``: FMHR layout plus gt/) with
scan ids ``first_id .. first_id + frames - 1``, and ``sequence.json`` beside the scan folders keeps
the sequence's own truth (betas, per-frame noise levels, occlusion masks, outliers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capture.camera import Camera
from capture.scan import GroundTruth, Scan, View
from handmodel.params import SIDES, HandParams

SEQUENCE_FORMAT = "handrecon.synthetic_sequence/1"
NUM_JOINTS = 21
FINGERS = [[1 + 4 * f + k for k in range(4)] for f in range(5)]  # MediaPipe ids, proximal -> tip


# ------------------------------------------------------------------------------------ detections
@dataclass
class DetectionModel:
    """How a frame's 2D detections go wrong; sizes are fractions of the hand's size in pixels.

    ``noise_rel``: per-frame Gaussian sigma, log-uniform in this range; ``bad_frame_rate`` of the
    frames draw it from ``bad_noise_rel`` instead. Defaults: the predictor's shape error grows
    from ~6 mm (clean) to ~10 mm at 8 % noise and ~18 mm at 15 % (or hallucinations of 60 %), so
    bad frames matter; with at most 8 % on 15 % of the frames they did not, and confidences could
    not matter either. ``occluded_frame_rate`` of the frames have an
    occlusion level ~ U(0, ``max_occlusion``): each finger is occluded from a random joint to its
    tip with that probability and hallucinated with a drift of ``hallucination_rel`` (range) at the
    tip. ``outlier_rate``: per joint, moved by ``outlier_rel`` (range) in a random direction.
    ``miss_rate``: per joint, dropped (confidence 0) — 0 for FMHR-faithful data."""

    noise_rel: tuple[float, float] = (0.002, 0.03)
    bad_frame_rate: float = 0.25
    bad_noise_rel: tuple[float, float] = (0.05, 0.2)
    occluded_frame_rate: float = 0.5
    max_occlusion: float = 0.6
    hallucination_rel: tuple[float, float] = (0.1, 0.5)
    outlier_rate: float = 0.01
    outlier_rel: tuple[float, float] = (0.3, 0.8)
    miss_rate: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def hand_size_px(K: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """(B,) nominal hand size in pixels: 0.18 m at focal length fx over the wrist depth."""
    return 0.18 * np.asarray(K)[..., 0, 0] / np.maximum(np.asarray(depth), 1e-3)


def corrupt_keypoints(uv: np.ndarray, size_px: np.ndarray, rng: np.random.Generator, model: DetectionModel) -> dict[str, np.ndarray]:
    """Detections of true projections ``uv`` (B,21,2) of hands ``size_px`` (B,) pixels big.

    Returns ``keypoints`` (B,21,3) = (u, v, confidence), the per-frame ``sigma_px`` (B,),
    ``occluded`` (B,21) hallucinated joints, ``outlier`` (B,21) and ``missed`` (B,21) masks."""
    uv = np.asarray(uv, np.float64)
    B = uv.shape[0]
    size = np.asarray(size_px, np.float64).reshape(B)

    def loguniform(lo_hi: tuple[float, float], n: int) -> np.ndarray:
        lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1])
        return np.exp(rng.uniform(lo, hi, n))

    rel = np.where(rng.random(B) < model.bad_frame_rate, loguniform(model.bad_noise_rel, B), loguniform(model.noise_rel, B))
    sigma = rel * size
    det = uv + sigma[:, None, None] * rng.normal(size=uv.shape)

    level = np.where(rng.random(B) < model.occluded_frame_rate, rng.uniform(0.0, model.max_occlusion, B), 0.0)
    occluded = np.zeros((B, NUM_JOINTS), bool)
    for chain in FINGERS:
        hit = rng.random(B) < level
        start = rng.integers(0, 4, B)  # first hallucinated joint along the finger
        angle = rng.uniform(0, 2 * np.pi, B)
        drift = rng.uniform(*model.hallucination_rel, B) * size
        direction = np.stack([np.cos(angle), np.sin(angle)], -1)
        for k, j in enumerate(chain):
            on = hit & (k >= start)
            frac = (k - start + 1) / np.maximum(4 - start, 1)
            det[on, j] += (drift * frac)[on, None] * direction[on]
            occluded[:, j] |= on

    outlier = rng.random((B, NUM_JOINTS)) < model.outlier_rate
    a = rng.uniform(0, 2 * np.pi, (B, NUM_JOINTS))
    mag = rng.uniform(*model.outlier_rel, (B, NUM_JOINTS)) * size[:, None]
    det += (outlier * mag)[..., None] * np.stack([np.cos(a), np.sin(a)], -1)

    missed = rng.random((B, NUM_JOINTS)) < model.miss_rate
    few = (~missed).sum(1) < 8  # a detector reports a hand only with enough joints
    missed[few] = False
    conf = np.where(missed, 0.0, 1.0)
    return {
        "keypoints": np.concatenate([det, conf[..., None]], -1).astype(np.float32),
        "sigma_px": sigma,
        "occluded": occluded,
        "outlier": outlier,
        "missed": missed,
    }


# ---------------------------------------------------------------------------------------- motion
def catmull_rom(keys: np.ndarray, n: int, every: int) -> np.ndarray:
    """Values at frames 0..n-1 of a uniform Catmull-Rom spline through ``keys`` (K,...) placed
    every ``every`` frames (key k at frame k*every); end keys are repeated."""
    keys = np.asarray(keys, np.float64)
    out = np.empty((n,) + keys.shape[1:])
    K = len(keys)
    for i in range(n):
        s = i / every
        k = min(int(np.floor(s)), K - 2)
        t = s - k
        p0, p1, p2, p3 = (keys[min(max(j, 0), K - 1)] for j in (k - 1, k, k + 1, k + 2))
        out[i] = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
    return out


@lru_cache(maxsize=4)
def _model_and_prior(side: str) -> tuple[Any, Any]:
    import handmodel
    from handmodel.prior import PosePrior

    model = handmodel.load("builtin", side)
    return model, PosePrior(model)


@dataclass
class SyntheticSequence:
    """A generated sequence. Per side: ``params`` (HandParams, batch = frames), ``keypoints3d``
    (F,21,3) and ``vertices`` (F,V,3) world metres, ``detections`` (F,V,21,3) in each view's
    pixels, ``sigma_px`` (F,V), ``occluded``/``outlier`` (F,V,21); ``masks`` (F,V,H,W) of all
    hands when rendered. ``cameras`` is the static rig."""

    betas: dict[str, np.ndarray]
    params: dict[str, HandParams]
    keypoints3d: dict[str, np.ndarray]
    vertices: dict[str, np.ndarray]
    faces: dict[str, np.ndarray]
    cameras: list[Camera]
    detections: dict[str, np.ndarray]
    sigma_px: dict[str, np.ndarray]
    occluded: dict[str, np.ndarray]
    outlier: dict[str, np.ndarray]
    detection_model: DetectionModel
    seed: int
    masks: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(next(iter(self.keypoints3d.values())))

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(s for s in SIDES if s in self.betas)

    def scan(self, f: int, scan_id: str = "") -> Scan:
        """Frame ``f`` as a Scan with its ground truth."""
        views = []
        for vi, cam in enumerate(self.cameras):
            kps = {s: self.detections[s][f, vi].copy() for s in self.sides}
            mask = None if self.masks is None else self.masks[f, vi].copy()
            views.append(View(cam.name, cam, image=None, mask=mask, keypoints=kps))
        gt = GroundTruth(
            hand_params={s: {k: v[f].numpy().copy() for k, v in self.params[s].to_dict().items()} for s in self.sides},
            keypoints3d={s: self.keypoints3d[s][f].copy() for s in self.sides},
            vertices={s: self.vertices[s][f].copy() for s in self.sides},
            faces={s: self.faces[s].copy() for s in self.sides},
        )
        return Scan(views, sides=self.sides, scan_id=str(scan_id or f), source="synthetic sequence", gt=gt)


def generate_sequence(
    frames: int = 30,
    views: int = 1,
    seed: int = 0,
    sides: tuple[str, ...] = ("right",),
    size: tuple[int, int] = (640, 480),
    key_every: int = 8,
    transl_std: float = 0.03,
    rotation_std_deg: float = 20.0,
    detection: DetectionModel | None = None,
    masks: bool = False,
    beta_clip: float = 2.0,
    separation: float = 0.2,
) -> SyntheticSequence:
    """One person's hand(s) over ``frames`` frames seen by ``views`` static cameras.

    Per side: betas ~ N(0, 1) clipped at ``beta_clip`` (fixed); poses keyframed from the pose
    prior's sampler; wrist rotation = a base orientation like ``synthetic.random_hands`` (fingers
    forward, palm down, random roll/pitch/yaw) turned by keyframed offsets with ``rotation_std_deg``
    per axis; wrist position keyframed with ``transl_std`` metres per axis around its own centre
    (two hands ``separation`` apart). ``masks`` renders the hands' silhouettes (CPU rasterizer)."""
    from synthetic import _rotvec, _wrist_rotation, random_cameras

    sides = tuple(s for s in SIDES if s in sides)
    if not sides:
        raise ValueError("sides must name at least one of 'left', 'right'")
    if frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {frames}")
    rng = np.random.default_rng(seed)
    detection = detection or DetectionModel()
    n_keys = int(np.ceil((frames - 1) / key_every)) + 2
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    out: dict[str, Any] = {k: {} for k in ("betas", "params", "keypoints3d", "vertices", "faces")}
    for side in sides:
        model, prior = _model_and_prior(side)
        betas = np.clip(rng.normal(size=model.num_betas), -beta_clip, beta_clip)
        angles = prior.angles(prior.sample_poses(n_keys, g)).double().numpy()
        angles = catmull_rom(angles, frames, key_every)
        angles = np.clip(angles, prior.low.double().numpy() + 1e-4, prior.high.double().numpy() - 1e-4)
        pose = prior.angles_to_pose(torch.as_tensor(angles, dtype=torch.float32))
        R0 = _wrist_rotation(model, rng)
        offsets = catmull_rom(rng.normal(0.0, np.deg2rad(rotation_std_deg), (n_keys, 3)), frames, key_every)
        from scipy.spatial.transform import Rotation

        Rf = Rotation.from_rotvec(offsets).as_matrix() @ R0
        orient = torch.as_tensor(np.stack([_rotvec(R) for R in Rf]), dtype=torch.float32)
        x = (0.5 if side == "right" else -0.5) * separation if len(sides) == 2 else 0.0
        wrist = np.array([x, 0.0, -0.08]) + catmull_rom(rng.normal(0.0, transl_std, (n_keys, 3)), frames, key_every)
        b = torch.as_tensor(np.tile(betas, (frames, 1)), dtype=torch.float32)
        with torch.no_grad():
            o = model(b, pose, orient, torch.zeros(frames, 3))
            transl = torch.as_tensor(wrist, dtype=torch.float32) - o.joints[:, 0]
            o = model(b, pose, orient, transl)
        out["betas"][side] = betas.astype(np.float32)
        out["params"][side] = HandParams(b, pose.detach(), orient, transl)
        out["keypoints3d"][side] = o.joints.double().numpy()
        out["vertices"][side] = o.vertices.double().numpy()
        out["faces"][side] = o.faces.numpy().astype(np.int64)

    allv = np.concatenate([v.reshape(-1, 3) for v in out["vertices"].values()])
    target = 0.5 * (allv.min(0) + allv.max(0))
    radius = float(np.linalg.norm(allv - target, axis=1).max())
    cameras = random_cameras(rng, views, size, target, radius)

    dets: dict[str, np.ndarray] = {}
    sig: dict[str, np.ndarray] = {}
    occ: dict[str, np.ndarray] = {}
    outl: dict[str, np.ndarray] = {}
    for side in sides:
        J = out["keypoints3d"][side]  # (F,21,3)
        per_view = []
        for cam in cameras:
            uv = cam.project(torch.as_tensor(J)).numpy()
            depth = (J[:, 0] @ cam.R.T + cam.t)[:, 2]
            per_view.append(corrupt_keypoints(uv, hand_size_px(cam.K, depth), rng, detection))
        dets[side] = np.stack([d["keypoints"] for d in per_view], 1)
        sig[side] = np.stack([d["sigma_px"] for d in per_view], 1)
        occ[side] = np.stack([d["occluded"] for d in per_view], 1)
        outl[side] = np.stack([d["outlier"] for d in per_view], 1)

    seq = SyntheticSequence(
        betas=out["betas"], params=out["params"], keypoints3d=out["keypoints3d"], vertices=out["vertices"],
        faces=out["faces"], cameras=cameras, detections=dets, sigma_px=sig, occluded=occ, outlier=outl,
        detection_model=detection, seed=int(seed),
        meta={"frames": frames, "views": views, "size": list(size), "key_every": key_every,
              "transl_std": transl_std, "rotation_std_deg": rotation_std_deg},
    )
    if masks:
        seq.masks = render_masks(seq)
    return seq


def render_masks(seq: SyntheticSequence) -> np.ndarray:
    """(F,V,H,W) bool silhouettes of all hands of every frame, one rasterization per frame."""
    from capture.camera import scene_depth_range, to_clip
    from renderer import make_context, rasterize

    ctx = make_context("cpu", "cpu")
    cams = seq.cameras
    H, W = cams[0].height, cams[0].width
    if any((c.height, c.width) != (H, W) for c in cams):
        raise ValueError("render_masks needs cameras of one image size")
    faces, offset = [], 0
    for s in seq.sides:
        faces.append(seq.faces[s] + offset)
        offset += seq.vertices[s].shape[1]
    tri = torch.as_tensor(np.concatenate(faces), dtype=torch.int32)
    out = np.zeros((seq.num_frames, len(cams), H, W), bool)
    for f in range(seq.num_frames):
        verts = np.concatenate([seq.vertices[s][f] for s in seq.sides])
        near, far = scene_depth_range(verts, cams)
        pos = to_clip(torch.as_tensor(verts, dtype=torch.float32), cams, near, far).contiguous()
        rast, _ = rasterize(ctx, pos, tri, (H, W), grad_db=False)
        out[f] = (rast[..., 3] > 0).numpy()
    return out


# --------------------------------------------------------------------------------------- writing
def write_sequence(seq: SyntheticSequence, data_path: str | Path, first_id: int = 0, overwrite: bool = False) -> list[str]:
    """Write every frame as a synthetic FMHR scan (ids ``first_id``.., plain integers) and
    ``<data_path>/sequence.json``; returns the scan ids."""
    from synthetic import SyntheticHands, SyntheticScan, write_synthetic

    data_path = Path(data_path)
    data_path.mkdir(parents=True, exist_ok=True)
    ids = [str(first_id + f) for f in range(seq.num_frames)]
    for f, sid in enumerate(ids):
        scan = seq.scan(f, sid)
        hands = SyntheticHands(
            params={s: HandParams(**{k: v[f : f + 1] for k, v in seq.params[s].to_dict().items()}) for s in seq.sides},
            keypoints3d={s: seq.keypoints3d[s][f] for s in seq.sides},
            vertices={s: seq.vertices[s][f] for s in seq.sides},
            faces=dict(seq.faces),
        )
        true2d = {c.name: {s: c.project(torch.as_tensor(seq.keypoints3d[s][f])).numpy() for s in seq.sides} for c in seq.cameras}
        detections = {c.name: {s: s for s in seq.sides} for c in seq.cameras}
        noise = float(np.mean([seq.sigma_px[s][f].mean() for s in seq.sides]))
        write_synthetic(SyntheticScan(scan, hands, seq.cameras, true2d, detections, noise_px=noise), data_path, sid, overwrite=overwrite)
    record = {
        "format": SEQUENCE_FORMAT,
        "seed": seq.seed,
        "scan_ids": ids,
        "sides": list(seq.sides),
        "betas": {s: seq.betas[s].tolist() for s in seq.sides},
        "sigma_px": {s: seq.sigma_px[s].round(4).tolist() for s in seq.sides},
        "occluded": {s: seq.occluded[s].astype(int).tolist() for s in seq.sides},
        "outlier": {s: seq.outlier[s].astype(int).tolist() for s in seq.sides},
        "detection_model": seq.detection_model.to_dict(),
        **seq.meta,
    }
    (data_path / "sequence.json").write_text(json.dumps(record))
    return ids


def load_sequence_truth(data_path: str | Path) -> dict[str, Any]:
    """``sequence.json`` written by :func:`write_sequence`."""
    path = Path(data_path) / "sequence.json"
    record = json.loads(path.read_text())
    if record.get("format") != SEQUENCE_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {SEQUENCE_FORMAT!r}")
    return record


__all__ = [
    "DetectionModel", "SyntheticSequence", "corrupt_keypoints", "catmull_rom", "generate_sequence",
    "hand_size_px", "load_sequence_truth", "render_masks", "write_sequence",
]
