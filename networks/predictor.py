"""The GCN predictor as a library: load the committed weights, predict hands from keypoints.

``GCNPredictor.load()`` holds the mesh network for 3D keypoints (multi-view, after triangulation;
networks/gcn.py) and the keypoint lifter for 2D keypoints of one view (networks/lifter.py), whose
root-relative 3D keypoints go through the same mesh network. Both see right hands in a normalised
frame (networks/geometry.py). Left hands are mirrored (x-flip of world or camera coordinates)
before the network and their outputs mirrored back with ``handmodel.mirror_params``'s rule.
Outputs are hand-model parameters in the world frame (so a fit can start from them) and the GCN's
own mesh.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import handmodel
from handmodel.params import HandParams, check_side

from .gcn import GCNConfig, HandMeshGCN
from .geometry import (
    canonical_frame_3d,
    from_canonical_3d,
    matrix_to_axis_angle,
    mirror_matrix,
    normalised_image_coords,
    register_translation,
    to_canonical_3d,
    virtual_crop,
)
from .hierarchy import HIERARCHY_FILE, MeshHierarchy
from .ik import SwingIK
from .lifter import KeypointLifter, LifterConfig

WEIGHTS_FILE = Path(__file__).resolve().parent / "data" / "gcn_weights.pt"
WEIGHTS_FORMAT = "handrecon.gcn/1"
STORAGE_DTYPE = torch.float16  # of the committed file (half its float32 size); networks run in float32
BRANCHES = ("3d", "2d")
AA_MIRROR = (1.0, -1.0, -1.0)


def hierarchy_digest(h: MeshHierarchy) -> str:
    """Hash of everything a trained network depends on in the hierarchy (spirals, maps)."""
    m = hashlib.sha256()
    for a in [*h.spirals, *(x for pair in h.up for x in pair), *(x for pair in h.down for x in pair)]:
        m.update(np.ascontiguousarray(a).astype(np.float64 if a.dtype.kind == "f" else np.int64).round(6).tobytes())
    return m.hexdigest()[:16]


def storage_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as stored in a weights file: floating tensors in ``STORAGE_DTYPE``. The
    rounding (relative 5e-4) moves the held-out errors by hundredths of a millimetre
    (networks/data/TRAINING.md)."""
    return {k: v.detach().cpu().to(STORAGE_DTYPE) if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}


def runtime_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stored state dict back in float32 (files of either precision load)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build_network(branch: str, hierarchy: MeshHierarchy, model: handmodel.HandModel, cfg: GCNConfig | None = None) -> HandMeshGCN:
    """A fresh mesh network on the right built-in hand. Only the 3D branch has one: the 2D branch
    lifts its keypoints to 3D (networks/lifter.py) and reuses it."""
    if branch != "3d":
        raise ValueError(f"branch {branch!r} has no mesh network; the 2D branch is a KeypointLifter")
    cfg = cfg or GCNConfig(in_dim=3, ik=True)
    with torch.no_grad():
        rest = model(torch.zeros(1, model.num_betas)).joints[0].double().numpy()
    palm = float(np.linalg.norm(rest[9] - rest[0]))
    template = (model.template.double().numpy() / palm).astype(np.float32)  # the mean hand in the palm frame
    return HandMeshGCN(hierarchy, cfg, template, rest / palm, SwingIK(model) if cfg.ik else None)


@dataclass
class Prediction:
    """Per batch element: world ``params`` (HandParams, batch B), the GCN mesh ``vertices``
    (B,V,3) and the joints of the hand model driven by ``params`` (B,21,3), world metres."""

    params: HandParams
    vertices: torch.Tensor
    joints: torch.Tensor
    seconds: float


