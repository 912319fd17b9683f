"""Capture readers/writers: FMHR round trip and validation, InterHand2.6M, keypoint detection,
and facts about the real demo capture (skipped when ../shared/data/fmhr_demo is absent)."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from capture.camera import Camera
from capture.fmhr import decompose_projection, pose_json, read_camera_file, read_fmhr, write_fmhr
from capture.scan import Scan, ScanError, View

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".." / "shared" / "data" / "fmhr_demo"
needs_demo = pytest.mark.skipif(not (DEMO / "1" / "camera" / "param.npz").is_file(),
                                reason="real capture ../shared/data/fmhr_demo is absent")


# ------------------------------------------------------------------------------- synthetic scans
def look_at(center: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World->camera (R, t) of a camera at ``center`` looking at ``target`` (OpenCV axes)."""
    z = target - center
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    return R, -R @ center


def make_scan(names=("00", "02", "07"), size=(64, 48), seed=0, images=True) -> Scan:
    """A small scan: cameras on a ring around two hands' worth of random 3D keypoints."""
    rng = np.random.default_rng(seed)
    W, H = size
    pts = {"left": rng.normal([-0.05, 0, 0], 0.03, (21, 3)), "right": rng.normal([0.05, 0, 0], 0.03, (21, 3))}
    views = []
    for k, name in enumerate(names):
        a = 2 * np.pi * k / len(names)
        R, t = look_at(np.array([0.6 * np.sin(a), -0.1, 0.6 * np.cos(a)]), np.zeros(3))
        K = np.array([[70.0 + k, 0.3, W / 2 + 0.7], [0, 72.0 - k, H / 2 - 0.4], [0, 0, 1]])
        cam = Camera(K, R, t, W, H, name)
        kps = {}
        for side, X in pts.items():
            uvw = (X @ R.T + t) @ K.T
            kps[side] = np.concatenate([uvw[:, :2] / uvw[:, 2:], np.ones((21, 1))], 1).astype(np.float32)
        mask = np.zeros((H, W), bool)
        mask[H // 4: H // 2 + k, W // 3: W // 2 + 2 * k] = True
        image = rng.random((H, W, 3)).astype(np.float32) if images else None
        views.append(View(name, cam, image, mask, kps))
    scale_mat = np.diag([0.5, 0.5, 0.5, 1.0])
    scale_mat[:3, 3] = [0.1, -0.2, 1.0]
    return Scan(views, scan_id="3", source="synthetic", scale_mat=scale_mat)


@pytest.fixture
def written(tmp_path: Path) -> tuple[Scan, Path]:
    scan = make_scan()
    write_fmhr(scan, tmp_path, 3)
    return scan, tmp_path


# ----------------------------------------------------------------------------------- FMHR format
def test_fmhr_round_trip_is_exact(written):
    scan, path = written
    back = read_fmhr(path, "3")
    assert [v.name for v in back.views] == ["00", "02", "07"]
    assert back.sides == ("left", "right")
    np.testing.assert_allclose(back.scale_mat, scan.scale_mat, atol=1e-12)
    for a, b in zip(scan.views, back.views):
        for key in ("K", "R", "t"):
            np.testing.assert_allclose(getattr(b.camera, key), getattr(a.camera, key), atol=1e-9, rtol=0)
        assert (b.camera.width, b.camera.height) == (a.camera.width, a.camera.height)
        assert b.image.dtype == np.float32 and b.image.shape == a.image.shape
        assert np.abs(b.image - a.image).max() <= 0.5 / 255 + 1e-7
        assert b.mask.dtype == bool and np.array_equal(b.mask, a.mask)
        assert set(b.keypoints) == {"left", "right"}
        for side in ("left", "right"):
            assert b.keypoints[side].dtype == np.float32 and b.keypoints[side].shape == (21, 3)
            np.testing.assert_allclose(b.keypoints[side], a.keypoints[side], atol=1e-4, rtol=0)


def test_fmhr_pose_file_uses_normalised_coords_and_anatomical_labels(written):
    scan, path = written
    data = json.loads((path / "3" / "pose" / "02.json").read_text())
    assert set(data) == {"Left", "Right"}
    v = scan.view("02")
    W, H = v.camera.width, v.camera.height
    left = np.asarray(data["Left"]).reshape(21, 3)
    np.testing.assert_allclose((left[:, 0] + 1) * W / 2, v.keypoints["left"][:, 0], atol=1e-4)
    np.testing.assert_allclose((left[:, 1] + 1) * H / 2, v.keypoints["left"][:, 1], atol=1e-4)
    npz = np.load(path / "3" / "camera" / "param.npz")
    for key in ("int_7", "ext_7", "world_mat_7", "scale_mat_7", "size_7"):
        assert key in npz.files
    np.testing.assert_allclose(npz["world_mat_7"], npz["int_7"] @ npz["ext_7"], atol=1e-12)


def test_fmhr_scale_resizes_images_masks_intrinsics_and_keypoints(written):
    scan, path = written
    half = read_fmhr(path, "3", scale=0.5)
    for a, b in zip(scan.views, half.views):
        assert (b.camera.width, b.camera.height) == (32, 24)
        assert b.image.shape == (24, 32, 3) and b.mask.shape == (24, 32)
        np.testing.assert_allclose(b.camera.K[:2], a.camera.K[:2] * 0.5, atol=1e-9)
        np.testing.assert_allclose(b.keypoints["left"][:, :2], a.keypoints["left"][:, :2] * 0.5, atol=1e-4)
        np.testing.assert_allclose(b.image, cv2.resize(a.image, (32, 24), interpolation=cv2.INTER_AREA), atol=1 / 255)
        assert b.mask.sum() == pytest.approx(a.mask.sum() / 4, rel=0.35)


def test_fmhr_views_subset_and_pose_only_scan(written, tmp_path):
    scan, path = written
    sub = read_fmhr(path, "3", views=["07", "00"])
    assert [v.name for v in sub.views] == ["00", "07"]
    assert [v.name for v in read_fmhr(path, "3", views=[7, "2"]).views] == ["02", "07"]
    with pytest.raises(ScanError, match=r"no view\(s\) \['05'\].*\['00', '02', '07'\]"):
        read_fmhr(path, "3", views=["05"])
    nophoto = make_scan(images=False)
    for v in nophoto.views:
        v.mask = None
    write_fmhr(nophoto, tmp_path / "kp", 4)
    back = read_fmhr(tmp_path / "kp", 4)
    assert [v.name for v in back.views] == ["00", "02", "07"] and back.views[0].image is None
    np.testing.assert_allclose(back.views[1].keypoints["right"], nophoto.views[1].keypoints["right"], atol=1e-4)


def test_fmhr_load_images_false_reads_size_from_header(written):
    _, path = written
    scan = read_fmhr(path, "3", load_images=False)
    assert all(v.image is None and v.mask is not None for v in scan.views)
    assert (scan.views[0].camera.width, scan.views[0].camera.height) == (64, 48)


def test_write_refuses_to_clobber_and_names_must_be_indices(written, tmp_path):
    scan, path = written
    with pytest.raises(ScanError, match="overwrite=True"):
        write_fmhr(scan, path, 3)
    write_fmhr(scan.subset(["00"]), path, 3, overwrite=True)
    assert [v.name for v in read_fmhr(path, 3).views] == ["00"]
    scan.views[0].name = "front"
    with pytest.raises(ScanError, match="camera index"):
        write_fmhr(scan, tmp_path / "x", 1)


def test_read_camera_file_any_ids_and_sizes(written, tmp_path):
    scan, path = written
    cams = read_camera_file(path / "3" / "camera" / "param.npz")
    assert list(cams) == ["00", "02", "07"]
    np.testing.assert_allclose(cams["07"].K, scan.view("07").camera.K, atol=1e-12)
    assert (cams["02"].width, cams["02"].height) == (64, 48)
    K = np.eye(4)
    K[:3, :3] = [[100, 0, 50], [0, 100, 40], [0, 0, 1]]
    R, t = look_at(np.array([0.0, 0.0, -1.0]), np.zeros(3))
    E = np.eye(4)
    E[:3, :3], E[:3, 3] = R, t
    np.savez(tmp_path / "p.npz", int_10=K, ext_10=E, int_15=K, ext_15=E)
    with pytest.raises(ScanError, match="image_size"):
        read_camera_file(tmp_path / "p.npz")
    cams = read_camera_file(tmp_path / "p.npz", image_size=(100, 80))
    assert list(cams) == ["10", "15"] and cams["15"].width == 100 and cams["15"].height == 80


def test_world_mat_only_calibration_is_decomposed(tmp_path):
    cam = make_scan().views[1].camera
    P = cam.projection * -3.7  # any projective scale, even negative
    K, R, t = decompose_projection(P)
    np.testing.assert_allclose(K, cam.K, atol=1e-9)
    np.testing.assert_allclose(R, cam.R, atol=1e-9)
    np.testing.assert_allclose(t, cam.t, atol=1e-9)
    np.savez(tmp_path / "w.npz", world_mat_2=np.vstack([P, [0, 0, 0, 1]]), size_2=[64, 48])
    np.testing.assert_allclose(read_camera_file(tmp_path / "w.npz")["02"].K, cam.K, atol=1e-9)


def test_pose_json_drops_unconfident_sides(written):
    scan, path = written
    v = scan.view("00")
    v.keypoints["right"][:, 2] = 0
    write_fmhr(scan, path, 3, overwrite=True)
    assert json.loads((path / "3" / "pose" / "00.json").read_text())["Right"] == []
    assert set(read_fmhr(path, 3).view("00").keypoints) == {"left"}
    assert pose_json({}, (10, 10)) == {"Left": [], "Right": []}


# ------------------------------------------------------------------------------------ validation
def test_missing_scan_folder_lists_what_exists(written):
    _, path = written
    with pytest.raises(ScanError, match=r"no such scan folder.*\['3'\]"):
        read_fmhr(path, 9)
    with pytest.raises(ScanError, match="does not exist"):
        read_fmhr(path / "nowhere", 3)


def test_image_without_camera_is_an_error_naming_the_file(written):
    _, path = written
    cv2.imwrite(str(path / "3" / "img" / "05.png"), np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ScanError, match=r"img/05.png.*no camera.*int_5/ext_5"):
        read_fmhr(path, 3)


def test_pose_for_a_view_without_camera_is_an_error(written):
    _, path = written
    (path / "3" / "pose" / "10.json").write_text('{"Left": [], "Right": []}')
    with pytest.raises(ScanError, match=r"pose/10.json.*no camera"):
        read_fmhr(path, 3)


def test_wrong_image_size_is_an_error(written, tmp_path):
    _, path = written
    cv2.imwrite(str(path / "3" / "img" / "02.png"), np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(ScanError, match=r"02.png: image is 32x24 .* 64x48 \(size_2\)"):
        read_fmhr(path, 3)
    # without size_i, a principal point far from the photo's centre gives the problem away
    npz = dict(np.load(path / "3" / "camera" / "param.npz"))
    npz = {k: v for k, v in npz.items() if not k.startswith("size_")}
    np.savez(path / "3" / "camera" / "param.npz", **npz)
    with pytest.raises(ScanError, match=r"02.png: image is 32x24 .*principal point"):
        read_fmhr(path, 3)


def test_mask_of_another_size_is_an_error(written):
    _, path = written
    cv2.imwrite(str(path / "3" / "mask" / "07.png"), np.full((10, 10), 255, np.uint8))
    with pytest.raises(ScanError, match=r"mask/07.png: mask is 10x10"):
        read_fmhr(path, 3)


def test_nan_camera_is_an_error_naming_the_file(written):
    _, path = written
    f = path / "3" / "camera" / "param.npz"
    npz = dict(np.load(f))
    npz["ext_2"][1, 3] = np.nan
    np.savez(f, **npz)
    with pytest.raises(ScanError, match=r"param.npz: camera 2 \(view 02\).*NaN"):
        read_fmhr(path, 3)


@pytest.mark.parametrize("target,match", [
    ("img/07.png", r"img/07.png: cannot be decoded"),
    ("mask/07.png", r"mask/07.png: cannot be decoded"),
    ("pose/07.json", r"pose/07.json: not valid JSON"),
    ("camera/param.npz", r"param.npz: cannot be read"),
])
def test_corrupt_files_are_errors_naming_the_file(written, target, match):
    _, path = written
    f = path / "3" / target
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    with pytest.raises(ScanError, match=match):
        read_fmhr(path, 3)


def test_malformed_pose_is_an_error(written):
    _, path = written
    (path / "3" / "pose" / "00.json").write_text('{"Left": [1, 2, 3], "Right": []}')
    with pytest.raises(ScanError, match=r"00.json: Left must hold 21 finite"):
        read_fmhr(path, 3)
    (path / "3" / "pose" / "00.json").write_text('{"left_hand": []}')
    with pytest.raises(ScanError, match=r"00.json: expected"):
        read_fmhr(path, 3)


def test_empty_mask_is_dropped_with_a_warning(written, caplog):
    _, path = written
    cv2.imwrite(str(path / "3" / "mask" / "02.png"), np.zeros((48, 64), np.uint8))
    with caplog.at_level(logging.WARNING, logger="capture.fmhr"):
        scan = read_fmhr(path, 3)
    assert scan.view("02").mask is None and scan.view("00").mask is not None
    assert "02.png: mask is empty" in caplog.text


def test_files_of_views_without_photo_are_ignored_with_a_warning(written, caplog):
    _, path = written
    (path / "3" / "img" / "07.png").unlink()  # view 07 keeps its camera, mask and pose
    with caplog.at_level(logging.WARNING, logger="capture.fmhr"):
        scan = read_fmhr(path, 3)
    assert [v.name for v in scan.views] == ["00", "02"]
    assert "pose/07.json: view 07 has no photo" in caplog.text and "mask/07.png: view 07 has no photo" in caplog.text


def test_bad_scale_is_an_error(written):
    _, path = written
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ScanError, match="scale must be a positive number"):
            read_fmhr(path, 3, scale=bad)


# ------------------------------------------------------------------------------ the real capture
@pytest.fixture(scope="module")
def demo() -> Scan:
    if not (DEMO / "1" / "camera" / "param.npz").is_file():
        pytest.skip("real capture ../shared/data/fmhr_demo is absent")
    return read_fmhr(DEMO, 1, load_images=False)


@needs_demo
def test_demo_views_have_gaps_and_metric_cameras(demo):
    assert [v.name for v in demo.views] == ["00", "01", "02", "03", "04", "06", "07", "08", "09", "11", "12", "13", "14"]
    assert all((v.camera.width, v.camera.height) == (1280, 1024) for v in demo.views)
    # a hand-sized scene a metre or two from cameras that are metres apart: units are metres
    assert 0.5 < np.linalg.norm(demo.view("00").camera.center - demo.view("12").camera.center) < 5
    assert demo.scale_mat is not None and demo.scale_mat[0, 0] == pytest.approx(0.639, abs=1e-3)
    scaled = read_fmhr(DEMO, 1, scale=0.25, views=["00"])
    v = scaled.view("00")
    assert v.image.shape == (256, 320, 3) and v.image.dtype == np.float32 and 0 <= v.image.min() <= v.image.max() <= 1
    np.testing.assert_allclose(v.keypoints["left"][:, :2], demo.view("00").keypoints["left"][:, :2] / 4, atol=1e-3)


def _triangulate(Ps: list[np.ndarray], uvs: list[np.ndarray]) -> np.ndarray:
    """Linear (DLT) triangulation of 21 joints seen as pixels ``uvs[k]`` (21,2) by cameras ``Ps[k]``."""
    A = np.concatenate([np.stack([uv[:, :1] * P[2] - P[0], uv[:, 1:2] * P[2] - P[1]], 1) for P, uv in zip(Ps, uvs)], 1)
    X = np.linalg.svd(A)[2][:, -1]
    return X[:, :3] / X[:, 3:]


def _reprojection(X: np.ndarray, P: np.ndarray, uv: np.ndarray) -> float:
    x = np.concatenate([X, np.ones((21, 1))], 1) @ P.T
    return float(np.median(np.linalg.norm(x[:, :2] / x[:, 2:] - uv, axis=1)))


def chirality(X: np.ndarray) -> float:
    """> 0 for a right hand, < 0 for a left one (MediaPipe joints, right-handed world): how far
    the curled fingers and the thumb lie along n = (index MCP - wrist) x (pinky MCP - wrist),
    which points out of the palm of a right hand and out of the back of a left one."""
    n = np.cross(X[5] - X[0], X[17] - X[0])
    n /= np.linalg.norm(n)
    return float(np.mean((X[[3, 4, 7, 8, 11, 12, 15, 16, 19, 20]] - X[0]) @ n))


@needs_demo
def test_demo_left_label_is_the_persons_left_hand(demo):
    """Cluster all detections into two 3D hands by RANSAC triangulation (labels ignored), then
    compare each hand's geometric chirality with the labels of the detections that formed it."""
    dets = [(v.name, s, v.camera.projection, kp[:, :2].astype(np.float64)) for v in demo.views for s, kp in v.keypoints.items()]
    remaining, hands = list(range(len(dets))), []
    for _ in range(2):
        best: list[int] = []
        for i, j in itertools.combinations(remaining, 2):
            if dets[i][0] == dets[j][0]:
                continue
            X = _triangulate([dets[i][2], dets[j][2]], [dets[i][3], dets[j][3]])
            inl = [k for k in remaining if _reprojection(X, dets[k][2], dets[k][3]) < 25]
            if len(inl) > len(best):
                best = inl
        X = _triangulate([dets[k][2] for k in best], [dets[k][3] for k in best])
        hands.append((X, [dets[k][1] for k in best]))
        remaining = [k for k in remaining if k not in best]
    for X, labels in hands:
        majority = max(set(labels), key=labels.count)
        assert len(labels) >= 6 and labels.count(majority) >= len(labels) - 1
        bones = np.linalg.norm(X[1:] - X[[0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19]], axis=1)
        assert 0.015 < bones.min() and bones.max() < 0.11  # a human hand in metres
        score = chirality(X)
        assert abs(score) > 0.01, "the hand is too flat to tell its side"
        assert ("right" if score > 0 else "left") == majority
    assert {max(set(lab), key=lab.count) for _, lab in hands} == {"left", "right"}


# ---------------------------------------------------------------------------------- InterHand2.6M
def write_interhand_fixture(root: Path, split: str = "test") -> dict:
    """A tiny InterHand2.6M tree: 2 cameras x 2 frames of capture 0, plus 1 right-hand-only frame."""
    rng = np.random.default_rng(1)
    cams = {"400002": np.array([0.0, 0.0, -900.0]), "400016": np.array([700.0, -100.0, -500.0])}
    camrot = {c: look_at(p, np.zeros(3))[0] for c, p in cams.items()}
    W, H = 40, 56
    frames = [(0, "ROM01_No_Interaction", 12), (0, "ROM01_No_Interaction", 3), (1, "ROM04_RT_Occlusion", 7)]
    data = {"images": [], "annotations": []}
    joint_3d: dict = {}
    mano: dict = {}
    truth = {}
    for fi, (cap, seq, frame) in enumerate(frames):
        world = rng.normal(0.0, 40.0, (42, 3)) + np.array([[30.0, 0, 0]] * 21 + [[-30.0, 0, 0]] * 21)  # mm
        valid = np.ones(42)
        valid[[5, 30]] = 0
        hand_type = "interacting" if cap == 0 else "right"
        joint_3d.setdefault(str(cap), {})[str(frame)] = {"world_coord": world.tolist(), "joint_valid": valid.tolist(), "hand_type": hand_type}
        mano.setdefault(str(cap), {})[str(frame)] = {
            "right": {"pose": rng.normal(0, 0.2, 48).tolist(), "shape": rng.normal(0, 1, 10).tolist(), "trans": [0.01, 0.02, 0.03]},
            "left": None if cap == 1 else {"pose": rng.normal(0, 0.2, 48).tolist(), "shape": [0.0] * 10, "trans": [0.0, 0.0, 0.1]},
        }
        truth[(cap, seq, frame)] = (world, valid)
        for cam in cams:
            img_id = len(data["images"])
            name = f"Capture{cap}/{seq}/cam{cam}/image{frame}.jpg"
            data["images"].append({"id": img_id, "file_name": name, "width": W, "height": H, "capture": cap,
                                   "camera": cam, "frame_idx": frame, "seq_name": seq, "subject": 0})
            data["annotations"].append({"id": img_id, "image_id": img_id, "bbox": [0, 0, W, H], "joint_valid": valid[:, None].tolist(),
                                        "hand_type": hand_type, "hand_type_valid": 1})
            path = root / "images" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((H, W, 3), (30 * fi, 100, 200), np.uint8))
    cam_json = {str(c): {"campos": {k: v.tolist() for k, v in cams.items()}, "camrot": {k: v.tolist() for k, v in camrot.items()},
                         "focal": {"400002": [50.0, 51.0], "400016": [45.0, 45.5]},
                         "princpt": {"400002": [20.0, 28.0], "400016": [19.5, 27.0]}} for c in (0, 1)}
    ann = root / "annotations" / split
    ann.mkdir(parents=True, exist_ok=True)
    for what, obj in (("data", data), ("camera", cam_json), ("joint_3d", joint_3d), ("MANO_NeuralAnnot", mano)):
        (ann / f"InterHand2.6M_{split}_{what}.json").write_text(json.dumps(obj))
    return {"cams": cams, "camrot": camrot, "truth": truth, "mano": mano}


