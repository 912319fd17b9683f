"""Identity calibration, test-time optimisation, synthetic sequences, the confidence head and the
sequence CLI (fit.py --scan_id A-B)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import handmodel
from fitting import conf as C
from fitting import metrics as M
from fitting.identity import (GCN_SIZE_PRIOR, Calibration, IdentityConf, calibrate, fit_size_prior, load_identity, save_identity,
                              shape_distances_mm, shape_error_mm)
from fitting.sequence import parse_scan_range
from fitting.tto import SequenceTargets, TTOConf, fit_sequence, neighbour_pairs
from handmodel.params import HandParams
from synthetic.sequence import DetectionModel, catmull_rom, generate_sequence, load_sequence_truth, write_sequence

TEST_SEED = 300000  # confidence training uses 100000+ / 200000+, scripts/eval_identity.py 400000+


@pytest.fixture(scope="module")
def right() -> handmodel.HandModel:
    return handmodel.load("builtin", "right")


@pytest.fixture(scope="module")
def predictor():
    from networks.predictor import GCNPredictor

    return GCNPredictor.load()


# ---------------------------------------------------------------------------------- calibration
def _estimates(rng: np.random.Generator, truth: np.ndarray, n_good: int, n_bad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Good frames near the truth, bad frames far off (all in one direction, like a biased
    detector), confidences that mostly tell them apart (two bad frames are over-confident)."""
    good = truth + 0.15 * rng.normal(size=(n_good, 10))
    bad = truth + 3.0 + 0.5 * rng.normal(size=(n_bad, 10))
    conf = np.concatenate([rng.normal(0.0, 0.3, n_good), rng.normal(-2.0, 0.3, n_bad)])
    conf[n_good : n_good + 2] = 0.5
    is_bad = np.r_[np.zeros(n_good, bool), np.ones(n_bad, bool)]
    return np.concatenate([good, bad]), conf, is_bad


def test_calibration_downweights_outlier_frames(right: handmodel.HandModel) -> None:
    rng = np.random.default_rng(TEST_SEED)
    truth = rng.normal(size=10)
    betas, conf, is_bad = _estimates(rng, truth, 20, 8)
    cal = calibrate(right, betas, conf, IdentityConf())
    e_cal, e_mean = shape_error_mm(right, cal.betas, truth), shape_error_mm(right, cal.plain_mean, truth)
    assert e_mean > 5.0, "the bad frames must hurt the plain mean for the test to mean anything"
    assert e_cal < 0.3 * e_mean, (e_cal, e_mean)
    np.testing.assert_allclose(cal.plain_mean, betas.mean(0), atol=1e-5)
    assert cal.weights.sum() == pytest.approx(1.0) and cal.weights[is_bad].sum() < 0.05
    # robustness alone (no confidences) and the trimmed mean beat the plain mean too
    no_conf = calibrate(right, betas, None, IdentityConf())
    trimmed = calibrate(right, betas, conf, IdentityConf(robust="trim", trim_fraction=0.3))
    for c in (no_conf, trimmed):
        assert shape_error_mm(right, c.betas, truth) < 0.3 * e_mean
    # confidences alone trust the two over-confident bad frames: what the robust step is for
    only_conf = calibrate(right, betas, conf, IdentityConf(robust="none"))
    assert only_conf.weights[20:22].sum() > 20 * cal.weights[20:22].sum()
    assert shape_error_mm(right, only_conf.betas, truth) > 5 * e_cal


def _size_biased_sequences(rng: np.random.Generator, n: int, frames: int = 30) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(truth, per-frame betas, confidences) of ``n`` sequences from a predictor like the GCN
    seen from one view: proportions (betas 1-9) right up to small noise; the size (beta 0) weakly
    informed (half the true value), biased (+0.7), with a per-sequence and a large per-frame error;
    confidences that prefer frames whose size is near the predictor's usual one."""
    out = []
    for _ in range(n):
        truth = np.clip(rng.normal(size=10), -2.0, 2.0)
        betas = truth + 0.1 * rng.normal(size=(frames, 10))
        betas[:, 0] = 0.5 * truth[0] + 0.7 + 0.2 * rng.normal() + 0.8 * rng.normal(size=frames)
        conf = -np.abs(betas[:, 0] - 0.7) + 0.1 * rng.normal(size=frames)
        out.append((truth, betas, conf))
    return out


