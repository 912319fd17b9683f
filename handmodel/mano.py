"""Loader of the user's own MANO files (``MANO_RIGHT.pkl`` / ``MANO_LEFT.pkl``), without chumpy.

MANO is licence-gated, so nothing of it ships here: the user downloads the files from
https://mano.is.tue.mpg.de and points ``model_dir`` at them. The pickles hold chumpy arrays; a
restricted unpickler maps every ``chumpy`` class to a stand-in that keeps the wrapped array, and
refuses any class outside numpy / scipy.sparse / a few builtins (a model file has no business
running other code).

What is converted to :class:`~handmodel.model.HandModelData`:
- joints reordered from MANO's (wrist, index, middle, pinky, ring, thumb) to ours (wrist, thumb,
  index, middle, ring, pinky), with the skinning weights, pose blend shapes and ``hands_mean``;
- rest joints as ``J_regressor @ (v_template + shapedirs @ betas)``, stored as the equivalent
  joint template + joint shape directions (exactly linear);
- ``hands_mean`` becomes ``pose_mean`` (zeros with ``flat_hand_mean=True``);
- fingertips from the commonly used vertex ids (``joint_orders.MANO_TIP_VERTICES``);
- the known sign error of ``MANO_LEFT.pkl``: its ``shapedirs[:, 0, :]`` equal the right hand's
  instead of their mirror, so shape changes pull the left hand's x the wrong way; it is negated.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .joint_orders import MANO_TIP_VERTICES
from .model import HandModelData, HandModelFileNotFound, HandModelFormatError, TREE_PARENTS
from .params import NUM_BETAS, check_side

MANO_FILES = {"right": "MANO_RIGHT.pkl", "left": "MANO_LEFT.pkl"}
# Our tree joint k is MANO joint MANO_JOINT_FOR_TREE[k].
MANO_JOINT_FOR_TREE = np.array([0, 13, 14, 15, 1, 2, 3, 4, 5, 6, 10, 11, 12, 7, 8, 9])
DEFAULT_DIR_ENV = "MANO_DIR"
DEFAULT_DIR = Path("models") / "mano"
_GET_IT = (
    "MANO is licence-gated and not shipped: register at https://mano.is.tue.mpg.de, download "
    "'Models & Code', and copy mano_v*/models/MANO_RIGHT.pkl and MANO_LEFT.pkl into that folder "
    f"(or pass model_dir=..., or set ${DEFAULT_DIR_ENV}); or use the built-in hand (source='builtin'), which needs no download"
)
_ALLOWED_BUILTINS = {"object", "set", "frozenset", "slice", "complex", "bytearray", "list", "dict", "tuple"}


class _ChumpyStandIn:
    """Takes the place of any chumpy class while unpickling; keeps the pickled state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._state: Any = args[0] if args else None

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def array(self) -> np.ndarray:
        """The wrapped array: chumpy keeps a leaf's value in its ``x`` attribute."""
        state = self._state
        if isinstance(state, tuple):  # (dict, slots) form
            state = next((s for s in state if isinstance(s, dict)), None)
        if isinstance(state, dict) and "x" in state:
            x = state["x"]
            return x.array() if isinstance(x, _ChumpyStandIn) else np.asarray(x)
        raise HandModelFormatError("a chumpy object in the MANO file holds no plain array (only chumpy leaves are supported)")