class GCNPredictor:
    """Both branches, the hierarchy and the right/left built-in hand models."""

    def __init__(self, nets: dict[str, torch.nn.Module], meta: dict | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.nets = {k: n.to(self.device).eval() for k, n in nets.items()}
        self.meta = meta or {}
        self.models = {s: handmodel.load("builtin", s).to(self.device) for s in ("left", "right")}
        with torch.no_grad():
            self.rest_joints = self.models["right"](torch.zeros(1, 10, device=self.device)).joints[0].float()
        self.palm_size = float((self.rest_joints[9] - self.rest_joints[0]).norm())

    # ------------------------------------------------------------------------------------ loading
    @staticmethod
    def load(path: str | Path | None = None, device: str | torch.device = "cpu", hierarchy_path: str | Path | None = None) -> "GCNPredictor":
        path = Path(path) if path else WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"GCN weights not found: {path}; train them with `python scripts/train_gcn.py` (see networks/data/TRAINING.md)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{path} is not a GCN weights file (format {WEIGHTS_FORMAT})")
        hierarchy = MeshHierarchy.load(hierarchy_path or HIERARCHY_FILE)
        if blob.get("hierarchy") != hierarchy_digest(hierarchy):
            raise ValueError(f"{path} was trained on another mesh hierarchy; retrain or restore networks/data/hand_hierarchy.npz")
        model = handmodel.load("builtin", "right")
        nets: dict[str, torch.nn.Module] = {}
        missing = [b for b in BRANCHES if b not in blob["state"]]
        if missing:
            raise ValueError(f"{path} lacks the {missing} branch; train it with scripts/train_gcn.py --branches {','.join(missing)}")
        for branch, state in blob["state"].items():
            if branch == "3d":
                net = build_network(branch, hierarchy, model, GCNConfig(**blob["configs"][branch]))
            else:
                net = KeypointLifter(LifterConfig(**blob["configs"][branch]))
            net.load_state_dict(runtime_state(state))
            nets[branch] = net
        return GCNPredictor(nets, blob.get("meta", {}), device)

    # -------------------------------------------------------------------------------- prediction
    def _finish(self, side: str, out: dict[str, torch.Tensor], R_to_world: torch.Tensor) -> tuple[HandParams, torch.Tensor]:
        """World-oriented, root-relative params of ``side`` from a right-hand prediction whose frame
        maps to (possibly mirrored) world axes by ``R_to_world`` (B,3,3)."""
        R = R_to_world @ out["rotation"]
        pose = out["hand_pose"]
        if side == "left":
            M = mirror_matrix(R.dtype, R.device)
            R = M @ R @ M
            pose = pose * torch.tensor(AA_MIRROR, dtype=pose.dtype, device=pose.device)
        orient = matrix_to_axis_angle(R)
        B = R.shape[0]
        params = HandParams(out["betas"], pose, orient, torch.zeros(B, 3, dtype=R.dtype, device=R.device))
        joints = self.models[side](params).joints
        return params, joints

    def _mesh_from_3d(self, kp: torch.Tensor, vis: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Right-hand 3D keypoints (any frame) -> network outputs, the palm frame's rotation and
        the GCN vertices in the input frame."""
        R, o, s = canonical_frame_3d(kp, vis, self.rest_joints, self.palm_size)
        x = to_canonical_3d(kp, R, o, s) * vis[..., None]
        out = self.nets["3d"](x, vis, torch.log(s / self.palm_size)[:, None])
        return out, R, from_canonical_3d(out["vertices"], R, o, s)

    @torch.no_grad()
    def predict_3d(self, keypoints: torch.Tensor, valid: torch.Tensor, side: str) -> Prediction:
        """From 3D keypoints (B,21,3) world metres and ``valid`` (B,21) (at least 3 valid joints)."""
        check_side(side)
        t0 = time.perf_counter()
        kp = torch.as_tensor(keypoints, dtype=torch.float32, device=self.device)
        vis = torch.as_tensor(valid, dtype=torch.float32, device=self.device)
        flip = torch.tensor([-1.0, 1.0, 1.0], device=self.device)
        out, R, verts = self._mesh_from_3d(kp * flip if side == "left" else kp, vis)
        if side == "left":
            verts = verts * flip
        params, joints = self._finish(side, out, R)
        # translation: least squares of the model joints onto the valid keypoints
        w = vis / vis.sum(1, keepdim=True).clamp(min=1.0)
        T = (w[..., None] * (kp - joints)).sum(1)
        params.transl = T
        return Prediction(params, verts, joints + T[:, None], time.perf_counter() - t0)

    @torch.no_grad()
    def predict_2d(
        self,
        uv: torch.Tensor,
        valid: torch.Tensor,
        K: torch.Tensor,
        side: str,
        R_cam: torch.Tensor | None = None,
        t_cam: torch.Tensor | None = None,
        views: dict[str, torch.Tensor] | None = None,
    ) -> Prediction:
        """From 2D keypoints ``uv`` (B,21,2) pixels with ``valid`` (B,21) of one view with
        intrinsics ``K`` (B,3,3) and world->camera ``R_cam`` (B,3,3), ``t_cam`` (B,3) (identity /
        zero: results in camera coordinates). The translation comes from 2D-1D registration in
        that view, or in all ``views`` when given: ``{"uv": (B,V,21,2), "weights": (B,V,21),
        "K": (B,V,3,3), "R": (B,V,3,3), "t": (B,V,3)}`` (the predicting view among them)."""
        check_side(side)
        t0 = time.perf_counter()
        dev = self.device
        uv = torch.as_tensor(uv, dtype=torch.float32, device=dev)
        vis = torch.as_tensor(valid, dtype=torch.float32, device=dev)
        K = torch.as_tensor(K, dtype=torch.float32, device=dev)
        B = uv.shape[0]
        R_cam = torch.eye(3, device=dev).expand(B, 3, 3) if R_cam is None else torch.as_tensor(R_cam, dtype=torch.float32, device=dev)
        t_cam = torch.zeros(B, 3, device=dev) if t_cam is None else torch.as_tensor(t_cam, dtype=torch.float32, device=dev)
        xy = normalised_image_coords(uv, K)
        flip = torch.tensor([-1.0, 1.0], device=dev)
        xy_in = xy * flip if side == "left" else xy
        R_virt, x, half = virtual_crop(xy_in, vis)
        lifted = self.nets["2d"](x, vis, torch.log(half)[:, None]) * self.palm_size  # virtual camera axes, wrist at 0
        out, R_frame, verts_virt = self._mesh_from_3d(lifted, torch.ones_like(vis))
        # palm frame -> virtual camera -> (mirrored) camera -> camera -> world
        M = mirror_matrix(device=dev)
        to_cam = R_virt.transpose(1, 2) @ R_frame
        verts_cam = torch.einsum("bij,bnj->bni", R_virt.transpose(1, 2), verts_virt)
        if side == "left":
            verts_cam = verts_cam @ M
        # _finish mirrors R_to_world @ rotation; pass the camera->world part after mirroring
        if side == "left":
            params, joints_rel = self._finish(side, out, M @ R_cam.transpose(1, 2) @ M @ to_cam)
        else:
            params, joints_rel = self._finish(side, out, R_cam.transpose(1, 2) @ to_cam)
        # joints_rel: world axes, wrist at the origin
        if views is None:
            obs = xy[:, None]
            w = vis[:, None]
            Rv, tv = R_cam[:, None], t_cam[:, None]
        else:
            obs = normalised_image_coords(views["uv"].reshape(-1, 21, 2), views["K"].reshape(-1, 3, 3)).reshape(views["uv"].shape)
            w, Rv, tv = views["weights"], views["R"], views["t"]
            obs, w, Rv, tv = (torch.as_tensor(a, dtype=torch.float32, device=dev) for a in (obs, w, Rv, tv))
        T = register_translation(joints_rel, obs, w, Rv, tv, scale=float(0.01))
        params.transl = T
        verts = torch.einsum("bji,bnj->bni", R_cam, verts_cam) + T[:, None]
        return Prediction(params, verts, joints_rel + T[:, None], time.perf_counter() - t0)
