"""The GCN predictor: mesh hierarchy, spiral layers, registration, committed weights, init stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import handmodel
from fitting import metrics as M
from fitting.state import State
from networks.geometry import normalised_image_coords, random_rotations, register_translation
from networks.hierarchy import MeshHierarchy, adjacency, apply_sparse, graph_distances
from networks.layers import DSConv, Resample, SpiralConv
from networks.predictor import STORAGE_DTYPE, WEIGHTS_FILE, GCNPredictor, runtime_state, storage_state
from networks.synthetic_pairs import PairSampler

EVAL_SEED = 7  # never used by training (1000+/2000+) nor validation (1)


@pytest.fixture(scope="module")
def hierarchy() -> MeshHierarchy:
    return MeshHierarchy.load()


@pytest.fixture(scope="module")
def predictor() -> GCNPredictor:
    return GCNPredictor.load()


@pytest.fixture(scope="module")
def right_model() -> handmodel.HandModel:
    return handmodel.load("builtin", "right")


# ------------------------------------------------------------------------------------ hierarchy
def test_hierarchy_matches_the_builtin_mesh(hierarchy: MeshHierarchy, right_model: handmodel.HandModel) -> None:
    assert hierarchy.sizes[0] == right_model.num_vertices
    np.testing.assert_array_equal(hierarchy.faces[0], right_model.faces.numpy())
    assert hierarchy.sizes == sorted(hierarchy.sizes, reverse=True) and hierarchy.sizes[-1] < 200
    for k in range(hierarchy.num_levels):
        F = hierarchy.faces[k]
        assert F.min() >= 0 and F.max() < hierarchy.sizes[k]
        assert len(np.unique(F)) == hierarchy.sizes[k], "every coarse vertex is used by a face"
    for k, kept in enumerate(hierarchy.kept):
        np.testing.assert_allclose(hierarchy.vertices[k + 1], hierarchy.vertices[k][kept], atol=1e-6)


def test_spirals_start_at_their_vertex_and_walk_rings(hierarchy: MeshHierarchy) -> None:
    for k in range(hierarchy.num_levels):
        S, F, n = hierarchy.spirals[k], hierarchy.faces[k], hierarchy.sizes[k]
        nb = adjacency(n, F)
        np.testing.assert_array_equal(S[:, 0], np.arange(n))
        for v in range(0, n, max(1, n // 150)):
            dist = graph_distances(nb, v, 4)
            d = [dist.get(int(i), 99) for i in S[v]]
            assert d[0] == 0 and all(x >= 1 for x in d[1:]), f"level {k} vertex {v}: {d}"
            assert d == sorted(d), f"level {k} vertex {v}: rings out of order {d}"
            ring1 = nb[v]
            if len(ring1) < S.shape[1]:
                assert set(S[v, 1 : 1 + len(ring1)].tolist()) == ring1, "the whole 1-ring comes first"
            assert len(set(S[v].tolist())) == S.shape[1], "no repeats on a mesh this size"


def test_resampling_rows_are_convex_and_reconstruct_smooth_fields(hierarchy: MeshHierarchy) -> None:
    for k in range(hierarchy.num_levels - 1):
        for idx, w in (hierarchy.up[k], hierarchy.down[k]):
            np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
            assert (w >= -1e-6).all()
        Vf = hierarchy.vertices[k]
        field = np.stack([np.sin(20 * Vf[:, 0]), np.cos(15 * Vf[:, 1]), Vf[:, 2] * 10 + Vf[:, 1] * 5], 1)
        rec = apply_sparse(*hierarchy.up[k], apply_sparse(*hierarchy.down[k], field))
        rng = field.max(0) - field.min(0)
        err = np.abs(rec - field).mean(0) / rng
        assert (err < 0.03).all(), f"level {k}: relative up(down(f)) error {err}"
        # and a non-smooth field is NOT reconstructed: the check can fail
        noise = np.random.default_rng(0).normal(size=(len(Vf), 1))
        rec_noise = apply_sparse(*hierarchy.up[k], apply_sparse(*hierarchy.down[k], noise))
        assert np.abs(rec_noise - noise).mean() > 0.3


# ---------------------------------------------------------------------------------------- layers
def _tiny_spiral() -> np.ndarray:
    return np.array([[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]])


@pytest.mark.parametrize("cls", [SpiralConv, DSConv])
def test_spiral_layers_shapes_and_gradients(cls: type) -> None:
    torch.manual_seed(0)
    conv = cls(3, 2, _tiny_spiral()).double()
    x = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    y = conv(x)
    assert y.shape == (2, 4, 2)
    assert torch.autograd.gradcheck(lambda inp: conv(inp), (x,), eps=1e-6, atol=1e-6)
    params = [p for p in conv.parameters()]
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(conv, dict(zip([n for n, _ in conv.named_parameters()], ps)), (x.detach(),)), tuple(p.detach().clone().requires_grad_(True) for p in params), eps=1e-6, atol=1e-6)


def test_spiral_conv_is_a_gather_then_linear() -> None:
    torch.manual_seed(1)
    S = _tiny_spiral()
    for cin, cout in ((3, 2), (2, 5)):  # both code paths (linear-first and gather-first)
        conv = SpiralConv(cin, cout, S).double()
        x = torch.randn(2, 4, cin, dtype=torch.double)
        ref = conv.linear(x[:, torch.as_tensor(S).reshape(-1)].reshape(2, 4, -1))
        torch.testing.assert_close(conv(x), ref)


def test_resample_layer_matches_numpy(hierarchy: MeshHierarchy) -> None:
    up = Resample(*hierarchy.up[0])
    x = np.random.default_rng(0).normal(size=(hierarchy.sizes[1], 4))
    y = up(torch.as_tensor(x, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(y, apply_sparse(*hierarchy.up[0], x), atol=1e-5)


# ---------------------------------------------------------------------------------- registration
def _views(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, g, torch.float64)
    T_true = torch.tensor([0.05, -0.02, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.0, 0.6], dtype=torch.float64) - torch.einsum("vij,j->vi", R, T_true)  # every camera looks at T_true
    K = torch.tensor([[800.0, 0, 320], [0, 800, 240], [0, 0, 1]], dtype=torch.float64).expand(n, 3, 3)
    return R, t, K


def test_registration_recovers_translation_exactly_and_robustly() -> None:
    g = torch.Generator().manual_seed(3)
    pts = 0.08 * torch.randn(1, 21, 3, generator=g, dtype=torch.float64)
    T_true = torch.tensor([[0.05, -0.02, 0.0]], dtype=torch.float64)
    for n in (1, 4):
        R, t, K = _views(n, n)
        cam = torch.einsum("vij,nj->vni", R, pts[0] + T_true) + t[:, None]
        uv = cam @ K[0].T
        uv = uv[..., :2] / uv[..., 2:]
        obs = normalised_image_coords(uv, K)[None]
        w = torch.ones(1, n, 21, dtype=torch.float64)
        T = register_translation(pts, obs, w, R[None], t[None])
        torch.testing.assert_close(T, T_true, atol=1e-9, rtol=0)
        # 20 % gross outliers (100 px) + 1 px noise: the robust solution stays within 2 mm
        uv_bad = uv + torch.randn(uv.shape, generator=g, dtype=torch.float64)
        out_mask = torch.rand(n, 21, generator=g) < 0.2
        uv_bad[out_mask] += 100.0
        obs_bad = normalised_image_coords(uv_bad, K)[None]
        T_rob = register_translation(pts, obs_bad, w, R[None], t[None])
        T_ls = register_translation(pts, obs_bad, w, R[None], t[None], iterations=1, scale=1e9)
        assert float((T_rob - T_true).norm()) < 2e-3
        assert float((T_ls - T_true).norm()) > float((T_rob - T_true).norm()), "plain least squares is hurt more"


def test_registration_single_view_camera_frame() -> None:
    pts = torch.tensor([[[0.0, 0, 0], [0.03, 0.01, 0.0], [0.0, 0.08, 0.01], [-0.02, 0.05, 0.02]]], dtype=torch.float64)
    T_true = torch.tensor([[0.1, 0.05, 0.7]], dtype=torch.float64)
    cam = pts + T_true[:, None]
    obs = (cam[..., :2] / cam[..., 2:])[:, None]
    T = register_translation(pts, obs, torch.ones(1, 1, 4, dtype=torch.float64))
    torch.testing.assert_close(T, T_true, atol=1e-9, rtol=0)


# -------------------------------------------------------------------------------- trained weights
def test_committed_weights_exist_and_are_small(predictor: GCNPredictor) -> None:
    """Stored in float16 (under the repository's 8 MiB file limit), run in float32."""
    assert WEIGHTS_FILE.is_file(), "train with scripts/train_gcn.py (networks/data/TRAINING.md)"
    assert WEIGHTS_FILE.stat().st_size <= 8 * 2**20
    blob = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)
    stored = [v for st in blob["state"].values() for v in st.values() if v.is_floating_point()]
    assert stored and all(v.dtype == STORAGE_DTYPE for v in stored)
    assert all(p.dtype == torch.float32 for n in predictor.nets.values() for p in n.parameters())


