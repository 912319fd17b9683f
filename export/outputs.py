"""Everything a finished run writes besides its stage checkpoints.

``write_outputs`` runs the exporters in ``EXPORTERS`` in order. An exporter reads the run
(``ExportContext``), writes files, records them, attaches images to a stage
(``ctx.images[stage]``) and may return extra report sections. Later stages (ham, neural) add their
own exporter to the list; the report then shows per stage its metrics table and its images.

Layout of ``<out>``::

    metrics.json                    all stages' metrics (time_s, peak_mem_mb, ...) + run identity
    keypoints3d.json / .npz         pose_fit's 3D keypoints per side (metres, MediaPipe order)
    hand_params.json / .npz         fitted hand parameters per side
    hand_<side>.obj / .ply          fitted hand meshes (output.mesh_formats)
    hands.<output.scene_format>     both hands in one scene
    hand_<side>_refined.*, refined.npz, hands_refined.*, images/ham/, images/silhouette_fit/
                                    the silhouette_fit / ham outputs (export/texture.py)
    images/<stage>/overlay_<view>.png  detections vs fitted joints (output.overlays): pose_fit's
                                    keypoints, and the hand model's joints of the last stage
    report.html                     (output.report)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from export.atomic import write_json
from export.mesh_io import write_obj, write_ply
from export.neural import export_neural
from export.overlay import write_overlays
from export.params_io import save_hand_params, save_keypoints3d
from export.report import ReportSection, stage_sections, write_report
from export.scene import SceneMesh, write_scene
from fitting.state import State

log = logging.getLogger("handrecon")
MESH_FORMATS = ("obj", "ply")


@dataclass
class ExportContext:
    scan: Any
    state: State
    conf: Mapping[str, Any]
    out_dir: Path
    run_info: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    images: dict[str, list[Path]] = field(default_factory=dict)
    hand_meshes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


Exporter = Callable[[ExportContext], list[ReportSection]]


def _output(ctx: ExportContext) -> Mapping[str, Any]:
    return ctx.conf["output"]


def export_keypoints(ctx: ExportContext) -> list[ReportSection]:
    """pose_fit's 3D keypoints and, per view, the detections against their projections."""
    st = ctx.state
    if not st.keypoints3d:
        return []
    ctx.files += save_keypoints3d(ctx.out_dir / "keypoints3d", st.keypoints3d, st.keypoints3d_valid)
    if _output(ctx)["overlays"]:
        paths = write_overlays(
            ctx.scan, ctx.out_dir / "images" / "pose_fit", st.keypoints3d,
            fitted_valid=st.keypoints3d_valid, assignment=st.assignment or None, accepted=st.accepted or None,
            title="pose_fit",
        )
        ctx.images.setdefault("pose_fit", []).extend(paths)
        ctx.files += paths
    return []


def hand_model_meshes(params: Mapping[str, Any], model_name: str) -> dict[str, dict[str, np.ndarray]]:
    """Vertices, faces and joints of the hand model for each side's parameters (CPU)."""
    import handmodel

    out: dict[str, dict[str, np.ndarray]] = {}
    for side, p in params.items():
        model = handmodel.load(model_name, side=side)
        with torch.no_grad():
            rec = model.forward(p.betas, p.hand_pose, p.global_orient, p.transl)
        faces = rec.faces if getattr(rec, "faces", None) is not None else model.faces
        out[side] = {
            "vertices": rec.vertices[0].detach().cpu().numpy(),
            "joints": rec.joints[0].detach().cpu().numpy(),
            "faces": np.asarray(faces.detach().cpu().numpy() if hasattr(faces, "detach") else faces, dtype=np.int64),
        }
    return out


def export_hands(ctx: ExportContext) -> list[ReportSection]:
    """Fitted parameters, per-side meshes, the two-hand scene and the hand_fit overlays."""
    st = ctx.state
    if not st.params:
        return []
    out = _output(ctx)
    ctx.files += save_hand_params(ctx.out_dir / "hand_params", st.params)
    ctx.hand_meshes = hand_model_meshes(st.params, str(ctx.conf["hand_model"]["name"]))
    formats = [str(f) for f in out["mesh_formats"]]
    unknown = sorted(set(formats) - set(MESH_FORMATS))
    if unknown:
        raise ValueError(f"output.mesh_formats: unknown {unknown}; use any of {list(MESH_FORMATS)}")
    for side, m in ctx.hand_meshes.items():
        if "obj" in formats:
            ctx.files.append(write_obj(ctx.out_dir / f"hand_{side}.obj", m["vertices"], m["faces"]))
        if "ply" in formats:
            ctx.files.append(write_ply(ctx.out_dir / f"hand_{side}.ply", m["vertices"], m["faces"]))
    scene = {s: SceneMesh(m["vertices"], m["faces"]) for s, m in ctx.hand_meshes.items()}
    ctx.files.append(write_scene(ctx.out_dir / f"hands.{out['scene_format']}", scene))
    if out["overlays"]:
        # the parameters are those of the last stage that ran (hand_fit, or a refinement after it)
        stage = next(reversed(st.metrics), "hand_fit") if st.metrics else "hand_fit"
        joints = {s: m["joints"] for s, m in ctx.hand_meshes.items()}
        paths = write_overlays(
            ctx.scan, ctx.out_dir / "images" / stage, joints,
            assignment=st.assignment or None, accepted=st.accepted or None, title=stage,
        )
        ctx.images.setdefault(stage, []).extend(paths)
        ctx.files += paths
    return []


def export_refinement(ctx: ExportContext) -> list[ReportSection]:
    """silhouette_fit's mask overlays and everything of the ham stage (``export/texture.py``)."""
    from export.texture import export_refined, export_silhouettes

    return export_silhouettes(ctx) + export_refined(ctx)


# Run in order by write_outputs; later stages append theirs.
EXPORTERS: list[Exporter] = [export_keypoints, export_hands, export_refinement, export_neural]


def write_outputs(
    scan: Any,
    state: State,
    conf: Mapping[str, Any],
    out_dir: str | Path,
    run_info: Mapping[str, Any] | None = None,
    exporters: list[Exporter] | None = None,
) -> ExportContext:
    """Write every output of a finished run into ``out_dir``; returns what was written."""
    from fitting.pipeline import json_safe

    ctx = ExportContext(scan, state, conf, Path(out_dir), dict(run_info or {}))
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    extra: list[ReportSection] = []
    for exporter in EXPORTERS if exporters is None else exporters:
        extra += exporter(ctx)
    metrics_path = write_json(ctx.out_dir / "metrics.json", json_safe({"run": ctx.run_info, "stages": state.metrics}))
    ctx.files.append(metrics_path)
    if _output(ctx)["report"]:
        sections = stage_sections(state.metrics, ctx.images) + extra
        files = ReportSection("files", metrics={"written": [p.relative_to(ctx.out_dir).as_posix()
                                                            for p in ctx.files if _inside(p, ctx.out_dir)]})
        title = f"handrecon: {ctx.run_info.get('conf', '')} scan {ctx.run_info.get('scan_id', '')}".strip()
        ctx.files.append(write_report(ctx.out_dir / "report.html", sections + [files], title, ctx.run_info))
    log.info("outputs written to %s (%d files)", ctx.out_dir, len(ctx.files))
    return ctx


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
