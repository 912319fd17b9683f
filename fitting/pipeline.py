"""Runs the fitting stages in order, with one checkpoint per stage so a run resumes where it stopped.

A stage is ``run(scan, state, conf_tree) -> State`` (see DESIGN.md). The registry maps a stage name
to where its function lives and which conf sections, besides its own, decide its result. Each
stage's checkpoint ``<out>/stages/<NN>_<name>.pt`` stores the stage's conf hash; the hash chains
the previous stage's hash, so a changed conf invalidates that stage and every later one. Writes are
atomic (tmp file + ``os.replace``), so a killed run never leaves a half-written checkpoint.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from export.atomic import atomic_path, write_text
from fitting.conf import UNHASHED_KEYS, ConfError, conf_hash, to_plain
from fitting.state import State

LOGGER_NAME = "handrecon"
log = logging.getLogger(LOGGER_NAME)
CHECKPOINT_FORMAT = "handrecon.stage/1"

StageFn = Callable[[Any, State, Any], State]


@dataclass(frozen=True)
class StageSpec:
    """``target`` is ``"module:function"`` (imported when the stage runs, so a stage whose module
    is missing fails only when asked for) or the function itself. ``conf_sections`` are the conf
    sections besides the stage's own that change its result (hashed for checkpoint matching)."""

    name: str
    target: str | StageFn
    conf_sections: tuple[str, ...] = ()

    def resolve(self) -> StageFn:
        if callable(self.target):
            return self.target
        module, _, attr = self.target.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ConfError(f"stage '{self.name}': cannot import {module} ({e})") from None
        fn = getattr(mod, attr or "run", None)
        if not callable(fn):
            raise ConfError(f"stage '{self.name}': {module} has no function {attr or 'run'}")
        return fn


# Stages a conf may list in ``pipeline.stages``, with the sections besides their own that they
# read. What an earlier stage's conf did reaches later stages through the chained hash.
REGISTRY: dict[str, StageSpec] = {}


def register(name: str, target: str | StageFn, conf_sections: Iterable[str] = ()) -> StageSpec:
    spec = StageSpec(name, target, tuple(conf_sections))
    REGISTRY[name] = spec
    return spec


register("pose_fit", "fitting.pose_fit:run", ("data",))
register("init", "fitting.init_gcn:run", ("data", "hand_model"))
register("hand_fit", "fitting.hand_fit:run", ("data", "hand_model"))
register("identity", "fitting.identity:run", ("data", "hand_model"))  # a calibrated shape into a single-frame fit
register("silhouette_fit", "fitting.silhouette_fit:run", ("data", "hand_model", "hand_fit", "masks", "renderer"))
register("ham", "fitting.ham:run", ("data", "hand_model", "masks", "renderer"))
register("neural", "fitting.neural:run", ("data", "masks", "renderer", "ham"))  # renderer trained on ham's meshes


def stage_specs(names: Iterable[str], registry: Mapping[str, StageSpec] | None = None) -> list[StageSpec]:
    registry = REGISTRY if registry is None else registry
    specs = []
    for n in names:
        if n not in registry:
            raise ConfError(f"pipeline.stages names unknown stage '{n}'; known stages: {sorted(registry)}")
        specs.append(registry[n])
    return specs


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_path(out_dir: Path, index: int, name: str) -> Path:
    return Path(out_dir) / "stages" / f"{index:02d}_{name}.pt"


def stage_hash(tree: Mapping[str, Any], spec: StageSpec, identity: Mapping[str, Any], previous: str) -> str:
    """Hash of what decides a stage's result: its own section, its declared sections, the scan
    identity, its name, and the previous stage's hash (so upstream changes propagate)."""
    sections = [s for s in (spec.name, *spec.conf_sections) if s not in UNHASHED_KEYS]
    seed = tree.get("seed", None)
    ident = {"scan": dict(identity), "stage": spec.name, "previous": previous, "seed": seed}
    return conf_hash(tree, sections, ident)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temporary file, fsync, then one os.replace: a kill leaves no torn file."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def weights_only_safe(value: Any, where: str = "state") -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as Python numbers, so that
    ``torch.load(weights_only=True)`` reads it back; anything else is an error naming its place
    (a checkpoint that cannot be loaded would silently be recomputed on every run)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, Mapping):
        return {k: weights_only_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"{where} is a {type(value).__name__}, which a weights_only checkpoint cannot hold; store tensors, "
        "arrays, numbers, strings, lists and dicts in the State"
    )