def test_storage_round_trip_is_float32_and_close(right_model: handmodel.HandModel) -> None:
    from networks.hierarchy import MeshHierarchy as H
    from networks.predictor import build_network

    net = build_network("3d", H.load(), right_model).eval()
    state = runtime_state(storage_state(net.state_dict()))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-6)


def _held_out_3d(model: handmodel.HandModel, n: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = PairSampler(model, EVAL_SEED)
    h = s.hands(n)
    T = 0.2 * torch.randn(n, 3, generator=s.g)
    verts = h["verts"] @ h["R"].transpose(1, 2) + T[:, None]
    joints = h["joints"] @ h["R"].transpose(1, 2) + T[:, None]
    if side == "left":  # the mirror image of a right hand is a left hand
        flip = torch.tensor([-1.0, 1.0, 1.0])
        verts, joints = verts * flip, joints * flip
    return verts, joints


@pytest.mark.parametrize("side", ["right", "left"])
def test_3d_keypoints_meet_the_accuracy_targets(predictor: GCNPredictor, right_model: handmodel.HandModel, side: str) -> None:
    n = 32
    verts, joints = _held_out_3d(right_model, n, side)
    p = predictor.predict_3d(joints, torch.ones(n, 21), side)
    pa = np.mean([M.pa_mpvpe(p.vertices[i], verts[i]) for i in range(n)])
    model_side = predictor.models[side]
    with torch.no_grad():
        pv = model_side(p.params).vertices
    pa_params = np.mean([M.pa_mpvpe(pv[i], verts[i]) for i in range(n)])
    mpjpe = np.mean([M.mpjpe(p.joints[i], joints[i]) for i in range(n)])
    assert pa <= 4.0, f"GCN mesh PA-MPVPE {pa:.2f} mm"
    assert pa_params <= 5.0, f"param mesh PA-MPVPE {pa_params:.2f} mm"
    assert mpjpe <= 6.0, f"MPJPE {mpjpe:.2f} mm"


def test_2d_single_view_meets_the_accuracy_target(predictor: GCNPredictor, right_model: handmodel.HandModel) -> None:
    n = 32
    s = PairSampler(right_model, EVAL_SEED + 1)
    _, truth = s.batch_2d(n, mode="scene", noise_px=(3.0, 3.0), miss_fraction=0.0)
    p = predictor.predict_2d(truth["uv"], torch.ones(n, 21), truth["K"], "right")
    pa = np.mean([M.pa_mpvpe(p.vertices[i], truth["verts_cam"][i]) for i in range(n)])
    assert pa <= 8.0, f"2D single-view PA-MPVPE {pa:.2f} mm"
    # the registered hand lands where the true one is (depth from a mean-size prior: a few cm)
    err = (p.params.transl - truth["wrist_cam"]).norm(dim=-1)
    assert float(err.median()) < 0.05


# ------------------------------------------------------------------------------------ init stage
def _synthetic_scan(seed: int):
    import synthetic

    return synthetic.generate(views=4, size=(320, 240), seed=seed, noise_px=1.0, miss_rate=0.0, hand_miss_rate=0.0, swap_rate=0.0)


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_init_stage_fills_params_for_both_sides(mode: str) -> None:
    from fitting import init_gcn

    syn = _synthetic_scan(11)
    scan = syn.scan
    state = State()
    if mode == "3d":
        state.keypoints3d = {s: syn.hands.keypoints3d[s].astype(np.float32) for s in scan.sides}
        state.keypoints3d_valid = {s: np.ones(21, bool) for s in scan.sides}
    conf = {"init": {"enabled": True, "weights": "", "input": "auto"}, "hand_model": {"name": "builtin"}, "device": "cpu"}
    state = init_gcn.run(scan, state, conf)
    assert set(state.params) == {"left", "right"}
    rec = state.metrics["init"]["sides"]
    for side in ("left", "right"):
        p = state.params[side]
        assert p.betas.shape == (1, 10) and p.hand_pose.shape == (1, 15, 3)
        assert rec[side]["input"] == mode and rec[side]["inference_ms"] > 0
        limit = 12.0 if mode == "3d" else 30.0
        assert rec[side]["mpjpe_mm"] < limit, f"{side} {mode}: {rec[side]}"
        assert rec[side]["pa_mpvpe_mm"] < (5.0 if mode == "3d" else 10.0), f"{side} {mode}: {rec[side]}"


def test_init_stage_can_be_switched_off() -> None:
    from fitting import init_gcn

    scan = _synthetic_scan(12).scan
    state = init_gcn.run(scan, State(), {"init": {"enabled": False, "weights": "", "input": "auto"}})
    assert state.params == {} and state.metrics["init"] == {"enabled": False}
    with pytest.raises(ValueError, match="init.input"):
        init_gcn.run(scan, State(), {"init": {"enabled": True, "weights": "", "input": "4d"}})