def test_size_prior_recovers_size_the_confidences_discard(right: handmodel.HandModel) -> None:
    """Confidences that favour the usual size pull the weighted size to it; the size prior fitted on
    training sequences (posterior mean of beta 0 given the plain mean) beats the weighted estimate
    and the plain mean on held-out ones, and keeps the weighted proportions."""
    rng = np.random.default_rng(TEST_SEED + 7)
    train, test = _size_biased_sequences(rng, 300), _size_biased_sequences(rng, 100)
    prior = fit_size_prior([b for _, b, _ in train], np.array([t for t, _, _ in train]))
    # regression of the truth on the plain mean: cov / var = 0.5 * 0.88 / (0.25 * 0.88 + 0.04 + 0.64 / 30) ~ 1.57
    assert 1.3 < prior.gain < 1.9 and -1.4 < prior.offset < -0.8, prior
    errs = []
    for truth, betas, conf in test:
        cal = calibrate(right, betas, conf, IdentityConf(), size_prior=prior)
        assert cal.betas_weighted is not None
        np.testing.assert_allclose(cal.betas[1:], cal.betas_weighted[1:])
        assert cal.betas[0] == pytest.approx(prior.gain * betas[:, 0].mean() + prior.offset, abs=1e-5)
        errs.append([shape_error_mm(right, b, truth) for b in (cal.betas, cal.betas_weighted, cal.plain_mean)])
    e_prior, e_weighted, e_plain = np.mean(errs, 0)
    assert e_prior < 0.6 * e_weighted and e_prior < 0.7 * e_plain, (e_prior, e_weighted, e_plain)
    with pytest.raises(ValueError, match="at least 3"):
        fit_size_prior([np.zeros((4, 10))] * 2, np.zeros((2, 10)))


def test_gcn_size_prior_corrects_the_predictors_size_on_held_out_sequences(predictor) -> None:
    """The committed size prior with the committed GCN on one-view sequences no fit used: the plain
    mean's beta 0 is biased (hands predicted small), the prior removes most of that bias and has a
    smaller squared beta 0 error than the weighted robust estimate and the plain mean."""
    from fitting.sequence import predict_side, side_frames

    model = handmodel.load("builtin", "right")
    d = []
    for i in range(24):
        side = "right" if i % 2 == 0 else "left"
        seq = generate_sequence(30, 1, seed=TEST_SEED + 400 + i, sides=(side,))
        frames = side_frames([seq.scan(f, str(f)) for f in range(30)], side)
        init, _, score, _ = predict_side(frames, side, "", "")
        cal = calibrate(model, init.betas, score, IdentityConf(), size_prior=GCN_SIZE_PRIOR)
        t0 = seq.betas[side][0]
        d.append([cal.betas[0] - t0, cal.betas_weighted[0] - t0, cal.plain_mean[0] - t0])
    d = np.array(d)
    bias, mse = d.mean(0), (d**2).mean(0)
    assert bias[2] > 0.4 and abs(bias[0]) < 0.5 * bias[2], bias
    assert mse[0] < 0.9 * mse[1] and mse[0] < 0.75 * mse[2], mse


def test_shape_distances_are_vertex_distances(right: handmodel.HandModel) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 10)), rng.normal(size=10)
    d = shape_distances_mm(right, a, b)
    with torch.no_grad():
        va = right.rest_vertices(torch.as_tensor(a, dtype=torch.float32)).double()
        vb = right.rest_vertices(torch.as_tensor(b[None], dtype=torch.float32)).double()
    rms = ((va - vb) ** 2).sum(-1).mean(-1).sqrt().numpy() * 1000
    np.testing.assert_allclose(d, rms, rtol=1e-3)
    assert shape_error_mm(right, b, b) == pytest.approx(0.0, abs=1e-6)


def test_identity_files_round_trip(tmp_path: Path, right: handmodel.HandModel) -> None:
    rng = np.random.default_rng(2)
    cal = calibrate(right, rng.normal(size=(5, 10)), rng.normal(size=5))
    j, n = save_identity(tmp_path / "identity", {"right": cal})
    for path in (j, n):
        got = load_identity(path)
        assert set(got) == {"right"}
        np.testing.assert_allclose(got["right"], cal.betas, atol=1e-7)
    doc = json.loads(j.read_text())
    assert len(doc["hands"]["right"]["weights"]) == 5
    with pytest.raises(FileNotFoundError):
        load_identity(tmp_path / "missing.json")