def save_checkpoint(path: Path, state: State, name: str, digest: str) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "stage": name, "conf_hash": digest,
               "state": weights_only_safe(state.to_dict())}
    atomic_torch_save(payload, path)
    metrics = json_safe(state.metrics.get(name, {}))
    write_text(path.with_suffix(".json"), json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path: Path, digest: str) -> State | None:
    """The stored State when ``path`` holds a checkpoint with hash ``digest``, else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable (older format, foreign file): recompute rather than fail
        log.warning("checkpoint %s unreadable (%s); recomputing", path, e)
        return None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        return None
    if payload.get("conf_hash") != digest:
        return None
    return State.from_dict(payload["state"])


def _remove_checkpoints(out_dir: Path, from_index: int) -> None:
    """Drop checkpoints of stage ``from_index`` and later: they were computed from older inputs."""
    stages = Path(out_dir) / "stages"
    if not stages.is_dir():
        return
    for p in stages.iterdir():
        head = p.name.split("_", 1)[0]
        if head.isdigit() and int(head) >= from_index and p.suffix in (".pt", ".json"):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak resident memory (MB) of this process during a block, and the CUDA peak when used.

    On Linux the kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs``, which
    gives the exact per-stage peak; where that is not allowed a 20 ms sampling thread is used."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda and torch.cuda.is_available()
        self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    def __enter__(self) -> "PeakMemory":
        self._hwm = _reset_hwm()
        if not self._hwm:
            self._sampled = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, _rss_mb())

    def __exit__(self, *exc: Any) -> None:
        if self._hwm:
            self.peak_mb = _status_mb("VmHWM")
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self._sampled, _rss_mb())
        if self.cuda:
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- reading
SCAN_FORMATS = ("fmhr", "interhand", "synthetic")


def read_scan(tree: Mapping[str, Any], data_path: str | Path, scan_id: str, load_images: bool = True) -> Any:
    """Read the scan with the reader of ``data.format`` (imported here, so a reader's optional
    dependencies are only needed when that format is used). ``data.views`` picks views by name
    (FMHR view ids, InterHand camera ids); ``load_images=False`` reads cameras and keypoints only."""
    data = tree["data"]
    fmt = str(data["format"])
    scale = float(data["scale"])
    views = [str(v) for v in data["views"]] or None
    holdout = [str(v) for v in data["holdout_views"]]
    return _read_scan(data, fmt, scale, views, data_path, scan_id, load_images).hold_out(holdout)


def _read_scan(data: Mapping[str, Any], fmt: str, scale: float, views: list[str] | None,
               data_path: str | Path, scan_id: str, load_images: bool) -> Any:
    if fmt == "fmhr":
        from capture.fmhr import read_fmhr

        return read_fmhr(data_path, scan_id, scale=scale, views=views, load_images=load_images)
    if fmt == "synthetic":  # FMHR layout plus the known answers in gt/ (synthetic.write_synthetic)
        from synthetic import read_synthetic

        scan = read_synthetic(data_path, scan_id, scale=scale, load_images=load_images)
        return scan.subset(views) if views else scan
    if fmt == "interhand":
        from capture.interhand import read_interhand

        try:
            index = int(scan_id)
        except ValueError:
            raise ConfError(f"InterHand2.6M scan ids are frame numbers of the split, got {scan_id!r}") from None
        return read_interhand(data_path, str(data["split"]), index, scale=scale, cameras=views,
                              load_images=load_images)
    raise ConfError(f"data.format = {fmt!r} is not a known capture format; use one of {SCAN_FORMATS}")


def scan_identity(tree: Mapping[str, Any], data_path: str | Path, scan_id: str) -> dict[str, Any]:
    """What makes two runs' inputs the same: format, resolved data path, scan id, scale, views."""
    data = tree["data"]
    return {
        "format": str(data["format"]),
        "path": str(Path(data_path).resolve()),
        "scan_id": str(scan_id),
        "scale": float(data["scale"]),
        "views": [str(v) for v in data["views"]],
        "holdout_views": [str(v) for v in data["holdout_views"]],
        "split": str(data["split"]) if str(data["format"]) == "interhand" else None,
    }


