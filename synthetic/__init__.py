"""Synthetic scans with known answers: the main instrument for testing the fitting stages.

``generate`` draws plausible hands and calibrated cameras and returns the truth together with a
``Scan`` of simulated detections (noise, missed joints, missed hands, swapped labels, outliers);
``write_synthetic`` writes that scan in the FMHR layout plus its ground truth, ``read_synthetic``
reads both back. Generation and writing are separate so renderers can add images and masks to
the generated scan before it is written: ``synthetic.render.render_scan`` gives every view a photo
and a mask of detailed hands (``synthetic.appearance``) and records what it used in
``SyntheticScan.appearance``, which ``write_synthetic`` then stores too.

Ground-truth layout, under ``<data_path>/<scan_id>/gt/``::

    hands.json     {"format": "handrecon.synthetic_gt/1", "units": "metres", "model": "builtin",
                    "sides": {side: {"betas": [10], "hand_pose": [15][3], "global_orient": [3],
                                     "transl": [3], "keypoints3d": [21][3]}},
                    "detections": {view: {label: side}},   # the true side behind each label
                    "swapped_views": [...], "duplicated_views": [...],
                    "missing_hands": [[view, side], ...], "outliers": [[view, side, joint], ...],
                    "noise_px": float}
    mesh_<side>.ply   the true mesh (world metres): the posed model mesh for a keypoint-only scan;
                      for a rendered scan the fine mesh (model mesh Loop-subdivided twice and
                      displaced by creases and skin relief) with its albedo as sRGB vertex colours
    base_<side>.ply   rendered scans: the posed model mesh without the detail
    albedo_<side>.png rendered scans: albedo texture (sRGB) in the model's UV atlas, subdivided
                      like the mesh (uv of ``synthetic.render.subdivision``; PNG top row = v 1)
    appearance.json   rendered scans: SH lighting (9x3, linear), lights, skin and background
                      parameters, displacement statistics (``synthetic.render.load_appearance``)

``load_gt`` / ``read_synthetic`` put the meshes of ``mesh_<side>.ply`` in ``scan.gt.vertices`` /
``faces``, so for a rendered scan they hold the fine meshes the photos were made from.

World frame: OpenCV-like, y down; the person stands at -z facing +z, so their right is +x; the
hands are in front of them around the origin, fingers roughly forward (+z), palms roughly down.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capture.camera import Camera
from capture.scan import GroundTruth, Scan, View
from handmodel.params import SIDES, HandParams

GT_FORMAT = "handrecon.synthetic_gt/1"
NUM_JOINTS = 21


@dataclass
class SyntheticHands:
    """True hands of one scan: parameters, joints (21,3), vertices and faces, per side."""

    params: dict[str, HandParams]
    keypoints3d: dict[str, np.ndarray]
    vertices: dict[str, np.ndarray]
    faces: dict[str, np.ndarray]


@dataclass
class SyntheticScan:
    """A generated scan and everything that was put into it."""

    scan: Scan
    hands: SyntheticHands
    cameras: list[Camera]
    true_keypoints2d: dict[str, dict[str, np.ndarray]]  # {view: {side: (21,2)}} noise-free, all joints
    detections: dict[str, dict[str, str]]  # {view: {label: true side}}
    swapped_views: list[str] = field(default_factory=list)
    duplicated_views: list[str] = field(default_factory=list)
    missing_hands: list[tuple[str, str]] = field(default_factory=list)
    outliers: list[tuple[str, str, int]] = field(default_factory=list)  # (view, true side, joint)
    noise_px: float = 0.0
    appearance: Any = None  # synthetic.render.SceneAppearance once render_scan has drawn the photos


# ------------------------------------------------------------------------------------------ hands
def random_hands(
    rng: np.random.Generator,
    sides: tuple[str, ...] = SIDES,
    model: str = "builtin",
    beta_clip: float = 2.0,
    separation: float = 0.2,
    min_gap: float = 0.015,
) -> SyntheticHands:
    """Plausible hands side by side: betas ~ N(0, 1) clipped at ``beta_clip``, poses from the
    prior's sampler, wrists ``separation`` apart (the person's right hand at +x), fingers roughly
    forward and palms roughly down with random pronation/supination, pitch and yaw; resampled
    until the meshes are at least ``min_gap`` apart."""
    import handmodel
    from handmodel.prior import PosePrior

    models = {s: handmodel.load(model, side=s) for s in sides}
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for _ in range(50):
        params, out = {}, {}
        for side in sides:
            m = models[side]
            betas = torch.as_tensor(np.clip(rng.normal(size=(1, m.num_betas)), -beta_clip, beta_clip), dtype=torch.float32)
            pose = PosePrior(m).sample_poses(1, g).float()
            R = _wrist_rotation(m, rng)
            orient = torch.as_tensor(_rotvec(R)[None], dtype=torch.float32)
            x = (0.5 if side == "right" else -0.5) * separation if len(sides) == 2 else 0.0
            wrist = np.array([x, 0.0, -0.08]) + rng.normal(0.0, [0.01, 0.02, 0.02])
            zero = torch.zeros(1, 3)
            with torch.no_grad():
                o = m.forward(betas, pose, orient, zero)
            transl = torch.as_tensor((wrist - o.joints[0, 0].numpy())[None], dtype=torch.float32)
            p = HandParams(betas, pose, orient, transl)
            with torch.no_grad():
                out[side] = m.forward(p.betas, p.hand_pose, p.global_orient, p.transl)
            params[side] = p
        if len(sides) < 2 or _min_distance(out[sides[0]].vertices[0].numpy(), out[sides[1]].vertices[0].numpy()) > min_gap:
            break
    else:
        raise RuntimeError("could not place two non-overlapping hands in 50 tries; increase separation")
    return SyntheticHands(
        params=params,
        keypoints3d={s: o.joints[0].numpy().astype(np.float64) for s, o in out.items()},
        vertices={s: o.vertices[0].numpy().astype(np.float64) for s, o in out.items()},
        faces={s: o.faces.numpy().astype(np.int64) for s, o in out.items()},
    )


def _wrist_rotation(model: Any, rng: np.random.Generator) -> np.ndarray:
    """Global rotation taking the model's rest hand (fingers, palm normal measured on its rest
    joints, so any model convention works) to fingers forward (+z), palm down (+y), then a random
    roll about the forearm of -40..+70 degrees (positive turns the palm towards the other hand),
    pitch and yaw of +-20."""
    with torch.no_grad():
        j = model.forward(torch.zeros(1, model.num_betas)).joints[0].numpy().astype(np.float64)
    fingers = _unit(j[9] - j[0])
    s = 1.0 if model.side == "right" else -1.0
    palm = _unit(s * np.cross(j[5] - j[0], j[17] - j[0]))  # out of the palm (see handmodel.prior)
    palm = _unit(palm - fingers * (palm @ fingers))
    src = np.stack([fingers, palm, np.cross(fingers, palm)], axis=1)
    f_w, p_w = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0])
    dst = np.stack([f_w, p_w, np.cross(f_w, p_w)], axis=1)
    base = dst @ src.T
    # roll sign mirrors between sides so both hands turn their palms towards each other
    roll = np.deg2rad(rng.uniform(-40.0, 70.0)) * (1.0 if model.side == "right" else -1.0)
    pitch, yaw = np.deg2rad(rng.uniform(-20.0, 20.0, size=2))
    return _axis_rot([0, 1, 0], yaw) @ _axis_rot([1, 0, 0], pitch) @ _axis_rot([0, 0, 1], roll) @ base


# ---------------------------------------------------------------------------------------- cameras
def random_cameras(
    rng: np.random.Generator,
    n: int,
    size: tuple[int, int],
    target: np.ndarray,
    radius: float,
    fov_deg: tuple[float, float] = (35.0, 55.0),
    fill: float = 0.7,
) -> list[Camera]:
    """``n`` cameras on a sphere around ``target`` looking at it: azimuths spread evenly all
    around (with jitter), elevations -15..55 degrees above the hands, one horizontal field of view
    drawn from ``fov_deg`` for the rig (per-camera focal jitter 2 %), distance chosen so a sphere of
    ``radius`` spans ``fill`` of the shorter image side. Names "00", "01", ..."""
    W, H = size
    fov = np.deg2rad(rng.uniform(*fov_deg))
    f0 = W / (2.0 * np.tan(fov / 2.0))
    dist = radius * f0 / (0.5 * fill * min(W, H))
    az0 = rng.uniform(0, 2 * np.pi)
    cams = []
    for k in range(n):
        az = az0 + 2 * np.pi * k / n + rng.normal(0.0, 0.15 * np.pi / max(n, 1))
        el = np.deg2rad(rng.uniform(-15.0, 55.0))
        # y is down: "above" is -y
        d = np.array([np.sin(az) * np.cos(el), -np.sin(el), np.cos(az) * np.cos(el)])
        center = target + dist * (1 + rng.uniform(-0.1, 0.1)) * d
        R = look_at(center, target)
        f = f0 * (1 + rng.normal(0.0, 0.02))
        K = np.array([[f, 0.0, W / 2 + rng.normal(0, 0.01 * W)], [0.0, f * (1 + rng.normal(0, 0.002)), H / 2 + rng.normal(0, 0.01 * H)], [0, 0, 1]])
        cams.append(Camera(K, R, -R @ center, W, H, f"{k:02d}"))
    return cams


def look_at(center: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, -1.0, 0.0])) -> np.ndarray:
    """World->camera rotation of a camera at ``center`` looking at ``target`` (OpenCV axes,
    image up along the world ``up`` where possible)."""
    z = _unit(target - center)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:  # looking straight up or down
        x = np.cross(z, np.array([0.0, 0.0, 1.0]))
    x = _unit(x)
    return np.stack([x, np.cross(z, x), z])


# ------------------------------------------------------------------------------------- generation
def generate(
    views: int = 8,
    size: tuple[int, int] = (640, 480),
    seed: int = 0,
    sides: tuple[str, ...] = SIDES,
    noise_px: float = 3.0,
    miss_rate: float = 0.1,
    hand_miss_rate: float = 0.05,
    swap_rate: float = 0.1,
    duplicates: int = 0,
    outliers: int = 0,
    outlier_px: float = 100.0,
    model: str = "builtin",
    scan_id: str = "0",
) -> SyntheticScan:
    """A keypoint-only synthetic scan and its truth.

    Detections: true projections plus N(0, ``noise_px``) per coordinate, confidence in
    [0.6, 1]; each joint missed with ``miss_rate`` (confidence 0, its position a far-off guess,
    like a detector's hallucination); each hand missed in a view with ``hand_miss_rate`` (every
    hand stays in at least three views); joints outside the image are missed. Then
    ``round(swap_rate * views)`` views get their Left/Right labels swapped, ``duplicates`` views
    report one hand under both labels, and ``outliers`` detected joints move ``outlier_px`` in a
    random direction."""
    rng = np.random.default_rng(seed)
    sides = tuple(s for s in SIDES if s in sides)
    if not sides:
        raise ValueError("sides must name at least one of 'left', 'right'")
    hands = random_hands(rng, sides, model)
    allv = np.concatenate([hands.vertices[s] for s in sides])
    target = 0.5 * (allv.min(axis=0) + allv.max(axis=0))
    radius = float(np.linalg.norm(allv - target, axis=1).max())
    cameras = random_cameras(rng, views, size, target, radius)
    W, H = size
    names = [c.name for c in cameras]

    true2d: dict[str, dict[str, np.ndarray]] = {}
    present = np.ones((views, len(sides)), bool)
    kps: dict[str, dict[str, np.ndarray]] = {}
    for vi, cam in enumerate(cameras):
        true2d[cam.name] = {}
        kps[cam.name] = {}
        for si, side in enumerate(sides):
            uv = cam.project(torch.as_tensor(hands.keypoints3d[side])).numpy()
            true2d[cam.name][side] = uv
            det = uv + rng.normal(0.0, noise_px, uv.shape)
            conf = rng.uniform(0.6, 1.0, NUM_JOINTS)
            missed = rng.random(NUM_JOINTS) < miss_rate
            inside = (det[:, 0] >= 0) & (det[:, 0] < W) & (det[:, 1] >= 0) & (det[:, 1] < H)
            missed |= ~inside
            guess = rng.normal(0.0, 0.15 * min(W, H), (NUM_JOINTS, 2))
            det = np.where(missed[:, None], np.clip(uv + guess, 0, [W - 1, H - 1]), det)
            conf = np.where(missed, 0.0, conf)
            kps[cam.name][side] = np.concatenate([det, conf[:, None]], axis=1).astype(np.float32)
            if (conf > 0).sum() < 5:
                present[vi, si] = False
    # whole hands missed, keeping every hand in >= 3 views
    for si in range(len(sides)):
        for vi in rng.permutation(views):
            if rng.random() < hand_miss_rate and present[:, si].sum() > 3:
                present[vi, si] = False
    missing = [(names[vi], sides[si]) for vi in range(views) for si in range(len(sides)) if not present[vi, si]]
    detections: dict[str, dict[str, str]] = {n: {} for n in names}
    for vi, n in enumerate(names):
        for si, side in enumerate(sides):
            if present[vi, si]:
                detections[n][side] = side
            else:
                del kps[n][side]
    # swapped labels
    n_swap = int(round(swap_rate * views))
    candidates = [n for n in names if kps[n]]
    swapped = sorted(rng.choice(candidates, size=min(n_swap, len(candidates)), replace=False).tolist()) if n_swap else []
    for n in swapped:
        kps[n] = {_other(label): kp for label, kp in kps[n].items()}
        detections[n] = {_other(label): side for label, side in detections[n].items()}
    # one hand reported under both labels
    dup_candidates = [n for n in names if len(kps[n]) == 2 and n not in swapped]
    duplicated = sorted(rng.choice(dup_candidates, size=min(duplicates, len(dup_candidates)), replace=False).tolist()) if duplicates else []
    for n in duplicated:
        keep = str(rng.choice(sorted(kps[n])))
        other = _other(keep)
        kp = kps[n][keep].copy()
        kp[:, :2] += rng.normal(0.0, noise_px, (NUM_JOINTS, 2))
        kps[n][other] = kp.astype(np.float32)
        detections[n][other] = detections[n][keep]
    # gross outliers on detected joints
    pool = [(n, label, j) for n in names for label in sorted(kps[n]) for j in range(NUM_JOINTS) if kps[n][label][j, 2] > 0]
    chosen = rng.choice(len(pool), size=min(outliers, len(pool)), replace=False) if outliers else []
    outlier_list = []
    for i in chosen:
        n, label, j = pool[int(i)]
        a = rng.uniform(0, 2 * np.pi)
        kps[n][label][j, :2] += outlier_px * np.array([np.cos(a), np.sin(a)], np.float32)
        outlier_list.append((n, detections[n][label], j))

    gt = GroundTruth(
        hand_params={s: {k: v[0].numpy().copy() for k, v in p.to_dict().items()} for s, p in hands.params.items()},
        keypoints3d={s: v.copy() for s, v in hands.keypoints3d.items()},
        vertices={s: v.copy() for s, v in hands.vertices.items()},
        faces={s: v.copy() for s, v in hands.faces.items()},
    )
    scan_views = [View(c.name, c, keypoints=kps[c.name]) for c in cameras]
    scan = Scan(scan_views, sides=sides, scan_id=str(scan_id), source="synthetic", gt=gt)
    return SyntheticScan(scan, hands, cameras, true2d, detections, swapped, duplicated, missing, outlier_list, noise_px)


# ---------------------------------------------------------------------------------------- writing
def write_synthetic(synth: SyntheticScan, data_path: str | Path, scan_id: str | int, overwrite: bool = False) -> Path:
    """Write the scan in the FMHR layout (``capture.fmhr.write_fmhr``) and its truth under
    ``gt/``; returns the scan folder. FMHR keeps no confidences, so missed joints come back as
    confident detections at their far-off guessed positions: outliers the pose fit must reject."""
    from capture.fmhr import write_fmhr

    root = write_fmhr(synth.scan, data_path, scan_id, overwrite=overwrite)
    gt_dir = root / "gt"
    if gt_dir.exists():  # only reached with overwrite: no stale answers of an earlier scan
        shutil.rmtree(gt_dir)
    gt_dir.mkdir(parents=True)
    hands = synth.hands
    record = {
        "format": GT_FORMAT,
        "units": "metres",
        "model": "builtin",
        "sides": {
            s: {
                **{k: v[0].tolist() for k, v in p.to_dict().items()},
                "keypoints3d": hands.keypoints3d[s].tolist(),
            }
            for s, p in hands.params.items()
        },
        "detections": synth.detections,
        "swapped_views": synth.swapped_views,
        "duplicated_views": synth.duplicated_views,
        "missing_hands": [list(x) for x in synth.missing_hands],
        "outliers": [list(x) for x in synth.outliers],
        "noise_px": synth.noise_px,
    }
    (gt_dir / "hands.json").write_text(json.dumps(record, indent=1))
    if synth.appearance is not None:  # rendered: fine meshes, albedo, lighting
        from synthetic.render import write_appearance

        write_appearance(gt_dir, synth.appearance)
    else:
        for s in hands.vertices:
            write_ply(gt_dir / f"mesh_{s}.ply", hands.vertices[s], hands.faces[s])
    return root


def load_gt(scan_dir: str | Path) -> GroundTruth:
    """The ground truth under ``<scan_dir>/gt/`` (see the module docstring for the layout)."""
    gt_dir = Path(scan_dir) / "gt"
    path = gt_dir / "hands.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {scan_dir} is not a synthetic scan written by write_synthetic")
    record = json.loads(path.read_text())
    if record.get("format") != GT_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {GT_FORMAT!r}")
    gt = GroundTruth()
    for side, d in record["sides"].items():
        gt.hand_params[side] = {
            k: np.asarray(d[k], np.float32) for k in ("betas", "hand_pose", "global_orient", "transl")
        }
        gt.keypoints3d[side] = np.asarray(d["keypoints3d"], np.float64)
        mesh = gt_dir / f"mesh_{side}.ply"
        if mesh.is_file():
            gt.vertices[side], gt.faces[side] = read_ply(mesh)
    return gt


def load_truth(scan_dir: str | Path) -> dict[str, Any]:
    """The detection-level truth (true side per label, swapped views, outliers) of ``hands.json``."""
    return json.loads((Path(scan_dir) / "gt" / "hands.json").read_text())


def read_synthetic(data_path: str | Path, scan_id: str | int, scale: float = 1.0, load_images: bool = True) -> Scan:
    """``read_fmhr`` of a written synthetic scan with ``scan.gt`` filled from ``gt/`` and
    ``scan.sides`` set to the hands it really contains."""
    from capture.fmhr import read_fmhr

    scan = read_fmhr(data_path, scan_id, scale=scale, load_images=load_images)
    scan.gt = load_gt(Path(data_path) / str(scan_id))
    scan.sides = tuple(s for s in SIDES if s in scan.gt.keypoints3d)
    return scan


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY of a triangle mesh (float32 vertices, int32 faces)."""
    import trimesh

    trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=False).export(str(path))


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    mesh = trimesh.load(str(path), process=False, force="mesh")
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)


# ---------------------------------------------------------------------------------------- helpers
def _other(label: str) -> str:
    return "right" if label == "left" else "left"


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _axis_rot(axis: list[float], angle: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.asarray(axis, np.float64) * angle).as_matrix()


def _rotvec(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def _min_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(cKDTree(b).query(a)[0].min())


__all__ = [
    "SyntheticHands", "SyntheticScan", "generate", "random_hands", "random_cameras", "look_at",
    "write_synthetic", "read_synthetic", "load_gt", "load_truth", "write_ply", "read_ply",
]