# -------------------------------------------------------------------------------------- sequences
def test_synthetic_sequence_is_one_smooth_person(tmp_path: Path) -> None:
    seq = generate_sequence(16, 2, seed=TEST_SEED, sides=("left", "right"), size=(160, 120), masks=True)
    assert seq.sides == ("left", "right") and seq.num_frames == 16 and len(seq.cameras) == 2
    for s in seq.sides:
        b = seq.params[s].betas.numpy()
        assert np.allclose(b, b[0]), "one person: the same shape in every frame"
        J = seq.keypoints3d[s]
        acc = np.linalg.norm(J[2:] - 2 * J[1:-1] + J[:-2], axis=-1).max()
        shuffled = J[np.random.default_rng(0).permutation(16)]
        acc_shuffled = np.linalg.norm(shuffled[2:] - 2 * shuffled[1:-1] + shuffled[:-2], axis=-1).max()
        assert acc < 0.02 and acc < 0.2 * acc_shuffled, "smooth motion: small joint accelerations"
        assert np.ptp(J[:, 0], axis=0).max() > 0.01, "but it does move"
        assert seq.detections[s].shape == (16, 2, 21, 3)
    sig = np.concatenate([seq.sigma_px[s].ravel() for s in seq.sides])
    assert sig.max() > 3 * np.median(sig), "detection quality varies from frame to frame"
    assert seq.masks is not None and seq.masks.shape == (16, 2, 120, 160) and seq.masks.any()
    ids = write_sequence(seq, tmp_path, first_id=5)
    assert ids[0] == "5" and ids[-1] == "20"
    from synthetic import read_synthetic

    scan = read_synthetic(tmp_path, "9")
    assert scan.sides == ("left", "right") and scan.views[0].mask is not None
    np.testing.assert_allclose(scan.views[1].keypoints["right"][:, :2], seq.detections["right"][4, 1, :, :2], atol=1e-3)
    np.testing.assert_allclose(scan.gt.hand_params["left"]["betas"], seq.betas["left"], atol=1e-6)
    assert load_sequence_truth(tmp_path)["scan_ids"] == ids


def test_catmull_rom_passes_through_keys() -> None:
    keys = np.array([[0.0], [1.0], [3.0], [2.0]])
    out = catmull_rom(keys, 13, 4)
    np.testing.assert_allclose(out[[0, 4, 8, 12], 0], keys[:, 0])


def test_parse_scan_range() -> None:
    assert parse_scan_range("3-6") == ["3", "4", "5", "6"]
    assert parse_scan_range("008-011") == ["008", "009", "010", "011"]
    assert parse_scan_range("12") is None and parse_scan_range("a-b") is None and parse_scan_range(None) is None
    with pytest.raises(C.ConfError):
        parse_scan_range("9-3")


# -------------------------------------------------------------------------------------------- TTO
def _targets(seq, side: str) -> SequenceTargets:
    F, V = seq.num_frames, len(seq.cameras)
    det = torch.as_tensor(seq.detections[side])
    stack = lambda key: torch.as_tensor(np.stack([getattr(c, key) for c in seq.cameras]), dtype=torch.float32)[None].expand(F, V, *np.shape(getattr(seq.cameras[0], key)))  # noqa: E731
    return SequenceTargets(det[..., :2], det[..., 2], stack("K"), stack("R"), stack("t"), torch.arange(F))


def test_neighbours_follow_frame_numbers() -> None:
    pairs, triples = neighbour_pairs(torch.tensor([0, 1, 2, 4, 5]))
    assert pairs.tolist() == [[0, 1], [1, 2], [3, 4]] and triples.tolist() == [[0, 1, 2]]


def test_tto_lowers_mpjpe_of_a_short_sequence(right: handmodel.HandModel, predictor) -> None:
    """Raw per-frame GCN predictions of a 2-view, 10-frame sequence, then TTO with the true shape."""
    torch.manual_seed(0)
    seq = generate_sequence(10, 2, seed=TEST_SEED + 1)
    tg = _targets(seq, "right")
    views = {"uv": tg.uv, "weights": tg.weight, "K": tg.K, "R": tg.R, "t": tg.t}
    p = predictor.predict_2d(tg.uv[:, 0], tg.weight[:, 0], tg.K[:, 0], "right", tg.R[:, 0], tg.t[:, 0], views=views)
    gt = seq.keypoints3d["right"]
    before = np.mean([M.mpjpe(p.joints[f], gt[f]) for f in range(10)])
    r = fit_sequence(right, torch.as_tensor(seq.betas["right"]), p.params, tg, TTOConf(iterations=60, iterations_transl=10))
    with torch.no_grad():
        J = right(r.params).joints
    after = np.mean([M.mpjpe(J[f], gt[f]) for f in range(10)])
    assert after < 0.7 * before, (before, after)
    assert torch.allclose(r.params.betas, torch.as_tensor(seq.betas["right"]).expand(10, -1)), "the shape stays fixed"
    assert r.reprojection_after_px < r.reprojection_before_px


