"""Write a synthetic sequence (one person, smooth motion, per-frame varying detection quality) as
FMHR frames with ground truth, one scan id per frame:

    python scripts/make_synthetic_sequence.py --out runs/sequence_demo --frames 30 --views 1 --seed 400000
    python fit.py --conf conf/identity.conf --data_path runs/sequence_demo --scan_id 0-29

See ``synthetic/sequence.py`` for the motion and detection models; ``sequence.json`` beside the
frames keeps the sequence's truth (betas, per-frame noise levels, occluded joints).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthetic.sequence import DetectionModel, generate_sequence, write_sequence  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder that receives one scan folder per frame")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default="right", help="right, left or both")
    ap.add_argument("--size", default="640x480", help="image size WxH")
    ap.add_argument("--key-every", type=int, default=8, help="frames between pose/motion keyframes")
    ap.add_argument("--first-id", type=int, default=0, help="scan id of the first frame")
    ap.add_argument("--masks", action="store_true", help="render the hands' silhouettes into mask/")
    ap.add_argument("--miss-rate", type=float, default=0.0, help="share of joints dropped (kept out of pose/ files)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    sides = ("left", "right") if args.sides == "both" else (args.sides,)
    try:
        W, H = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WxH, got {args.size!r}")
    seq = generate_sequence(args.frames, args.views, seed=args.seed, sides=sides, size=(W, H), key_every=args.key_every,
                            detection=DetectionModel(miss_rate=args.miss_rate), masks=args.masks)
    ids = write_sequence(seq, args.out, first_id=args.first_id, overwrite=args.overwrite)
    print(f"wrote {len(ids)} frames {ids[0]}..{ids[-1]} to {args.out} (sides {list(seq.sides)}, {args.views} view(s))")
    print(f"fit them: python fit.py --conf conf/identity.conf --data_path {args.out} --scan_id {ids[0]}-{ids[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
