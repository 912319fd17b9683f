"""A multi-resolution hierarchy of the hand mesh: decimation, resampling matrices and spirals.

Why: spiral graph convolutions (Neural3DMM / SpiralNet++) need, per level, a fixed ordered
neighbourhood of every vertex, and an up-sampling decoder needs sparse maps between levels. We
build both from OUR mesh (the built-in hand's faces) so the network decodes straight to the
hand model's 1609 vertices.

- Decimation: quadric-error half-edge collapse (Garland & Heckbert 1997, restricted to keeping one
  endpoint so every coarse vertex is a fine vertex), with boundary-preserving constraint planes, a
  small edge-length term so the flat palm does not swallow the whole budget, the link condition
  (no topology change) and a normal-flip check.
- Down-sampling (fine -> coarse): each coarse vertex averages the fine vertices that collapsed
  into it (its cluster); rows are convex weights.
- Up-sampling (coarse -> fine): each fine vertex is the barycentric combination of the closest
  point on the nearest coarse triangle, searched only among triangles around its cluster's coarse
  vertex so a vertex never snaps to a neighbouring finger.
- Spirals: per vertex, the vertex itself, then its 1-ring, 2-ring, ... each ring ordered by angle
  about the vertex normal (counter-clockwise seen from outside), starting from the direction
  closest to a fixed reference axis of the canonical hand frame, truncated/padded to a length.

Sparse maps are stored as padded ``(rows, K)`` index and weight arrays (weight 0 = padding).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIERARCHY_FILE = Path(__file__).resolve().parent / "data" / "hand_hierarchy.npz"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------ mesh basics
def face_normals(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Unnormalised face normals (area x 2) of triangles ``F`` over vertices ``V``."""
    return np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])


