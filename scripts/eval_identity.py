"""Held-out evaluation of identity calibration and test-time optimisation on synthetic sequences.

    python scripts/eval_identity.py [--sequences 20] [--shape-sequences 100] [--frames 30] [--views 1]
                                    [--timing-frames 100] [--threads 2] [--json runs/eval_identity.json]
    python scripts/eval_identity.py --fit-size-prior 2000   # refit fitting.identity.GCN_SIZE_PRIOR

Sequences: ``synthetic.sequence.generate_sequence`` (one person, smooth motion, default detection
model), seeds 400000+i — never used by the confidence head's training (100000+), validation
(200000+), the size prior's fit (600000+) or the tests (300000+). Each goes through the sequence
pipeline's own functions (``fitting.sequence``: per-frame GCN prediction + confidence,
``fitting.identity.calibrate`` with ``GCN_SIZE_PRIOR``, ``fitting.tto.fit_sequence``) with
``conf/identity.conf``'s settings.

Figures (mean over sequences):
- shape error (mm): mean-pose vertex error of the confidence-weighted robust calibration vs the
  plain mean of the per-frame betas vs the mean per-frame error, and the weighted robust estimate
  before the size prior set its beta 0; also after scaling each shape onto the truth (the part a
  single view can see: it cannot tell a hand's size from its distance);
- the same shape errors over ``--shape-sequences`` sequences (prediction + calibration only, cheap):
  one view cannot tell a hand's size from its distance, so the absolute shape error of a sequence
  depends much on how far its person's size (beta 0) lies from the mean, and 20 sequences give a
  noisy ratio;
- MPJPE / PA-MPJPE (mm) of the raw per-frame predictions vs after TTO;
- time of calibration + TTO for a ``--timing-frames`` sequence on ``--threads`` CPU threads.
Targets: calibrated <= 60 % of the mean per-frame shape error and below the plain mean; TTO
MPJPE <= 70 % of the raw; timing <= 300 s.

``--fit-size-prior N`` instead predicts N training sequences (seeds 600000+i, sides alternating,
the evaluation's generator and frame count) and prints the least-squares ``SizePrior``
(``fitting.identity.fit_size_prior``) to paste into ``fitting.identity.GCN_SIZE_PRIOR``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import handmodel  # noqa: E402
from fitting.conf import CONF_DIR, load_conf  # noqa: E402
from fitting.identity import GCN_SIZE_PRIOR, IdentityConf, calibrate, fit_size_prior, shape_error_mm  # noqa: E402
from fitting.sequence import SideResult, process_scans, scale_aligned_shape_error_mm  # noqa: E402
from synthetic.sequence import generate_sequence  # noqa: E402

EVAL_SEED = 400000
TIMING_SEED = 499999
SIZE_PRIOR_SEED = 600000


def evaluate_sequence(tree, seed: int, frames: int, views: int, side: str) -> dict[str, float]:
    """One held-out sequence through ``process_scans``; its shape and joint errors, plus the
    calibration's ablations (no confidence, confidence without the robust step)."""
    seq = generate_sequence(frames, views, seed=seed, sides=(side,))
    scans = [seq.scan(f, str(f)) for f in range(frames)]
    res = process_scans(tree, scans)[side]
    assert isinstance(res, SideResult)
    gt = res.record["gt"]
    model = handmodel.load("builtin", side)
    truth = seq.betas[side]
    icfg = IdentityConf.from_tree(tree)
    no_conf = calibrate(model, res.init.betas, None, icfg, size_prior=GCN_SIZE_PRIOR)
    conf_only = calibrate(model, res.init.betas, res.score, IdentityConf(**{**icfg.__dict__, "robust": "none"}), size_prior=GCN_SIZE_PRIOR)
    out = {
        "shape_per_frame_mm": gt["shape_error_mm"]["per_frame_mean"],
        "shape_plain_mean_mm": gt["shape_error_mm"]["plain_mean"],
        "shape_calibrated_mm": gt["shape_error_mm"]["calibrated"],
        "shape_weighted_no_size_prior_mm": gt["shape_error_mm"]["weighted_without_size_prior"],
        "shape_robust_no_confidence_mm": shape_error_mm(model, no_conf.betas, truth),
        "shape_confidence_no_robust_mm": shape_error_mm(model, conf_only.betas, truth),
        "shape_sa_per_frame_mm": gt["shape_error_scale_aligned_mm"]["per_frame_mean"],
        "shape_sa_plain_mean_mm": gt["shape_error_scale_aligned_mm"]["plain_mean"],
        "shape_sa_calibrated_mm": gt["shape_error_scale_aligned_mm"]["calibrated"],
        "shape_sa_weighted_no_size_prior_mm": gt["shape_error_scale_aligned_mm"]["weighted_without_size_prior"],
        "mpjpe_raw_mm": gt["mpjpe_mm"]["raw"],
        "mpjpe_tto_mm": gt["mpjpe_mm"]["tto"],
        "pa_mpjpe_raw_mm": gt["pa_mpjpe_mm"]["raw"],
        "pa_mpjpe_tto_mm": gt["pa_mpjpe_mm"]["tto"],
        "calibration_and_tto_s": res.record["time_s"]["calibration_and_tto"],
    }
    if "refined" in gt["shape_error_mm"]:
        out["shape_refined_mm"] = gt["shape_error_mm"]["refined"]
        out["shape_sa_refined_mm"] = gt["shape_error_scale_aligned_mm"]["refined"]
    if res.score is not None:
        from networks.confidence import shape_error_mm as per_frame_errors, spearman

        errs = per_frame_errors(model, res.init.betas, torch.as_tensor(truth)[None])
        out["confidence_spearman_within"] = spearman(-res.score, errs)
        out["_scores"], out["_errors"] = res.score.tolist(), errs.tolist()
    return out