# ------------------------------------------------------------------------------------------ running
def run_pipeline(
    scan: Any,
    tree: Mapping[str, Any],
    out_dir: str | Path,
    *,
    identity: Mapping[str, Any] | None = None,
    restart: bool = False,
    registry: Mapping[str, StageSpec] | None = None,
    state: State | None = None,
) -> State:
    """Run ``pipeline.stages`` of ``tree`` on ``scan``, resuming from matching checkpoints.

    ``identity`` says which data this is (format, path, scan id, scale) and enters every stage's
    hash; ``restart`` drops all checkpoints first."""
    out_dir = Path(out_dir)
    names = list(tree["pipeline"]["stages"])
    specs = stage_specs(names, registry)
    identity = dict(identity or {})
    set_progress_enabled(bool(tree.get("log", {}).get("progress", True)))
    if restart:
        log.info("restart: recomputing every stage")
        _remove_checkpoints(out_dir, 0)
    state = state if state is not None else State()
    previous = ""
    recomputed = False
    device = str(tree.get("device", "cpu"))
    seed = int(tree.get("seed", 0))
    for index, spec in enumerate(specs):
        digest = stage_hash(tree, spec, identity, previous)
        path = checkpoint_path(out_dir, index, spec.name)
        loaded = None if recomputed else load_checkpoint(path, digest)
        if loaded is not None:
            state = loaded
            m = state.metrics.get(spec.name, {})
            log.info("stage %02d %s: resumed from %s (took %.1f s when computed)", index, spec.name,
                     path.name, float(m.get("time_s", float("nan"))))
        else:
            if not recomputed:
                _remove_checkpoints(out_dir, index)
                recomputed = True
            fn = spec.resolve()
            log.info("stage %02d %s: running", index, spec.name)
            seed_everything(seed + index)
            start = time.perf_counter()
            with PeakMemory(cuda=device.startswith("cuda")) as mem:
                result = fn(scan, state, tree)
                if device.startswith("cuda") and torch.cuda.is_available():
                    torch.cuda.synchronize()  # the stage's queued GPU work belongs to its time
            elapsed = time.perf_counter() - start
            if not isinstance(result, State):
                raise TypeError(f"stage '{spec.name}' returned {type(result).__name__}, expected State")
            state = result
            metrics = dict(state.metrics.get(spec.name, {}))
            metrics["time_s"] = round(elapsed, 4)
            metrics["peak_mem_mb"] = round(mem.peak_mb, 1)
            if mem.cuda_peak_mb is not None:
                metrics["peak_gpu_mem_mb"] = round(mem.cuda_peak_mb, 1)
            state.metrics[spec.name] = metrics
            save_checkpoint(path, state, spec.name, digest)
            log.info("stage %02d %s: done in %.2f s, peak memory %.0f MB", index, spec.name, elapsed, mem.peak_mb)
        previous = digest
    return state


def seed_everything(seed: int) -> None:
    """Same seed before each stage, so a resumed run's later stages match an uninterrupted run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def json_safe(value: Any) -> Any:
    """Metrics -> JSON: arrays/tensors to lists, numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if np.isfinite(f) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------ logging