def test_interhand_frames_cameras_units_and_joint_order(tmp_path):
    from capture.interhand import interhand_frames, read_interhand
    from handmodel.joint_orders import INTERHAND_TO_MEDIAPIPE

    fx = write_interhand_fixture(tmp_path)
    frames = interhand_frames(tmp_path, "test")
    assert [(f.capture, f.seq, f.frame) for f in frames] == [(0, "ROM01_No_Interaction", 3), (0, "ROM01_No_Interaction", 12), (1, "ROM04_RT_Occlusion", 7)]
    scan = read_interhand(tmp_path, "test", 1)
    world, valid = fx["truth"][(0, "ROM01_No_Interaction", 12)]
    assert [v.name for v in scan.views] == ["400002", "400016"] and scan.sides == ("left", "right")
    cam = scan.view("400016").camera
    np.testing.assert_allclose(cam.R, fx["camrot"]["400016"], atol=1e-12)
    np.testing.assert_allclose(cam.center, fx["cams"]["400016"] / 1000, atol=1e-12)  # mm -> m
    np.testing.assert_allclose(cam.K, [[45, 0, 19.5], [0, 45.5, 27], [0, 0, 1]])
    # 3D ground truth: metres, MediaPipe order (wrist = InterHand joint 20 / 41 first)
    np.testing.assert_allclose(scan.gt.keypoints3d["right"][0], world[20] / 1000)
    np.testing.assert_allclose(scan.gt.keypoints3d["left"][0], world[41] / 1000)
    np.testing.assert_allclose(scan.gt.keypoints3d["left"], world[21:][INTERHAND_TO_MEDIAPIPE] / 1000)
    assert scan.gt.keypoints_valid["right"].sum() == 20 and not scan.gt.keypoints_valid["right"][list(INTERHAND_TO_MEDIAPIPE).index(5)]
    # 2D keypoints are projections of the 3D joints; invalid / off-image joints get confidence 0
    import torch
    for v in scan.views:
        for side in ("left", "right"):
            kp = v.keypoints[side]
            proj = v.camera.project(torch.as_tensor(scan.gt.keypoints3d[side])).numpy()
            on = kp[:, 2] > 0
            assert on.sum() >= 5
            np.testing.assert_allclose(kp[on, :2], proj[on], atol=1e-3)
            inside = (proj[:, 0] >= 0) & (proj[:, 0] < 40) & (proj[:, 1] >= 0) & (proj[:, 1] < 56)
            assert np.array_equal(on, inside & scan.gt.keypoints_valid[side])
    # MANO (NeuralAnnot) in its own convention
    m = scan.gt.hand_params["right"]
    np.testing.assert_allclose(m["mano_pose"].reshape(-1), fx["mano"]["0"]["12"]["right"]["pose"])
    assert m["mano_betas"].shape == (10,) and m["mano_transl"].tolist() == [0.01, 0.02, 0.03]
    # images are RGB (the jpg was written as BGR (0, 100, 200)) and scaled like the cameras
    rgb = scan.views[0].image.reshape(-1, 3).mean(0)
    assert scan.views[0].image.shape == (56, 40, 3) and np.abs(rgb - [200 / 255, 100 / 255, 0]).max() < 0.02
    half = read_interhand(tmp_path, "test", 1, scale=0.5, cameras=["400016"])
    assert [v.name for v in half.views] == ["400016"] and half.views[0].image.shape == (28, 20, 3)
    np.testing.assert_allclose(half.views[0].keypoints["left"][:, :2], scan.view("400016").keypoints["left"][:, :2] / 2, atol=1e-4)


