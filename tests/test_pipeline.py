"""Pipeline: order, checkpoints, resume after a crash or a kill, invalidation, timing, progress.

The stages here are stand-ins registered under the real stage names (so the real conf sections
drive their hashes); they record each call in a file so a test can tell what actually ran.
"""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fitting import pipeline as P
from fitting.conf import load_conf
from fitting.state import State
from handmodel.params import HandParams

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@dataclass
class FakeScan:
    calls: Path  # each stage appends its name: what ran, across processes


def _record(scan: FakeScan, name: str) -> None:
    with open(scan.calls, "a") as f:
        f.write(name + "\n")


def stage_keypoints(scan: FakeScan, state: State, conf) -> State:
    """Random (seeded by the pipeline) keypoints scaled by a conf value."""
    _record(scan, "pose_fit")
    k = torch.randn(21, 3) * float(conf["pose_fit"]["huber"])
    state.keypoints3d = {"right": k.numpy()}
    state.keypoints3d_valid = {"right": np.ones(21, bool)}
    state.metrics["pose_fit"] = {"reprojection_median_px": 1.5}
    return state


def stage_params(scan: FakeScan, state: State, conf) -> State:
    """Depends on the previous stage's output, a conf value and the seeded RNG."""
    _record(scan, "hand_fit")
    p = HandParams.zeros()
    p.transl = torch.as_tensor(state.keypoints3d["right"].mean(0))[None] * float(conf["hand_fit"]["lr_full"])
    p.betas = torch.randn(1, 10)
    state.params = {"right": p}
    state.metrics["hand_fit"] = {"losses": {"keypoints3d": 0.25}}
    if os.environ.get("HANDRECON_TEST_KILL") == "1":
        os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no exception handlers
    if os.environ.get("HANDRECON_TEST_CRASH") == "1":
        raise RuntimeError("simulated crash in hand_fit")
    return state


def registry() -> dict[str, P.StageSpec]:
    # string targets: resolved by import, as the real registry does
    return {
        "pose_fit": P.StageSpec("pose_fit", "test_pipeline:stage_keypoints", ("data",)),
        "hand_fit": P.StageSpec("hand_fit", "test_pipeline:stage_params", ("data", "hand_model")),
    }


def _tree(*overrides: str):
    """base.conf with the stand-ins' two stages (the real default also runs the GCN ``init``)."""
    return load_conf(REPO / "conf" / "base.conf",
                     ["log.progress=false", "pipeline.stages=[pose_fit, hand_fit]", *overrides]).tree


def _run(out: Path, calls: Path, *overrides: str, restart: bool = False) -> State:
    return P.run_pipeline(FakeScan(calls), _tree(*overrides), out, identity={"scan_id": "t"},
                          restart=restart, registry=registry())


