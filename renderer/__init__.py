"""Differentiable rasterization with nvdiffrast's interface over a numba CPU backend and nvdiffrast.

Ops (``rasterize``, ``interpolate``, ``texture``, ``antialias``) take nvdiffrast's arguments;
``make_context`` picks the backend. ``shading`` builds images from them (``render_mesh``),
``mesh_ops`` holds the mesh utilities (Loop subdivision, Laplacians, regularisers).
"""
from renderer.context import RenderContext, RendererError, make_context
from renderer.ops import (
    TopologyHash,
    antialias,
    antialias_construct_topology_hash,
    get_num_threads,
    interpolate,
    rasterize,
    set_num_threads,
    texture,
)
from renderer.shading import RenderResult, render_mesh

__all__ = [
    "RenderContext",
    "RenderResult",
    "RendererError",
    "TopologyHash",
    "antialias",
    "antialias_construct_topology_hash",
    "get_num_threads",
    "interpolate",
    "make_context",
    "rasterize",
    "render_mesh",
    "set_num_threads",
    "texture",
]
