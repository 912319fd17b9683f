"""Synthetic scans: the generator puts in what it says, and the written scan reads back the same."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import synthetic
from scripts.make_synthetic_scan import main as make_scan_main


@pytest.fixture(scope="module")
def synth() -> synthetic.SyntheticScan:
    return synthetic.generate(views=8, size=(640, 480), seed=5, outliers=4, duplicates=1)


def test_hands_are_plausible_and_apart(synth):
    hands = synthetic.generate(views=2, seed=11, miss_rate=0, swap_rate=0).hands
    for s in (synth.hands, hands):
        left, right = s.keypoints3d["left"], s.keypoints3d["right"]
        assert left[0, 0] < right[0, 0], "the person's right hand is at +x"
        for side, X in s.keypoints3d.items():
            length = np.linalg.norm(X[9] - X[0])  # wrist -> middle MCP
            assert 0.07 < length < 0.12
            assert (X[9] - X[0])[2] > 0.3 * np.linalg.norm(X[9] - X[0]), "fingers point roughly forward"
            betas = s.params[side].betas
            assert betas.abs().max() <= 2.0 + 1e-6
        gap = np.min(np.linalg.norm(s.vertices["left"][:, None] - s.vertices["right"][None, ::4], axis=-1))
        assert gap > 0.015


def test_cameras_look_at_the_hands(synth):
    allj = np.concatenate(list(synth.hands.keypoints3d.values()))
    for cam in synth.cameras:
        uv = cam.project(torch.as_tensor(allj)).numpy()
        depth = (allj @ cam.R.T + cam.t)[:, 2]
        assert (depth > 0.2).all()
        assert (uv[:, 0] > 0).all() and (uv[:, 0] < 640).all() and (uv[:, 1] > 0).all() and (uv[:, 1] < 480).all()
        fov = np.degrees(2 * np.arctan(320 / cam.K[0, 0]))
        assert 30 < fov < 60


def test_detections_follow_the_recipe(synth):
    assert len(synth.swapped_views) == 1  # round(10 % of 8)
    assert len(synth.duplicated_views) == 1 and len(synth.outliers) == 4
    errs, confs = [], []
    for view in synth.scan.views:
        truth = synth.detections[view.name]
        assert set(truth) == set(view.keypoints)
        for label, kp in view.keypoints.items():
            side = truth[label]
            if view.name in synth.swapped_views:
                assert side != label
            elif view.name not in synth.duplicated_views:
                assert side == label
            ok = kp[:, 2] > 0
            confs.append(kp[:, 2])
            moved = {j for v, s, j in synth.outliers if v == view.name and s == side}
            keep = ok & ~np.isin(np.arange(21), list(moved))
            errs.append(np.linalg.norm(kp[keep, :2] - synth.true_keypoints2d[view.name][side][keep], axis=1))
    e = np.concatenate(errs)
    # 2D noise N(0, 3 px) per coordinate: distance RMS = 3 sqrt(2)
    assert 3.0 < np.sqrt(np.mean(e**2)) < 5.5
    missed = np.mean(np.concatenate(confs) == 0)
    assert 0.03 < missed < 0.2


def test_same_seed_same_scan_other_seed_other_scan():
    a = synthetic.generate(views=3, size=(320, 240), seed=1)
    b = synthetic.generate(views=3, size=(320, 240), seed=1)
    c = synthetic.generate(views=3, size=(320, 240), seed=2)
    np.testing.assert_array_equal(a.hands.keypoints3d["right"], b.hands.keypoints3d["right"])
    assert not np.allclose(a.hands.keypoints3d["right"], c.hands.keypoints3d["right"])


def test_one_hand_scan():
    s = synthetic.generate(views=4, size=(320, 240), seed=3, sides=("left",), swap_rate=0.25)
    assert s.scan.sides == ("left",)
    assert all(set(d.values()) <= {"left"} for d in s.detections.values())
    assert len(s.swapped_views) == 1
    with pytest.raises(ValueError):
        synthetic.generate(views=2, sides=("up",))


def test_write_read_round_trip(synth, tmp_path: Path):
    root = synthetic.write_synthetic(synth, tmp_path, "4")
    assert root == tmp_path / "4"
    for f in ("gt/hands.json", "gt/mesh_left.ply", "gt/mesh_right.ply", "camera/param.npz", "pose/00.json"):
        assert (root / f).is_file(), f
    scan = synthetic.read_synthetic(tmp_path, "4")
    assert [v.name for v in scan.views] == [v.name for v in synth.scan.views]
    assert scan.sides == ("left", "right")
    for a, b in zip(scan.views, synth.scan.views):
        np.testing.assert_allclose(a.camera.K, b.camera.K)
        np.testing.assert_allclose(a.camera.R, b.camera.R, atol=1e-12)
        assert set(a.keypoints) == set(b.keypoints)
        for label in a.keypoints:
            np.testing.assert_allclose(a.keypoints[label][:, :2], b.keypoints[label][:, :2], atol=1e-3)
    gt = scan.gt
    for side in ("left", "right"):
        np.testing.assert_allclose(gt.keypoints3d[side], synth.hands.keypoints3d[side], atol=1e-9)
        np.testing.assert_allclose(gt.vertices[side], synth.hands.vertices[side], atol=1e-6)
        np.testing.assert_array_equal(gt.faces[side], synth.hands.faces[side])
        for k, v in synth.hands.params[side].to_dict().items():
            np.testing.assert_allclose(gt.hand_params[side][k], v[0].numpy(), atol=1e-7)
    truth = synthetic.load_truth(root)
    assert truth["swapped_views"] == synth.swapped_views and truth["detections"] == synth.detections
    # half resolution: keypoints scale with the images
    half = synthetic.read_synthetic(tmp_path, "4", scale=0.5)
    v0, h0 = scan.views[0], half.views[0]
    lab = sorted(v0.keypoints)[0]
    np.testing.assert_allclose(h0.keypoints[lab][:, :2], v0.keypoints[lab][:, :2] * 0.5, atol=1e-3)


def test_load_gt_names_a_missing_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a synthetic scan"):
        synthetic.load_gt(tmp_path)


def test_cli(tmp_path: Path, capsys):
    args = ["--out", str(tmp_path), "--scan_id", "9", "--views", "4", "--size", "320x240", "--seed", "2",
            "--hands", "right", "--keypoints_only"]
    assert make_scan_main(args) == 0
    scan = synthetic.read_synthetic(tmp_path, "9")
    assert len(scan.views) == 4 and scan.sides == ("right",)
    assert (scan.views[0].camera.width, scan.views[0].camera.height) == (320, 240)
    assert make_scan_main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert make_scan_main(args + ["--overwrite", "--seed", "3"]) == 0
    with pytest.raises(SystemExit):
        make_scan_main(["--out", str(tmp_path), "--scan_id", "1", "--size", "640by480"])
