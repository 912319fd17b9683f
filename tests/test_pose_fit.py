"""pose_fit: robust multi-view keypoints from imperfect detections (synthetic truth, real capture)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import synthetic
from capture.scan import Scan, View
from fitting import pose_fit
from fitting.geometry import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    project,
    projection_matrices,
    robust_triangulate,
    similarity_transform,
    triangulate_dlt,
)
from fitting.state import State

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".." / "shared" / "data" / "fmhr_demo"
needs_demo = pytest.mark.skipif(not (DEMO / "1" / "camera" / "param.npz").is_file(),
                                reason="real capture ../shared/data/fmhr_demo is absent")


def _errors_mm(state: State, synth: synthetic.SyntheticScan) -> dict[str, float]:
    out = {}
    for side, X in synth.hands.keypoints3d.items():
        ok = state.keypoints3d_valid[side]
        assert ok.sum() >= 19, f"{side}: only {ok.sum()} valid joints"
        out[side] = float(np.linalg.norm(state.keypoints3d[side][ok] - X[ok], axis=1).mean() * 1000)
    return out


def _assignment_correct(state: State, synth: synthetic.SyntheticScan) -> None:
    for view, truth in synth.detections.items():
        got = state.assignment[view]
        if view in synth.duplicated_views:  # one hand under both labels: exactly one is kept
            (side,) = set(truth.values())
            assert list(got.values()) == [side], (view, got)
            continue
        assert got == truth, (view, got, truth)


# ---------------------------------------------------------------------------------------- geometry
def test_dlt_and_robust_triangulation():
    rng = np.random.default_rng(0)
    cams = synthetic.random_cameras(rng, 6, (640, 480), np.zeros(3), 0.2)
    P = projection_matrices(cams)
    X = rng.normal(0, 0.05, (30, 3))
    uv, _ = project(P, X)
    np.testing.assert_allclose(triangulate_dlt(P, np.transpose(uv, (1, 0, 2)), np.ones((30, 6))), X, atol=1e-8)
    noisy = uv + rng.normal(0, 1.0, uv.shape)
    noisy[2, :10] += 120.0  # one view far off for a third of the points
    conf = np.ones((6, 30))
    conf[4, 20:] = 0  # unobserved
    Xr, inl, err = robust_triangulate(P, noisy, conf, 15.0)
    assert not inl[2, :10].any() and inl[2, 10:].all()
    assert not inl[4, 20:].any()
    assert np.linalg.norm(Xr - X, axis=1).max() < 2e-3
    # a point seen once cannot be triangulated
    conf1 = np.zeros((6, 1))
    conf1[0] = 1
    X1, inl1, _ = robust_triangulate(P, noisy[:, :1], conf1, 15.0)
    assert np.isnan(X1).all() and not inl1.any()


def test_similarity_and_rotations():
    rng = np.random.default_rng(1)
    R = Rotation.random(random_state=2).as_matrix()
    src = rng.normal(size=(10, 3))
    dst = 1.3 * src @ R.T + [0.1, -0.2, 0.3]
    s, R2, t = similarity_transform(src, dst)
    assert s == pytest.approx(1.3) and np.allclose(R2, R) and np.allclose(t, [0.1, -0.2, 0.3])
    _, R3, _ = similarity_transform(src, dst, with_scale=False)
    assert np.allclose(R3, R)
    import torch

    aa = matrix_to_axis_angle(R)
    np.testing.assert_allclose(axis_angle_to_matrix(torch.as_tensor(aa)).numpy(), R, atol=1e-10)
    assert torch.allclose(axis_angle_to_matrix(torch.zeros(3)), torch.eye(3))


# ---------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_keypoints_within_5mm_and_swaps_found(seed):
    """8 cameras, 3 px noise, 10 % joints missed, 10 % of views with swapped labels."""
    synth = synthetic.generate(views=8, size=(640, 480), seed=seed)
    assert synth.swapped_views
    state = pose_fit.run(synth.scan, State(), {})
    for side, e in _errors_mm(state, synth).items():
        assert e <= 5.0, f"{side}: {e:.2f} mm"
    m = state.metrics["pose_fit"]
    assert m["relabelled_views"] == synth.swapped_views
    _assignment_correct(state, synth)
    assert m["accepted_fraction"] > 0.9
    # 3 px noise per coordinate: the median distance of inliers is about 3.5 px
    assert 2.0 < m["reprojection_median_px"] < 5.0
    for side in ("left", "right"):
        assert not m["sides"][side]["handedness_conflict"]


def test_relabelling_duplicates_and_single_detections():
    """Every kind of label trouble at once: swapped views, a view reporting one hand under both
    labels, views that detect one hand only (with whichever label)."""
    synth = synthetic.generate(views=9, size=(640, 480), seed=4, swap_rate=0.3, duplicates=1, hand_miss_rate=0.3)
    assert len(synth.swapped_views) == 3 and synth.duplicated_views and synth.missing_hands
    state = pose_fit.run(synth.scan, State(), {})
    _assignment_correct(state, synth)
    m = state.metrics["pose_fit"]
    assert set(synth.swapped_views) <= set(m["relabelled_views"])
    dup = synth.duplicated_views[0]
    assert len([d for d in m["discarded_detections"] if d.startswith(dup + ":")]) == 1
    for side, e in _errors_mm(state, synth).items():
        assert e <= 5.0, f"{side}: {e:.2f} mm"


def test_outlier_joints_are_rejected():
    synth = synthetic.generate(views=8, size=(640, 480), seed=6, outliers=12, outlier_px=100.0)
    state = pose_fit.run(synth.scan, State(), {})
    _assignment_correct(state, synth)
    for view, side, j in synth.outliers:
        assert not state.accepted[view][side][j], (view, side, j)
    for side, e in _errors_mm(state, synth).items():
        assert e <= 5.0, f"{side}: {e:.2f} mm"


@pytest.mark.parametrize("swapped", [(0, 1), (2, 3), (1, 3)])
def test_tied_label_vote_is_decided_by_3d_handedness(swapped):
    """Two of four views swapped: the labels tie and the skeleton's handedness names the hands."""
    synth = synthetic.generate(views=4, size=(640, 480), seed=8, swap_rate=0.0, miss_rate=0.0, hand_miss_rate=0.0)
    truth = synth.hands.keypoints3d
    assert pose_fit.chirality(truth["left"]) > 0.1 and pose_fit.chirality(truth["right"]) < -0.1
    flip = {"left": "right", "right": "left"}
    views = [View(v.name, v.camera, keypoints={flip[k]: kp for k, kp in v.keypoints.items()}) if i in swapped else v
             for i, v in enumerate(synth.scan.views)]
    state = pose_fit.run(Scan(views, scan_id="t"), State(), {})
    changes = {views[i].name: {flip[k]: k for k in synth.scan.views[i].keypoints} for i in swapped}
    _assignment_correct(state, _with_truth(synth, changes))


