"""Hand layer: built-in data, anatomy, mirroring, skinning, gradients, priors, MANO loading."""
from __future__ import annotations

import math
import pickle
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

import handmodel
from handmodel import HandParams, mirror_params
from handmodel.joint_orders import MANO_TIP_VERTICES, MANO_TO_MEDIAPIPE, PARENTS, TIPS
from handmodel.mano import MANO_JOINT_FOR_TREE, load_mano_data, read_mano_pickle
from handmodel.model import BUILTIN_FILE, HandModel, mirror_data
from handmodel.prior import PosePrior, pose_prior_loss, sample_poses, shape_prior

MIRROR = torch.tensor([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def right() -> HandModel:
    return handmodel.load("builtin", "right")


@pytest.fixture(scope="module")
def left() -> HandModel:
    return handmodel.load("builtin", "left")


def random_params(batch: int, seed: int, scale: float = 0.4, dtype: torch.dtype = torch.float32) -> HandParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return HandParams(r(batch, 10), scale * r(batch, 15, 3), r(batch, 3), 0.1 * r(batch, 3))


# ----------------------------------------------------------------------------- built-in data
def test_builtin_file_is_small_and_complete() -> None:
    assert BUILTIN_FILE.stat().st_size < 2 * 1024 * 1024
    with np.load(BUILTIN_FILE, allow_pickle=False) as z:
        keys = set(z.files)
        assert {"template", "faces", "uv", "uv_faces", "shapedirs", "joint_template", "joint_shapedirs",
                "weights", "parents", "tip_vertex_ids", "tip_weights", "canonical_axes"} <= keys
        assert z["template"].shape == (1609, 3)
        assert z["weights"].shape == (1609, 16)
        assert z["uv_faces"].shape == z["faces"].shape
        uv = z["uv"]
        assert uv.min() >= 0 and uv.max() <= 1
        sigma = z["shape_sigma"]
        assert np.all(np.diff(sigma) <= 0), "PCA components are sorted by variance"
    assert (BUILTIN_FILE.parent / "PROVENANCE.md").is_file()


def test_mean_shape_anatomy(right: HandModel) -> None:
    j = right(torch.zeros(1, 10)).joints[0]
    assert torch.allclose(j[0], torch.zeros(3))
    palm = j[9].norm().item()  # wrist -> middle MCP
    assert 0.07 <= palm <= 0.10
    length = j[12].norm().item()  # wrist -> middle fingertip
    assert 0.16 <= length <= 0.21
    for f in range(5):
        base, tip = j[1 + 4 * f], j[4 + 4 * f]
        assert tip.norm() > base.norm() + 0.03
        seg = [(j[1 + 4 * f + k + 1] - j[1 + 4 * f + k]).norm().item() for k in range(3)]
        assert all(0.015 < s < 0.06 for s in seg), seg
    # Canonical axes: fingers along +y, thumb on +x for the right hand, pinky on -x.
    assert j[12, 1] > 0.15 and j[4, 0] > 0.05 and j[20, 0] < -0.03
    # Flat rest: index..pinky stay within 2 cm of the palm plane z = 0.
    assert j[5:, 2].abs().max() < 0.02


def test_wrist_is_origin_for_every_shape(right: HandModel) -> None:
    betas = 2.0 * torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    rest = right.rest_joints(betas)
    assert rest[:, 0].abs().max() == 0
    p = random_params(4, 1)
    out = right(p)
    assert torch.allclose(out.joints[:, 0], p.transl, atol=1e-6), "transl is the wrist position"


def test_shape_space_varies_size_plausibly(right: HandModel) -> None:
    betas = torch.randn(200, 10, generator=torch.Generator().manual_seed(2))
    length = right(betas).joints[:, 12].norm(dim=-1)
    assert 0.006 < length.std().item() < 0.025  # surveys: about 1.2 cm
    assert 0.16 < length.mean().item() < 0.21


# ----------------------------------------------------------------------------------- layer
def test_forward_inputs_and_shapes(right: HandModel) -> None:
    p = random_params(3, 3)
    a = right(p)
    b = right(p.betas, p.hand_pose.reshape(3, 45), p.global_orient, p.transl)
    assert a.vertices.shape == (3, 1609, 3) and a.joints.shape == (3, 21, 3) and a.faces.shape == (3196, 3)
    assert a.faces.dtype == torch.long
    assert torch.equal(a.vertices, b.vertices)
    zero = right(torch.zeros(1, 10))
    assert torch.allclose(zero.vertices[0], right.template, atol=1e-6)
    with pytest.raises(ValueError):
        right(torch.zeros(1, 7))


def test_left_is_exact_mirror_of_right(right: HandModel, left: HandModel) -> None:
    p = random_params(4, 4)
    r, l_ = right(p), left(mirror_params(p))
    assert torch.allclose(l_.vertices, r.vertices * MIRROR, atol=1e-6)
    assert torch.allclose(l_.joints, r.joints * MIRROR, atol=1e-6)
    assert torch.equal(l_.faces, r.faces[:, [0, 2, 1]])
    assert torch.equal(left.uv_faces, right.uv_faces[:, [0, 2, 1]])
    # Winding stays outward after mirroring: the signed volume keeps its sign.
    def volume(v: torch.Tensor, f: torch.Tensor) -> float:
        t = v[f] - v.mean(0)
        return torch.einsum("fi,fi->f", t[:, 0], torch.linalg.cross(t[:, 1], t[:, 2])).sum().item()

    assert volume(r.vertices[0], r.faces) > 0 and volume(l_.vertices[0], l_.faces) > 0


def test_joints_follow_the_skin_under_pose(right: HandModel) -> None:
    """Vertices skinned rigidly to a joint keep their distance to it and to its child joint."""
    p = random_params(2, 5, scale=0.5)
    rest, posed = right(p.betas), right(p.betas, p.hand_pose, p.global_orient, p.transl)
    tree_to_mp = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19]
    checked = 0
    for k in range(1, 16):
        rigid = torch.nonzero(right.weights[:, k] > 0.999)[:, 0]
        if len(rigid) == 0:
            continue
        jm = tree_to_mp[k]
        for b in range(2):
            for jj in (jm, jm + 1):  # the joint and the next keypoint along the finger
                d0 = (rest.vertices[b, rigid] - rest.joints[b, jj]).norm(dim=-1)
                d1 = (posed.vertices[b, rigid] - posed.joints[b, jj]).norm(dim=-1)
                assert torch.allclose(d0, d1, atol=1e-5)
        checked += 1
    assert checked >= 10
    # Fingertips stay on the skin: within a few mm of a posed vertex.
    d = torch.cdist(posed.joints[:, TIPS], posed.vertices).min(dim=-1).values
    assert d.max() < 0.004


def test_global_orient_rotates_about_the_wrist(right: HandModel) -> None:
    p = random_params(1, 6)
    p.transl = torch.zeros(1, 3)
    base = right(p.betas, p.hand_pose)
    rot = right(p.betas, p.hand_pose, p.global_orient)
    R = handmodel.axis_angle_to_matrix(p.global_orient)[0]
    assert torch.allclose(rot.vertices[0], base.vertices[0] @ R.T, atol=1e-6)


def test_gradients_match_finite_differences(right: HandModel) -> None:
    model = HandModel(handmodel.load_data("builtin", "right"), dtype=torch.float64)
    p = random_params(2, 7, dtype=torch.float64)
    p.hand_pose[0, 3] = 0.0  # exercise the small-angle branch of Rodrigues
    subset = torch.arange(0, 1609, 97)

    def f(betas, pose, orient, transl):
        o = model(betas, pose, orient, transl)
        return torch.cat([o.joints.reshape(2, -1), o.vertices[:, subset].reshape(2, -1)], dim=1)

    inputs = tuple(t.clone().requires_grad_() for t in (p.betas, p.hand_pose, p.global_orient, p.transl))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    zero = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(handmodel.axis_angle_to_matrix, (zero,), eps=1e-6, atol=1e-7)


def test_fitting_never_edits_buffers(right: HandModel) -> None:
    before = {k: v.clone() for k, v in right.named_buffers()}
    assert not any(v.requires_grad for v in right.buffers())
    p = random_params(1, 8).requires_grad_()
    opt = torch.optim.Adam(p.to_dict().values(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        out = right(p)
        (out.vertices.square().sum() + out.joints.square().sum()).backward()
        opt.step()
    for k, v in right.named_buffers():
        assert torch.equal(v, before[k]), k


def test_forward_backward_is_fast(right: HandModel) -> None:
    p = random_params(1, 9).requires_grad_()
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads only add waiting at this size (and on busy machines)
    try:
        for _ in range(15):
            t = time.perf_counter()
            out = right(p)
            (out.vertices.sum() + out.joints.sum()).backward()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    # About 2 ms on one idle core; the best of 15 runs filters out load from other processes.
    assert min(times) < 0.02


# ----------------------------------------------------------------------------------- priors
def test_prior_penalizes_beyond_limits_only(right: HandModel) -> None:
    prior = PosePrior(right)
    inside = prior.sample_poses(64, torch.Generator().manual_seed(0))
    assert prior.limit_penalty(inside).max() == 0
    assert prior.limit_penalty(torch.zeros(1, 15, 3)).item() == 0  # the flat rest pose
    deg = math.pi / 180
    for joint, axis, value in [(4, 0, -30), (3, 0, 120), (3, 1, 40), (5, 0, 100), (2, 0, -40), (8, 2, 45)]:
        a = torch.zeros(1, 15, 3)
        a[0, joint, axis] = value * deg
        pose = prior.angles_to_pose(a)
        assert prior.limit_penalty(pose).item() > 0.01, (joint, axis, value)
        pose.requires_grad_()
        prior(pose).sum().backward()
        assert pose.grad.abs().sum() > 0
    # Within limits only the small L2 remains.
    a = torch.zeros(1, 15, 3)
    a[0, 4, 0] = 80 * deg
    pose = prior.angles_to_pose(a)
    assert prior.limit_penalty(pose).item() == 0
    assert torch.allclose(prior(pose), prior.l2_weight * pose.square().sum())
    assert torch.allclose(prior.angles(pose), a, atol=1e-6)


def test_prior_is_mirror_invariant(right: HandModel, left: HandModel) -> None:
    pr, pl = PosePrior(right), PosePrior(left)
    pose = 0.8 * torch.randn(8, 15, 3, generator=torch.Generator().manual_seed(1))
    mirrored = pose * torch.tensor([1.0, -1.0, -1.0])
    assert torch.allclose(pl.angles(mirrored), pr.angles(pose), atol=1e-5)
    assert torch.allclose(pl(mirrored), pr(pose), atol=1e-5)
    assert torch.allclose(pose_prior_loss(mirrored, "left"), pose_prior_loss(pose, "right"), atol=1e-5)
    assert torch.allclose(pose_prior_loss(pose, "left", model=right), pr(pose))


def test_sampled_poses_flex_towards_the_palm(right: HandModel) -> None:
    prior = PosePrior(right)
    poses = sample_poses(right, 200, torch.Generator().manual_seed(3))
    assert poses.shape == (200, 15, 3)
    flex = prior.angles(poses)[..., 0]
    assert (flex[:, [4, 5, 7, 8, 10, 11, 13, 14]] >= 0).all()  # PIP and DIP never bend backwards
    rest = right(torch.zeros(1, 10)).joints[0]
    out = right(torch.zeros(200, 10), poses).joints
    palm_normal = torch.tensor([0.0, 0.0, 1.0])  # +z is palmar in the built-in frame
    deg = 180 / math.pi
    for f in range(1, 5):
        tip = 4 + 4 * f
        mcp, pip = flex[:, 3 * f] * deg, flex[:, 3 * f + 1] * deg
        moved = out[:, tip] - rest[tip]
        # Half-closed fingers: the tip swings well in front of the palm.
        half = (mcp > 10) & (mcp < 60) & (pip > 20) & (pip < 80)
        assert half.sum() > 20
        assert (moved[half] @ palm_normal > 0.015).all(), f"finger {f}: tips should move to the palm side"
        # Fists: the tip curls back onto the palm, far closer to the wrist, never behind the hand.
        fist = pip > 60
        assert fist.sum() > 20
        assert (moved[fist] @ palm_normal > 0).all(), f"finger {f}: a curled tip ends on the palm side"
        assert (rest[tip].norm() - out[fist, tip].norm(dim=-1) > 0.03).all(), "curled tips come closer to the wrist"
    # Thumb: flexing all three joints brings its tip towards the palm and the little finger.
    a = torch.zeros(1, 15, 3)
    a[0, :3, 0] = torch.tensor([40.0, 40.0, 50.0]) * math.pi / 180
    thumb = right(torch.zeros(1, 10), prior.angles_to_pose(a)).joints[0, 4]
    assert thumb[2] > rest[4, 2] and (thumb - rest[17]).norm() < (rest[4] - rest[17]).norm()


def test_shape_prior() -> None:
    b = torch.tensor([[1.0, 2.0] + [0.0] * 8, [0.0] * 10])
    assert torch.equal(shape_prior(b), torch.tensor([5.0, 0.0]))


# ------------------------------------------------------------------------------------- MANO
def _mirror_posedirs(posedirs: np.ndarray) -> np.ndarray:
    m = np.array([-1.0, 1.0, 1.0])
    return posedirs * m[None, :, None] * np.tile(np.outer(m, m).reshape(9), 15)[None, None]


def _fake_mano(seed: int) -> dict:
    """Random but well-formed arrays in MANO's layout (778 vertices, 16 joints, MANO order)."""
    rng = np.random.default_rng(seed)
    V = 778
    template = rng.normal(size=(V, 3)) * np.array([0.04, 0.02, 0.01]) + np.array([0.05, 0.0, 0.0])
    shapedirs = rng.normal(size=(V, 3, 10)) * 0.002
    shapedirs[:, :, 0] = 0.1 * (template - template.mean(0)) + 0.0005 * rng.normal(size=(V, 3))  # size-like
    J = np.abs(rng.normal(size=(16, V))) * (rng.random((16, V)) < 0.03)
    J[:, 0] += 1e-3
    J /= J.sum(1, keepdims=True)
    w = rng.random((V, 16)) ** 4
    w /= w.sum(1, keepdims=True)
    parents = np.array([4294967295, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14], dtype=np.int64)
    return {
        "v_template": template,
        "f": rng.integers(0, V, size=(1538, 3)).astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": rng.normal(size=(V, 3, 135)) * 0.003,
        "J_regressor": scipy.sparse.csc_matrix(J),
        "weights": w,
        "kintree_table": np.stack([parents, np.arange(16)]),
        "hands_mean": rng.normal(size=45) * 0.2,
        "hands_components": rng.normal(size=(45, 45)),
        "J": J @ template,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def _mirror_fake(d: dict, sign_bug: bool) -> dict:
    m = np.array([-1.0, 1.0, 1.0])
    out = dict(d)
    out["v_template"] = d["v_template"] * m
    out["f"] = d["f"][:, [0, 2, 1]]
    sd = d["shapedirs"] * m[None, :, None]
    if sign_bug:
        sd[:, 0] = d["shapedirs"][:, 0]
    out["shapedirs"] = sd
    out["posedirs"] = _mirror_posedirs(d["posedirs"])
    out["hands_mean"] = (d["hands_mean"].reshape(15, 3) * -m).reshape(45)
    out["J"] = d["J"] * m
    return out


def _write_mano_pickle(path: Path, d: dict) -> None:
    """Write like MANO's files: chumpy arrays for shapedirs, protocol 2 (a fake chumpy module)."""
    ch_mod, chumpy = types.ModuleType("chumpy.ch"), types.ModuleType("chumpy")

    class Ch:
        def __init__(self, x: np.ndarray) -> None:
            self.x = x
            self._dirty_vars = set()
            self._cache = {"r": x}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch_mod.Ch, chumpy.ch = Ch, ch_mod
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, ch_mod
    try:
        wrapped = dict(d, shapedirs=Ch(d["shapedirs"]))
        path.write_bytes(pickle.dumps(wrapped, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


@pytest.fixture(scope="module")
def mano_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("mano")
    raw = _fake_mano(0)
    _write_mano_pickle(d / "MANO_RIGHT.pkl", raw)
    _write_mano_pickle(d / "MANO_LEFT.pkl", _mirror_fake(raw, sign_bug=True))
    return d, raw


def test_mano_pickle_round_trip(mano_dir: tuple[Path, dict]) -> None:
    folder, raw = mano_dir
    assert "chumpy" not in sys.modules
    back = read_mano_pickle(folder / "MANO_RIGHT.pkl")
    assert np.array_equal(back["shapedirs"], raw["shapedirs"])
    assert np.allclose(back["J_regressor"], raw["J_regressor"].toarray())
    data = load_mano_data("right", folder)
    order = MANO_JOINT_FOR_TREE
    assert np.array_equal(data.weights, raw["weights"][:, order])
    assert np.allclose(data.joint_template, (raw["J_regressor"].toarray() @ raw["v_template"])[order])
    assert np.allclose(data.pose_mean, raw["hands_mean"].reshape(15, 3)[order[1:] - 1])
    assert np.array_equal(data.tip_vertex_ids[:, 0], MANO_TIP_VERTICES)
    assert np.all(load_mano_data("right", folder, flat_hand_mean=True).pose_mean == 0)
    model = handmodel.load("mano", "right", model_dir=folder)
    assert model.has_pose_blendshapes and model.uv is None


def _smplx_mano(folder: Path, raw: dict, flat_hand_mean: bool):
    smplx = pytest.importorskip("smplx", reason="smplx not installed (optional: pip install smplx)")
    from smplx.utils import Struct

    plain = dict(raw, f=raw["f"].astype(np.int64))
    return smplx.MANO(str(folder), is_rhand=True, data_struct=Struct(**plain), use_pca=False, flat_hand_mean=flat_hand_mean)


@pytest.mark.parametrize("flat_hand_mean", [False, True])
def test_mano_matches_smplx(mano_dir: tuple[Path, dict], flat_hand_mean: bool) -> None:
    folder, raw = mano_dir
    ref = _smplx_mano(folder, raw, flat_hand_mean)
    ours = handmodel.load("mano", "right", model_dir=folder, flat_hand_mean=flat_hand_mean)
    p = random_params(3, 10, scale=0.5)
    mano_pose = torch.zeros(3, 16, 3)  # our hand_pose (thumb..pinky) into MANO's joint order
    mano_pose[:, MANO_JOINT_FOR_TREE[1:]] = p.hand_pose
    with torch.no_grad():
        r = ref(betas=p.betas, global_orient=p.global_orient, hand_pose=mano_pose[:, 1:].reshape(3, 45), transl=p.transl)
        o = ours(p)
    assert torch.allclose(o.vertices, r.vertices, atol=1e-6)
    mano21 = torch.cat([r.joints, r.vertices[:, torch.as_tensor(MANO_TIP_VERTICES)]], dim=1)
    assert torch.allclose(o.joints, mano21[:, torch.as_tensor(MANO_TO_MEDIAPIPE)], atol=1e-6)


def test_mano_left_sign_fix_and_mirror(mano_dir: tuple[Path, dict], tmp_path: Path) -> None:
    folder, raw = mano_dir
    right, left = (handmodel.load("mano", s, model_dir=folder) for s in ("right", "left"))
    p = random_params(2, 11)
    r, l_ = right(p), left(mirror_params(p))
    assert torch.allclose(l_.vertices, r.vertices * MIRROR, atol=1e-6)
    assert torch.allclose(l_.joints, r.joints * MIRROR, atol=1e-6)
    # Without the right file beside it, the size-like first direction reveals the error too.
    alone = tmp_path / "MANO_LEFT.pkl"
    alone.write_bytes((folder / "MANO_LEFT.pkl").read_bytes())
    assert np.allclose(load_mano_data("left", alone).shapedirs, load_mano_data("left", folder).shapedirs)
    # A left file without the error is left as it is.
    good = tmp_path / "good"
    good.mkdir()
    _write_mano_pickle(good / "MANO_LEFT.pkl", _mirror_fake(raw, sign_bug=False))
    assert np.allclose(load_mano_data("left", good).shapedirs[:, 0], -raw["shapedirs"][:, 0, :10])
    # The MANO mirror identity also holds for data mirrored by the library (pose blend shapes).
    mirrored = HandModel(mirror_data(load_mano_data("right", folder)))
    assert torch.allclose(mirrored(mirror_params(p)).vertices, l_.vertices, atol=1e-6)


# ----------------------------------------------------------------------------------- errors
def test_missing_files_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(handmodel.HandModelFileNotFound, match="mano.is.tue.mpg.de") as e:
        handmodel.load("mano", "right", model_dir=tmp_path)
    assert str(tmp_path / "MANO_RIGHT.pkl") in str(e.value)
    with pytest.raises(FileNotFoundError, match="bake_hand_model") as e:
        handmodel.load("builtin", "left", model_dir=tmp_path)
    assert str(tmp_path / "builtin_right.npz") in str(e.value)
    with pytest.raises(ValueError, match="unknown hand model source"):
        handmodel.load("smpl")
    with pytest.raises(ValueError, match="'left' or 'right'"):
        handmodel.load("builtin", "both")


def test_corrupt_files_raise_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "builtin_right.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(handmodel.HandModelFormatError, match="not a valid built-in hand model"):
        handmodel.load("builtin", model_dir=tmp_path)
    with np.load(BUILTIN_FILE) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "weights"})
    with pytest.raises(handmodel.HandModelFormatError, match="weights"):
        handmodel.load("builtin", model_dir=tmp_path)
    np.savez(bad, **dict(arrays, faces=arrays["faces"] + 5000))
    with pytest.raises(handmodel.HandModelFormatError, match="face indices"):
        handmodel.load("builtin", model_dir=tmp_path)
    pkl = tmp_path / "MANO_RIGHT.pkl"
    pkl.write_bytes(b"\x80\x02garbage")
    with pytest.raises(handmodel.HandModelFormatError, match="not a readable MANO model"):
        handmodel.load("mano", model_dir=tmp_path)
    pkl.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}, protocol=2))
    with pytest.raises(handmodel.HandModelFormatError, match="missing"):
        handmodel.load("mano", model_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_mano_unpickler_refuses_code(tmp_path: Path) -> None:
    pkl = tmp_path / "MANO_RIGHT.pkl"
    pkl.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(handmodel.HandModelFormatError, match="unexpected class"):
        read_mano_pickle(pkl)


def test_joint_order_tables_agree_with_the_tree() -> None:
    from handmodel.model import TREE_PARENTS, TREE_TO_MEDIAPIPE

    # Tree parent -> MediaPipe parent: the kinematic chains are the same.
    for k in range(1, 16):
        mp, mp_parent = np.nonzero(TREE_TO_MEDIAPIPE == k)[0][0], np.nonzero(TREE_TO_MEDIAPIPE == TREE_PARENTS[k])[0][0]
        assert PARENTS[mp] == mp_parent
