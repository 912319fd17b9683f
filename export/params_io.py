"""Hand parameters and 3D keypoints on disk: JSON for people and other tools, npz for exact reload.

JSON floats are the float32 values widened to Python floats, so JSON also round-trips exactly.
Layouts (one file per run, both sides together):
- ``hand_params.json``: ``{"format", "units", "hands": {side: {betas (10), hand_pose (15x3),
  global_orient (3), transl (3)}}}``; ``hand_params.npz``: keys ``<side>/<name>``.
- ``keypoints3d.json``: ``{"format", "units", "order": "mediapipe", "hands": {side: {"joints"
  (21x3), "valid" (21)}}}``; ``keypoints3d.npz``: ``<side>/joints``, ``<side>/valid``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from export.atomic import assert_finite, write_bytes, write_json
from handmodel.joint_orders import JOINT_NAMES, NUM_JOINTS
from handmodel.params import HandParams, check_side

PARAMS_FORMAT = "handrecon.hand_params/1"
KEYPOINTS_FORMAT = "handrecon.keypoints3d/1"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _params_arrays(params: Mapping[str, HandParams]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for side, p in params.items():
        check_side(side)
        if p.batch_size != 1:
            raise ValueError(f"{side} hand parameters have batch {p.batch_size}; save one hand per side")
        out[side] = {k: assert_finite(f"{side} {k}", v.detach().cpu().float().numpy()[0]) for k, v in p.to_dict().items()}
    return out


def save_hand_params(path_stem: str | Path, params: Mapping[str, HandParams]) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.npz``; returns both paths."""
    stem = Path(path_stem)
    arrays = _params_arrays(params)
    doc = {
        "format": PARAMS_FORMAT,
        "units": "transl in metres (world frame); rotations axis-angle in radians",
        "hands": {s: {k: v.tolist() for k, v in a.items()} for s, a in arrays.items()},
    }
    j = write_json(stem.with_suffix(".json"), doc)
    n = write_bytes(stem.with_suffix(".npz"), _npz_bytes({f"{s}/{k}": v for s, a in arrays.items() for k, v in a.items()}))
    return j, n


def load_hand_params(path: str | Path) -> dict[str, HandParams]:
    """Read a ``.json`` or ``.npz`` written by ``save_hand_params`` (batch 1 per side)."""
    path = Path(path)
    per_side: dict[str, dict[str, Any]] = {}
    if path.suffix == ".npz":
        with np.load(path) as z:
            for key in z.files:
                side, name = key.split("/", 1)
                per_side.setdefault(check_side(side), {})[name] = z[key]
    else:
        doc = json.loads(path.read_text())
        if doc.get("format") != PARAMS_FORMAT:
            raise ValueError(f"{path}: not a hand parameter file (format {doc.get('format')!r})")
        for side, d in doc["hands"].items():
            per_side[check_side(side)] = {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}
    return {
        s: HandParams.from_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32))[None] for k, v in d.items()})
        for s, d in per_side.items()
    }


def save_keypoints3d(
    path_stem: str | Path, keypoints: Mapping[str, Any], valid: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write 21 MediaPipe-order joints per side (metres, world) as ``<stem>.json`` + ``.npz``.
    Invalid joints are stored (as whatever the fit left) but flagged; they must still be finite."""
    stem = Path(path_stem)
    hands: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    for side, kp in keypoints.items():
        check_side(side)
        j = assert_finite(f"{side} keypoints3d", kp).astype(np.float32).reshape(NUM_JOINTS, 3)
        ok = np.ones(NUM_JOINTS, bool) if valid is None or side not in valid else np.asarray(valid[side], bool).reshape(-1)
        hands[side] = {"joints": j.tolist(), "valid": ok.tolist()}
        arrays[f"{side}/joints"], arrays[f"{side}/valid"] = j, ok
    doc = {"format": KEYPOINTS_FORMAT, "units": "metres, world frame", "order": "mediapipe",
           "joint_names": JOINT_NAMES, "hands": hands}
    return write_json(stem.with_suffix(".json"), doc), write_bytes(stem.with_suffix(".npz"), _npz_bytes(arrays))


def load_keypoints3d(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(joints per side (21,3) float32, valid per side (21,) bool) from ``.json`` or ``.npz``."""
    path = Path(path)
    joints: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    if path.suffix == ".npz":
        with np.load(path) as z:
            for key in z.files:
                side, name = key.split("/", 1)
                (joints if name == "joints" else valid)[check_side(side)] = z[key]
    else:
        doc = json.loads(path.read_text())
        if doc.get("format") != KEYPOINTS_FORMAT:
            raise ValueError(f"{path}: not a keypoint file (format {doc.get('format')!r})")
        for side, d in doc["hands"].items():
            joints[check_side(side)] = np.asarray(d["joints"], dtype=np.float32)
            valid[side] = np.asarray(d["valid"], dtype=bool)
    return joints, valid
