"""Exporters: exact mesh round trips through trimesh, NaN refusal, atomic writes, parameter files,
overlays, two-hand scenes, the report, and the run's output folder as a whole."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import trimesh

from conftest import tiny_keypoints
from export import atomic, mesh_io, outputs, overlay, params_io, report, scene
from fitting.conf import load_conf
from fitting.state import State
from handmodel.params import HandParams


def _mesh() -> tuple[np.ndarray, np.ndarray]:
    m = trimesh.creation.icosphere(subdivisions=1)
    rng = np.random.default_rng(0)
    v = (m.vertices * 0.0123 + rng.normal(scale=1e-4, size=m.vertices.shape)).astype(np.float32)
    return v, np.asarray(m.faces)


# ------------------------------------------------------------------------------------------ meshes
def test_obj_round_trip_is_exact(tmp_path: Path):
    v, f = _mesh()
    mesh_io.write_obj(tmp_path / "a.obj", v, f)
    m = trimesh.load(tmp_path / "a.obj", process=False, maintain_order=True)
    assert np.array_equal(m.vertices.astype(np.float32), v)
    assert np.array_equal(m.faces, f)


def test_obj_with_uvs_and_texture(tmp_path: Path):
    v, f = _mesh()
    rng = np.random.default_rng(1)
    uv = rng.uniform(size=(3 * len(f), 2)).astype(np.float32)  # every corner its own uv: seams everywhere
    uf = np.arange(3 * len(f)).reshape(-1, 3)
    tex = (rng.uniform(size=(16, 8, 3)) * 255).astype(np.uint8)
    mesh_io.write_obj(tmp_path / "t.obj", v, f, uvs=uv, uv_faces=uf, texture=tex)
    assert (tmp_path / "t.mtl").is_file() and (tmp_path / "t.png").is_file()
    text = (tmp_path / "t.obj").read_text()
    assert "mtllib t.mtl" in text and "usemtl" in text and re.search(r"^f \d+/\d+ \d+/\d+ \d+/\d+$", text, re.M)
    assert "map_Kd t.png" in (tmp_path / "t.mtl").read_text()
    m = trimesh.load(tmp_path / "t.obj", process=False)
    # trimesh splits vertices at uv seams: compare per face corner
    assert np.array_equal(m.vertices[m.faces].astype(np.float32), v[f])
    assert np.array_equal(m.visual.uv[m.faces].astype(np.float32), uv[uf])
    assert np.array_equal(np.asarray(m.visual.material.image)[..., :3], tex)


def test_obj_uvs_shared_with_vertex_indices(tmp_path: Path):
    v, f = _mesh()
    uv = np.random.default_rng(2).uniform(size=(len(v), 2)).astype(np.float32)
    mesh_io.write_obj(tmp_path / "u.obj", v, f, uvs=uv)  # uv_faces default to faces
    m = trimesh.load(tmp_path / "u.obj", process=False)
    assert np.array_equal(m.visual.uv[m.faces].astype(np.float32), uv[f])


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip_with_colours(tmp_path: Path, binary: bool):
    v, f = _mesh()
    c = np.random.default_rng(3).integers(0, 256, size=(len(v), 3)).astype(np.uint8)
    mesh_io.write_ply(tmp_path / "c.ply", v, f, colors=c, binary=binary)
    m = trimesh.load(tmp_path / "c.ply", process=False)
    assert np.array_equal(m.vertices.astype(np.float32), v)
    assert np.array_equal(m.faces, f)
    assert np.array_equal(np.asarray(m.visual.vertex_colors)[:, :3], c)
    mesh_io.write_ply(tmp_path / "n.ply", v, f, binary=binary)
    m = trimesh.load(tmp_path / "n.ply", process=False)
    assert np.array_equal(m.vertices.astype(np.float32), v)


def test_float_colours_are_rounded_and_checked():
    c = mesh_io.colors_to_uint8("c", np.array([[0.0, 0.5, 1.0]]), 1)
    assert c.tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match=r"\(N,3\) or \(N,4\)"):
        mesh_io.colors_to_uint8("c", np.zeros((2, 3)), 1)


def test_nan_is_refused_and_nothing_is_written(tmp_path: Path):
    v, f = _mesh()
    mesh_io.write_ply(tmp_path / "keep.ply", v, f)
    before = (tmp_path / "keep.ply").read_bytes()
    bad = v.copy()
    bad[7, 1] = np.nan
    with pytest.raises(atomic.NonFiniteError, match=r"keep.ply vertices: 1 of \d+ values are NaN/Inf \(first at index \[7, 1\]\)"):
        mesh_io.write_ply(tmp_path / "keep.ply", bad, f)
    assert (tmp_path / "keep.ply").read_bytes() == before  # the old file is untouched
    with pytest.raises(atomic.NonFiniteError):
        mesh_io.write_obj(tmp_path / "x.obj", bad, f)
    assert not (tmp_path / "x.obj").exists()
    with pytest.raises(atomic.NonFiniteError):
        atomic.write_json(tmp_path / "m.json", {"x": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.ply"]
    with pytest.raises(ValueError, match="index out of range"):
        mesh_io.write_obj(tmp_path / "y.obj", v, f + len(v))


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            assert tmp.suffix == ".txt" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# -------------------------------------------------------------------------------------- parameters
def _params(seed: int = 0) -> dict[str, HandParams]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("left", "right"):
        out[side] = HandParams(torch.randn(1, 10, generator=g), torch.randn(1, 15, 3, generator=g),
                               torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g))
    return out


def test_hand_params_round_trip_json_and_npz(tmp_path: Path):
    p = _params()
    j, n = params_io.save_hand_params(tmp_path / "hand_params", p)
    doc = json.loads(j.read_text())
    assert doc["format"] == params_io.PARAMS_FORMAT and len(doc["hands"]["left"]["hand_pose"]) == 15
    for path in (j, n):
        back = params_io.load_hand_params(path)
        for side in p:
            for k, t in p[side].to_dict().items():
                assert torch.equal(back[side].to_dict()[k], t), (path.suffix, side, k)
    p["left"].betas[0, 3] = float("inf")
    with pytest.raises(atomic.NonFiniteError, match="left betas"):
        params_io.save_hand_params(tmp_path / "bad", p)


def test_keypoints_round_trip(tmp_path: Path):
    kp = tiny_keypoints()
    valid = {"left": np.arange(21) % 2 == 0, "right": np.ones(21, bool)}
    j, n = params_io.save_keypoints3d(tmp_path / "kp", kp, valid)
    for path in (j, n):
        joints, ok = params_io.load_keypoints3d(path)
        for side in kp:
            assert np.array_equal(joints[side], kp[side]) and np.array_equal(ok[side], valid[side])
    assert json.loads(j.read_text())["joint_names"][4] == "thumb4"


# --------------------------------------------------------------------------------------- overlays
def _pixel(img: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return img[int(uv[1]), int(uv[0])]


def test_overlay_draws_fit_detections_and_rejections(tiny_scan, tmp_path: Path):
    view = tiny_scan.views[1]
    fitted = {s: k for s, k in tiny_keypoints().items()}
    # the detector swapped the labels in this view; the fit assigned them back; joint 4 rejected
    dets = {"left": view.keypoints["right"], "right": view.keypoints["left"]}
    accepted = {"right": np.ones(21, bool), "left": np.ones(21, bool)}
    accepted["right"][4] = False
    img = overlay.draw_overlay(view.image, view.camera, dets, fitted,
                               assignment={"left": "right", "right": "left"}, accepted=accepted)
    assert img.shape == (view.camera.height, view.camera.width, 3) and img.dtype == np.uint8
    assert not np.array_equal(img, np.full_like(img, 64))
    # fitted wrist: filled dot in the side's colour
    uv, _ = overlay.project_joints(view.camera, fitted["right"])
    assert np.abs(_pixel(img, uv[0]).astype(int) - overlay.SIDE_COLORS["right"]).max() < 40
    uv_l, _ = overlay.project_joints(view.camera, fitted["left"])
    assert np.abs(_pixel(img, uv_l[0]).astype(int) - overlay.SIDE_COLORS["left"]).max() < 40
    # colours present: both sides, and grey for the rejected joint
    flat = img.reshape(-1, 3).astype(int)
    for c in (overlay.SIDE_COLORS["left"], overlay.SIDE_COLORS["right"], overlay.REJECTED_COLOR):
        assert (np.abs(flat - c).max(axis=1) < 10).any(), c


def test_overlay_without_image_is_black_and_discarded_detections_grey(tiny_scan):
    view = tiny_scan.views[0]
    img = overlay.draw_overlay(None, view.camera, {"left": view.keypoints["left"]}, {}, assignment={})
    assert img[-1, -1].tolist() == [0, 0, 0]
    flat = img.reshape(-1, 3).astype(int)
    assert (np.abs(flat - overlay.REJECTED_COLOR).max(axis=1) < 10).any()
    assert not (np.abs(flat - overlay.SIDE_COLORS["left"]).max(axis=1) < 40).any()


def test_write_overlays_one_png_per_view(tiny_scan, tmp_path: Path):
    paths = overlay.write_overlays(tiny_scan, tmp_path / "ov", tiny_keypoints(), title="t")
    assert [p.name for p in paths] == [f"overlay_{v.name}.png" for v in tiny_scan.views]
    img = cv2.imread(str(paths[0]))
    assert img.shape == (48, 64, 3)


# ------------------------------------------------------------------------------------------ scenes
def test_scene_glb_has_both_hands(tmp_path: Path):
    v, f = _mesh()
    p = scene.write_scene(tmp_path / "s.glb", {"left": (v - [0.05, 0, 0], f), "right": (v + [0.05, 0, 0], f)})
    s = trimesh.load(p)
    assert set(s.geometry) == {"left", "right"}
    np.testing.assert_allclose(s.geometry["right"].vertices, v + [0.05, 0, 0], atol=1e-7)
    colors = np.asarray(s.geometry["left"].visual.vertex_colors)[:, :3]
    assert (colors == overlay.SIDE_COLORS["left"]).all()


@pytest.mark.parametrize("fmt", ["ply", "obj"])
def test_scene_single_file_formats(tmp_path: Path, fmt: str):
    v, f = _mesh()
    p = scene.write_scene(tmp_path / f"s.{fmt}", {"left": (v, f), "right": (v + [0.1, 0, 0], f)})
    m = trimesh.load(p, process=False, maintain_order=True)
    assert len(m.vertices) == 2 * len(v) and len(m.faces) == 2 * len(f)
    assert np.array_equal(m.faces[len(f):], f + len(v))
    if fmt == "ply":
        c = np.asarray(m.visual.vertex_colors)[:, :3]
        assert (c[: len(v)] == overlay.SIDE_COLORS["left"]).all() and (c[len(v):] == overlay.SIDE_COLORS["right"]).all()
    else:
        assert p.read_text().count("\no ") == 2
    with pytest.raises(ValueError, match="scene format"):
        scene.write_scene(tmp_path / "s.stl", {"left": (v, f)})


# ------------------------------------------------------------------------------------------ report
def test_report_is_offline_with_relative_images(tmp_path: Path):
    img_dir = tmp_path / "run" / "images" / "pose_fit"
    atomic.write_image(img_dir / "overlay_00.png", np.zeros((4, 4, 3), np.uint8))
    sections = report.stage_sections(
        {"pose_fit": {"time_s": 1.23456, "sides": {"left": {"reprojection_median_px": 3.5}}, "views": ["00", "07"]}},
        {"pose_fit": [img_dir / "overlay_00.png"]},
    ) + [report.ReportSection("notes <b>", text="a < b")]
    path = report.write_report(tmp_path / "run" / "report.html", sections, "T", {"scan_id": "1"})
    html = path.read_text()
    assert "stage pose_fit" in html and "1.235" in html
    # per-side records are one table with a column per side
    assert "<tr><th>sides</th><th>left</th></tr>" in html and "<th>reprojection_median_px</th><td class='v'>3.5</td>" in html
    assert "00, 07" in html and "notes &lt;b&gt;" in html and "a &lt; b" in html
    srcs = re.findall(r"src='([^']+)'", html)
    assert srcs == ["images/pose_fit/overlay_00.png"]
    assert all((path.parent / s).is_file() for s in srcs)
    assert "http" not in html and "<script" not in html


# ------------------------------------------------------------------------------------------ outputs
class _FakeModel:
    """A stand-in hand model: a tetrahedron per joint set, placed by transl (no handmodel needed)."""

    faces = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])

    def forward(self, betas, hand_pose, global_orient, transl):
        verts = torch.tensor([[0, 0, 0], [0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.01]], dtype=torch.float32)[None] + transl[:, None]
        joints = torch.as_tensor(tiny_keypoints()["right"])[None] + transl[:, None]
        return SimpleNamespace(vertices=verts, joints=joints, faces=torch.as_tensor(self.faces))


def _state_with_fit() -> State:
    kp = tiny_keypoints()
    st = State(keypoints3d=kp, keypoints3d_valid={s: np.ones(21, bool) for s in kp})
    st.assignment = {"00": {"left": "left", "right": "right"}}
    st.accepted = {"00": {"left": np.ones(21, bool), "right": np.ones(21, bool)}}
    st.metrics = {"pose_fit": {"time_s": 0.5, "peak_mem_mb": 100.0}}
    return st


def test_write_outputs_keypoints_only(tiny_scan, tmp_path: Path):
    tree = load_conf(Path(__file__).parent.parent / "conf" / "base.conf").tree
    ctx = outputs.write_outputs(tiny_scan, _state_with_fit(), tree, tmp_path / "o", {"conf": "base", "scan_id": "tiny"})
    out = tmp_path / "o"
    names = {p.relative_to(out).as_posix() for p in ctx.files}
    assert {"keypoints3d.json", "keypoints3d.npz", "metrics.json", "report.html"} <= names
    assert {f"images/pose_fit/overlay_{v.name}.png" for v in tiny_scan.views} <= names
    assert not (out / "hand_params.json").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["stages"]["pose_fit"]["time_s"] == 0.5 and m["run"]["scan_id"] == "tiny"
    assert "images/pose_fit/overlay_00.png" in (out / "report.html").read_text()


def test_write_outputs_with_hands(tiny_scan, tmp_path: Path, monkeypatch):
    import handmodel

    monkeypatch.setattr(handmodel, "load", lambda name, side: _FakeModel(), raising=False)
    st = _state_with_fit()
    st.params = _params()
    st.metrics["hand_fit"] = {"time_s": 2.0}
    tree = load_conf(Path(__file__).parent.parent / "conf" / "base.conf",
                     ["output.scene_format=ply", "output.mesh_formats=[obj]"]).tree
    outputs.write_outputs(tiny_scan, st, tree, tmp_path / "o")
    out = tmp_path / "o"
    for side in ("left", "right"):
        m = trimesh.load(out / f"hand_{side}.obj", process=False, maintain_order=True)
        expect = _FakeModel().forward(None, None, None, st.params[side].transl).vertices[0].numpy()
        assert np.array_equal(m.vertices.astype(np.float32), expect)
        assert not (out / f"hand_{side}.ply").exists()
    assert len(trimesh.load(out / "hands.ply", process=False).vertices) == 8
    assert params_io.load_hand_params(out / "hand_params.npz")["left"].betas.shape == (1, 10)
    assert len(list((out / "images" / "hand_fit").glob("overlay_*.png"))) == len(tiny_scan.views)
    html = (out / "report.html").read_text()
    assert "stage hand_fit" in html and "images/hand_fit/overlay_01.png" in html
    tree_bad = load_conf(Path(__file__).parent.parent / "conf" / "base.conf", ["output.mesh_formats=[stl]"]).tree
    with pytest.raises(ValueError, match="output.mesh_formats"):
        outputs.write_outputs(tiny_scan, st, tree_bad, tmp_path / "o2")