def shape_only(tree, seed: int, frames: int, views: int, side: str) -> dict[str, float]:
    """Prediction + calibration alone (no TTO) of one held-out sequence: its shape errors."""
    from fitting.identity import resolve_path
    from fitting.sequence import predict_side, side_frames

    seq = generate_sequence(frames, views, seed=seed, sides=(side,))
    scans = [seq.scan(f, str(f)) for f in range(frames)]
    fr = side_frames(scans, side)
    icfg = IdentityConf.from_tree(tree)
    conf_path = (str(resolve_path(icfg.confidence_weights)) if icfg.confidence_weights else "") if icfg.use_confidence else None
    init, _, score, _ = predict_side(fr, side, str(tree["init"]["weights"]), conf_path)
    model = handmodel.load("builtin", side)
    truth = seq.betas[side]
    cal = calibrate(model, init.betas, score, icfg, size_prior=GCN_SIZE_PRIOR)
    return {"shape_per_frame_mm": float(np.mean([shape_error_mm(model, b, truth) for b in init.betas.numpy()])),
            "shape_plain_mean_mm": shape_error_mm(model, cal.plain_mean, truth), "shape_calibrated_mm": shape_error_mm(model, cal.betas, truth),
            "shape_weighted_no_size_prior_mm": shape_error_mm(model, cal.betas_weighted, truth),
            "shape_mean_hand_mm": shape_error_mm(model, np.zeros(10, np.float32), truth)}