def test_naming_weighs_labels_against_handedness():
    dets = [pose_fit.Detection(v, lab, np.zeros((21, 2)), np.ones(21)) for v in range(4) for lab in ("left", "right")]
    a = {0: 0, 1: 2, 2: 5, 3: 7}  # labelled left, left, right, right: a tie
    b = {0: 1, 1: 3, 2: 4, 3: 6}
    assert pose_fit.name_clusters([a, b], dets, ("left", "right"), [0.3, -0.3]) == ["left", "right"]
    assert pose_fit.name_clusters([a, b], dets, ("left", "right"), [-0.3, 0.3]) == ["right", "left"]
    c = {0: 0, 1: 2, 2: 4, 3: 7}  # three "left" labels out of four outvote a weak opposite cue
    d = {0: 1, 1: 3, 2: 5, 3: 6}
    assert pose_fit.name_clusters([c, d], dets, ("left", "right"), [-0.3, 0.3]) == ["left", "right"]
    assert pose_fit.name_clusters([c], dets, ("right",), [0.5]) == ["right"]


def _with_truth(synth: synthetic.SyntheticScan, changes: dict[str, dict[str, str]]) -> synthetic.SyntheticScan:
    det = {v: dict(d) for v, d in synth.detections.items()}
    det.update(changes)
    return synthetic.SyntheticScan(synth.scan, synth.hands, synth.cameras, synth.true_keypoints2d, det)


def test_one_hand_scan_and_metrics_in_original_pixels():
    synth = synthetic.generate(views=6, size=(640, 480), seed=2, sides=("right",), swap_rate=0.34)
    full = pose_fit.run(synth.scan, State(), {})
    _assignment_correct(full, synth)  # a one-hand scan's detections are that hand whatever the label
    assert full.keypoints3d_valid["right"].sum() >= 19 and "left" not in full.keypoints3d
    half_views = [View(v.name, v.camera.scaled(0.5), keypoints={k: kp * np.float32([0.5, 0.5, 1.0])
                                                                for k, kp in v.keypoints.items()})
                  for v in synth.scan.views]
    half = pose_fit.run(Scan(half_views, sides=("right",)), State(), {"data": {"scale": 0.5}})
    a, b = full.metrics["pose_fit"], half.metrics["pose_fit"]
    assert b["reprojection_median_px"] == pytest.approx(a["reprojection_median_px"], rel=0.02)
    assert b["inlier_threshold_px"] == pytest.approx(a["inlier_threshold_px"], rel=0.01)
    np.testing.assert_allclose(half.keypoints3d["right"], full.keypoints3d["right"], atol=2e-4)


def test_expected_hand_never_seen_is_reported_invalid():
    synth = synthetic.generate(views=5, size=(640, 480), seed=3, sides=("left",), swap_rate=0.0)
    scan = Scan(synth.scan.views, sides=("left", "right"))
    state = pose_fit.run(scan, State(), {})
    assert state.keypoints3d_valid["left"].sum() >= 19
    assert not state.keypoints3d_valid["right"].any()
    assert "right" not in state.metrics["pose_fit"]["sides"]


# ------------------------------------------------------------------------------------------ real
@needs_demo
def test_real_capture_two_hands_from_thirteen_views():
    """The demo's 20 detections fall into two hands; labels agree with the 3D handedness."""
    from capture.fmhr import read_fmhr

    scan = read_fmhr(DEMO, "1", load_images=False)
    state = pose_fit.run(scan, State(), {})
    m = state.metrics["pose_fit"]
    assert m["accepted_fraction"] >= 0.8
    assert m["reprojection_median_px"] <= 12.0
    for side in ("left", "right"):
        assert state.keypoints3d_valid[side].all()
        assert not m["sides"][side]["handedness_conflict"]
        length = np.linalg.norm(state.keypoints3d[side][12] - state.keypoints3d[side][0])
        assert 0.15 < length < 0.22, f"{side} hand length {length:.3f} m"
    assert len(m["sides"]["left"]["views"]) >= 8 and len(m["sides"]["right"]["views"]) >= 9
    # view 07 faces the person: "Left" is the person's left hand there too
    assert state.assignment["07"] == {"left": "left", "right": "right"}
