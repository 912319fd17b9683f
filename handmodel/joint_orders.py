"""Keypoint orders. Inside the code every 21-joint array is in MediaPipe order:

0 wrist; 1-4 thumb CMC, MCP, IP, tip; 5-8 index MCP, PIP, DIP, tip; 9-12 middle; 13-16 ring;
17-20 pinky. This module is the one place that converts to and from other datasets' orders.
"""
from __future__ import annotations

import numpy as np

NUM_JOINTS = 21
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
JOINT_NAMES = ["wrist"] + [f"{f}{i}" for f in FINGERS for i in range(1, 5)]
# Parent of each MediaPipe joint in the kinematic chain (wrist is the root).
PARENTS = np.array([-1] + [p for f in range(5) for p in (0, 1 + 4 * f, 2 + 4 * f, 3 + 4 * f)])
# Bones drawn in overlays: (parent, child).
BONES = [(int(PARENTS[j]), j) for j in range(1, NUM_JOINTS)]
TIPS = np.array([4, 8, 12, 16, 20])

# InterHand2.6M per hand: thumb tip..base (0-3), index (4-7), middle, ring, pinky, wrist (20).
INTERHAND_TO_MEDIAPIPE = np.array(
    [20] + [b + k for b in (0, 4, 8, 12, 16) for k in (3, 2, 1, 0)]
)
# OpenPose's hand order is the same as MediaPipe's.
OPENPOSE_TO_MEDIAPIPE = np.arange(NUM_JOINTS)
# MANO's 16 skeleton joints: wrist, index1-3, middle1-3, pinky1-3, ring1-3, thumb1-3;
# fingertips are appended as 16-20 in the order thumb, index, middle, ring, pinky.
MANO_TO_MEDIAPIPE = np.array(
    [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]
)
# Vertex ids of MANO's fingertips (thumb, index, middle, ring, pinky), as commonly used.
MANO_TIP_VERTICES = np.array([745, 317, 444, 556, 673])


def reorder(joints: np.ndarray, source_to_mediapipe: np.ndarray) -> np.ndarray:
    """Take joints (..., 21, D) in a source order to MediaPipe order."""
    return np.asarray(joints)[..., source_to_mediapipe, :]


def inverse(order: np.ndarray) -> np.ndarray:
    """Index array taking MediaPipe order back to the source order."""
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return inv
