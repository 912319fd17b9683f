"""FMHR capture format: reader, writer, and a reader for its camera file alone.

Layout of one scan (``<data_path>/<scan_id>/``), as in ``../shared/data/fmhr_demo`` (README there)::

    img/NN.png        RGB photo of view NN          mask/NN.png   hands silhouette (0/255)
    pose/NN.json      {"Left": [63 floats], "Right": [63 floats]} MediaPipe landmarks (x, y, z),
                      x, y normalised: u = (x + 1) W / 2, v = (y + 1) H / 2; [] = not detected
    camera/param.npz  per view i: int_i (4x4, K = int_i[:3,:3]), ext_i (4x4 world->camera, metres),
                      world_mat_i = int_i @ ext_i, scale_mat_i (normalised -> world, same for all);
                      optional size_i = [W, H] (written by ``write_fmhr``; the demo has none)

View ids come from the file names: NN is the camera index i (``int(NN)``), ids may have gaps
(the demo holds out 05, 10, 15). Pixel and label conventions are described in ``read_fmhr``.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg

from capture.camera import Camera, CameraError
from capture.imageio import image_size, load_image, load_mask, resize_image, resize_mask, save_image, save_mask
from capture.scan import Scan, ScanError, View
from handmodel.params import SIDES

log = logging.getLogger(__name__)

# The files' labels are the person's hands (verified on the demo capture, see read_fmhr).
LABEL_TO_SIDE = {"Left": "left", "Right": "right"}
SIDE_TO_LABEL = {side: label for label, side in LABEL_TO_SIDE.items()}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PARAM_KEY = re.compile(r"^(int|ext|world_mat|scale_mat|size)_(\d+)$")


# --------------------------------------------------------------------------------------- reading
def read_fmhr(
    data_path: str | Path,
    scan_id: str | int,
    scale: float = 1.0,
    views: list[str] | None = None,
    load_images: bool = True,
) -> Scan:
    """Load one FMHR scan as a Scan in world metres, images resized by ``scale``.

    Views are the ids with a photo in ``img/``; a scan without photos (keypoints only) takes its
    views from ``pose/``. ``views`` picks a subset by name or camera index ("07" or 7). With
    ``load_images=False`` photos are not decoded (their size is read from the header); masks and
    keypoints are still loaded. ``scale`` resizes photos (area filter), masks (area > 0.5) and
    intrinsics (``Camera.scaled``); keypoints are returned in pixels of the resized image.

    Pixel convention: K is used as stored, i.e. read as our continuous convention (pixel centres
    at +0.5), and the landmarks' u = (x + 1) W / 2 is continuous too (x = -1 is the left edge).
    The demo cannot settle a half-pixel question: after a robust linear triangulation the
    landmarks reproject with 4-12 px median error, and the volume of the visual hull of the 7
    complete silhouettes (views 03 04 06 07 08 09 14) as a function of a common principal-point
    shift falls monotonically from -0.5 px to +1.5 px (587 -> 577 cm^3) and peaks near
    (-3, -3.5) px, so the calibration/silhouette consistency is a few pixels. What it does say is
    that +0.5 fits no better than 0, so nothing is added.

    Left/Right: a file's "Left" is the person's LEFT hand (MediaPipe's raw labels assume a mirrored
    selfie; this capture's labels are already anatomical). Verified on the demo by clustering all
    20 detections of the 13 views into two 3D hands by RANSAC DLT triangulation, ignoring labels
    (inlier: median reprojection < 25 px): one hand is formed by 8 "Left" detections only, the
    other by 8 "Right" ones. With n = (index_mcp - wrist) x (pinky_mcp - wrist), which in a
    right-handed world (every ext_i has det R = +1) points out of the palm of a right hand and out
    of the back of a left one, the "Left" hand's finger tips lie 11-29 mm and its thumb tip 47 mm
    on -n (fingers curl away from n: a left hand) and the "Right" hand's tips 25-35 mm and thumb
    57 mm on +n (a right hand). The photos agree: in view 07 the person faces the camera and
    "Left" is on the image's right; in view 00 the near hand shows its back, fingers to the left,
    thumb up: a left hand. ``tests/test_capture.py`` repeats the check. Per-view label swaps are
    left to the pose fit; in this demo every detection, view 07 included, lies nearer its own
    label's hand (4-53 px median reprojection) than the other (64-479 px).
    """
    data_path = Path(data_path)
    root = _scan_folder(data_path, str(scan_id))
    if not (scale > 0 and np.isfinite(scale)):
        raise ScanError(f"scale must be a positive number, got {scale}")
    npz = root / "camera" / "param.npz"
    if not npz.is_file():
        raise ScanError(f"{npz}: missing; an FMHR scan needs its calibration in camera/param.npz")
    params = _load_param_npz(npz)

    names, img_files = _view_names(root)
    _check_orphans(root, names, params, npz)
    if views is not None:  # by name or camera index: "07", "7" and 7 all pick view 07
        by_index = {int(n): n for n in names}
        found = {v: by_index.get(int(v)) if str(v).strip().isdigit() else None for v in views}
        unknown = [v for v, n in found.items() if n is None]
        if unknown:
            raise ScanError(f"{root}: no view(s) {unknown}; the scan has {names}")
        names = [n for n in names if n in found.values()]

    scan_views = [
        _read_view(root, name, img_files.get(name), params, npz, scale, load_images) for name in names
    ]
    sides = tuple(s for s in SIDES if any(s in v.keypoints for v in scan_views)) or SIDES
    return Scan(scan_views, sides=sides, scan_id=str(scan_id), source=str(root), scale_mat=_scale_mat(params, npz))


def read_camera_file(path: str | Path, image_size: tuple[int, int] | None = None) -> dict[str, Camera]:
    """All cameras of a ``param.npz``, keyed by two-digit view id ("00", "11", ...).

    Any view ids work (a camera for a held-out view renders it). Each camera's image size is its
    ``size_i`` = [W, H] when present, else ``image_size`` = (W, H).
    """
    path = Path(path)
    params = _load_param_npz(path)
    if not params:
        raise ScanError(f"{path}: no cameras (expected int_i/ext_i or world_mat_i arrays)")
    cams: dict[str, Camera] = {}
    for idx in sorted(params):
        if not ({"int", "ext"} <= params[idx].keys() or "world_mat" in params[idx]):
            continue
        name = f"{idx:02d}"
        if "size" in params[idx]:
            size = _size_entry(params[idx]["size"], path, idx)
        elif image_size is not None:
            size = (int(image_size[0]), int(image_size[1]))
        else:
            raise ScanError(f"{path}: camera {idx} has no size_{idx}; pass image_size=(W, H)")
        cams[name] = _camera(params, idx, size, path, name)
    if not cams:
        raise ScanError(f"{path}: no complete camera (int_i with ext_i, or world_mat_i); found keys for ids {sorted(params)}")
    return cams


def _scan_folder(data_path: Path, scan_id: str) -> Path:
    if not data_path.is_dir():
        raise ScanError(f"data path {data_path} does not exist; pass the folder that holds the scan folders")
    root = data_path / scan_id
    if not root.is_dir():
        have = sorted(p.name for p in data_path.iterdir() if p.is_dir())
        raise ScanError(f"{root}: no such scan folder; {data_path} holds scan folders {have}")
    return root


def _load_param_npz(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """param.npz as {camera index: {"int"|"ext"|"world_mat"|"scale_mat"|"size": array}}."""
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ScanError(f"{path}: cannot be read as an .npz calibration file ({e}); the file is corrupt, regenerate it") from e
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in raw.items():
        m = _PARAM_KEY.match(key)
        if not m:
            continue
        kind, idx = m.group(1), int(m.group(2))
        if kind in out.setdefault(idx, {}):
            raise ScanError(f"{path}: two entries for {kind} of camera {idx} (e.g. {kind}_{idx} and a zero-padded one); keep one")
        out[idx][kind] = arr
    return out


def _view_names(root: Path) -> tuple[list[str], dict[str, Path]]:
    """View names from img/ (or pose/ when there are no photos), sorted by camera index."""
    img_dir, pose_dir = root / "img", root / "pose"
    img_files: dict[str, Path] = {}
    if img_dir.is_dir():
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                if p.stem in img_files:
                    raise ScanError(f"{img_dir}: two photos for view {p.stem} ({img_files[p.stem].name}, {p.name}); keep one")
                img_files[p.stem] = p
    if img_files:
        names = list(img_files)
        source = img_dir
    elif pose_dir.is_dir() and any(pose_dir.glob("*.json")):
        names = [p.stem for p in pose_dir.glob("*.json")]
        source = pose_dir
    else:
        raise ScanError(f"{root}: no views; expected photos img/NN.png or keypoints pose/NN.json")
    for n in names:
        if not n.isdigit():
            raise ScanError(f"{source / n}: FMHR files are named by camera index (NN.png / NN.json); rename it")
    return sorted(names, key=lambda n: (int(n), n)), img_files


def _check_orphans(root: Path, names: list[str], params: dict, npz: Path) -> None:
    """Pose/mask files of views without a photo: an error without a camera, else ignored (logged)."""
    for sub, pattern in (("pose", "*.json"), ("mask", "*.png")):
        folder = root / sub
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob(pattern)):
            if p.stem in names:
                continue
            if not p.stem.isdigit() or int(p.stem) not in params:
                raise ScanError(
                    f"{p}: {sub} file for view {p.stem}, which has no camera in {npz} and no photo; "
                    f"remove the file or add the view's calibration"
                )
            log.warning("%s: view %s has no photo in img/; ignoring its %s file", p, p.stem, sub)


def _read_view(
    root: Path, name: str, img_file: Path | None, params: dict, npz: Path, scale: float, load_images: bool
) -> View:
    idx = int(name)
    if idx not in params or not ({"int", "ext"} <= params[idx].keys() or "world_mat" in params[idx]):
        what = img_file if img_file is not None else root / "pose" / f"{name}.json"
        raise ScanError(
            f"{what}: view {name} has no camera in {npz} (no int_{idx}/ext_{idx}); "
            f"remove the view's files or add its calibration (cameras present: {sorted(params)})"
        )
    mask_file = root / "mask" / f"{name}.png"
    pose_file = root / "pose" / f"{name}.json"

    image = None
    if img_file is not None:
        image = load_image(img_file) if load_images else None
        size = (image.shape[1], image.shape[0]) if image is not None else image_size(img_file)
    mask = load_mask(mask_file) if mask_file.is_file() else None
    if img_file is None:
        if "size" in params[idx]:
            size = _size_entry(params[idx]["size"], npz, idx)
        elif mask is not None:
            size = (mask.shape[1], mask.shape[0])
        else:
            raise ScanError(f"{root}: view {name} has no photo, no mask and no size_{idx} in {npz}; cannot tell its image size")
    what = img_file if img_file is not None else root / "pose" / f"{name}.json"
    _check_size(what, size, params[idx], npz, idx)
    if mask is not None and (mask.shape[1], mask.shape[0]) != size:
        raise ScanError(
            f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but the photo is {size[0]}x{size[1]}; "
            f"regenerate the mask at the photo's size"
        )
    if mask is not None and not mask.any():
        log.warning("%s: mask is empty; dropping it (view %s is kept without a silhouette)", mask_file, name)
        mask = None
    keypoints = _read_pose(pose_file, size) if pose_file.is_file() else {}

    camera = _camera(params, idx, size, npz, name)
    if scale != 1.0:
        camera = camera.scaled(scale)
        new = (camera.width, camera.height)
        image = resize_image(image, new) if image is not None else None
        mask = resize_mask(mask, new) if mask is not None else None
        factor = np.array([new[0] / size[0], new[1] / size[1], 1.0], dtype=np.float64)
        keypoints = {s: (kp.astype(np.float64) * factor).astype(np.float32) for s, kp in keypoints.items()}
    return View(name=name, camera=camera, image=image, mask=mask, keypoints=keypoints)


def _size_entry(arr: np.ndarray, npz: Path, idx: int) -> tuple[int, int]:
    a = np.asarray(arr).reshape(-1)
    if a.size != 2 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ScanError(f"{npz}: size_{idx} must be [W, H] with positive entries, got {arr!r}")
    return int(a[0]), int(a[1])


def _check_size(what: Path, size: tuple[int, int], entry: dict, npz: Path, idx: int) -> None:
    """The photo must be the size the camera was calibrated for (size_i, else a sane principal point)."""
    W, H = size
    if "size" in entry:
        expected = _size_entry(entry["size"], npz, idx)
        if expected != size:
            raise ScanError(
                f"{what}: image is {W}x{H} but {npz} says camera {idx} is {expected[0]}x{expected[1]} (size_{idx}); "
                f"resize the image back or recalibrate"
            )
        return
    K = entry["int"][:3, :3] if "int" in entry else None
    if K is None or not np.all(np.isfinite(K)):
        return  # world_mat-only or NaN: the camera check reports what is wrong
    cx, cy = float(K[0, 2]), float(K[1, 2])
    if not (W / 4 <= cx <= 3 * W / 4 and H / 4 <= cy <= 3 * H / 4):
        raise ScanError(
            f"{what}: image is {W}x{H} but int_{idx} has its principal point at ({cx:.1f}, {cy:.1f}), far from "
            f"the image centre; the photo was probably resized or cropped after calibration. Use the original "
            f"photo, or scale int_{idx}; if this principal point is right, add size_{idx} = [{W}, {H}] to {npz.name}"
        )


def _camera(params: dict, idx: int, size: tuple[int, int], npz: Path, name: str) -> Camera:
    entry = params[idx]
    try:
        if "int" in entry and "ext" in entry:
            intr, ext = np.asarray(entry["int"], np.float64), np.asarray(entry["ext"], np.float64)
            if intr.shape not in ((4, 4), (3, 3)) or ext.shape not in ((4, 4), (3, 4)):
                raise CameraError(f"int_{idx} must be 4x4 (or 3x3) and ext_{idx} 4x4 (or 3x4), got {intr.shape}, {ext.shape}")
            K, R, t = intr[:3, :3], ext[:3, :3], ext[:3, 3]
            if "world_mat" in entry:
                _check_world_mat(entry["world_mat"], intr, ext, npz, idx)
        else:
            K, R, t = decompose_projection(np.asarray(entry["world_mat"], np.float64))
        return Camera(K, R, t, size[0], size[1], name=name)
    except CameraError as e:
        raise ScanError(f"{npz}: camera {idx} (view {name}): {e}") from e


def _check_world_mat(world: np.ndarray, intr: np.ndarray, ext: np.ndarray, npz: Path, idx: int) -> None:
    if intr.shape != (4, 4) or ext.shape != (4, 4) or not np.all(np.isfinite(world)):
        return
    ref = intr @ ext
    if np.abs(np.asarray(world, np.float64) - ref).max() > 1e-5 * max(1.0, np.abs(ref).max()):
        log.warning("%s: world_mat_%d differs from int_%d @ ext_%d; using int/ext", npz, idx, idx, idx)


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, R, t) of a 3x4 (or 4x4) projection K [R|t], for calibration files with only world_mat."""
    P = np.asarray(P, np.float64)[:3]
    if P.shape != (3, 4) or not np.all(np.isfinite(P)):
        raise CameraError(f"world_mat must be a finite 3x4/4x4 projection, got shape {P.shape} / NaN")
    M = P[:, :3]
    det = np.linalg.det(M)
    if abs(det) < 1e-12:
        raise CameraError("world_mat is singular")
    if det < 0:  # projective sign: choose the one that puts the scene in front of the camera
        P, M = -P, -M
    K, R = scipy.linalg.rq(M)
    D = np.diag(np.sign(np.diag(K)))
    K, R = K @ D, D @ R
    t = np.linalg.solve(K, P[:, 3])
    return K / K[2, 2], R, t


def _scale_mat(params: dict, npz: Path) -> np.ndarray | None:
    mats = [np.asarray(e["scale_mat"], np.float64) for _, e in sorted(params.items()) if "scale_mat" in e]
    if not mats:
        return None
    if any(not np.allclose(m, mats[0], rtol=1e-6, atol=1e-7) for m in mats[1:]):
        log.warning("%s: scale_mat_i differ between views; keeping the first", npz)
    return mats[0]


def _read_pose(path: Path, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """pose JSON -> {side: (21,3) float32 (u, v, 1)} in pixels of an image of ``size``."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScanError(f"{path}: not valid JSON ({e}); regenerate it with scripts/detect_keypoints.py --overwrite") from e
    if not isinstance(data, dict) or set(data) - set(LABEL_TO_SIDE):
        raise ScanError(f"{path}: expected {{\"Left\": [63 floats], \"Right\": [63 floats]}}, got keys {list(data) if isinstance(data, dict) else type(data).__name__}")
    W, H = size
    out: dict[str, np.ndarray] = {}
    for label, values in data.items():
        if values is None or (isinstance(values, list) and len(values) == 0):
            continue
        try:
            a = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ScanError(f"{path}: {label} must be a list of 63 numbers ({e})") from e
        if a.size != 63 or not np.all(np.isfinite(a)):
            raise ScanError(f"{path}: {label} must hold 21 finite (x, y, z) landmarks = 63 numbers, got {a.size}")
        a = a.reshape(21, 3)
        u, v = (a[:, 0] + 1.0) * W / 2.0, (a[:, 1] + 1.0) * H / 2.0
        out[LABEL_TO_SIDE[label]] = np.stack([u, v, np.ones(21)], axis=1).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------- writing
def pose_json(keypoints: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, list[float]]:
    """{side: (21,>=2) pixels} -> the FMHR pose dict (normalised x, y; z = 0, not known here)."""
    W, H = size
    out: dict[str, list[float]] = {"Left": [], "Right": []}
    for side, kp in keypoints.items():
        kp = np.asarray(kp, np.float64)
        xyz = np.zeros((21, 3))
        xyz[:, 0], xyz[:, 1] = 2.0 * kp[:, 0] / W - 1.0, 2.0 * kp[:, 1] / H - 1.0
        out[SIDE_TO_LABEL[side]] = [float(x) for x in xyz.reshape(-1)]
    return out


def write_fmhr(scan: Scan, data_path: str | Path, scan_id: str | int, overwrite: bool = False) -> Path:
    """Write ``scan`` in the FMHR layout (at its current resolution); returns the scan folder.

    View names must be camera indices ("00", "07"). Keypoint confidences are not part of the
    format: a side whose confidences are all 0 is written as [] and others read back as 1.
    ``size_i`` is added to param.npz so keypoint-only scans know their image size.
    """
    root = Path(data_path) / str(scan_id)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ScanError(f"{root} exists and is not empty; pass overwrite=True to replace it")
        for sub in ("img", "mask", "pose", "camera"):
            if (root / sub).is_dir():
                shutil.rmtree(root / sub)
    params: dict[str, np.ndarray] = {}
    scale_mat = np.eye(4) if scan.scale_mat is None else np.asarray(scan.scale_mat, np.float64)
    any_pose = any(v.keypoints for v in scan.views)
    for sub, needed in (("img", any(v.image is not None for v in scan.views)),
                        ("mask", any(v.mask is not None for v in scan.views)), ("pose", any_pose), ("camera", True)):
        if needed:
            (root / sub).mkdir(parents=True, exist_ok=True)
    for view in scan.views:
        if not view.name.isdigit():
            raise ScanError(f"view {view.name!r}: FMHR names views by camera index (e.g. '07'); rename the views")
        idx, cam = int(view.name), view.camera
        if view.image is not None:
            save_image(root / "img" / f"{view.name}.png", view.image)
        if view.mask is not None:
            save_mask(root / "mask" / f"{view.name}.png", view.mask)
        if any_pose:
            kps = {s: kp for s, kp in view.keypoints.items() if np.any(kp[:, 2] > 0)}
            (root / "pose" / f"{view.name}.json").write_text(json.dumps(pose_json(kps, (cam.width, cam.height))))
        intr, ext = np.eye(4), np.eye(4)
        intr[:3, :3] = cam.K
        ext[:3, :3], ext[:3, 3] = cam.R, cam.t
        params.update({f"int_{idx}": intr, f"ext_{idx}": ext, f"world_mat_{idx}": intr @ ext,
                       f"scale_mat_{idx}": scale_mat, f"size_{idx}": np.array([cam.width, cam.height], np.int64)})
    np.savez(root / "camera" / "param.npz", **params)
    return root
