"""Train the confidence head of the GCN predictor (networks/confidence.py), predictor frozen.

    python scripts/train_confidence.py [--train-sequences 3000] [--train-frames 5] [--val-sequences 100]
                                       [--steps 1500] [--out networks/data/confidence.pt] [--cache runs/confidence_train]

The committed weights: ``python scripts/train_confidence.py --cache runs/confidence_train/v3``
(networks/data/TRAINING.md). Data: synthetic single-view sequences
(``synthetic.sequence.generate_sequence``, the default detection model with per-frame noise,
hallucinated occlusions and outliers; a third of them also drop joints), one random side each:
many short training sequences (``--train-frames`` frames, keyframes every ``--train-key-every``:
many identities and poses), 30-frame validation sequences. Training sequences use seeds 100000+i,
validation 200000+i (tests use 300000+i, ``scripts/eval_identity.py`` 400000+i: never
overlapping). Every frame goes through the frozen predictor (``predict_2d`` in its view); its
features and its shape error (mean vertex error of the mean-pose mesh, predicted vs true betas,
mm) are cached under ``--cache`` so re-training is quick.

Loss: pairwise logistic ranking over all pairs of a batch (pair weight |log e_i - log e_j|: pairs
whose errors barely differ teach little), plus ``--reg`` x squared error of the score against
-log(e / 1 mm) so that the score has a scale (softmax(score / 0.5) ~ 1 / e^2). AdamW, cosine
decay, ``torch.set_num_threads(2)``. Reports validation Spearman correlation of -score vs error,
overall and within sequences.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks.confidence import CONFIDENCE_FILE, LATENT_DIM, ConfidenceHead, FeatureConf, predict_with_features, shape_error_mm, spearman  # noqa: E402
from networks.predictor import GCNPredictor  # noqa: E402
from synthetic.sequence import DetectionModel, generate_sequence  # noqa: E402

TRAIN_SEED, VAL_SEED, TEST_SEED, EVAL_SEED = 100000, 200000, 300000, 400000
FRAMES = 30


def sequence_detection(rng: np.random.Generator) -> DetectionModel:
    """The default detection model; a third of the sequences also drop up to 10 % of the joints."""
    miss = float(rng.uniform(0.0, 0.1)) if rng.random() < 1 / 3 else 0.0
    return DetectionModel(miss_rate=miss)


def frames_of(seed: int, frames: int = FRAMES, key_every: int = 8) -> dict[str, torch.Tensor | str]:
    """One single-view synthetic sequence of a random side as predictor inputs and true betas."""
    rng = np.random.default_rng(seed)
    side = "left" if rng.random() < 0.5 else "right"
    seq = generate_sequence(frames, 1, seed=seed, sides=(side,), detection=sequence_detection(rng), key_every=key_every)
    cam = seq.cameras[0]
    det = torch.as_tensor(seq.detections[side][:, 0], dtype=torch.float32)
    F = det.shape[0]
    rep = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)[None].expand(F, *np.shape(a)).clone()  # noqa: E731
    return {"side": side, "uv": det[..., :2], "vis": (det[..., 2] > 0).float(), "K": rep(cam.K), "R": rep(cam.R),
            "t": rep(cam.t), "betas": torch.as_tensor(seq.betas[side], dtype=torch.float32)}


def build_split(pred: GCNPredictor, first_seed: int, n: int, fconf: FeatureConf, frames: int, key_every: int,
                chunk: int = 20) -> dict[str, torch.Tensor]:
    """Features, shape errors, true betas and sequence index of every frame of ``n`` sequences."""
    feats, errs, seq_idx, truth = [], [], [], []
    t0 = time.time()
    chunk = max(1, chunk * FRAMES // frames)
    for c0 in range(0, n, chunk):
        batch = [frames_of(first_seed + i, frames, key_every) for i in range(c0, min(n, c0 + chunk))]
        for side in ("left", "right"):
            items = [(c0 + k, b) for k, b in enumerate(batch) if b["side"] == side]
            if not items:
                continue
            cat = lambda key: torch.cat([b[key] for _, b in items])  # noqa: E731
            p, f = predict_with_features(pred, cat("uv"), cat("vis"), cat("K"), side, cat("R"), cat("t"), conf=fconf)
            true = torch.cat([b["betas"][None].expand(len(b["uv"]), -1) for _, b in items])
            feats.append(f)
            truth.append(true)
            errs.append(shape_error_mm(pred.models[side], p.params.betas, true))
            seq_idx.append(torch.cat([torch.full((len(b["uv"]),), i) for i, b in items]))
        print(f"  {min(n, c0 + chunk)}/{n} sequences, {time.time() - t0:.0f} s", flush=True)
    return {"features": torch.cat(feats), "error": torch.cat(errs), "sequence": torch.cat(seq_idx), "betas_true": torch.cat(truth)}


def ranking_loss(score: torch.Tensor, log_err: torch.Tensor) -> torch.Tensor:
    """Weighted pairwise logistic loss: the frame with the smaller error must score higher."""
    d_err = log_err[:, None] - log_err[None, :]  # > 0 where i is worse than j
    d_score = score[None, :] - score[:, None]  # > 0 where j scores higher than i
    w = d_err.clamp(min=0.0)
    return (w * torch.nn.functional.softplus(-d_score)).sum() / w.sum().clamp(min=1e-6)


def within_sequence_spearman(score: torch.Tensor, err: torch.Tensor, seq: torch.Tensor) -> float:
    vals = [spearman(-score[seq == s], err[seq == s]) for s in seq.unique() if int((seq == s).sum()) > 3]
    return float(np.nanmean(vals))


def train(data: dict[str, torch.Tensor], val: dict[str, torch.Tensor], fconf: FeatureConf, steps: int, batch: int,
          lr: float, reg: float, hidden: int, dropout: float, weight_decay: float, seed: int) -> tuple[ConfidenceHead, list[dict[str, float]]]:
    torch.manual_seed(seed)
    X, e = data["features"], data["error"]
    head = ConfidenceHead(X.shape[1], hidden=hidden, dropout=dropout, feature_conf=fconf)
    head.set_normalisation(X)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    log_e = torch.log(e.clamp(min=1e-3))
    g = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, steps + 1):
        head.train()
        idx = torch.randint(0, len(X), (batch,), generator=g)
        s = head(X[idx])
        loss = ranking_loss(s, log_e[idx]) + reg * ((s + log_e[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            head.eval()
            with torch.no_grad():
                sv = head(val["features"])
            rec = {"step": step, "loss": float(loss), "val_spearman": spearman(-sv, val["error"]),
                   "val_spearman_within": within_sequence_spearman(sv, val["error"], val["sequence"])}
            history.append(rec)
            print(f"  step {step}: loss {rec['loss']:.4f}, val Spearman {rec['val_spearman']:.3f} "
                  f"(within sequences {rec['val_spearman_within']:.3f})", flush=True)
    head.eval()
    return head, history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-sequences", type=int, default=3000)
    ap.add_argument("--train-frames", type=int, default=5, help="frames per training sequence (many short ones: many identities)")
    ap.add_argument("--train-key-every", type=int, default=2, help="keyframe spacing of the training sequences (varied poses)")
    ap.add_argument("--val-sequences", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reg", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--tta", type=int, default=0, help="nudged re-predictions of the stability feature")
    ap.add_argument("--no-latent", action="store_true", help="leave out the predictor's global feature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="runs/confidence_train")
    ap.add_argument("--out", default=str(CONFIDENCE_FILE))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fconf = FeatureConf(latent=not args.no_latent, tta=args.tta)
    pred = GCNPredictor.load()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    splits = {}
    plan = (("train", TRAIN_SEED, args.train_sequences, args.train_frames, args.train_key_every),
            ("val", VAL_SEED, args.val_sequences, FRAMES, 8))
    for name, first, n, frames, key_every in plan:
        path = cache / f"{name}_{n}x{frames}k{key_every}_tta{fconf.tta}.pt"
        if path.is_file():
            splits[name] = torch.load(path, weights_only=True)
            print(f"{name}: {len(splits[name]['error'])} frames from {path}")
        else:
            print(f"{name}: predicting {n} sequences x {frames} frames (seeds {first}..{first + n - 1})", flush=True)
            splits[name] = build_split(pred, first, n, FeatureConf(latent=True, tta=fconf.tta), frames, key_every)
            torch.save(splits[name], path)
        if not fconf.latent:  # the cache always holds the latent feature last; drop it
            splits[name] = {**splits[name], "features": splits[name]["features"][:, :-LATENT_DIM]}
    t_data = time.time() - t0
    e = splits["train"]["error"]
    print(f"train shape error mm: median {e.median():.2f}, mean {e.mean():.2f}, 90th pct {e.quantile(0.9):.2f}")
    t1 = time.time()
    head, history = train(splits["train"], splits["val"], fconf, args.steps, args.batch, args.lr, args.reg, args.hidden,
                          args.dropout, args.weight_decay, args.seed)
    t_train = time.time() - t1
    final = history[-1]
    meta = {"command": "python scripts/train_confidence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "train_sequences": args.train_sequences, "train_frames": args.train_frames, "val_sequences": args.val_sequences,
            "steps": args.steps, "seeds": {"train": TRAIN_SEED, "val": VAL_SEED}, "val_spearman": final["val_spearman"],
            "val_spearman_within": final["val_spearman_within"], "data_s": round(t_data, 1), "train_s": round(t_train, 1)}
    head.save(args.out, meta)
    print(json.dumps(meta, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
