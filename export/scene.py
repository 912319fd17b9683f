"""Both hands as one scene file, so a viewer shows them in their true relative placement.

GLB keeps each hand a separate named node (via trimesh); PLY is one mesh with the hands told
apart by vertex colour; OBJ is one file with an ``o <name>`` object per hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from export.atomic import assert_finite, write_bytes, write_text
from export.mesh_io import colors_to_uint8, write_ply
from export.overlay import SIDE_COLORS

SCENE_FORMATS = ("glb", "ply", "obj")


@dataclass
class SceneMesh:
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None  # (N,3|4) uint8 or float [0,1]; default: the side's colour


def _colors(name: str, m: SceneMesh) -> np.ndarray:
    if m.colors is not None:
        c = colors_to_uint8(f"{name} colors", m.colors, len(m.vertices))
    else:
        c = np.tile(np.array(SIDE_COLORS.get(name, (200, 200, 200)), np.uint8), (len(m.vertices), 1))
    if c.shape[1] == 3:
        c = np.concatenate([c, np.full((len(c), 1), 255, np.uint8)], axis=1)
    return c


def write_scene(path: str | Path, meshes: Mapping[str, SceneMesh | tuple[Any, Any]]) -> Path:
    """Write ``meshes`` (name -> SceneMesh or (vertices, faces)) into one file; the format is the
    suffix of ``path`` (.glb, .ply or .obj)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in SCENE_FORMATS:
        raise ValueError(f"scene format must be one of {SCENE_FORMATS}, got {path.suffix!r}")
    if not meshes:
        raise ValueError(f"{path.name}: no meshes to write")
    items: list[tuple[str, SceneMesh]] = []
    for name, m in meshes.items():
        sm = m if isinstance(m, SceneMesh) else SceneMesh(*m)
        v = assert_finite(f"{name} vertices", sm.vertices).astype(np.float64).reshape(-1, 3)
        f = assert_finite(f"{name} faces", sm.faces).astype(np.int64).reshape(-1, 3)
        items.append((name, SceneMesh(v, f, sm.colors)))

    if fmt == "glb":
        import trimesh

        scene = trimesh.Scene()
        for name, m in items:
            mesh = trimesh.Trimesh(m.vertices, m.faces, vertex_colors=_colors(name, m), process=False)
            scene.add_geometry(mesh, node_name=name, geom_name=name)
        return write_bytes(path, scene.export(file_type="glb"))

    offsets = np.cumsum([0] + [len(m.vertices) for _, m in items])
    V = np.concatenate([m.vertices for _, m in items])
    if fmt == "ply":
        F = np.concatenate([m.faces + o for (_, m), o in zip(items, offsets)])
        C = np.concatenate([_colors(n, m)[:, :3] for n, m in items])
        return write_ply(path, V, F, colors=C)
    lines = [f"# handrecon scene: {', '.join(n for n, _ in items)}; metres\n"]
    lines += [f"v {x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in V.tolist()]
    for (name, m), o in zip(items, offsets):
        lines.append(f"o {name}\n")
        lines += [f"f {a} {b} {c}\n" for a, b, c in (m.faces + o + 1).tolist()]
    return write_text(path, "".join(lines))