def vertex_normals(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals."""
    n = np.zeros_like(V)
    fn = face_normals(V, F)
    for k in range(3):
        np.add.at(n, F[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def adjacency(n: int, F: np.ndarray) -> list[set[int]]:
    """Vertex neighbour sets of a triangle mesh."""
    nb: list[set[int]] = [set() for _ in range(n)]
    for a, b, c in F:
        nb[a].update((b, c))
        nb[b].update((a, c))
        nb[c].update((a, b))
    return nb


def boundary_edges(F: np.ndarray) -> set[tuple[int, int]]:
    """Undirected edges used by exactly one face, as sorted pairs."""
    count: dict[tuple[int, int], int] = {}
    for f in F:
        for i in range(3):
            e = tuple(sorted((int(f[i]), int(f[(i + 1) % 3]))))
            count[e] = count.get(e, 0) + 1
    return {e for e, c in count.items() if c == 1}


def graph_distances(nb: list[set[int]], src: int, max_depth: int) -> dict[int, int]:
    """Breadth-first hop distances from ``src`` up to ``max_depth``."""
    dist = {src: 0}
    frontier = [src]
    for d in range(1, max_depth + 1):
        nxt = []
        for u in frontier:
            for w in nb[u]:
                if w not in dist:
                    dist[w] = d
                    nxt.append(w)
        frontier = nxt
    return dist


# ------------------------------------------------------------------------------------- decimation
def _plane_quadric(n: np.ndarray, p: np.ndarray, w: float) -> np.ndarray:
    d = -float(n @ p)
    q = np.append(n, d)
    return w * np.outer(q, q)


def decimate(V: np.ndarray, F: np.ndarray, target: int, length_weight: float = 0.05, boundary_weight: float = 100.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-edge collapse down to ``target`` vertices.

    Returns ``(kept (Vc,) fine indices of the coarse vertices, Fc (Fc,3) coarse faces in coarse
    indices, cluster (V,) coarse index that each fine vertex collapsed into)``. The cost of
    collapsing u into v is ``v^T (Q_u + Q_v) v`` plus ``length_weight * mean_area * |u-v|^2 / mean_edge^2``.
    """
    V = np.asarray(V, np.float64)
    F = np.asarray(F, np.int64).copy()
    n = len(V)
    if not 3 < target < n:
        raise ValueError(f"target {target} must be between 4 and {n - 1}")
    fn = face_normals(V, F)
    area = 0.5 * np.linalg.norm(fn, axis=1)
    unit = fn / np.maximum(2 * area[:, None], 1e-18)
    Q = np.zeros((n, 4, 4))
    for fi, f in enumerate(F):
        q = _plane_quadric(unit[fi], V[f[0]], area[fi])
        for v in f:
            Q[v] += q
    bedges = boundary_edges(F)
    face_of_edge: dict[tuple[int, int], int] = {}
    for fi, f in enumerate(F):
        for i in range(3):
            face_of_edge[tuple(sorted((int(f[i]), int(f[(i + 1) % 3]))))] = fi
    mean_area = float(area.mean())
    for a, b in bedges:
        e = V[b] - V[a]
        nrm = np.cross(e, unit[face_of_edge[(a, b)]])
        nrm /= max(np.linalg.norm(nrm), 1e-18)
        q = _plane_quadric(nrm, V[a], boundary_weight * mean_area)
        Q[a] += q
        Q[b] += q
    on_boundary = np.zeros(n, bool)
    for a, b in bedges:
        on_boundary[a] = on_boundary[b] = True

    alive = np.ones(n, bool)
    faces: dict[int, np.ndarray] = {i: F[i].copy() for i in range(len(F))}
    vfaces: list[set[int]] = [set() for _ in range(n)]
    for fi, f in enumerate(F):
        for v in f:
            vfaces[v].add(fi)
    nb = adjacency(n, F)
    bset = set(bedges)
    edge_len2 = np.mean([np.sum((V[a] - V[b]) ** 2) for a, b in ((f[0], f[1]) for f in F)])
    parent = np.arange(n)
    version = np.zeros(n, np.int64)
    heap: list[tuple[float, int, int, int, int]] = []

    def cost(u: int, v: int) -> float:
        h = np.append(V[v], 1.0)
        return float(h @ (Q[u] + Q[v]) @ h) + length_weight * mean_area * float(np.sum((V[u] - V[v]) ** 2)) / edge_len2

    def push(u: int) -> None:
        for v in nb[u]:
            heapq.heappush(heap, (cost(u, v), u, v, int(version[u]), int(version[v])))

    def valid(u: int, v: int) -> bool:
        e = (min(u, v), max(u, v))
        if on_boundary[u] and e not in bset:
            return False
        opposite = set()
        for fi in vfaces[u] & vfaces[v]:
            opposite.update(int(x) for x in faces[fi] if x not in (u, v))
        if (nb[u] & nb[v]) != opposite:
            return False  # link condition: the collapse would glue two sheets together
        if e in bset:
            loop = sum(1 for x in on_boundary[alive] if x)
            if loop <= 8:
                return False
        for fi in vfaces[u] - vfaces[v]:
            f = faces[fi]
            before = face_normals(V, f[None])[0]
            g = np.where(f == u, v, f)
            after = face_normals(V, g[None])[0]
            la, lb = np.linalg.norm(after), np.linalg.norm(before)
            if la < 1e-12 or after @ before < 0.2 * la * lb:
                return False
        return True

    for u in range(n):
        push(u)
    count = n
    while count > target and heap:
        _, u, v, vu, vv = heapq.heappop(heap)
        if not (alive[u] and alive[v]) or vu != version[u] or vv != version[v] or v not in nb[u]:
            continue
        if not valid(u, v):
            continue
        # collapse u -> v
        for fi in list(vfaces[u]):
            f = faces[fi]
            if v in f:
                for x in f:
                    vfaces[x].discard(fi)
                del faces[fi]
            else:
                faces[fi] = np.where(f == u, v, f)
                vfaces[v].add(fi)
        vfaces[u] = set()
        for w in nb[u]:
            nb[w].discard(u)
            if w != v:
                nb[w].add(v)
                nb[v].add(w)
        nb[v].discard(u)
        nb[u] = set()
        for w in list(bset):
            if u in w:
                bset.discard(w)
                other = w[0] if w[1] == u else w[1]
                if other != v:
                    bset.add((min(other, v), max(other, v)))
        Q[v] += Q[u]
        alive[u] = False
        parent[u] = v
        count -= 1
        version[v] += 1
        for w in nb[v]:
            version[w] += 1
        for w in [v, *nb[v]]:
            push(w)
    if count > target:
        raise RuntimeError(f"decimation stalled at {count} vertices (target {target})")

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    kept = np.flatnonzero(alive)
    new_index = -np.ones(n, np.int64)
    new_index[kept] = np.arange(len(kept))
    Fc = new_index[np.stack(list(faces.values()))]
    cluster = np.array([new_index[root(i)] for i in range(n)])
    return kept, Fc, cluster


# ------------------------------------------------------------------------------------- resampling
def closest_barycentric(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
    """Barycentric coordinates of the point of triangle abc closest to p, and its distance."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        w = np.array([1.0, 0.0, 0.0])
    else:
        bp = p - b
        d3, d4 = ab @ bp, ac @ bp
        cp = p - c
        d5, d6 = ab @ cp, ac @ cp
        vc, vb, va = d1 * d4 - d3 * d2, d5 * d2 - d1 * d6, d3 * d6 - d5 * d4
        if d3 >= 0 and d4 <= d3:
            w = np.array([0.0, 1.0, 0.0])
        elif d6 >= 0 and d5 <= d6:
            w = np.array([0.0, 0.0, 1.0])
        elif vc <= 0 and d1 >= 0 and d3 <= 0:
            t = d1 / (d1 - d3)
            w = np.array([1 - t, t, 0.0])
        elif vb <= 0 and d2 >= 0 and d6 <= 0:
            t = d2 / (d2 - d6)
            w = np.array([1 - t, 0.0, t])
        elif va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
            t = (d4 - d3) / ((d4 - d3) + (d5 - d6))
            w = np.array([0.0, 1 - t, t])
        else:
            den = 1.0 / (va + vb + vc)
            w = np.array([va * den, vb * den, vc * den])
    q = w[0] * a + w[1] * b + w[2] * c
    return w, float(np.linalg.norm(p - q))


def upsampling(Vf: np.ndarray, Vc: np.ndarray, Fc: np.ndarray, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Vf,3) indices and weights: each fine vertex from its closest coarse triangle among those
    within one ring of its cluster's coarse vertex."""
    nbc = adjacency(len(Vc), Fc)
    vfaces: list[list[int]] = [[] for _ in range(len(Vc))]
    for fi, f in enumerate(Fc):
        for v in f:
            vfaces[v].append(fi)
    idx = np.zeros((len(Vf), 3), np.int64)
    wts = np.zeros((len(Vf), 3))
    for i, p in enumerate(Vf):
        c = int(cluster[i])
        cand = set(vfaces[c])
        for w in nbc[c]:
            cand.update(vfaces[w])
        best = (np.inf, None, None)
        for fi in sorted(cand):
            f = Fc[fi]
            bw, d = closest_barycentric(p, Vc[f[0]], Vc[f[1]], Vc[f[2]])
            if d < best[0] - 1e-15:
                best = (d, f, bw)
        idx[i], wts[i] = best[1], best[2]
    return idx, wts


def downsampling(cluster: np.ndarray, n_coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """(Vc,K) indices and weights: each coarse vertex = mean of its cluster's fine vertices."""
    members: list[list[int]] = [[] for _ in range(n_coarse)]
    for i, c in enumerate(cluster):
        members[int(c)].append(i)
    K = max(len(m) for m in members)
    idx = np.zeros((n_coarse, K), np.int64)
    wts = np.zeros((n_coarse, K))
    for c, m in enumerate(members):
        idx[c, : len(m)] = m
        wts[c, : len(m)] = 1.0 / len(m)
    return idx, wts


# ----------------------------------------------------------------------------------------- spirals
def spirals(V: np.ndarray, F: np.ndarray, length: int, reference: np.ndarray = np.array([0.0, 1.0, 0.0]), fallback: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """(V, length) spiral index sequences: vertex, 1-ring, 2-ring, ... each ring sorted by angle
    about the vertex normal from the reference axis projected on the tangent plane (the fallback
    axis where the reference is nearly normal). Sequences shorter than ``length`` (tiny meshes)
    repeat their rings cyclically."""
    N = vertex_normals(V, F)
    nb = adjacency(len(V), F)
    out = np.zeros((len(V), length), np.int64)
    for i in range(len(V)):
        n = N[i]
        ref = reference - (reference @ n) * n
        if np.linalg.norm(ref) < 0.3:
            ref = fallback - (fallback @ n) * n
        ref /= max(np.linalg.norm(ref), 1e-12)
        side = np.cross(n, ref)
        seq = [i]
        seen = {i}
        frontier = [i]
        while len(seq) < length:
            ring = sorted({w for u in frontier for w in nb[u]} - seen)
            if not ring:
                break
            d = V[ring] - V[i]
            ang = np.mod(np.arctan2(d @ side, d @ ref), 2 * np.pi)
            ring = [ring[k] for k in np.lexsort((np.array(ring), ang))]
            seq.extend(ring)
            seen.update(ring)
            frontier = ring
        if len(seq) < length:
            rest = seq[1:] or [i]
            seq = seq + [rest[k % len(rest)] for k in range(length - len(seq))]
        out[i] = seq[:length]
    return out


# ---------------------------------------------------------------------------------------- the file
@dataclass
class MeshHierarchy:
    """Levels 0 (full mesh) .. L-1 (coarsest). ``down[k]``: level k -> k+1, ``up[k]``: k+1 -> k,
    each an (index, weight) pair of padded arrays; ``spirals[k]`` (V_k, S)."""

    vertices: list[np.ndarray]
    faces: list[np.ndarray]
    kept: list[np.ndarray]  # kept[k]: indices in level k of the vertices of level k+1
    spirals: list[np.ndarray]
    down: list[tuple[np.ndarray, np.ndarray]]
    up: list[tuple[np.ndarray, np.ndarray]]

    @property
    def num_levels(self) -> int:
        return len(self.vertices)

    @property
    def sizes(self) -> list[int]:
        return [len(v) for v in self.vertices]

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {"format_version": np.int32(FORMAT_VERSION), "num_levels": np.int32(self.num_levels)}
        for k in range(self.num_levels):
            arrays[f"vertices_{k}"] = self.vertices[k].astype(np.float32)
            arrays[f"faces_{k}"] = self.faces[k].astype(np.int32)
            arrays[f"spiral_{k}"] = self.spirals[k].astype(np.int32)
        for k in range(self.num_levels - 1):
            arrays[f"kept_{k}"] = self.kept[k].astype(np.int32)
            arrays[f"down_index_{k}"] = self.down[k][0].astype(np.int32)
            arrays[f"down_weight_{k}"] = self.down[k][1].astype(np.float32)
            arrays[f"up_index_{k}"] = self.up[k][0].astype(np.int32)
            arrays[f"up_weight_{k}"] = self.up[k][1].astype(np.float32)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)

    @staticmethod
    def load(path: str | Path = HIERARCHY_FILE) -> "MeshHierarchy":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mesh hierarchy not found: {path}; build it with `python scripts/build_mesh_hierarchy.py`")
        with np.load(path) as z:
            if int(z["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: format {int(z['format_version'])}, expected {FORMAT_VERSION}; rebuild it")
            L = int(z["num_levels"])
            i64 = lambda k: z[k].astype(np.int64)  # noqa: E731
            return MeshHierarchy(
                vertices=[z[f"vertices_{k}"].astype(np.float64) for k in range(L)],
                faces=[i64(f"faces_{k}") for k in range(L)],
                kept=[i64(f"kept_{k}") for k in range(L - 1)],
                spirals=[i64(f"spiral_{k}") for k in range(L)],
                down=[(i64(f"down_index_{k}"), z[f"down_weight_{k}"].astype(np.float64)) for k in range(L - 1)],
                up=[(i64(f"up_index_{k}"), z[f"up_weight_{k}"].astype(np.float64)) for k in range(L - 1)],
            )


def apply_sparse(index: np.ndarray, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Rows of a padded sparse matrix applied to a field ``x`` (N, ...) -> (rows, ...)."""
    return np.einsum("rk,rk...->r...", weight, x[index])


def build_hierarchy(V: np.ndarray, F: np.ndarray, levels: int = 5, factor: float = 2.0, spiral_length: int = 9, length_weight: float = 0.05) -> MeshHierarchy:
    """Full mesh plus ``levels - 1`` decimations, each by ``factor`` in vertex count."""
    Vs, Fs, kept_all, down, up = [np.asarray(V, np.float64)], [np.asarray(F, np.int64)], [], [], []
    for _ in range(levels - 1):
        Vf, Ff = Vs[-1], Fs[-1]
        target = int(np.ceil(len(Vf) / factor))
        kept, Fc, cluster = decimate(Vf, Ff, target, length_weight=length_weight)
        Vc = Vf[kept]
        down.append(downsampling(cluster, len(kept)))
        up.append(upsampling(Vf, Vc, Fc, cluster))
        kept_all.append(kept)
        Vs.append(Vc)
        Fs.append(Fc)
    sp = [spirals(v, f, spiral_length) for v, f in zip(Vs, Fs)]
    return MeshHierarchy(Vs, Fs, kept_all, sp, down, up)
