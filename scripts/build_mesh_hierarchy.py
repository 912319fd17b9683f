"""Build the GCN's mesh hierarchy of the built-in hand: ``python scripts/build_mesh_hierarchy.py``.

Decimates the open (flat) template by quadric half-edge collapse, halving the vertex count per
level (1609 -> 805 -> 403 -> 202 -> 101), and stores per level the vertices, faces and spiral
sequences, and between levels the barycentric up-sampling and cluster-mean down-sampling maps
(networks/hierarchy.py) in ``networks/data/hand_hierarchy.npz``. Deterministic: same input, same file.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import handmodel  # noqa: E402
from networks.hierarchy import HIERARCHY_FILE, apply_sparse, build_hierarchy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, default=5, help="number of levels including the full mesh")
    ap.add_argument("--factor", type=float, default=2.0, help="vertex count ratio between levels")
    ap.add_argument("--spiral-length", type=int, default=9, help="vertices per spiral (itself + rings)")
    ap.add_argument("--out", default=str(HIERARCHY_FILE), help="output npz")
    args = ap.parse_args(argv)

    model = handmodel.load("builtin", "right")
    V = model.template.double().numpy()
    F = model.faces.numpy()
    H = build_hierarchy(V, F, levels=args.levels, factor=args.factor, spiral_length=args.spiral_length)
    H.save(args.out)
    print(f"levels {H.sizes} vertices, faces {[len(f) for f in H.faces]} -> {args.out}")
    for k in range(H.num_levels - 1):
        err = np.linalg.norm(apply_sparse(*H.up[k], H.vertices[k + 1]) - H.vertices[k], axis=1) * 1000
        print(f"  level {k}<-{k + 1}: up-sampled template error mean {err.mean():.2f} mm, max {err.max():.2f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
