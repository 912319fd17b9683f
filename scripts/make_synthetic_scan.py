#!/usr/bin/env python
"""Write a synthetic scan (FMHR layout + gt/) of known hands: photos, masks, noisy keypoints.

Photos show the detailed hands of synthetic/render.py (textured skin, creases, SH light, random
background); --keypoints_only writes the keypoints and cameras alone, as before.

Example: python scripts/make_synthetic_scan.py --out data/syn --scan_id 1 --views 8 --size 640x480 --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 640x480; got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def parse_hands(text: str) -> tuple[str, ...]:
    sides = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sides if s not in ("left", "right")]
    if not sides or bad:
        raise argparse.ArgumentTypeError(f"--hands takes left, right or left,right; got {text!r}")
    return sides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="data folder; the scan goes to OUT/SCAN_ID")
    ap.add_argument("--scan_id", required=True, help="scan folder name")
    ap.add_argument("--views", type=int, default=8, help="number of cameras")
    ap.add_argument("--size", type=parse_size, default=(640, 480), help="image size WxH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hands", type=parse_hands, default=("left", "right"), help="left, right or left,right")
    ap.add_argument("--noise_px", type=float, default=3.0, help="2D detection noise (std per coordinate, px)")
    ap.add_argument("--miss_rate", type=float, default=0.1, help="fraction of joints missed")
    ap.add_argument("--hand_miss_rate", type=float, default=0.05, help="chance a hand is missed in a view")
    ap.add_argument("--swap_rate", type=float, default=0.1, help="fraction of views with swapped labels")
    ap.add_argument("--duplicates", type=int, default=0, help="views reporting one hand under both labels")
    ap.add_argument("--outliers", type=int, default=0, help="detected joints moved by --outlier_px")
    ap.add_argument("--outlier_px", type=float, default=100.0)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing scan folder")
    ap.add_argument("--keypoints_only", action="store_true", help="no photos or masks (no rendering)")
    ap.add_argument("--texture_size", type=int, default=512, help="albedo texture size (pixels, square)")
    ap.add_argument("--supersample", type=int, default=2, help="render at this multiple of the size, then filter")
    ap.add_argument("--specular", type=float, default=0.0,
                    help="skin sheen: Blinn-Phong highlights of the lights at this strength (0 = Lambertian)")
    ap.add_argument("--shininess", type=float, default=30.0, help="Blinn-Phong exponent of --specular")
    args = ap.parse_args(argv)
    if args.views < 2:
        ap.error("--views must be at least 2")
    if args.texture_size < 16 or args.supersample < 1:
        ap.error("--texture_size must be >= 16 and --supersample >= 1")
    if args.specular < 0 or args.shininess <= 0:
        ap.error("--specular must be >= 0 and --shininess > 0")
    synth = synthetic.generate(
        views=args.views, size=args.size, seed=args.seed, sides=args.hands, noise_px=args.noise_px,
        miss_rate=args.miss_rate, hand_miss_rate=args.hand_miss_rate, swap_rate=args.swap_rate,
        duplicates=args.duplicates, outliers=args.outliers, outlier_px=args.outlier_px, scan_id=args.scan_id,
    )
    root = args.out / str(args.scan_id)
    if not args.overwrite and root.exists() and any(root.iterdir()):  # before the rendering time is spent
        print(f"error: {root} exists and is not empty (command line: --overwrite)", file=sys.stderr)
        return 2
    if not args.keypoints_only:
        from synthetic.render import render_scan

        render_scan(synth, seed=args.seed, texture_size=args.texture_size, supersample=args.supersample,
                    specular=args.specular, shininess=args.shininess)
    try:
        root = synthetic.write_synthetic(synth, args.out, args.scan_id, overwrite=args.overwrite)
    except ValueError as e:  # ScanError: the scan folder exists
        print(f"error: {e} (command line: --overwrite)", file=sys.stderr)
        return 2
    print(f"wrote {root} ({args.views} views, hands {','.join(synth.hands.params)}; "
          f"{'keypoints only' if args.keypoints_only else 'photos and masks'}; "
          f"swapped views {synth.swapped_views or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
