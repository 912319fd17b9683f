"""Detect 2D hand keypoints for an FMHR scan without ``pose/`` (writes pose/NN.json per photo).

    python scripts/detect_keypoints.py --data_path ../shared/data/fmhr_demo --scan_id 1 [--overwrite]

Needs the optional MediaPipe install (see requirements-detect.txt).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.detect import detect_scan  # noqa: E402
from capture.scan import ScanError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_path", required=True, help="folder holding the scan folders")
    ap.add_argument("--scan_id", required=True, help="scan folder name, e.g. 1")
    ap.add_argument("--overwrite", action="store_true", help="redo views whose pose/NN.json exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        found = detect_scan(args.data_path, args.scan_id, overwrite=args.overwrite)
    except (ImportError, ScanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for view, sides in found.items():
        print(f"view {view}: {', '.join(sides) or 'no hands'}")
    print(f"{len(found)} pose file(s) written under {Path(args.data_path) / args.scan_id / 'pose'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