class _MANOUnpickler(pickle.Unpickler):
    """Unpickler that maps chumpy to stand-ins and allows only numpy, scipy.sparse and plain builtins."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        if module in ("__builtin__", "builtins") and name in _ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if module == "_codecs" and name == "encode":  # bytes inside protocol-2 pickles written by Python 3
            return super().find_class(module, name)
        if module == "copy_reg" or module == "copyreg":
            if name in ("_reconstructor", "__newobj__"):
                return super().find_class(module, name)
        if module.startswith("scipy.sparse"):  # old pickles name private modules; use the namespace
            import scipy.sparse

            if hasattr(scipy.sparse, name):
                return getattr(scipy.sparse, name)
        if module == "numpy" or module.startswith("numpy.") or module.startswith("scipy.sparse"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a MANO model file")


def read_mano_pickle(path: str | Path) -> dict[str, Any]:
    """The raw dictionary of a MANO pickle, chumpy arrays replaced by numpy arrays."""
    path = Path(path)
    try:
        raw = _MANOUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except HandModelFormatError:
        raise
    except Exception as e:  # any unpickling failure means the file is not a MANO model
        raise HandModelFormatError(f"{path} is not a readable MANO model file ({type(e).__name__}: {e}); re-download it. {_GET_IT}") from e
    if not isinstance(raw, dict):
        raise HandModelFormatError(f"{path}: expected a dictionary of arrays, found {type(raw).__name__}")
    return {k: _to_numpy(v) for k, v in raw.items()}


def _to_numpy(v: Any) -> Any:
    if isinstance(v, _ChumpyStandIn):
        return v.array()
    if hasattr(v, "toarray") and type(v).__module__.startswith("scipy.sparse"):
        return np.asarray(v.toarray())
    return v


def mano_path(side: str, model_dir: str | Path | None = None) -> Path:
    """Where the MANO file of ``side`` is looked for: ``model_dir`` (a folder or the .pkl itself),
    else ``$MANO_DIR``, else ``models/mano`` relative to the working directory."""
    check_side(side)
    folder = Path(model_dir) if model_dir is not None else Path(os.environ.get(DEFAULT_DIR_ENV, DEFAULT_DIR))
    return folder if folder.suffix == ".pkl" else folder / MANO_FILES[side]


def load_mano_data(side: str = "right", model_dir: str | Path | None = None, flat_hand_mean: bool = False) -> HandModelData:
    """MANO's data for one side in our joint order (see the module docstring)."""
    path = mano_path(side, model_dir)
    if not path.is_file():
        raise HandModelFileNotFound(f"MANO model file not found: {path}. {_GET_IT}")
    raw = read_mano_pickle(path)
    needed = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "hands_mean")
    missing = [k for k in needed if k not in raw]
    if missing:
        raise HandModelFormatError(f"{path}: not a MANO model, missing {missing}")
    try:
        template = np.asarray(raw["v_template"], dtype=np.float64)
        shapedirs = np.asarray(raw["shapedirs"], dtype=np.float64)[:, :, :NUM_BETAS]
        posedirs = np.asarray(raw["posedirs"], dtype=np.float64)
        J_reg = np.asarray(raw["J_regressor"], dtype=np.float64)
        weights = np.asarray(raw["weights"], dtype=np.float64)
        kintree = np.asarray(raw["kintree_table"]).astype(np.int64)
        hands_mean = np.asarray(raw["hands_mean"], dtype=np.float64).reshape(15, 3)
        faces = np.asarray(raw["f"]).astype(np.int64)
    except (TypeError, ValueError) as e:
        raise HandModelFormatError(f"{path}: malformed MANO arrays ({e})") from e
    V = len(template)
    if shapedirs.shape[:2] != (V, 3) or shapedirs.shape[2] < NUM_BETAS:
        raise HandModelFormatError(f"{path}: shapedirs {shapedirs.shape} do not match {V} vertices x {NUM_BETAS} betas")
    if J_reg.shape != (16, V) or weights.shape != (V, 16) or posedirs.shape != (V, 3, 135):
        raise HandModelFormatError(f"{path}: J_regressor {J_reg.shape}, weights {weights.shape}, posedirs {posedirs.shape} do not fit MANO's 16 joints")
    if kintree.shape != (2, 16):
        raise HandModelFormatError(f"{path}: kintree_table {kintree.shape} is not (2, 16)")
    _check_kintree(kintree, path)

    if side == "left":
        shapedirs = _fix_left_shapedirs(shapedirs, template, path)

    order = MANO_JOINT_FOR_TREE
    pose_order = order[1:] - 1
    posedirs = posedirs.reshape(V, 3, 15, 9)[:, :, pose_order].reshape(V, 3, 135)
    J_reg = J_reg[order]
    data = HandModelData(
        side=side,
        source="mano",
        template=template,
        faces=faces,
        shapedirs=shapedirs,
        joint_template=J_reg @ template,
        joint_shapedirs=np.einsum("jv,vck->jck", J_reg, shapedirs),
        weights=weights[:, order],
        tip_vertex_ids=np.repeat(MANO_TIP_VERTICES[:, None], 3, axis=1).astype(np.int64),
        tip_weights=np.tile([1.0, 0.0, 0.0], (5, 1)),
        parents=TREE_PARENTS.copy(),
        posedirs=posedirs,
        pose_mean=np.zeros((15, 3)) if flat_hand_mean else hands_mean[pose_order],
        canonical_axes=f"MANO's own frame ({side} hand, metres); the rest wrist is not at the origin",
    )
    return data.validate(str(path))


def _check_kintree(kintree: np.ndarray, path: Path) -> None:
    """MANO's tree: every finger a chain of three joints hanging on the wrist."""
    parents = kintree[0]
    expected = np.array([-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14])
    if not np.array_equal(kintree[1], np.arange(16)) or not np.array_equal(parents[1:], expected[1:]):
        raise HandModelFormatError(f"{path}: kinematic tree {kintree.tolist()} is not MANO's")


def _fix_left_shapedirs(shapedirs: np.ndarray, template: np.ndarray, path: Path) -> np.ndarray:
    """Negate ``shapedirs[:, 0, :]`` of a left model that carries the known sign error.

    With the right file beside it, the error is recognised exactly (the x rows are equal rather
    than opposite). Without it: MANO's first shape direction is mostly a change of size, whose
    x, y and z parts all correlate with the centred template the same way; the error shows as
    an x correlation of the opposite sign.
    """
    right = path.with_name(MANO_FILES["right"])
    fixed = shapedirs.copy()
    if right.is_file() and right != path:
        r = np.asarray(read_mano_pickle(right)["shapedirs"], dtype=np.float64)[:, :, : shapedirs.shape[2]]
        if r.shape == shapedirs.shape:
            if np.abs(shapedirs[:, 0] - r[:, 0]).sum() < np.abs(shapedirs[:, 0] + r[:, 0]).sum():
                fixed[:, 0] *= -1
            return fixed
    centred = template - template.mean(0)
    corr = [np.corrcoef(centred[:, a], shapedirs[:, a, 0])[0, 1] for a in range(3)]
    if np.sign(corr[1]) == np.sign(corr[2]) and np.sign(corr[0]) == -np.sign(corr[1]):
        fixed[:, 0] *= -1
    return fixed