def test_shape_refinement_recovers_size_from_two_views(right: handmodel.HandModel) -> None:
    """With the shape freed (identity refinement), two calibrated views pin the hand's size."""
    seq = generate_sequence(8, 2, seed=TEST_SEED + 2, detection=DetectionModel(bad_frame_rate=0.0, occluded_frame_rate=0.0, outlier_rate=0.0))
    tg = _targets(seq, "right")
    truth = seq.params["right"]
    wrong = torch.as_tensor(seq.betas["right"]) + torch.as_tensor(np.random.default_rng(3).normal(0, 0.8, 10), dtype=torch.float32)
    init = HandParams(wrong.expand(8, -1), truth.hand_pose + 0.05, truth.global_orient, truth.transl)
    r = fit_sequence(right, wrong, init, tg, TTOConf(iterations=80, iterations_transl=0), shape_anchor=1e-4)
    e0, e1 = shape_error_mm(right, wrong, seq.betas["right"]), shape_error_mm(right, r.params.betas[0], seq.betas["right"])
    assert e1 < 0.5 * e0, (e0, e1)


def test_tto_silhouette_term_runs_on_masks(right: handmodel.HandModel) -> None:
    seq = generate_sequence(3, 1, seed=TEST_SEED + 3, size=(96, 72), masks=True)
    tg = _targets(seq, "right")
    tg.masks = torch.as_tensor(seq.masks.astype(np.float32))
    tg.mask_weight = torch.ones(3, 1)
    tg.cameras = [list(seq.cameras) for _ in range(3)]
    truth = seq.params["right"]
    init = HandParams(truth.betas, truth.hand_pose, truth.global_orient, truth.transl + torch.tensor([0.004, 0.0, 0.0]))
    w = {"reprojection": 0.0, "pose_prior": 0.0, "temporal": 0.0, "acceleration": 0.0, "silhouette": 1.0}
    r = fit_sequence(right, truth.betas[0], init, tg, TTOConf(iterations=15, iterations_transl=0, weights=w), "cpu")
    assert "silhouette" in r.losses["full"] and np.isfinite(r.losses["full"]["silhouette"])


# ------------------------------------------------------------------------------------ confidence
def test_confidence_head_ranks_held_out_frames(predictor) -> None:
    """The committed head on sequences no training or validation used: Spearman(-score, shape
    error) over all frames > 0.3."""
    from networks.confidence import ConfidenceHead, predict_with_confidence, shape_error_mm as errors, spearman

    head = ConfidenceHead.load()
    scores, errs = [], []
    for i in range(12):
        seq = generate_sequence(25, 1, seed=TEST_SEED + 100 + i)
        tg = _targets(seq, "right")
        p, s = predict_with_confidence(predictor, head, tg.uv[:, 0], tg.weight[:, 0], tg.K[:, 0], "right", tg.R[:, 0], tg.t[:, 0])
        scores.append(s)
        errs.append(errors(predictor.models["right"], p.params.betas, torch.as_tensor(seq.betas["right"])[None]))
    rho = spearman(-torch.cat(scores), torch.cat(errs))
    assert rho > 0.3, rho


# ------------------------------------------------------------------------------------------- conf
@pytest.mark.parametrize("section, cls", [("identity", IdentityConf), ("tto", TTOConf)])
def test_base_conf_sections_match_the_dataclasses(section: str, cls: type) -> None:
    """Like tests/test_conf.py does for the stages: every field in base.conf with its default."""
    base = C.load_base()
    fields = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default) for f in dataclasses.fields(cls)}
    assert set(base[section]) == set(fields)
    for k, v in fields.items():
        assert C.to_plain(base[section][k]) == v, k
    assert dataclasses.asdict(cls.from_tree(C.load_conf(C.CONF_DIR / "identity.conf").tree)) is not None


def test_unknown_tto_term_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown terms"):
        TTOConf.from_tree({"tto": {"weights": {"velocity": 1.0}}})
    with pytest.raises(ValueError, match="identity.robust"):
        IdentityConf.from_tree({"identity": {"robust": "median"}})


