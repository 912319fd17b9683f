"""InterHand2.6M reader: one frame seen by all its cameras is one Scan.

Layout (as released)::

    <root>/annotations/<split>/InterHand2.6M_<split>_data.json              COCO-style images/annotations
    <root>/annotations/<split>/InterHand2.6M_<split>_camera.json            per capture: campos, camrot, focal, princpt
    <root>/annotations/<split>/InterHand2.6M_<split>_joint_3d.json          per capture, frame: world_coord (42,3), joint_valid
    <root>/annotations/<split>/InterHand2.6M_<split>_MANO_NeuralAnnot.json  per capture, frame: {right,left}: pose, shape, trans
    <root>/images/<split>/Capture<c>/<seq>/cam<id>/image<frame>.jpg

Conversions made here, once: millimetres -> metres (world coordinates, campos); camera
``R = camrot`` (world->camera), ``t = -R @ campos``; K from focal and princpt, used as stored;
the 42 joints (right 0-20, left 21-41, InterHand order) -> MediaPipe order per side.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from capture.camera import Camera, CameraError
from capture.imageio import load_image, resize_image
from capture.scan import GroundTruth, Scan, ScanError, View
from handmodel.joint_orders import INTERHAND_TO_MEDIAPIPE

log = logging.getLogger(__name__)

MM = 1e-3  # InterHand2.6M is in millimetres; everything inside the code is metres
SIDE_SLICES = {"right": slice(0, 21), "left": slice(21, 42)}


@dataclass(frozen=True)
class Frame:
    """One instant: (capture, sequence, frame index); sorting these gives the scan ids."""

    capture: int
    seq: str
    frame: int


def annotation_file(root: Path, split: str, what: str) -> Path:
    return Path(root) / "annotations" / split / f"InterHand2.6M_{split}_{what}.json"


def _load_json(path: Path) -> object:
    """Parse an annotation file once per process and version (the released ones are hundreds of MB)."""
    if not path.is_file():
        folder = path.parent
        have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else f"(no folder {folder})"
        raise ScanError(f"{path}: missing; InterHand2.6M annotations hold {have}")
    st = path.stat()
    return _parse_json(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _parse_json(path: Path, mtime_ns: int, size: int) -> object:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScanError(f"{path}: not valid JSON ({e}); the download is corrupt, fetch the file again") from e


def _index(data_file: Path) -> tuple[list[Frame], dict[Frame, list[tuple[dict, dict | None]]]]:
    """Frames (sorted) and, per frame, its (image record, annotation record) pairs."""
    _load_json(data_file)  # reports a missing or corrupt file
    st = data_file.stat()
    return _build_index(data_file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _build_index(data_file: Path, mtime_ns: int, size: int) -> tuple[list[Frame], dict[Frame, list[tuple[dict, dict | None]]]]:
    data = _load_json(data_file)
    if not isinstance(data, dict) or "images" not in data:
        raise ScanError(f"{data_file}: expected a COCO-style dict with 'images' and 'annotations'")
    anns = {a["image_id"]: a for a in data.get("annotations", [])}
    frames: dict[Frame, list[tuple[dict, dict | None]]] = {}
    for img in data["images"]:
        try:
            key = Frame(int(img["capture"]), str(img["seq_name"]), int(img["frame_idx"]))
        except KeyError as e:
            raise ScanError(f"{data_file}: image record {img.get('id')} lacks {e}; the file is not InterHand2.6M data") from e
        frames.setdefault(key, []).append((img, anns.get(img["id"])))
    order = sorted(frames, key=lambda f: (f.capture, f.seq, f.frame))
    return order, frames


def interhand_frames(root: str | Path, split: str) -> list[Frame]:
    """The frames of a split in scan-id order (``scan_id`` indexes this list)."""
    return list(_index(annotation_file(Path(root), split, "data"))[0])


def read_interhand(
    root: str | Path,
    split: str,
    scan_id: int,
    scale: float = 1.0,
    cameras: list[str] | None = None,
    load_images: bool = True,
) -> Scan:
    """Frame ``scan_id`` of ``split`` over all its cameras (or ``cameras``, ids like "400002").

    Views are named by camera id. InterHand has no 2D detections, so each view's keypoints are
    the projections of the annotated 3D joints, with confidence = joint_valid (0 also for joints
    behind the camera or outside the image). ``scan.gt`` holds keypoints3d (world metres, MediaPipe
    order), keypoints_valid, and the NeuralAnnot MANO fit in MANO's own convention, kept apart
    from HandParams on purpose: ``mano_pose`` (16,3) axis-angle = global orient then 15 joints in
    MANO order (index, middle, pinky, ring, thumb), relative to MANO's mean pose (smplx
    ``flat_hand_mean=False``, ``use_pca=False``), the left hand with MANO's left model;
    ``mano_betas`` (10,); ``mano_transl`` (3,) metres, world frame.
    """
    root = Path(root)
    if not root.is_dir():
        raise ScanError(f"InterHand2.6M root {root} does not exist")
    data_file = annotation_file(root, split, "data")
    order, frames = _index(data_file)
    if not (0 <= scan_id < len(order)):
        raise ScanError(f"{data_file}: scan id {scan_id} out of range; the {split} split has {len(order)} frames (0..{len(order) - 1})")
    if not (scale > 0 and np.isfinite(scale)):
        raise ScanError(f"scale must be a positive number, got {scale}")
    fr = order[scan_id]
    cam_file, j3d_file = annotation_file(root, split, "camera"), annotation_file(root, split, "joint_3d")
    cams = _lookup(_load_json(cam_file), cam_file, str(fr.capture))
    joints = _lookup(_lookup(_load_json(j3d_file), j3d_file, str(fr.capture)), j3d_file, str(fr.frame))
    world = np.asarray(joints["world_coord"], np.float64).reshape(42, 3) * MM
    frame_valid = np.asarray(joints.get("joint_valid", np.ones(42)), np.float64).reshape(42)

    records = sorted(frames[fr], key=lambda r: str(r[0]["camera"]))
    if cameras is not None:
        have = [str(r[0]["camera"]) for r in records]
        unknown = [c for c in cameras if c not in have]
        if unknown:
            raise ScanError(f"{data_file}: frame {fr} has no camera(s) {unknown}; it has {have}")
        records = [r for r in records if str(r[0]["camera"]) in cameras]

    sides_present: set[str] = set()
    views = []
    for img, ann in records:
        cam_id = str(img["camera"])
        camera = _camera(cams, cam_id, (int(img["width"]), int(img["height"])), cam_file)
        valid = frame_valid if ann is None or "joint_valid" not in ann else np.asarray(ann["joint_valid"], np.float64).reshape(42)
        hand_type = (ann or {}).get("hand_type", joints.get("hand_type", "interacting"))
        sides = {"right": ("right",), "left": ("left",)}.get(hand_type, ("right", "left"))
        keypoints = {}
        for side in sides:
            kp = _project(camera, world[SIDE_SLICES[side]], valid[SIDE_SLICES[side]])
            if kp[:, 2].any():
                keypoints[side] = kp
                sides_present.add(side)
        image = None
        if load_images:
            path = root / "images" / split / img["file_name"]
            if not path.is_file():
                raise ScanError(f"{path}: image of camera {cam_id} in {data_file} is missing; download the images or pass cameras=")
            image = load_image(path)
            if image.shape[:2] != (camera.height, camera.width):
                raise ScanError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but {data_file} says {camera.width}x{camera.height}")
        if scale != 1.0:
            new = camera.scaled(scale)
            f = np.array([new.width / camera.width, new.height / camera.height, 1.0])
            keypoints = {s: (k * f).astype(np.float32) for s, k in keypoints.items()}
            image = resize_image(image, (new.width, new.height)) if image is not None else None
            camera = new
        views.append(View(name=cam_id, camera=camera, image=image, mask=None, keypoints=keypoints))

    gt = GroundTruth()
    for side, sl in SIDE_SLICES.items():
        if side in sides_present:
            gt.keypoints3d[side] = world[sl][INTERHAND_TO_MEDIAPIPE]
            gt.keypoints_valid[side] = frame_valid[sl][INTERHAND_TO_MEDIAPIPE] > 0
    gt.hand_params = _mano(root, split, fr)
    sides = tuple(s for s in ("left", "right") if s in sides_present) or ("left", "right")
    return Scan(views, sides=sides, scan_id=str(scan_id), source=f"{root} {split} {fr}", gt=gt)


def _lookup(d: object, path: Path, key: str) -> dict:
    if not isinstance(d, dict) or key not in d:
        raise ScanError(f"{path}: no entry {key!r}; the annotation files do not belong together (re-download them)")
    return d[key]


def _camera(cams: dict, cam_id: str, size: tuple[int, int], path: Path) -> Camera:
    try:
        campos = np.asarray(cams["campos"][cam_id], np.float64).reshape(3) * MM
        R = np.asarray(cams["camrot"][cam_id], np.float64).reshape(3, 3)
        fx, fy = np.asarray(cams["focal"][cam_id], np.float64).reshape(2)
        cx, cy = np.asarray(cams["princpt"][cam_id], np.float64).reshape(2)
    except KeyError as e:
        raise ScanError(f"{path}: camera {cam_id} lacks {e}; re-download the camera file") from e
    try:
        return Camera([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], R, -R @ campos, size[0], size[1], name=cam_id)
    except CameraError as e:
        raise ScanError(f"{path}: camera {cam_id}: {e}") from e


def _project(camera: Camera, joints: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """InterHand-order world joints (21,3) -> MediaPipe-order (u, v, conf) float32 (21,3)."""
    cam = joints @ camera.R.T + camera.t
    z = cam[:, 2]
    uvw = cam @ camera.K.T
    uv = uvw[:, :2] / np.where(np.abs(z) > 1e-9, z, 1e-9)[:, None]
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < camera.width) & (uv[:, 1] >= 0) & (uv[:, 1] < camera.height)
    conf = (valid > 0) & inside
    uv = np.where(conf[:, None], uv, 0.0)
    return np.concatenate([uv, conf[:, None]], 1)[INTERHAND_TO_MEDIAPIPE].astype(np.float32)


def _mano(root: Path, split: str, fr: Frame) -> dict[str, dict[str, np.ndarray]]:
    path = annotation_file(root, split, "MANO_NeuralAnnot")
    if not path.is_file():
        log.info("%s: absent; the scan has no MANO ground truth", path)
        return {}
    per_frame = _load_json(path)
    entry = per_frame.get(str(fr.capture), {}).get(str(fr.frame)) if isinstance(per_frame, dict) else None
    out: dict[str, dict[str, np.ndarray]] = {}
    for side in ("right", "left"):
        p = (entry or {}).get(side)
        if not p:
            continue
        try:
            out[side] = {
                "mano_pose": np.asarray(p["pose"], np.float64).reshape(16, 3),
                "mano_betas": np.asarray(p["shape"], np.float64).reshape(10),
                "mano_transl": np.asarray(p["trans"], np.float64).reshape(3),
            }
        except (KeyError, ValueError) as e:
            raise ScanError(f"{path}: capture {fr.capture} frame {fr.frame} {side}: malformed MANO entry ({e})") from e
    return out
