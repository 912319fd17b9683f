"""Atomic file writes and the finite-value guard shared by every exporter.

Why: a run killed mid-write must never leave a truncated mesh or JSON that a later step (or a
person) mistakes for a result; and a NaN that reaches a mesh file silently breaks viewers.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


class NonFiniteError(ValueError):
    """An array about to be written contains NaN or Inf."""


def assert_finite(name: str, array: Any) -> np.ndarray:
    """Return ``array`` as numpy, or raise naming how many values of ``name`` are NaN/Inf."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0].tolist()
            raise NonFiniteError(
                f"{name}: {int(bad.sum())} of {a.size} values are NaN/Inf (first at index {first}); "
                "refusing to write it"
            )
    return a


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix (writers that pick the format
    from the extension still work); on success it replaces ``path`` in one ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"writer produced no file for {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON with NaN refused (``allow_nan=False``): the file stays valid for strict readers."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise NonFiniteError(f"{path}: {e}; refusing to write it") from None
    return write_text(path, text + "\n")


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """RGB (H,W,3) or grey (H,W) image, uint8 or float in [0,1], as PNG via OpenCV."""
    import cv2

    img = assert_finite(str(path), image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA if img.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"OpenCV could not write {path}")
    return Path(path)
