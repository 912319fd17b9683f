"""Graph layers over our mesh in plain torch: index gathers and linear maps, nothing else.

Why plain torch: no torch-geometric / torch-scatter build to install, the same code runs on CPU
and GPU, and a spiral convolution is exactly a gather followed by a linear layer.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _index_buffer(index: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(index), dtype=torch.long)


class SpiralConv(nn.Module):
    """Spiral convolution (SpiralNet++): ``y_i = W [x_{s_i0} | x_{s_i1} | ... | x_{s_iL-1}] + b``.

    ``x`` (B, V, C_in) -> (B, V, C_out); ``spiral`` (V, L) fixed per mesh level, so the ordered
    neighbourhood plays the role of an image kernel's window."""

    def __init__(self, in_channels: int, out_channels: int, spiral: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("spiral", _index_buffer(spiral), persistent=False)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.length = int(self.spiral.shape[1])
        # row s(v,l) * L + l of (x W_l) stacked per vertex: the linear-first gather
        self.register_buffer("flat_index", (self.spiral * self.length + torch.arange(self.length)).reshape(-1), persistent=False)
        self.linear = nn.Linear(in_channels * self.length, out_channels)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, V, _ = x.shape
        L, Co = self.length, self.out_channels
        if Co < self.in_channels:
            # Same result, fewer channels gathered: y_v = sum_l (x W_l)_{s(v,l)}.
            W = self.linear.weight.reshape(Co, L, self.in_channels).transpose(0, 1).reshape(L * Co, self.in_channels)
            y = (x @ W.t()).reshape(B, V * L, Co)
            g = y.index_select(1, self.flat_index).reshape(B, V, L, Co)
            return g.sum(2) + self.linear.bias
        g = x.index_select(1, self.spiral.reshape(-1)).reshape(B, V, L * self.in_channels)
        return self.linear(g)

    def macs(self, batch: int = 1) -> int:
        """Multiply-adds of one forward (the gather costs none)."""
        return batch * int(self.spiral.shape[0]) * self.length * self.in_channels * self.out_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, vertices={self.spiral.shape[0]}, length={self.length}"


class DSConv(nn.Module):
    """Depth-separable spiral convolution (MobRecon's DSConv, factors swapped): a point-wise linear
    C_in -> C_out, then a per-channel weighted sum over the spiral (L x C_out weights) plus a bias.
    About L times fewer multiply-adds than :class:`SpiralConv`; doing the point-wise part first
    means the spiral gather moves C_out channels, and lets a decoder stage apply it before
    up-sampling (both are linear per vertex with convex up-sampling rows, so they commute)."""

    def __init__(self, in_channels: int, out_channels: int, spiral: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("spiral", _index_buffer(spiral), persistent=False)
        self.register_buffer("spiral_t", self.spiral.t().contiguous(), persistent=False)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.length = int(self.spiral.shape[1])
        self.pointwise = nn.Linear(in_channels, out_channels, bias=False)
        nn.init.xavier_uniform_(self.pointwise.weight)
        w = torch.empty(self.length, out_channels)
        nn.init.uniform_(w, -1.0 / np.sqrt(self.length), 1.0 / np.sqrt(self.length))
        w[0] += 1.0  # start close to the identity on the centre vertex
        self.depthwise = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def pointwise_part(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(x)

    def depthwise_part(self, x: torch.Tensor) -> torch.Tensor:
        # One gather + multiply-add per spiral position: never materialises (B, V, L, C), which
        # on CPU is several times slower than these L streaming passes.
        cols = self.spiral_t
        acc = torch.addcmul(self.bias, x.index_select(1, cols[0]), self.depthwise[0])
        for k in range(1, self.length):
            acc = torch.addcmul(acc, x.index_select(1, cols[k]), self.depthwise[k])
        return acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise_part(self.pointwise_part(x))

    def macs(self, batch: int = 1, vertices_in: int | None = None) -> int:
        """Multiply-adds; ``vertices_in`` when the point-wise part runs on a coarser level."""
        V = int(self.spiral.shape[0])
        Vin = V if vertices_in is None else vertices_in
        return batch * (Vin * self.in_channels * self.out_channels + V * self.length * self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, vertices={self.spiral.shape[0]}, length={self.length}"


class Resample(nn.Module):
    """A fixed sparse matrix (padded rows of indices and weights) applied to per-vertex features:
    ``y_r = sum_k w_rk x_{i_rk}``. Up-sampling (barycentric) and down-sampling (cluster means)."""

    def __init__(self, index: np.ndarray | torch.Tensor, weight: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", _index_buffer(index), persistent=False)
        self.register_buffer("weight", torch.as_tensor(np.asarray(weight), dtype=torch.float32), persistent=False)
        self.register_buffer("index_t", self.index.t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Column by column (K passes of gather + multiply-add), as in DSConv, for CPU speed.
        w = self.weight.to(x.dtype)
        acc = x.index_select(1, self.index_t[0]) * w[:, :1]
        for k in range(1, self.index.shape[1]):
            acc = torch.addcmul(acc, x.index_select(1, self.index_t[k]), w[:, k : k + 1])
        return acc

    def macs(self, batch: int = 1, channels: int = 1) -> int:
        return batch * int((self.weight != 0).sum()) * channels


class SpiralBlock(nn.Module):
    """One decoder stage: (up-sample) -> spiral conv -> ELU. With a :class:`DSConv` the point-wise
    part runs before the up-sampling (exactly equivalent, fewer channels to up-sample)."""

    def __init__(self, up: Resample | None, conv: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.conv = conv
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is None:
            return self.act(self.conv(x))
        if isinstance(self.conv, DSConv):
            return self.act(self.conv.depthwise_part(self.up(self.conv.pointwise_part(x))))
        return self.act(self.conv(self.up(x)))


class JointGraphConv(nn.Module):
    """Residual graph convolution on the 21-keypoint skeleton (Pose2Mesh style) with a learnable
    adjacency initialised from the bones plus self loops, row-normalised."""

    def __init__(self, channels: int, adjacency: np.ndarray) -> None:
        super().__init__()
        A = np.asarray(adjacency, np.float32) + np.eye(len(adjacency), dtype=np.float32)
        A = A / A.sum(1, keepdims=True)
        self.adjacency = nn.Parameter(torch.as_tensor(A))
        self.linear = nn.Linear(channels, channels)
        self.self_linear = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("ij,bjc->bic", self.adjacency, self.linear(x)) + self.self_linear(x)
        return x + self.act(self.norm(h))

    def macs(self, batch: int = 1) -> int:
        J, C = self.adjacency.shape[0], self.linear.in_features
        return batch * (2 * J * C * C + J * J * C)