def fit_gcn_size_prior(tree, n: int, frames: int) -> dict[str, object]:
    """Per-frame GCN betas of ``n`` training sequences (seeds ``SIZE_PRIOR_SEED``+i, one view,
    sides alternating) -> ``fit_size_prior``; also the correlations that motivate it."""
    from fitting.sequence import predict_side, side_frames

    per_frame, truth, weighted = [], [], []
    model = handmodel.load("builtin", "right")
    icfg = IdentityConf.from_tree(tree)
    from fitting.identity import resolve_path

    conf_path = str(resolve_path(icfg.confidence_weights)) if icfg.confidence_weights else ""
    for i in range(n):
        side = "right" if i % 2 == 0 else "left"
        seq = generate_sequence(frames, 1, seed=SIZE_PRIOR_SEED + i, sides=(side,))
        fr = side_frames([seq.scan(f, str(f)) for f in range(frames)], side)
        init, _, score, _ = predict_side(fr, side, str(tree["init"]["weights"]), conf_path)
        per_frame.append(init.betas.numpy())
        truth.append(seq.betas[side])
        weighted.append(calibrate(model, init.betas, score, icfg).betas[0])
    truth = np.asarray(truth, np.float64)
    prior = fit_size_prior(per_frame, truth, f"GCN, {n} x {frames}-frame one-view sequences, seeds {SIZE_PRIOR_SEED}+")
    mean0 = np.array([b[:, 0].mean() for b in per_frame])
    resid = truth[:, 0] - np.array([prior(m) for m in mean0])
    return {"gain": prior.gain, "offset": prior.offset, "source": prior.source, "sequences": n, "seeds": [SIZE_PRIOR_SEED, SIZE_PRIOR_SEED + n - 1],
            "corr_plain_mean_beta0": float(np.corrcoef(mean0, truth[:, 0])[0, 1]),
            "corr_weighted_beta0": float(np.corrcoef(weighted, truth[:, 0])[0, 1]),
            "plain_mean_beta0_mean": float(mean0.mean()), "residual_std": float(resid.std()), "truth_beta0_std": float(truth[:, 0].std())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=20)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--shape-sequences", type=int, default=100,
                    help="shape errors (prediction + calibration, no TTO) over this many sequences, the first --sequences included")
    ap.add_argument("--timing-frames", type=int, default=100, help="0 = skip the timing run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conf", default=str(CONF_DIR / "identity.conf"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default="", help="write the figures here too")
    ap.add_argument("--fit-size-prior", type=int, default=0, metavar="N",
                    help="only fit the GCN's size prior on N training sequences (seeds 600000+) and print it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tree = load_conf(args.conf, ["log.progress=false", "device=cpu", *args.overrides]).tree
    if args.fit_size_prior > 0:
        fit = fit_gcn_size_prior(tree, args.fit_size_prior, args.frames)
        print(json.dumps(fit, indent=1))
        print(f"GCN_SIZE_PRIOR = SizePrior({fit['gain']:.4f}, {fit['offset']:.4f}, {fit['source']!r})")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(fit, indent=1))
        return 0
    rows = []
    t0 = time.time()
    for i in range(args.sequences):
        side = "right" if i % 2 == 0 else "left"
        r = evaluate_sequence(tree, EVAL_SEED + i, args.frames, args.views, side)
        rows.append(r)
        print(f"seq {i:2d} ({side:5s}): shape mm per-frame {r['shape_per_frame_mm']:5.2f}  plain mean {r['shape_plain_mean_mm']:5.2f}  "
              f"calibrated {r['shape_calibrated_mm']:5.2f} | MPJPE mm raw {r['mpjpe_raw_mm']:6.1f} -> TTO {r['mpjpe_tto_mm']:6.1f}", flush=True)
    keys = [k for k in rows[0] if not k.startswith("_")]
    mean = {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}
    if "_scores" in rows[0]:
        from networks.confidence import spearman

        mean["confidence_spearman_all_frames"] = spearman(-torch.tensor(sum((r["_scores"] for r in rows), [])),
                                                          torch.tensor(sum((r["_errors"] for r in rows), [])))
    figures: dict[str, object] = {"sequences": args.sequences, "frames": args.frames, "views": args.views,
                                  "seeds": [EVAL_SEED, EVAL_SEED + args.sequences - 1], "mean": mean, "eval_s": round(time.time() - t0, 1)}
    ratio = mean["shape_calibrated_mm"] / mean["shape_per_frame_mm"]
    red = 1.0 - mean["mpjpe_tto_mm"] / mean["mpjpe_raw_mm"]
    print()
    print(f"{args.sequences} held-out sequences x {args.frames} frames, {args.views} view(s), seeds {EVAL_SEED}..{EVAL_SEED + args.sequences - 1}")
    print(f"shape error mm (mean-pose mesh)     per-frame {mean['shape_per_frame_mm']:.2f} | plain mean {mean['shape_plain_mean_mm']:.2f} | "
          f"calibrated {mean['shape_calibrated_mm']:.2f} ({100 * ratio:.0f} % of per-frame; target <= 60 % and < plain mean)")
    print(f"  ablations: weighted robust estimate without the size prior {mean['shape_weighted_no_size_prior_mm']:.2f}, "
          f"robust without confidence {mean['shape_robust_no_confidence_mm']:.2f}, confidence without robust step "
          f"{mean['shape_confidence_no_robust_mm']:.2f}" + (f", refined {mean['shape_refined_mm']:.2f}" if "shape_refined_mm" in mean else ""))
    print(f"  scale-aligned (what one view can see): per-frame {mean['shape_sa_per_frame_mm']:.2f} | plain mean "
          f"{mean['shape_sa_plain_mean_mm']:.2f} | calibrated {mean['shape_sa_calibrated_mm']:.2f} (without the size prior "
          f"{mean['shape_sa_weighted_no_size_prior_mm']:.2f})")
    print(f"MPJPE mm                            raw {mean['mpjpe_raw_mm']:.1f} -> TTO {mean['mpjpe_tto_mm']:.1f} "
          f"({100 * red:.0f} % lower; target >= 30 %)")
    print(f"PA-MPJPE mm                         raw {mean['pa_mpjpe_raw_mm']:.2f} -> TTO {mean['pa_mpjpe_tto_mm']:.2f}")
    if "confidence_spearman_all_frames" in mean:
        print(f"confidence Spearman vs shape error: all frames {mean['confidence_spearman_all_frames']:.3f}, "
              f"within sequences {mean['confidence_spearman_within']:.3f}")
    figures["shape_ratio"] = ratio
    figures["mpjpe_reduction"] = red
    if args.shape_sequences > args.sequences:
        # one view cannot tell a hand's size, so a sequence's shape error depends much on how far its
        # person's size is from the mean: 20 sequences give a noisy ratio, these many a steadier one
        shape_rows = [{k: r[k] for k in ("shape_per_frame_mm", "shape_plain_mean_mm", "shape_calibrated_mm", "shape_weighted_no_size_prior_mm")}
                      for r in rows]
        for i in range(args.sequences, args.shape_sequences):
            shape_rows.append(shape_only(tree, EVAL_SEED + i, args.frames, args.views, "right" if i % 2 == 0 else "left"))
        sm = {k: float(np.mean([r[k] for r in shape_rows])) for k in shape_rows[0]}
        beats = float(np.mean([r["shape_calibrated_mm"] < r["shape_plain_mean_mm"] for r in shape_rows]))
        beats_w = float(np.mean([r["shape_weighted_no_size_prior_mm"] < r["shape_plain_mean_mm"] for r in shape_rows]))
        figures["shape_many"] = {"sequences": args.shape_sequences, "seeds": [EVAL_SEED, EVAL_SEED + args.shape_sequences - 1], "mean": sm,
                                 "ratio": sm["shape_calibrated_mm"] / sm["shape_per_frame_mm"], "calibrated_beats_plain_mean_share": beats,
                                 "weighted_without_size_prior_beats_plain_mean_share": beats_w}
        extra = [r for r in shape_rows if "shape_mean_hand_mm" in r]
        hand = float(np.mean([r["shape_mean_hand_mm"] for r in extra])) if extra else float("nan")
        print(f"shape error mm over {args.shape_sequences} sequences (seeds {EVAL_SEED}..{EVAL_SEED + args.shape_sequences - 1}): per-frame "
              f"{sm['shape_per_frame_mm']:.2f} | plain mean {sm['shape_plain_mean_mm']:.2f} | calibrated {sm['shape_calibrated_mm']:.2f} "
              f"({100 * figures['shape_many']['ratio']:.0f} % of per-frame; below the plain mean in {100 * beats:.0f} % of the sequences); "
              f"the mean hand (betas 0) {hand:.2f} on the {len(extra)} shape-only ones")
        print(f"  without the size prior (weighted robust beta 0): {sm['shape_weighted_no_size_prior_mm']:.2f} "
              f"({100 * sm['shape_weighted_no_size_prior_mm'] / sm['shape_per_frame_mm']:.0f} %; below the plain mean in {100 * beats_w:.0f} %)")
    if args.timing_frames > 0:
        side = "right"
        seq = generate_sequence(args.timing_frames, args.views, seed=TIMING_SEED, sides=(side,))
        scans = [seq.scan(f, str(f)) for f in range(args.timing_frames)]
        t1 = time.perf_counter()
        res = process_scans(tree, scans)[side]
        total = time.perf_counter() - t1
        assert isinstance(res, SideResult)
        ts = res.record["time_s"]
        figures["timing"] = {"frames": args.timing_frames, "threads": args.threads, **ts, "total_s": round(total, 2)}
        print(f"timing, {args.timing_frames} frames on {args.threads} thread(s): prediction {ts['prediction']:.1f} s, calibration "
              f"{ts['calibration'] + ts['refinement']:.2f} s, TTO {ts['tto']:.1f} s -> calibration + TTO {ts['calibration_and_tto']:.1f} s "
              f"(target <= 300 s); whole sequence {total:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
