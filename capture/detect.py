"""2D hand keypoints for scans that have photos but no ``pose/``: MediaPipe Hands, offline.

MediaPipe is an optional extra (``requirements-detect.txt``); its hand landmark and palm detection
models ship inside the wheel, so nothing is downloaded at run time. Output is the FMHR pose JSON
(``capture/fmhr.py``): per hand 21 (x, y, z) with x = 2 u / W - 1, y = 2 v / H - 1 and
z = 2 z_mp - 1 (MediaPipe's relative depth, mapped like the demo's files), labelled with the
person's hand.

MediaPipe's handedness assumes a mirrored selfie image; on ordinary photos its "Left" is the
person's right hand, so labels are swapped here. Checked on view 00 of the demo capture: the
swapped labels put each detected hand 3 px (left) and 10 px (right) median from the same-label
hand of the demo's own pose file, and 244-250 px from the other, whose labels were shown to be anatomical (see ``read_fmhr``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import numpy as np

from capture.fmhr import IMAGE_SUFFIXES, LABEL_TO_SIDE
from capture.imageio import load_image
from capture.scan import ScanError

log = logging.getLogger(__name__)

INSTALL = (
    "pip install -r requirements-detect.txt && pip install --no-deps mediapipe==0.10.21 "
    "(the --no-deps keeps the project's single OpenCV and skips jax)"
)
# MediaPipe's label on an unmirrored photo -> the person's hand, as written in pose files.
MEDIAPIPE_TO_LABEL = {"Left": "Right", "Right": "Left"}


def load_mediapipe() -> ModuleType:
    """Import mediapipe on first use, with the install command in the error."""
    try:
        import mediapipe as mp
    except ImportError as e:
        raise ImportError(f"keypoint detection needs MediaPipe 0.10.21, which is not installed ({e}). Install it with:\n  {INSTALL}") from e
    return mp


class HandDetector:
    """MediaPipe Hands on still photos (up to two hands); use as a context manager."""

    def __init__(self, min_confidence: float = 0.5, model_complexity: int = 1) -> None:
        mp = load_mediapipe()
        self._hands = mp.solutions.hands.Hands(
            static_image_mode=True, max_num_hands=2, model_complexity=model_complexity,
            min_detection_confidence=min_confidence,
        )

    def __enter__(self) -> "HandDetector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._hands.close()

    def detect(self, image: np.ndarray) -> dict[str, list[float]]:
        """RGB image (H,W,3; float in [0,1] or uint8) -> pose dict {"Left": [63], "Right": [63]}.

        When both detections get the same label, the more confident keeps it and the other takes
        the free one: a view holds at most one hand per side; real swaps are the pose fit's job.
        """
        rgb = image if image.dtype == np.uint8 else np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        res = self._hands.process(np.ascontiguousarray(rgb[..., :3]))
        found: list[tuple[float, str, list[float]]] = []
        for lms, hd in zip(res.multi_hand_landmarks or [], res.multi_handedness or []):
            cls = hd.classification[0]
            xyz = [c for lm in lms.landmark for c in (2 * lm.x - 1, 2 * lm.y - 1, 2 * lm.z - 1)]
            found.append((float(cls.score), MEDIAPIPE_TO_LABEL[cls.label], xyz))
        out: dict[str, list[float]] = {"Left": [], "Right": []}
        for score, label, xyz in sorted(found, key=lambda f: -f[0]):
            if out[label]:
                label = "Left" if label == "Right" else "Right"
            out[label] = [float(v) for v in xyz]
        return out


def detect_scan(data_path: str | Path, scan_id: str | int, overwrite: bool = False) -> dict[str, list[str]]:
    """Write ``pose/NN.json`` for every ``img/NN.*`` of a scan; returns {view: sides found}.

    Existing pose files are kept unless ``overwrite``.
    """
    root = Path(data_path) / str(scan_id)
    img_dir = root / "img"
    images = sorted(p for p in img_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
    if not images:
        raise ScanError(f"{img_dir}: no photos (img/NN.png) to detect hands in")
    pose_dir = root / "pose"
    pose_dir.mkdir(exist_ok=True)
    found: dict[str, list[str]] = {}
    with HandDetector() as det:
        for p in images:
            out = pose_dir / f"{p.stem}.json"
            if out.exists() and not overwrite:
                log.info("%s exists; kept (pass overwrite to redo it)", out)
                continue
            pose = det.detect(load_image(p))
            out.write_text(json.dumps(pose))
            found[p.stem] = [LABEL_TO_SIDE[k] for k, v in pose.items() if v]
            log.info("%s: %s", out, found[p.stem] or "no hands")
    return found