# The run's own logger and the project's packages (modules log under ``__name__``), so their
# messages reach the console and run.log too; third-party libraries stay at their defaults.
LOGGED_PACKAGES = (LOGGER_NAME, "capture", "fitting", "handmodel", "renderer", "export", "synthetic", "networks")


def setup_logging(out_dir: str | Path | None, level: str = "INFO", console: bool = True) -> logging.Logger:
    """Console + ``<out>/run.log`` handlers on the project's loggers, replacing earlier ones
    (so repeated runs in one process do not log twice). Returns the ``handrecon`` logger."""
    numeric = logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ConfError(f"log.level must be one of DEBUG, INFO, WARNING, ERROR; got {level!r}")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    if console:
        handlers.append(_TqdmHandler())
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "run.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._handrecon = True  # type: ignore[attr-defined]
    reset_logging()
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(numeric)
        for h in handlers:
            logger.addHandler(h)
    return logging.getLogger(LOGGER_NAME)


def reset_logging() -> None:
    """Remove (and close) the handlers ``setup_logging`` added and reset the levels, so a run
    inside a longer process (tests, notebooks) leaves logging as it found it. Records still
    propagate to the root logger throughout, so an application's own handlers see them."""
    closed: set[int] = set()
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        ours = [h for h in logger.handlers if getattr(h, "_handrecon", False)]
        for h in ours:
            logger.removeHandler(h)
            if id(h) not in closed:
                h.close()
                closed.add(id(h))
        if ours:
            logger.setLevel(logging.NOTSET)


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break a running tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


# ----------------------------------------------------------------------------------------- progress
_PROGRESS_ENABLED = True


def set_progress_enabled(flag: bool) -> None:
    """Set from ``log.progress`` by the pipeline; bars also stay off when stderr is not a TTY."""
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = bool(flag)


class Progress:
    """A tqdm bar over ``iterable`` that shows the current loss terms.

    ``losses(data=..., prior=...)`` accepts floats or 0-d tensors; when the bar is off nothing is
    converted, so a quiet run pays no GPU sync for it. The last terms are logged at the end."""

    def __init__(self, iterable: Iterable[Any], desc: str, total: int | None = None, enabled: bool | None = None,
                 mininterval: float = 0.1):
        on = _PROGRESS_ENABLED if enabled is None else enabled
        self.desc = desc
        self._bar = tqdm(iterable, desc=desc, total=total, disable=True if not on else None, leave=False,
                         dynamic_ncols=True, file=sys.stderr, mininterval=mininterval)
        self.active = not self._bar.disable
        self._last: dict[str, Any] = {}
        self.steps = 0

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self._bar:
                self.steps += 1
                yield item
        finally:
            self._bar.close()
            if self._last:
                terms = ", ".join(f"{k} {_fmt(v)}" for k, v in self._last.items())
                log.info("%s: %d steps, last %s", self.desc, self.steps, terms)

    def __len__(self) -> int:
        return len(self._bar)

    def losses(self, **terms: Any) -> None:
        self._last = terms
        if self.active:
            self._bar.set_postfix({k: _fmt(v) for k, v in terms.items()}, refresh=False)


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item()
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def progress(
    iterable: Iterable[Any], desc: str, total: int | None = None, enabled: bool | None = None, mininterval: float = 0.1
) -> Progress:
    """``bar = progress(range(n), "hand_fit")``; ``for it in bar: ...; bar.losses(kp=l1, prior=l2)``.
    ``enabled=None`` follows ``log.progress``; bars are never drawn when stderr is not a TTY."""
    return Progress(iterable, desc, total=total, enabled=enabled, mininterval=mininterval)


__all__ = [
    "REGISTRY", "StageSpec", "register", "stage_specs", "run_pipeline", "checkpoint_path", "stage_hash",
    "load_checkpoint", "save_checkpoint", "setup_logging", "progress", "Progress", "set_progress_enabled",
    "json_safe", "PeakMemory", "to_plain", "reset_logging", "read_scan", "scan_identity", "weights_only_safe", "seed_everything",
]