def _calls(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


def _same(a: State, b: State) -> None:
    for side in a.keypoints3d:
        np.testing.assert_array_equal(a.keypoints3d[side], b.keypoints3d[side])
    assert a.params.keys() == b.params.keys()
    for side in a.params:
        for k, v in a.params[side].to_dict().items():
            assert torch.equal(v, b.params[side].to_dict()[k]), k
    strip = lambda m: {s: {k: v for k, v in d.items() if k not in ("time_s", "peak_mem_mb", "peak_gpu_mem_mb")} for s, d in m.items()}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.delenv("HANDRECON_TEST_KILL", raising=False)
    monkeypatch.delenv("HANDRECON_TEST_CRASH", raising=False)
    yield
    P.reset_logging()  # leave no handlers or levels behind for other test files


# ------------------------------------------------------------------------------------------ tests
def test_runs_in_order_writes_checkpoints_metrics_and_log(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    P.setup_logging(out, "INFO", console=False)
    state = _run(out, calls)
    assert _calls(calls) == ["pose_fit", "hand_fit"]
    for n, name in enumerate(["pose_fit", "hand_fit"]):
        pt = out / "stages" / f"{n:02d}_{name}.pt"
        assert pt.is_file() and pt.with_suffix(".json").is_file()
        m = state.metrics[name]
        assert m["time_s"] >= 0 and m["peak_mem_mb"] > 10
        payload = torch.load(pt, weights_only=True)  # plain tensors and records only
        assert payload["stage"] == name and len(payload["conf_hash"]) == 16
    import json

    js = json.loads((out / "stages" / "01_hand_fit.json").read_text())
    assert js["losses"] == {"keypoints3d": 0.25} and "time_s" in js
    assert state.metrics["pose_fit"]["reprojection_median_px"] == 1.5  # the stage's own metrics kept
    log = (out / "run.log").read_text()
    assert "stage 00 pose_fit: done in" in log and "stage 01 hand_fit: done in" in log
    assert not list((out / "stages").glob(".*tmp*"))


def test_second_run_resumes_everything(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    P.setup_logging(out, "INFO", console=False)
    first = _run(out, calls)
    second = _run(out, calls)
    assert _calls(calls) == ["pose_fit", "hand_fit"]
    _same(first, second)
    assert second.metrics["hand_fit"]["time_s"] == first.metrics["hand_fit"]["time_s"]
    assert (out / "run.log").read_text().count("resumed") == 2


def test_crash_in_stage_two_resumes_from_stage_one(tmp_path: Path, monkeypatch):
    reference = _run(tmp_path / "ref", tmp_path / "ref_calls.txt")
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    monkeypatch.setenv("HANDRECON_TEST_CRASH", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(out, calls)
    assert (out / "stages" / "00_pose_fit.pt").is_file()
    assert not (out / "stages" / "01_hand_fit.pt").exists()
    monkeypatch.delenv("HANDRECON_TEST_CRASH")
    resumed = _run(out, calls)
    assert _calls(calls) == ["pose_fit", "hand_fit", "hand_fit"]  # pose_fit ran once
    _same(reference, resumed)  # identical to an uninterrupted run (seeded per stage)


def test_killed_process_resumes_from_its_last_finished_stage(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    child = (
        "import sys; from pathlib import Path; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import test_pipeline as t\n"
        "t._run(Path(sys.argv[3]), Path(sys.argv[4]))\n"
    )
    env = {**os.environ, "HANDRECON_TEST_KILL": "1"}
    proc = subprocess.run([sys.executable, "-c", child, str(TESTS), str(REPO), str(out), str(calls)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # really killed inside hand_fit
    assert _calls(calls) == ["pose_fit", "hand_fit"]
    assert (out / "stages" / "00_pose_fit.pt").is_file()
    assert not (out / "stages" / "01_hand_fit.pt").exists()
    resumed = _run(out, calls)
    assert _calls(calls) == ["pose_fit", "hand_fit", "hand_fit"]
    _same(_run(tmp_path / "ref", tmp_path / "ref_calls.txt"), resumed)


def test_changed_conf_invalidates_that_stage_and_later(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    _run(out, calls)
    _run(out, calls, "hand_fit.lr_full=0.5")  # only hand_fit's section changed
    assert _calls(calls) == ["pose_fit", "hand_fit", "hand_fit"]
    s = _run(out, calls, "hand_fit.lr_full=0.5", "pose_fit.huber=2.0")  # upstream change: both
    assert _calls(calls)[3:] == ["pose_fit", "hand_fit"]
    _same(s, _run(tmp_path / "ref", tmp_path / "ref_calls.txt", "hand_fit.lr_full=0.5", "pose_fit.huber=2.0"))
    _run(out, calls, "hand_fit.lr_full=0.5", "pose_fit.huber=2.0", "log.level=DEBUG", "output.report=false")
    assert len(_calls(calls)) == 5  # logging/output keys do not invalidate anything
    _run(out, calls, "hand_fit.lr_full=0.5", "pose_fit.huber=2.0", "data.scale=0.5")
    assert _calls(calls)[5:] == ["pose_fit", "hand_fit"]  # declared dependency (data) invalidates


def test_identity_change_invalidates(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    tree = _tree()
    P.run_pipeline(FakeScan(calls), tree, out, identity={"scan_id": "a"}, registry=registry())
    P.run_pipeline(FakeScan(calls), tree, out, identity={"scan_id": "b"}, registry=registry())
    assert _calls(calls) == ["pose_fit", "hand_fit"] * 2


def test_restart_recomputes_everything(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    first = _run(out, calls)
    again = _run(out, calls, restart=True)
    assert _calls(calls) == ["pose_fit", "hand_fit"] * 2
    _same(first, again)


def test_recomputed_stage_drops_stale_later_checkpoints(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    _run(out, calls)
    (out / "stages" / "00_pose_fit.pt").unlink()  # e.g. removed by hand
    _run(out, calls)
    # hand_fit's old checkpoint matched its hash but was computed from the old pose_fit output
    assert _calls(calls) == ["pose_fit", "hand_fit"] * 2


def test_interrupted_checkpoint_write_leaves_no_file(tmp_path: Path, monkeypatch):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    real_save = torch.save

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        _run(out, calls)
    assert not (out / "stages" / "00_pose_fit.pt").exists()
    assert not [p for p in (out / "stages").iterdir()]
    monkeypatch.setattr(torch, "save", real_save)
    _run(out, calls)
    assert _calls(calls) == ["pose_fit", "pose_fit", "hand_fit"]


def test_corrupt_or_foreign_checkpoint_is_recomputed(tmp_path: Path):
    out, calls = tmp_path / "run", tmp_path / "calls.txt"
    _run(out, calls)
    (out / "stages" / "01_hand_fit.pt").write_bytes(b"not a checkpoint")
    _run(out, calls)
    assert _calls(calls) == ["pose_fit", "hand_fit", "hand_fit"]


def test_numpy_values_in_state_still_resume(tmp_path: Path):
    """numpy scalars/arrays in metrics or records must not make a checkpoint unloadable."""
    calls = tmp_path / "c.txt"

    def np_stage(scan, state, conf):
        _record(scan, "pose_fit")
        state.metrics["pose_fit"] = {"err": np.float64(1.5), "n": np.int64(3), "per_view": np.arange(3.0)}
        state.neural = {"table": {"a": np.float32(2.0)}}
        return state

    reg = {"pose_fit": P.StageSpec("pose_fit", np_stage)}
    tree = _tree("pipeline.stages=[pose_fit]")
    first = P.run_pipeline(FakeScan(calls), tree, tmp_path / "o", registry=reg)
    second = P.run_pipeline(FakeScan(calls), tree, tmp_path / "o", registry=reg)
    assert _calls(calls) == ["pose_fit"]
    assert second.metrics["pose_fit"]["err"] == 1.5 and first.metrics["pose_fit"]["n"] == 3
    assert torch.equal(second.metrics["pose_fit"]["per_view"], torch.arange(3.0, dtype=torch.float64))

    def bad_stage(scan, state, conf):
        state.neural = {"net": object()}
        return state

    with pytest.raises(TypeError, match=r"state.neural.net is a object"):
        P.run_pipeline(FakeScan(calls), tree, tmp_path / "b", registry={"pose_fit": P.StageSpec("pose_fit", bad_stage)})


def test_unknown_stage_and_bad_return(tmp_path: Path):
    from fitting.conf import ConfError

    with pytest.raises(ConfError, match="unknown stage 'ham'.*known stages"):
        _run(tmp_path / "a", tmp_path / "c.txt", "pipeline.stages=[pose_fit, ham]")
    reg = {"pose_fit": P.StageSpec("pose_fit", lambda scan, state, conf: None)}
    with pytest.raises(TypeError, match="expected State"):
        P.run_pipeline(FakeScan(tmp_path / "c.txt"), _tree("pipeline.stages=[pose_fit]"), tmp_path / "b", registry=reg)
    missing = {"pose_fit": P.StageSpec("pose_fit", "no_such_module_xyz:run")}
    with pytest.raises(ConfError, match="cannot import no_such_module_xyz"):
        P.run_pipeline(FakeScan(tmp_path / "c.txt"), _tree("pipeline.stages=[pose_fit]"), tmp_path / "d", registry=missing)


def test_default_registry_names_the_real_stages():
    assert {"pose_fit", "hand_fit"} <= set(P.REGISTRY)
    assert callable(P.REGISTRY["pose_fit"].resolve())


def test_peak_memory_sees_a_large_allocation(tmp_path: Path):
    def hungry(scan, state, conf):
        import mmap

        # 40 MB of fresh pages, touched (a malloc could reuse resident free heap and not grow RSS)
        m = mmap.mmap(-1, 40 * 2**20)
        a = np.frombuffer(m, dtype=np.uint8)
        a[::4096] = 1
        state.metrics["pose_fit"] = {"touched": int(a.sum())}
        del a
        m.close()
        return state

    def light(scan, state, conf):
        return state

    reg = {"pose_fit": P.StageSpec("pose_fit", hungry), "hand_fit": P.StageSpec("hand_fit", light)}
    before = P._rss_mb()
    s = P.run_pipeline(FakeScan(tmp_path / "c.txt"), _tree(), tmp_path / "o", registry=reg)
    assert s.metrics["pose_fit"]["peak_mem_mb"] >= before + 30
    assert s.metrics["hand_fit"]["peak_mem_mb"] < s.metrics["pose_fit"]["peak_mem_mb"] - 20 or not P._reset_hwm()


def test_setup_logging_does_not_duplicate_handlers(tmp_path: Path):
    P.setup_logging(tmp_path / "a", "INFO", console=False)
    lg = P.setup_logging(tmp_path / "b", "DEBUG", console=False)
    assert sum(isinstance(h, logging.FileHandler) for h in lg.handlers) == 1
    lg.debug("hello")
    logging.getLogger("capture.fmhr").warning("from a reader")  # project modules log by __name__
    assert "hello" in (tmp_path / "b" / "run.log").read_text()
    assert "from a reader" in (tmp_path / "b" / "run.log").read_text()
    assert logging.getLogger("capture.fmhr").propagate  # an application's / pytest's handlers still see it
    P.reset_logging()
    assert not [h for h in logging.getLogger("capture").handlers if getattr(h, "_handrecon", False)]
    assert logging.getLogger("capture").level == logging.NOTSET
    assert "hello" not in (tmp_path / "a" / "run.log").read_text()
    from fitting.conf import ConfError

    with pytest.raises(ConfError, match="log.level"):
        P.setup_logging(None, "LOUD")


# -------------------------------------------------------------------------------------- progress
class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_loss_terms_on_a_tty(monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    P.set_progress_enabled(True)
    bar = P.progress(range(3), "fit", enabled=None, mininterval=0)
    assert bar.active
    for i in bar:
        bar.losses(data=torch.tensor(0.5 * (i + 1)), prior=0.01)
    text = fake.getvalue()
    assert "fit" in text and "data=1.5" in text and "prior=0.01" in text
    assert bar.steps == 3


def test_progress_is_quiet_off_a_tty_or_when_disabled(monkeypatch):
    plain = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", plain)
    P.set_progress_enabled(True)
    bar = P.progress(range(4), "quiet")
    assert not bar.active
    assert [i for i in bar] == [0, 1, 2, 3]
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    P.set_progress_enabled(False)  # log.progress = false
    try:
        bar = P.progress(range(2), "off")
        for _ in bar:
            bar.losses(x=torch.tensor(1.0))
        assert not bar.active and tty.getvalue() == ""
    finally:
        P.set_progress_enabled(True)


# ------------------------------------------------------------------------------------------ fit.py
def _fit(argv: list[str], capsys) -> tuple[int, str]:
    import fit

    rc = fit.main(argv)
    return rc, capsys.readouterr().err


def test_fit_reports_input_errors_in_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = str(REPO / "conf" / "demo_sfs.conf")
    rc, err = _fit(["--conf", conf, "--set", "hand_fit.lr_fulll=1"], capsys)
    assert rc == 2 and "unknown conf key 'hand_fit.lr_fulll'" in err and "hand_fit.lr_full'" in err
    assert "Traceback" not in err
    rc, err = _fit(["--conf", str(tmp_path / "nope.conf")], capsys)
    assert rc == 2 and "nope.conf not found" in err
    rc, err = _fit(["--conf", conf, "--data_path", "missing_dir"], capsys)
    assert rc == 2 and str(tmp_path / "missing_dir") in err  # relative to the CWD
    (tmp_path / "empty").mkdir()
    rc, err = _fit(["--conf", conf, "--data_path", "empty", "--scan_id", "3"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ScanError: ") and "Traceback" not in err


def test_fit_default_data_path_is_the_embedded_demo_data(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _fit(["--conf", str(REPO / "conf" / "demo_sfs.conf"), "--scan_id", "no_such_scan"], capsys)
    assert rc == 2
    assert str(REPO / "demo_data") in err  # resolved against the repo root, not the CWD


def test_fit_end_to_end_on_the_demo_capture(fmhr_demo_path: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the real capture through the main conf, cut short: ham has its own tests
    quick = ["--set", "data.scale=0.25", "--set", "hand_fit.iterations_global=2",
             "--set", "hand_fit.iterations_full=3", "--set", "log.progress=false",
             "--set", "pipeline.stages=[pose_fit, init, hand_fit, silhouette_fit]",
             "--set", "silhouette_fit.iterations=3"]
    argv = ["--conf", str(REPO / "conf" / "demo_sfs.conf"), "--data_path", str(fmhr_demo_path), *quick]
    rc, err = _fit(argv, capsys)
    assert rc == 0, err
    out = tmp_path / "runs" / "demo_sfs" / "1"  # the default out dir, under the CWD
    for name in ("stages/00_pose_fit.pt", "stages/01_init.pt", "stages/02_hand_fit.pt", "metrics.json", "report.html", "run.log",
                 "keypoints3d.json", "hand_params.json", "hand_left.obj", "hand_right.ply", "hands.glb",
                 "conf.resolved.conf", "images/pose_fit/overlay_07.png", "images/silhouette_fit/overlay_07.png"):
        assert (out / name).is_file(), name
    import json

    m = json.loads((out / "metrics.json").read_text())["stages"]
    assert m["pose_fit"]["time_s"] > 0 and m["hand_fit"]["peak_mem_mb"] > 0
    assert m["pose_fit"]["reprojection_median_px"] < 30  # original 1280x1024 pixels
    assert m["hand_fit"]["start"] == "initializer"  # the GCN's prediction starts the hand fit by default
    first = (out / "stages" / "02_hand_fit.pt").stat().st_mtime_ns
    rc, err = _fit(argv, capsys)
    assert rc == 0 and (out / "stages" / "02_hand_fit.pt").stat().st_mtime_ns == first
    assert (out / "run.log").read_text().count("resumed") == 4
    # the MANO model is licensed and absent here: one clear line, exit 2
    monkeypatch.setenv("MANO_DIR", str(tmp_path / "no_mano"))
    rc, err = _fit([*argv, "--set", "hand_model.name=mano", "--out", str(tmp_path / "mano")], capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: HandModelFileNotFound: MANO model file not found")
    assert "stage 00 pose_fit" not in err  # checked before any stage runs


def test_fit_reads_interhand_through_its_conf(tmp_path: Path, capsys, monkeypatch):
    """conf/ih_sfs.conf end to end on a tiny InterHand2.6M tree (the capture tests' fixture):
    the keypoints are projections of the annotations, so pose_fit must give them back."""
    from test_capture import write_interhand_fixture

    from export.params_io import load_keypoints3d
    from fitting.conf import ConfError

    write_interhand_fixture(tmp_path / "ih")
    monkeypatch.chdir(tmp_path)
    argv = ["--conf", str(REPO / "conf" / "ih_sfs.conf"), "--data_path", "ih", "--scan_id", "1",
            "--set", "pipeline.stages=[pose_fit]", "--set", "pose_fit.min_joints=4", "--out", "o"]
    rc, err = _fit(argv, capsys)
    assert rc == 0, err
    joints, valid = load_keypoints3d(tmp_path / "o" / "keypoints3d.npz")
    from capture.interhand import read_interhand

    gt = read_interhand(tmp_path / "ih", "test", 1, load_images=False).gt
    for side in ("left", "right"):
        ok = valid[side] & gt.keypoints_valid[side]
        assert ok.sum() >= 10
        np.testing.assert_allclose(joints[side][ok], gt.keypoints3d[side][ok], atol=1e-4)
    tree = load_conf(REPO / "conf" / "ih_sfs.conf").tree
    with pytest.raises(ConfError, match="frame numbers"):
        P.read_scan(tree, tmp_path / "ih", "abc")
    assert P.scan_identity(tree, "ih", "1")["split"] == "test"


def test_fit_on_a_synthetic_scan_recovers_its_keypoints(tmp_path: Path, capsys, monkeypatch):
    """data.format = synthetic: known answers in, the same answers out of pose_fit."""
    from synthetic import generate, write_synthetic

    from export.params_io import load_keypoints3d

    synth = generate(views=5, size=(160, 120), seed=3, noise_px=0.0, miss_rate=0.0, hand_miss_rate=0.0,
                     swap_rate=0.0)
    write_synthetic(synth, tmp_path / "syn", "7")
    monkeypatch.chdir(tmp_path)
    rc, err = _fit(["--conf", str(REPO / "conf" / "demo_sfs.conf"), "--data_path", "syn", "--scan_id", "7",
                    "--set", "data.format=synthetic", "--set", "data.scale=1.0", "--set", "pipeline.stages=[pose_fit]",
                    "--out", "o"], capsys)
    assert rc == 0, err
    joints, valid = load_keypoints3d(tmp_path / "o" / "keypoints3d.json")
    gt = P.read_scan(load_conf(REPO / "conf" / "base.conf", ["data.format=synthetic"]).tree, tmp_path / "syn", "7").gt
    for side in gt.keypoints3d:
        assert valid[side].all()
        np.testing.assert_allclose(joints[side], gt.keypoints3d[side], atol=1e-6)  # noise-free detections


def test_data_width_becomes_one_scale_for_every_stage():
    """data.width fits at that width whatever the capture: it resolves to data.scale once."""
    from pathlib import Path

    import fit
    from fitting.conf import load_conf

    repo = Path(__file__).resolve().parents[1]
    conf = load_conf(repo / "conf" / "demo_sfs.conf", ["data.width=160"])
    fit.resolve_scale(conf.tree, repo / "demo_data", "1")
    assert float(conf.tree["data"]["scale"]) == 160 / 320
    conf0 = load_conf(repo / "conf" / "demo_sfs.conf", ["data.width=0", "data.scale=0.75"])
    fit.resolve_scale(conf0.tree, repo / "demo_data", "1")
    assert float(conf0.tree["data"]["scale"]) == 0.75
