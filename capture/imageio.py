"""Image and mask files <-> the arrays a View holds; shared by every reader and writer.

Errors name the file and say what to do (ScanError), so a bad capture fails at load time with a
message a user can act on instead of deep inside a fitting stage.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from capture.scan import ScanError


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image file from its header only (no decoding), for ``load_images=False``."""
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except (OSError, SyntaxError, ValueError) as e:
        raise ScanError(f"{path}: cannot read the image header ({e}); the file is corrupt, re-export it") from e


def load_image(path: Path) -> np.ndarray:
    """float32 RGB (H,W,3) in [0,1]; 16-bit files are scaled by 65535, grey/alpha are handled."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ScanError(f"{path}: cannot be decoded as an image; the file is corrupt or truncated, re-export it")
    scale = 65535.0 if raw.dtype == np.uint16 else 255.0
    if raw.ndim == 2:
        raw = cv2.cvtColor(raw, cv2.COLOR_GRAY2BGR)
    elif raw.shape[2] == 4:
        raw = cv2.cvtColor(raw, cv2.COLOR_BGRA2BGR)
    return (cv2.cvtColor(raw, cv2.COLOR_BGR2RGB).astype(np.float32) / scale).clip(0.0, 1.0)


def load_mask(path: Path) -> np.ndarray:
    """bool (H,W): any non-zero pixel is foreground (files are 0/255; colour masks use max(R,G,B))."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ScanError(f"{path}: cannot be decoded as a mask image; the file is corrupt, re-export it")
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2)
    return raw > (0.5 if raw.dtype.kind == "f" else 0)


def save_image(path: Path, image: np.ndarray) -> None:
    """Write float RGB in [0,1] as 8-bit PNG (rounded, so a reload is within 0.5/255)."""
    rgb8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb8, cv2.COLOR_RGB2BGR)):
        raise ScanError(f"{path}: could not write the image (check the folder is writable)")


def save_mask(path: Path, mask: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8)):
        raise ScanError(f"{path}: could not write the mask (check the folder is writable)")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (W, H) with area averaging (the right filter for downscaling photos)."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to (W, H): a pixel is foreground when more than half its area was."""
    if mask.shape[1] == size[0] and mask.shape[0] == size[1]:
        return mask
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
