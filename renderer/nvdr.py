"""nvdiffrast backend: import and build-environment handling for ``nvdiffrast.torch``.

GPU install facts (what it takes to make ``import nvdiffrast.torch as dr`` work):

- ``pip install diffrp-nvdiffrast`` (a PyPI packaging of NVlabs' nvdiffrast; module name
  ``nvdiffrast``). It ships sources only: the CUDA plugin is compiled on first use with
  ``torch.utils.cpp_extension`` (ninja and a CUDA toolkit needed), which takes a minute or two.
- ``CUDA_HOME=/usr/local/cuda`` (the toolkit whose nvcc matches torch's CUDA).
- With torch cu13 builds, ``cusparse.h`` is found only if ``site-packages/nvidia/cu13/include``
  is on ``CPATH``.
- The extension build directory (``torch.utils.cpp_extension._get_build_directory``) must be
  on ``sys.path`` before first use, so the compiled plugin can be imported (the fork names it
  ``nvdiffrast_plugin_<version>_torch<version>``: ``plugin_names``).
- ``TORCH_CUDA_ARCH_LIST=9.0`` for Hopper (H100/H200); otherwise the capability of device 0.

``prepare_build_env`` applies the last four (leaving values already set alone); ``load`` calls
it, imports nvdiffrast and reports why it failed without raising.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from types import ModuleType

import torch

_STATE: dict[str, object] = {"module": None, "error": None, "tried": False}
_PLUGIN_NAMES = ("nvdiffrast_plugin", "nvdiffrast_plugin_gl")


def prepare_build_env() -> None:
    """Set the environment nvdiffrast's first-use compilation needs, without overriding the user."""
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    for base in sys.path:
        inc = os.path.join(base, "nvidia", "cu13", "include")
        if base and os.path.isdir(inc):
            cpath = os.environ.get("CPATH", "")
            if inc not in cpath.split(os.pathsep):
                os.environ["CPATH"] = inc + (os.pathsep + cpath if cpath else "")
            break
    try:
        from torch.utils.cpp_extension import _get_build_directory

        for name in plugin_names():
            build_dir = _get_build_directory(name, verbose=False)
            if build_dir not in sys.path:
                sys.path.insert(0, build_dir)
    except Exception:  # the build dir helper is private API; the import below reports failures
        pass


def plugin_names() -> list[str]:
    """Module names the compiled plugin may have: upstream's plain ones, and the fork's
    ``nvdiffrast_plugin_<version>_torch<version>[_gl]`` (non-word characters as ``_``)."""
    names = list(_PLUGIN_NAMES)
    try:
        version = importlib.import_module("nvdiffrast").__version__
    except Exception:  # not installed: the import in ``load`` reports it
        return names
    base = re.sub(r"\W|^(?=\d)", "_", f"nvdiffrast_plugin_{version}_torch{torch.__version__}")
    return names + [base, base + "_gl"]


def load() -> ModuleType | None:
    """``nvdiffrast.torch`` if it imports and CUDA is present, else None (see ``why_unavailable``)."""
    if _STATE["tried"]:
        return _STATE["module"]  # type: ignore[return-value]
    _STATE["tried"] = True
    if not torch.cuda.is_available():
        _STATE["error"] = "CUDA is not available"
        return None
    prepare_build_env()
    try:
        _STATE["module"] = importlib.import_module("nvdiffrast.torch")
    except Exception as exc:  # ImportError, or a build failure surfacing at import
        _STATE["error"] = f"import nvdiffrast.torch failed: {exc!r} (pip install diffrp-nvdiffrast)"
    return _STATE["module"]  # type: ignore[return-value]


def available() -> bool:
    return load() is not None


def why_unavailable() -> str:
    load()
    return str(_STATE["error"] or "")
