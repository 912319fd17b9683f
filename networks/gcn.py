"""The GCN predictor: 21 keypoints -> full-resolution hand mesh (1609 vertices) + hand-model parameters.

Architecture (in the spirit of Pose2Mesh, FMHR's joints-to-mesh GCN and CMR/MobRecon decoders):

1. Keypoint encoder: a global MLP over all keypoints (context: which joints are missing, overall
   pose) and per-joint features refined by residual graph convolutions on the skeleton.
2. Lifting to the coarsest mesh level (101 vertices): a learned joints -> vertices mixing matrix,
   initialised to a soft nearest-joint assignment on the template, plus a per-vertex embedding,
   the global feature and (``cfg.ik``) the coordinates of the swing-IK posed mean hand
   (networks/ik.py) at those vertices.
3. Decoder: a depth-separable spiral conv (DSConv) at the coarsest level, then (barycentric
   up-sample -> DSConv) stages up to level 1 (805 vertices), a linear + up-sample to 1609
   vertices, a spiral-conv head to xyz, plus a learnable per-vertex bias; with ``cfg.ik`` the
   output is a residual on the IK mesh, else the bias starts at the mean shape.
4. Parameter head: an MLP on the global feature and the predicted mesh down-sampled to 403
   vertices, giving betas, hand_pose (axis-angle, a residual on the IK pose with ``cfg.ik``), the
   wrist rotation (6D) and a translation in the input frame; trained so the hand model driven by
   them reproduces the mesh.

The 3D branch uses this network with ``cfg.ik``; the 2D branch lifts its keypoints to 3D first
(networks/lifter.py) and reuses it.

All coordinates are in the normalised input frame (networks/geometry.py); the wrapper in
networks/predictor.py maps in and out of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from handmodel.params import NUM_BETAS, NUM_POSE_JOINTS

from .hierarchy import MeshHierarchy
from .layers import DSConv, JointGraphConv, Resample, SpiralBlock, SpiralConv

NUM_KEYPOINTS = 21
# MediaPipe skeleton: parent of each keypoint (wrist has none).
KEYPOINT_PARENTS = [-1, 0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19]


def skeleton_adjacency() -> np.ndarray:
    """(21,21) symmetric bone adjacency, plus the knuckle line (palm) as extra edges."""
    A = np.zeros((NUM_KEYPOINTS, NUM_KEYPOINTS), np.float32)
    for j, p in enumerate(KEYPOINT_PARENTS):
        if p >= 0:
            A[j, p] = A[p, j] = 1.0
    for a, b in ((1, 5), (5, 9), (9, 13), (13, 17)):
        A[a, b] = A[b, a] = 1.0
    return A


@dataclass
class GCNConfig:
    """Sizes of one predictor. ``in_dim`` 3 (3D keypoints) or 2 (2D keypoints)."""

    in_dim: int = 3
    joint_channels: int = 64
    joint_layers: int = 2
    latent: int = 256
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # level 0 (fine) .. coarsest
    param_level: int = 2
    param_hidden: int = 512
    extra_dim: int = 1
    # A DSConv at full resolution too; off, the last stage is linear -> barycentric up-sampling and
    # the spiral head alone works at 1609 vertices (memory traffic there dominates CPU training).
    fine_conv: bool = False
    # 3D branch: decode residuals on the swing-IK posed mean hand (networks/ik.py).
    ik: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class HandMeshGCN(nn.Module):
    """``forward(x (B,21,in_dim), vis (B,21), extra (B,extra_dim))`` -> dict with ``vertices``
    (B,1609,3), ``betas`` (B,10), ``hand_pose`` (B,15,3), ``rotation`` (B,3,3), ``translation`` (B,3)."""

    def __init__(self, hierarchy: MeshHierarchy, cfg: GCNConfig, template: np.ndarray, rest_joints: np.ndarray, ik: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.ik and ik is None:
            raise ValueError("cfg.ik needs the SwingIK module")
        self.ik = ik if cfg.ik else None
        L = hierarchy.num_levels
        if len(cfg.channels) != L:
            raise ValueError(f"channels {cfg.channels} must list one width per level ({L})")
        Cj, G = cfg.joint_channels, cfg.latent
        d_in = cfg.in_dim + 1
        self.global_mlp = nn.Sequential(
            nn.Linear(NUM_KEYPOINTS * d_in + cfg.extra_dim, G), nn.ELU(), nn.Linear(G, G), nn.ELU(), nn.Linear(G, G), nn.ELU()
        )
        self.joint_in = nn.Linear(d_in, Cj)
        self.joint_embed = nn.Parameter(0.02 * torch.randn(NUM_KEYPOINTS, Cj))
        self.joint_from_global = nn.Linear(G, NUM_KEYPOINTS * Cj)
        A = skeleton_adjacency()
        self.joint_convs = nn.ModuleList([JointGraphConv(Cj, A) for _ in range(cfg.joint_layers)])

        # Lift: coarse vertex <- soft nearest joints of the template (learnable afterwards).
        coarse = hierarchy.vertices[-1]
        Vc = len(coarse)
        d2 = ((coarse[:, None] - rest_joints[None]) ** 2).sum(-1)
        sigma2 = np.median(d2.min(1)) + 1e-8
        mix = np.exp(-(d2 - d2.min(1, keepdims=True)) / sigma2)
        mix /= mix.sum(1, keepdims=True)
        self.lift = nn.Parameter(torch.as_tensor(mix, dtype=torch.float32))
        C = cfg.channels
        self.coarse_in = nn.Linear(Cj, C[-1])
        self.vertex_embed = nn.Parameter(0.02 * torch.randn(Vc, C[-1]))
        self.coarse_from_global = nn.Linear(G, C[-1])
        coarse_index = np.arange(hierarchy.sizes[0])
        for kept in hierarchy.kept:
            coarse_index = coarse_index[kept]
        self.register_buffer("coarse_index", torch.as_tensor(coarse_index, dtype=torch.long), persistent=False)
        self.coarse_from_prior = nn.Linear(3, C[-1]) if cfg.ik else None

        blocks: list[nn.Module] = [SpiralBlock(None, DSConv(C[-1], C[-1], hierarchy.spirals[-1]))]
        for k in range(L - 2, -1, -1):
            up = Resample(*hierarchy.up[k])
            if k == 0 and not cfg.fine_conv:
                blocks.append(UpLinear(up, nn.Linear(C[1], C[0])))
            else:
                blocks.append(SpiralBlock(up, DSConv(C[k + 1], C[k], hierarchy.spirals[k])))
        self.decoder = nn.ModuleList(blocks)
        self.head = SpiralConv(C[0], 3, hierarchy.spirals[0])
        nn.init.normal_(self.head.linear.weight, std=1e-3)
        self.vertex_bias = nn.Parameter(torch.as_tensor(np.zeros_like(template) if cfg.ik else np.asarray(template), dtype=torch.float32))

        self.down = nn.ModuleList([Resample(*hierarchy.down[k]) for k in range(cfg.param_level)])
        Vp = hierarchy.sizes[cfg.param_level]
        H = cfg.param_hidden
        self.param_mlp = nn.Sequential(
            nn.Linear(G + Vp * 3 + cfg.extra_dim, H), nn.ELU(), nn.Linear(H, H), nn.ELU(), nn.Linear(H, NUM_BETAS + NUM_POSE_JOINTS * 3 + 6 + 3)
        )
        last = self.param_mlp[-1]
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[NUM_BETAS + NUM_POSE_JOINTS * 3 : NUM_BETAS + NUM_POSE_JOINTS * 3 + 6] = torch.tensor([1.0, 0, 0, 0, 1.0, 0])

    def forward(self, x: torch.Tensor, vis: torch.Tensor, extra: torch.Tensor) -> dict[str, torch.Tensor]:
        from .geometry import rot6d_to_matrix

        B = x.shape[0]
        prior_pose = prior_verts = None
        if self.ik is not None:
            prior_pose, prior_verts = self.ik(x, vis)
            prior_verts = prior_verts / self.ik.palm_size  # metres -> canonical units
        v = vis[..., None].to(x.dtype)
        inp = torch.cat([x * v, v], -1)  # (B,21,d_in)
        g = self.global_mlp(torch.cat([inp.reshape(B, -1), extra], -1))
        j = self.joint_in(inp) + self.joint_embed + self.joint_from_global(g).reshape(B, NUM_KEYPOINTS, -1)
        for conv in self.joint_convs:
            j = conv(j)
        h = torch.einsum("vj,bjc->bvc", self.lift, j)
        h = self.coarse_in(h) + self.vertex_embed + self.coarse_from_global(g)[:, None]
        if prior_verts is not None:
            h = h + self.coarse_from_prior(prior_verts[:, self.coarse_index])
        for block in self.decoder:
            h = block(h)
        verts = self.head(h) + self.vertex_bias
        if prior_verts is not None:
            verts = verts + prior_verts
        d = verts
        for down in self.down:
            d = down(d)
        p = self.param_mlp(torch.cat([g, d.reshape(B, -1), extra], -1))
        nb, npose = NUM_BETAS, NUM_POSE_JOINTS * 3
        return {
            "vertices": verts,
            "betas": p[:, :nb],
            "hand_pose": p[:, nb : nb + npose].reshape(B, NUM_POSE_JOINTS, 3) + (0 if prior_pose is None else prior_pose),
            "rotation": rot6d_to_matrix(p[:, nb + npose : nb + npose + 6]),
            "translation": p[:, nb + npose + 6 :],
        }

    def macs(self, batch: int = 1) -> int:
        """Multiply-adds of one forward, counted analytically (linear layers, spiral gathers,
        resampling, joint-graph products); element-wise activations are not counted."""

        def lin(m: nn.Linear, rows: int = 1) -> int:
            return rows * m.in_features * m.out_features

        J, Vc = NUM_KEYPOINTS, int(self.lift.shape[0])
        total = sum(lin(m) for m in self.global_mlp if isinstance(m, nn.Linear))
        total += lin(self.joint_in, J) + lin(self.joint_from_global)
        total += sum(c.macs(1) for c in self.joint_convs)
        total += Vc * J * self.cfg.joint_channels + lin(self.coarse_in, Vc) + lin(self.coarse_from_global)
        for block in self.decoder:
            conv = block.conv
            if isinstance(block, UpLinear):
                total += lin(block.conv, int(block.up.index.max()) + 1) + block.up.macs(1, block.conv.out_features)
            elif block.up is None:
                total += conv.macs(1)
            else:
                v_in = int(block.up.index.max()) + 1
                total += conv.macs(1, vertices_in=v_in) + block.up.macs(1, conv.out_channels)
        total += self.head.macs(1)
        total += sum(d.macs(1, 3) for d in self.down)
        total += sum(lin(m) for m in self.param_mlp if isinstance(m, nn.Linear))
        return batch * total


class UpLinear(nn.Module):
    """Point-wise linear on the coarser level, then barycentric up-sampling, then ELU."""

    def __init__(self, up: Resample, linear: nn.Linear) -> None:
        super().__init__()
        self.up = up
        self.conv = linear
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.up(self.conv(x)))
