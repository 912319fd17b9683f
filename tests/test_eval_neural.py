"""scripts/eval_neural.py: the issue's criteria and the ceiling share from held-out records, the
table, and clear errors on bad arguments or a run without held-out figures."""
from __future__ import annotations

import json

import pytest
from conftest import load_script

EV = load_script("eval_neural")


def record(neural: float, shaded: float) -> dict:
    return {"neural_psnr_mean": neural, "shaded_psnr_mean": shaded, "neural_ssim_mean": 0.97, "shaded_ssim_mean": 0.95}


def test_criteria_need_both_thirty_db_and_two_db_of_gain():
    assert EV.summarise(record(30.5, 28.0))["meets_both"]
    low = EV.summarise(record(29.9, 27.0))  # +2.9 dB but under 30 dB
    assert low["meets_gain"] and not low["meets_psnr"] and not low["meets_both"]
    small = EV.summarise(record(31.0, 29.5))  # over 30 dB but +1.5
    assert small["meets_psnr"] and not small["meets_gain"]
    assert small["gain_db"] == pytest.approx(1.5)


def test_share_of_the_sheen_free_ceiling_is_in_squared_error():
    row = EV.summarise(record(30.0, 28.0), record(31.0, 30.5))
    m = lambda db: 10 ** (-db / 10)  # noqa: E731
    assert row["share"] == pytest.approx((m(28.0) - m(30.0)) / (m(28.0) - m(31.0)))
    assert 0.73 < row["share"] < 0.75
    assert row["ceiling_gain_db"] == pytest.approx(3.0)
    # a twin no better than the shading leaves no room: no share rather than a division by ~0
    assert EV.summarise(record(30.0, 28.0), record(27.5, 27.0))["share"] is None


def test_table_has_a_row_per_seed_in_order():
    rows = {11: EV.summarise(record(29.45, 28.19), record(30.49, 30.02)), 3: EV.summarise(record(32.68, 28.97))}
    text = EV.table(rows)
    lines = text.splitlines()
    assert lines[2].startswith("| 3 |") and lines[3].startswith("| 11 |")
    assert "+3.71 | yes | yes |" in lines[2]
    assert "+1.26 | no | no |" in lines[3] and "61 %" in lines[3]


def test_bad_holdout_names_the_valid_views(capsys):
    with pytest.raises(SystemExit) as e:
        EV.main(["--holdout", "02", "12", "--views", "12", "--out", "unused"])
    assert e.value.code == 2
    assert "views are named 00..11" in capsys.readouterr().err


def test_run_without_held_out_figures_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"stages": {"ham": {}}}))
    with pytest.raises(RuntimeError, match=r"metrics\.json has no held-out neural figures"):
        EV.run_fit(tmp_path, run, "conf/demo_neural.conf", [])


def test_mean_row_judges_the_criteria_on_the_mean_psnrs():
    rows = {3: EV.summarise(record(32.0, 29.0), record(33.0, 32.5)), 11: EV.summarise(record(29.0, 28.0), record(30.0, 29.5))}
    mean = EV.mean_row(rows)
    assert mean["neural_psnr"] == pytest.approx(30.5) and mean["shaded_psnr"] == pytest.approx(28.5)
    assert mean["meets_both"] and not rows[11]["meets_both"]
    assert mean["twin_neural_psnr"] == pytest.approx(31.5) and mean["ceiling_gain_db"] == pytest.approx(3.0)
    text = EV.table({**rows, "mean": mean}).splitlines()
    assert text[-1].startswith("| mean | 30.50") and text[2].startswith("| 3 |") and text[3].startswith("| 11 |")


def test_real_row_asks_neural_at_least_shaded_in_psnr_and_ssim():
    rec = {**record(21.1, 18.55), "views": {"03": {"neural": {"psnr": 23.6, "ssim": 0.88}, "shaded": {"psnr": 19.3, "ssim": 0.85}}}}
    row = EV.real_row(rec)
    assert row["meets"] and row["gain_db"] == pytest.approx(2.55) and row["views"]["03"]["neural"] == (23.6, 0.88)
    worse_ssim = {**record(21.1, 18.55), "neural_ssim_mean": 0.90, "shaded_ssim_mean": 0.91}
    assert not EV.real_row(worse_ssim)["meets"]


def test_missing_real_capture_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        EV.main(["--real", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "no scan folder 1" in capsys.readouterr().err
