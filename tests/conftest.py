"""Shared fixtures: the real demo capture (skipped where absent), tmp output folders, and a tiny
synthetic scan with known 3D keypoints for stage-independent tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from capture.camera import Camera
from capture.scan import Scan, View

REPO_ROOT = Path(__file__).resolve().parent.parent
FMHR_DEMO = REPO_ROOT.parent / "shared" / "data" / "fmhr_demo"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (scripts are not a package), registered in sys.modules
    under ``script_<name>`` so dataclasses in it can look their module up."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def fmhr_demo_path() -> Path:
    """The real FMHR capture (scan 1) at ../shared/data/fmhr_demo relative to the repo root."""
    if not (FMHR_DEMO / "1" / "camera" / "param.npz").is_file():
        pytest.skip(f"real capture not present at {FMHR_DEMO} (CI has it)")
    return FMHR_DEMO


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def tiny_keypoints() -> dict[str, np.ndarray]:
    """Two plausible 21-joint skeletons (metres), left at x < 0 and right at x > 0."""
    rng = np.random.default_rng(0)
    base = np.zeros((21, 3))
    for f in range(5):
        direction = np.array([np.cos(0.35 * (f - 2)), np.sin(0.35 * (f - 2)), 0.0])
        for k in range(4):
            base[1 + 4 * f + k] = direction * 0.025 * (k + 1) + np.array([0, 0, 0.003 * k])
    out = {}
    for side, x in (("left", -0.06), ("right", 0.06)):
        jitter = 0.001 * rng.normal(size=(21, 3))
        out[side] = (base * np.array([-1 if side == "left" else 1, 1, 1]) + jitter + [x, 0.0, 0.0]).astype(np.float32)
    return out


def make_tiny_scan(width: int = 64, height: int = 48, n_views: int = 3, with_images: bool = True) -> Scan:
    """Cameras on an arc 0.5 m away looking at the origin; detections are exact projections."""
    joints = tiny_keypoints()
    views = []
    for i in range(n_views):
        yaw = np.radians(-20 + 20 * i)
        R = Rotation.from_rotvec([0, yaw, 0]).as_matrix()
        t = np.array([0.0, 0.0, 0.5])
        K = np.array([[80.0, 0, width / 2], [0, 80.0, height / 2], [0, 0, 1]])
        cam = Camera(K, R, t, width, height, name=f"{i:02d}")
        kps = {}
        for side, X in joints.items():
            x = (X @ R.T + t) @ K.T
            uv = x[:, :2] / x[:, 2:]
            kps[side] = np.concatenate([uv, np.ones((21, 1))], axis=1).astype(np.float32)
        img = np.full((height, width, 3), 0.25, np.float32) if with_images else None
        views.append(View(f"{i:02d}", cam, img, None, kps))
    return Scan(views, scan_id="tiny", source="synthetic")


@pytest.fixture
def tiny_scan() -> Scan:
    return make_tiny_scan()