def test_interhand_single_hand_frame_and_errors(tmp_path):
    from capture.interhand import read_interhand

    write_interhand_fixture(tmp_path)
    one = read_interhand(tmp_path, "test", 2, load_images=False)
    assert one.sides == ("right",) and set(one.gt.keypoints3d) == {"right"} and set(one.gt.hand_params) == {"right"}
    assert all(set(v.keypoints) == {"right"} and v.image is None for v in one.views)
    with pytest.raises(ScanError, match=r"scan id 3 out of range.*3 frames"):
        read_interhand(tmp_path, "test", 3)
    with pytest.raises(ScanError, match=r"InterHand2.6M_val_data.json: missing"):
        read_interhand(tmp_path, "val", 0)
    with pytest.raises(ScanError, match=r"no camera\(s\) \['999'\]"):
        read_interhand(tmp_path, "test", 0, cameras=["999"])
    (tmp_path / "images" / "test" / "Capture1" / "ROM04_RT_Occlusion" / "cam400016" / "image7.jpg").unlink()
    with pytest.raises(ScanError, match=r"image7.jpg: image of camera 400016 .* missing"):
        read_interhand(tmp_path, "test", 2)
    cam_file = tmp_path / "annotations" / "test" / "InterHand2.6M_test_camera.json"
    cam_file.write_text(cam_file.read_text()[:50])
    with pytest.raises(ScanError, match=r"InterHand2.6M_test_camera.json: not valid JSON"):
        read_interhand(tmp_path, "test", 0)