# ---------------------------------------------------------------------------------------- the CLI
def test_sequence_cli_end_to_end(tmp_path: Path) -> None:
    """scripts/make_synthetic_sequence.py writes a folder, fit.py --scan_id A-B fits it, and the
    calibrated shape is taken by a later run."""
    import fit
    from conftest import load_script

    data = tmp_path / "data"
    script = load_script("make_synthetic_sequence")
    assert script.main(["--out", str(data), "--frames", "4", "--seed", str(TEST_SEED + 4), "--size", "160x120"]) == 0
    assert load_sequence_truth(data)["scan_ids"] == ["0", "1", "2", "3"]
    out = tmp_path / "out"
    quick = ["tto.iterations=20", "tto.iterations_transl=5", "log.progress=false"]
    args = ["--conf", str(C.CONF_DIR / "identity.conf"), "--data_path", str(data), "--scan_id", "0-3", "--out", str(out)]
    assert fit.main(args + sum((["--set", q] for q in quick), [])) == 0
    for f in range(4):
        assert (out / "frames" / str(f) / "hand_right.ply").is_file()
        assert (out / "frames" / str(f) / "hand_params.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    rec = metrics["sides"]["right"]
    assert rec["frames"] == 4 and len(rec["calibration"]["confidence"]) == 4
    gt = rec["gt"]
    assert set(gt["shape_error_mm"]) >= {"per_frame_mean", "plain_mean", "calibrated"}
    assert gt["mpjpe_mm"]["raw"] > 0 and gt["mpjpe_mm"]["tto"] > 0
    cal = load_identity(out / "identity.json")["right"]
    np.testing.assert_allclose(cal, rec["calibration"]["betas"], atol=1e-4)
    # a later run takes the calibrated shape instead of calibrating
    out2 = tmp_path / "out2"
    args2 = ["--conf", str(C.CONF_DIR / "identity.conf"), "--data_path", str(data), "--scan_id", "2-3", "--out", str(out2),
             "--set", f"identity.betas_file={out / 'identity.json'}"]
    assert fit.main(args2 + sum((["--set", q] for q in quick), [])) == 0
    params = json.loads((out2 / "frames" / "3" / "hand_params.json").read_text())
    np.testing.assert_allclose(params["hands"]["right"]["betas"], cal, atol=1e-5)
    # a bad range is one line and exit code 2
    assert fit.main(["--conf", str(C.CONF_DIR / "identity.conf"), "--data_path", str(data), "--scan_id", "3-1"]) == 2


def test_identity_stage_fixes_a_single_frame_fit(tmp_path: Path, right: handmodel.HandModel) -> None:
    """pipeline [pose_fit, init, identity, hand_fit] with hand_fit.betas_lr_scale = 0 (identity.conf)
    keeps the calibrated shape through a multi-view single-frame fit."""
    from fitting.pipeline import run_pipeline
    from synthetic import generate

    synth = generate(views=4, size=(160, 120), seed=TEST_SEED + 5, sides=("right",), swap_rate=0.0, hand_miss_rate=0.0)
    betas = synth.hands.params["right"].betas[0].numpy() + 0.3
    cal = Calibration(betas=betas.astype(np.float32), plain_mean=betas, weights=np.ones(1), prior_weights=np.ones(1), distances_mm=np.zeros(1))
    path, _ = save_identity(tmp_path / "identity", {"right": cal})
    conf = C.load_conf(C.CONF_DIR / "identity.conf", [f"identity.betas_file={path}", "hand_fit.iterations_full=20",
                                                       "hand_fit.iterations_global=5", "log.progress=false"])
    state = run_pipeline(synth.scan, conf.tree, tmp_path / "run")
    np.testing.assert_allclose(state.params["right"].betas[0].numpy(), betas, atol=1e-6)
    assert state.metrics["identity"]["sides"]["right"]["pose_from"] == "init"
    assert state.metrics["hand_fit"]["sides"]["right"]["mpjpe_mm"] < 15.0


def test_identity_stage_skips_a_side_without_3d_keypoints(tmp_path: Path) -> None:
    """One view gives pose_fit no 3D keypoints: the stage says so and puts no start in (no NaN)."""
    from fitting.pipeline import run_pipeline
    from synthetic import generate

    synth = generate(views=1, size=(160, 120), seed=TEST_SEED + 6, sides=("right",), swap_rate=0.0, hand_miss_rate=0.0)
    cal = Calibration(betas=np.zeros(10, np.float32), plain_mean=np.zeros(10), weights=np.ones(1), prior_weights=np.ones(1),
                      distances_mm=np.zeros(1))
    path, _ = save_identity(tmp_path / "identity", {"right": cal})
    conf = C.load_conf(C.CONF_DIR / "identity.conf", [f"identity.betas_file={path}", "log.progress=false"])
    state = run_pipeline(synth.scan, conf.tree, tmp_path / "run")
    assert "skipped" in state.metrics["identity"]["sides"]["right"]
    assert "right" not in state.params