# ------------------------------------------------------------------------------ keypoint detection
def test_missing_mediapipe_error_gives_the_install_command(monkeypatch):
    import sys

    from capture.detect import load_mediapipe

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(ImportError, match=r"pip install --no-deps mediapipe==0.10.21"):
        load_mediapipe()


def _mediapipe_available() -> bool:
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return False
    return True


@needs_demo
@pytest.mark.skipif(not _mediapipe_available(), reason="mediapipe not installed (optional: requirements-detect.txt)")
def test_detect_both_hands_on_demo_view_00_with_anatomical_labels(tmp_path):
    import subprocess
    import sys

    scan_dir = tmp_path / "1"
    (scan_dir / "img").mkdir(parents=True)
    (scan_dir / "camera").mkdir()
    (scan_dir / "img" / "00.png").write_bytes((DEMO / "1" / "img" / "00.png").read_bytes())
    (scan_dir / "camera" / "param.npz").write_bytes((DEMO / "1" / "camera" / "param.npz").read_bytes())
    cmd = [sys.executable, str(REPO / "scripts" / "detect_keypoints.py"), "--data_path", str(tmp_path), "--scan_id", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "view 00: left, right" in run.stdout
    mine = read_fmhr(tmp_path, 1, load_images=False).view("00").keypoints
    theirs = read_fmhr(DEMO, 1, views=["00"], load_images=False).view("00").keypoints
    assert set(mine) == {"left", "right"}
    for side in ("left", "right"):  # same hand under the same label as the demo's own detections
        assert np.median(np.linalg.norm(mine[side][:, :2] - theirs[side][:, :2], axis=1)) < 20
    from capture.detect import detect_scan

    before = (scan_dir / "pose" / "00.json").read_text()
    (scan_dir / "pose" / "00.json").write_text('{"Left": [], "Right": []}')
    assert detect_scan(tmp_path, 1) == {}  # an existing pose file is kept
    assert detect_scan(tmp_path, 1, overwrite=True) == {"00": ["left", "right"]}
    assert json.loads((scan_dir / "pose" / "00.json").read_text()) == json.loads(before)


def test_holdout_views_leave_fitting_and_unknown_names_are_errors():
    scan = make_scan(names=("00", "02", "07"), images=False)
    split = scan.hold_out(["02"])
    assert [v.name for v in split.views] == ["00", "07"] and [v.name for v in split.holdout] == ["02"]
    assert [v.name for v in split.subset(["00", "02"]).holdout] == ["02"]
    with pytest.raises(ScanError, match=r"holdout views \['05'\].*data.holdout_views"):
        scan.hold_out(["05"])
    with pytest.raises(ScanError, match="every view"):
        scan.hold_out(["00", "02", "07"])
