"""Procedural appearance of synthetic hands: skin albedo, fine geometric detail, SH light, backdrops.

Everything here is our own procedural code over the hand model's rest geometry. A point of skin
is described by where it sits on the flat rest hand of its own shape, in the right hand's
canonical frame (handmodel/data/PROVENANCE.md: millimetres here, +y wrist -> middle MCP, +z out
of the palm, +x towards the thumb; a left hand is mirrored back by negating x). Patterns defined
there follow the skin when the hand is posed, and a texel of the UV atlas and a vertex of the
fine mesh at the same rest point get the same value, so the texture, the per-vertex albedo and
the displaced mesh of a scan agree with each other.

- ``HandAnatomy``: rest joints plus, per crease joint, the bone axis, the dorsal direction
  (index..pinky: the back of the hand; thumb: measured on the UV atlas, see ``dorsal_sides``)
  and the finger radius.
- ``crease_field``: the knuckle wrinkles (thin grooves across the back of the finger over the
  MCP/PIP/DIP/IP joints) and palmar flexion creases, as depths in mm; used for the displacement
  and (as darker lines) for the albedo.
- ``skin_albedo``: linear RGB albedo (tone per person, blotches, pores, freckles, darker creases
  and palm lines, lighter palms and nails).
- ``skin_displacement``: creases plus a low-amplitude skin relief, mm along the outward normal.
- ``random_lighting``: 2nd-order SH (renderer.shading convention) of a key light, a fill light
  and an ambient term, RGB, positive everywhere.
- ``random_backdrop``: per-view sRGB backgrounds (smooth gradient + noise) in non-skin hues.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from handmodel.model import TREE_TO_MEDIAPIPE

# MediaPipe joints that get creases, their skinning-tree index, and the tree index of their parent.
# (thumb MCP, IP; index..pinky MCP, PIP, DIP)
CREASE_JOINTS = (2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19)
_MP_TO_TREE = {int(m): int(t) for t, m in zip(TREE_TO_MEDIAPIPE, range(21)) if t < 16}
_TREE_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
DISPLACEMENT_RANGE_MM = (-1.2, 0.4)  # hard bounds of skin_displacement (grooves are negative)


# ------------------------------------------------------------------------------------ colour maths
def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding (photos are sRGB; shading is computed in linear space)."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 encoding, clipped to [0, 1]."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1.0 / 2.4) - 0.055)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at e0 to 1 at e1 (e0 > e1 gives the falling step)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ------------------------------------------------------------------------------------------ noise
class ValueNoise:
    """Smooth 3D value noise in [-1, 1]: random values on an integer lattice (hashed into a table
    drawn from ``seed``), quintic interpolation. Deterministic, vectorised, no dependencies."""

    def __init__(self, seed: int, table_bits: int = 14) -> None:
        self.table = np.random.default_rng(seed).uniform(-1.0, 1.0, 1 << table_bits)
        self.mask = np.uint64((1 << table_bits) - 1)

    def _hash(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = x * np.uint64(0x9E3779B1) + y * np.uint64(0x85EBCA77) + z * np.uint64(0xC2B2AE3D)
            h ^= h >> np.uint64(15)
            h *= np.uint64(0x2C1B3C6D)
            h ^= h >> np.uint64(13)
        return (h & self.mask).astype(np.int64)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        i0 = np.floor(p)
        f = p - i0
        u = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)
        i0 = i0.astype(np.int64).astype(np.uint64)  # negative lattice ids wrap: fine for a hash
        out = np.zeros(len(p))
        for dx in (0, 1):
            wx = u[:, 0] if dx else 1.0 - u[:, 0]
            for dy in (0, 1):
                wy = u[:, 1] if dy else 1.0 - u[:, 1]
                for dz in (0, 1):
                    wz = u[:, 2] if dz else 1.0 - u[:, 2]
                    h = self._hash(i0[:, 0] + np.uint64(dx), i0[:, 1] + np.uint64(dy), i0[:, 2] + np.uint64(dz))
                    out += wx * wy * wz * self.table[h]
        return out

    def fbm(self, p: np.ndarray, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
        """Fractal sum (frequency doubling, amplitude x ``gain``), normalised to [-1, 1]."""
        total, amp, norm = np.zeros(len(p)), 1.0, 0.0
        for k in range(octaves):
            total += amp * self(p * (2.0**k) + 17.31 * k)
            norm += amp
            amp *= gain
        return total / norm


# ------------------------------------------------------------------------------------ per person
@dataclass
class SkinStyle:
    """One person's skin and crease parameters (colours linear RGB, lengths mm)."""

    tone: float  # 0 very light .. 1 very dark
    base: np.ndarray  # (3,) dorsal skin albedo
    palm: np.ndarray  # (3,) palmar skin albedo
    nail: np.ndarray  # (3,) nail plate albedo
    blotch: float  # relative brightness variation of the low-frequency blotches
    redness: float  # strength of reddish blotches
    pores: float  # relative darkening of the pore noise
    freckles: float  # freckle coverage (0 none)
    crease_dark: float  # relative darkening at the bottom of a crease
    knuckle_dark: float  # relative darkening of the skin over the dorsal knuckles
    wrinkle_spacing: float
    wrinkle_sigma: float
    dorsal_depth: float  # knuckle wrinkles
    palmar_depth: float  # flexion creases
    relief: float  # amplitude of the skin relief
    seed: int  # noise seed of this person (each hand adds its side)

    def to_json(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


# sRGB skin tones from very light to very dark (albedo-like: what a photo shows under unit light).
_TONES = np.array([[0.95, 0.76, 0.67], [0.87, 0.64, 0.52], [0.75, 0.52, 0.39], [0.57, 0.37, 0.27], [0.39, 0.25, 0.18]])


def random_skin(rng: np.random.Generator) -> SkinStyle:
    """A plausible person: tone anywhere from very light to very dark (palms lighter, more so for
    dark skin), freckles more likely on light skin, crease geometry of a few adult hands."""
    tone = float(rng.uniform(0.0, 1.0))
    x = tone * (len(_TONES) - 1)
    i = min(int(x), len(_TONES) - 2)
    srgb = (1 - (x - i)) * _TONES[i] + (x - i) * _TONES[i + 1]
    srgb = srgb * (1.0 + rng.normal(0.0, [0.02, 0.025, 0.03]))  # redder / yellower individuals
    base = srgb_to_linear(srgb)
    palm_srgb = 0.55 * srgb + 0.45 * np.array([0.90, 0.68, 0.60])
    palm = srgb_to_linear((1 - (0.15 + 0.5 * tone)) * srgb + (0.15 + 0.5 * tone) * palm_srgb)
    nail = srgb_to_linear(np.array([0.93, 0.76, 0.72]) * (1.0 - 0.12 * tone))
    return SkinStyle(
        tone=tone, base=base, palm=palm, nail=nail,
        blotch=float(rng.uniform(0.04, 0.10)), redness=float(rng.uniform(0.02, 0.07)),
        pores=float(rng.uniform(0.03, 0.06)), freckles=float(rng.uniform(0.0, 0.3) * (1.0 - tone) ** 2),
        crease_dark=float(rng.uniform(0.25, 0.45)), knuckle_dark=float(0.04 + 0.14 * tone + rng.uniform(0, 0.04)),
        wrinkle_spacing=float(rng.uniform(1.9, 2.5)), wrinkle_sigma=float(rng.uniform(0.55, 0.7)),
        dorsal_depth=float(rng.uniform(0.25, 0.4)), palmar_depth=float(rng.uniform(0.5, 0.75)),
        relief=float(rng.uniform(0.12, 0.2)), seed=int(rng.integers(2**31)),
    )


# --------------------------------------------------------------------------------------- anatomy
@dataclass
class HandAnatomy:
    """Rest-pose landmarks of one hand in the right-hand canonical frame, millimetres."""

    joints: np.ndarray  # (21,3) MediaPipe order
    axis: dict[int, np.ndarray] = field(default_factory=dict)  # crease joint -> unit distal bone axis
    dorsal: dict[int, np.ndarray] = field(default_factory=dict)  # crease joint -> unit dorsal direction
    radius: dict[int, float] = field(default_factory=dict)  # crease joint -> finger radius there
    length: dict[int, float] = field(default_factory=dict)  # crease joint -> distal bone length


def dorsal_sides(uv: np.ndarray, uv_faces: np.ndarray, faces: np.ndarray, normals: np.ndarray,
                 weights: np.ndarray) -> np.ndarray:
    """+1 (dorsal) / -1 (palmar) per mesh vertex from the UV atlas.

    The atlas lays the palmar and the dorsal skin out as two mirrored hands. A linear split of
    the atlas is fitted on the finger vertices whose rest normals are clearly palmar or dorsal
    (|n_z| > 0.6); it then says which side of the thumb, whose rest pose is turned about its own
    axis, is its back (where the nail goes). Seam vertices take the side of their first copy."""
    uv2v = np.zeros(len(uv), np.int64)
    uv2v[np.asarray(uv_faces).reshape(-1)] = np.asarray(faces).reshape(-1)
    nz = normals[uv2v, 2]
    fingers = weights.argmax(1)[uv2v] >= 4
    sel = fingers & (np.abs(nz) > 0.6)
    X = np.c_[uv[sel], np.ones(int(sel.sum()))]
    coef = np.linalg.lstsq(X, -np.sign(nz[sel]), rcond=None)[0]  # +1 on the dorsal (n_z < 0) half
    side_uv = np.sign(np.c_[uv, np.ones(len(uv))] @ coef)
    out = np.zeros(int(faces.max()) + 1)
    out[uv2v[::-1]] = side_uv[::-1]
    return out


def hand_anatomy(rest_verts: np.ndarray, rest_joints16: np.ndarray, tip_ids: np.ndarray, tip_w: np.ndarray,
                 weights: np.ndarray, normals: np.ndarray, dorsal_side: np.ndarray) -> HandAnatomy:
    """Crease frames of one rest hand (canonical right-hand frame, metres in, mm out).

    Axis: joint -> next joint distally. Dorsal direction: index..pinky the back of the hand (-z)
    made perpendicular to the axis; thumb: the mean rest normal of the dorsal-side (atlas) vertices
    of the bone. Radius: median distance from the axis of the bone's own vertices."""
    v = rest_verts * 1000.0
    tips = (v[tip_ids] * tip_w[..., None]).sum(1)
    joints = np.concatenate([rest_joints16 * 1000.0, tips])[TREE_TO_MEDIAPIPE]
    an = HandAnatomy(joints=joints)
    dom = weights.argmax(1)
    for j in CREASE_JOINTS:
        a = joints[j + 1] - joints[j]
        L = float(np.linalg.norm(a))
        a = a / L
        tree = _MP_TO_TREE[j]
        own = dom == tree
        if j in (2, 3):
            sel = own & (dorsal_side > 0)
            d = normals[sel].mean(0)
        else:
            d = np.array([0.0, 0.0, -1.0])
        d = d - a * (d @ a)
        d = d / np.linalg.norm(d)
        rel = v[own] - joints[j]
        t = rel @ a
        rho = np.linalg.norm(rel - t[:, None] * a, axis=1)
        mid = (t > 0.15 * L) & (t < 0.5 * L)
        an.axis[j], an.dorsal[j], an.length[j] = a, d, L
        an.radius[j] = float(np.median(rho[mid])) if mid.sum() >= 5 else float(np.median(rho))
    return an


# ----------------------------------------------------------------------------------------- creases
@dataclass
class CreaseField:
    """Crease depths (mm, >= 0) at points: ``dorsal`` knuckle wrinkles, ``palmar`` flexion creases;
    ``knuckle`` (0..1) marks the skin over the dorsal knuckles; ``nail`` (0..1) the nail plates,
    ``nail_edge`` the free edge, ``lunula`` the pale base of the nail."""

    dorsal: np.ndarray
    palmar: np.ndarray
    knuckle: np.ndarray
    nail: np.ndarray
    nail_edge: np.ndarray
    lunula: np.ndarray

    @property
    def depth(self) -> np.ndarray:
        return self.dorsal + self.palmar


# wrinkles per crease joint: (number of dorsal wrinkles, palmar crease offsets as fractions of the
# distal bone length). Finger MCPs: the palmar digital crease lies at the finger web, about a third
# along the proximal phalanx (the model's MCP is the knuckle centre, deep in the palm).
_WRINKLES = {"thumb_mcp": (3, (-0.04, 0.04)), "thumb_ip": (4, (0.0,)), "mcp": (3, (0.30, 0.35)),
             "pip": (5, (-0.05, 0.05)), "dip": (3, (0.0,))}


def _kind(j: int) -> str:
    if j == 2:
        return "thumb_mcp"
    if j == 3:
        return "thumb_ip"
    return ("mcp", "pip", "dip")[(j - 5) % 4]


def crease_field(points: np.ndarray, weights: np.ndarray, an: HandAnatomy, style: SkinStyle, seed: int) -> CreaseField:
    """Creases at rest ``points`` (N,3 mm, canonical frame) with skinning ``weights`` (N,16).

    Each crease joint owns the skin of its two adjacent bones (skinning weights) within 1.6 finger
    radii of its axis; a point's position along the axis (t), and the angle around it (cos to the
    dorsal direction) place the grooves: Gaussian profiles (sigma ``wrinkle_sigma``) across the
    finger, dorsal ones spaced ``wrinkle_spacing`` apart and slightly wavy, palmar ones at fixed
    offsets; all fade out on the finger's sides."""
    N = len(points)
    dorsal, palmar, knuckle = np.zeros(N), np.zeros(N), np.zeros(N)
    nail, nail_edge, lunula = np.zeros(N), np.zeros(N), np.zeros(N)
    s, sp = style.wrinkle_sigma, style.wrinkle_spacing
    for j in CREASE_JOINTS:
        # one stream per joint, drawn before looking at the points: the texture's texels and the
        # fine mesh's vertices (different point sets) get the same grooves
        rng = np.random.default_rng([seed, j])
        kind = _kind(j)
        n_dorsal, palm_offsets = _WRINKLES[kind]
        centre = rng.normal(0.0, 0.3)
        offs = [(k - 0.5 * (n_dorsal - 1)) * sp * rng.uniform(0.85, 1.15) + centre for k in range(n_dorsal)]
        amps = [(1.0 - 0.18 * abs(k - 0.5 * (n_dorsal - 1))) * rng.uniform(0.8, 1.1) for k in range(n_dorsal)]
        phases = rng.uniform(0, 2 * np.pi, n_dorsal)
        a, d, R, L = an.axis[j], an.dorsal[j], an.radius[j], an.length[j]
        tree = _MP_TO_TREE[j]
        parent = _TREE_PARENTS[tree]
        member = smoothstep(0.35, 0.8, weights[:, tree] + weights[:, parent])
        rel = points - an.joints[j]
        t = rel @ a
        r = rel - t[:, None] * a
        rho = np.linalg.norm(r, axis=1)
        inside = member * smoothstep(1.6 * R, 1.25 * R, rho)
        near = inside > 0
        if not near.any():
            continue
        cos = (r[near] @ d) / np.maximum(rho[near], 1e-9)
        lat = (r[near] @ np.cross(a, d)) / np.maximum(rho[near], 1e-9)
        phi = np.arctan2(lat, cos)
        tn, w = t[near], inside[near]
        g = np.zeros(near.sum())
        for off, amp, phase in zip(offs, amps, phases):
            wave = 0.35 * np.sin(2.5 * phi + phase)
            g += amp * np.exp(-(((tn - off - wave) / s) ** 2))
        dorsal[near] += w * smoothstep(0.1, 0.6, cos) * style.dorsal_depth * g
        gp = np.zeros(near.sum())
        for off in palm_offsets:
            gp += np.exp(-(((tn - off * L + 0.3 * np.sin(1.5 * phi)) / (1.1 * s)) ** 2))
        palmar[near] += w * smoothstep(0.0, -0.45, cos) * style.palmar_depth * np.minimum(gp, 1.0)
        if kind != "dip" and kind != "thumb_ip":
            knuckle[near] = np.maximum(knuckle[near], w * smoothstep(0.2, 0.8, cos) * np.exp(-((tn / (1.5 * R)) ** 2)))
        if kind in ("dip", "thumb_ip"):  # the nail plate on the back of the distal phalanx
            u = tn / L
            plate = smoothstep(0.42, 0.62, cos) * smoothstep(0.40, 0.48, u) * smoothstep(1.08, 0.98, u)
            nail[near] = np.maximum(nail[near], w * plate)
            nail_edge[near] = np.maximum(nail_edge[near], w * plate * smoothstep(0.86, 0.95, u))
            lunula[near] = np.maximum(lunula[near], w * plate * smoothstep(0.56, 0.50, u))
    # Gaussian tails below a micron are cut: the creases have compact support around their joints
    dorsal[dorsal < 1e-3] = 0.0
    palmar[palmar < 1e-3] = 0.0
    return CreaseField(dorsal, palmar, knuckle, nail, nail_edge, lunula)


# ------------------------------------------------------------------------------------ palm lines
def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def palm_lines(points: np.ndarray, normals: np.ndarray, weights: np.ndarray, an: HandAnatomy, seed: int) -> np.ndarray:
    """Darkness (0..1) of the three major palm lines (distal transverse, proximal transverse and
    thenar creases) at rest points on the palm's palmar side; curves placed from the joints with
    a few millimetres of per-hand variation."""
    rng = np.random.default_rng(seed)
    J = an.joints[:, :2]
    idx, mid, ring, pinky = J[5], J[9], J[13], J[17]
    jit = lambda: rng.normal(0.0, 2.0, 2)  # noqa: E731
    heart = _bezier(pinky + [-7.0, -14.0] + jit(), ring + [0.0, -15.0] + jit(), 0.5 * (idx + mid) + [2.0, -9.0] + jit())
    head_start = idx + [5.0, -24.0] + jit()
    head = _bezier(head_start, mid + [-2.0, -31.0] + jit(), ring + [-8.0, -42.0] + jit())
    life = _bezier(head_start + [-1.0, -1.0], np.array([4.0, 42.0]) + jit(), np.array([10.0, 6.0]) + jit())
    out = np.zeros(len(points))
    sel = (normals[:, 2] > 0.2) & (weights[:, 0] > 0.5)
    if not sel.any():
        return out
    p = points[sel, :2]
    dark = np.zeros(len(p))
    for curve, width, strength in ((heart, 0.7, 1.0), (head, 0.6, 0.9), (life, 0.7, 1.0)):
        dist, along = np.full(len(p), np.inf), np.zeros(len(p))
        for c0 in range(0, len(p), 20000):
            d2 = ((p[c0:c0 + 20000, None, :] - curve[None]) ** 2).sum(-1)
            dist[c0:c0 + 20000] = np.sqrt(d2.min(1))
            along[c0:c0 + 20000] = d2.argmin(1) / (len(curve) - 1)
        taper = smoothstep(0.0, 0.2, along) * smoothstep(1.0, 0.75, along)  # lines fade out at their ends
        dark = np.maximum(dark, strength * taper * np.exp(-((dist / (width * (0.6 + 0.4 * taper))) ** 2)))
    out[sel] = dark * smoothstep(0.2, 0.5, normals[sel, 2]) * smoothstep(0.5, 0.8, weights[sel, 0])
    return out


# ---------------------------------------------------------------------------------- albedo, relief
def skin_albedo(points: np.ndarray, normals: np.ndarray, weights: np.ndarray, an: HandAnatomy, style: SkinStyle,
                hand_seed: int, creases: CreaseField | None = None) -> np.ndarray:
    """Linear RGB albedo (N,3) in [0, 1] at rest points (mm), rest normals and skinning weights."""
    if creases is None:
        creases = crease_field(points, weights, an, style, hand_seed)
    noise = ValueNoise(hand_seed)
    palmar = smoothstep(-0.1, 0.5, normals[:, 2])
    alb = (1 - palmar)[:, None] * style.base + palmar[:, None] * style.palm
    blotch = noise.fbm(points / 18.0, 3)
    alb = alb * (1.0 + style.blotch * blotch)[:, None]
    red = np.clip(noise.fbm(points / 11.0 + 101.0, 3), 0.0, 1.0)
    alb = alb * (1.0 + style.redness * red[:, None] * np.array([0.6, -0.6, -0.9]))
    pores = np.clip(noise.fbm(points / 0.45 + 211.0, 2), 0.0, 1.0)
    alb = alb * (1.0 - style.pores * pores)[:, None]
    if style.freckles > 0:
        spots = smoothstep(0.55 - style.freckles, 0.7 - style.freckles, noise.fbm(points / 1.6 + 307.0, 2))
        spots = spots * (1.0 - palmar)
        alb = alb * (1.0 - 0.3 * spots[:, None] * np.array([0.7, 0.9, 1.0]))
    alb = alb * (1.0 - style.knuckle_dark * creases.knuckle)[:, None]
    lines = np.clip(creases.palmar / max(style.palmar_depth, 1e-6), 0, 1)
    lines = np.maximum(lines, 0.3 * np.clip(creases.dorsal / max(style.dorsal_depth, 1e-6), 0, 1))
    lines = np.maximum(lines, palm_lines(points, normals, weights, an, hand_seed + 1))
    alb = alb * (1.0 - style.crease_dark * lines)[:, None]
    nail = style.nail * (1.0 + 0.04 * noise.fbm(points / 3.0 + 401.0, 2))[:, None]
    nail = nail + (creases.lunula + 0.8 * creases.nail_edge)[:, None] * (np.array([0.80, 0.74, 0.70]) - nail) * 0.7
    alb = (1 - creases.nail)[:, None] * alb + creases.nail[:, None] * nail
    return np.clip(alb, 0.0, 1.0)


def skin_displacement(points: np.ndarray, creases: CreaseField, style: SkinStyle, hand_seed: int) -> np.ndarray:
    """Displacement (N,) in mm along the outward normal: minus the crease depth, plus a skin
    relief of fractal noise (``style.relief`` amplitude, 1-4 mm features), within
    ``DISPLACEMENT_RANGE_MM``."""
    relief = style.relief * ValueNoise(hand_seed + 2).fbm(points / 3.5, 3)
    return np.clip(relief - creases.depth, *DISPLACEMENT_RANGE_MM)


# ------------------------------------------------------------------------------------------ light
@dataclass
class Lighting:
    """A scene's light: SH radiance coefficients (9,3) as ``renderer.shading.sh_shading`` takes
    them, and the lights they were made from (directions point towards the light, world frame)."""

    sh: np.ndarray
    key_direction: np.ndarray
    key_rgb: np.ndarray
    fill_direction: np.ndarray
    fill_rgb: np.ndarray
    ambient_rgb: np.ndarray

    def to_json(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in self.__dict__.items()}


def sh_directional(direction: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """SH (9,3) of a distant light that shades a white surface facing it to ``rgb`` (radiance
    pi * rgb concentrated in one direction, projected on the 9 functions)."""
    from renderer.shading import sh_basis

    y = sh_basis(torch.as_tensor(direction / np.linalg.norm(direction), dtype=torch.float64)).numpy()
    return math.pi * y[:, None] * np.asarray(rgb)[None, :]


def sh_min_shading(sh: np.ndarray, n: int = 2000) -> float:
    """Smallest shading value of ``sh`` over ``n`` directions (order-2 SH of a light rings
    negative behind it; the ambient term must outweigh that)."""
    from renderer.shading import sh_shading

    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    dirs = np.stack([np.sqrt(1 - z * z) * np.cos(phi), np.sqrt(1 - z * z) * np.sin(phi), z], 1)
    return float(sh_shading(torch.as_tensor(dirs), torch.as_tensor(sh)).min())


def random_lighting(rng: np.random.Generator) -> Lighting:
    """A key light 25-70 degrees above the horizon (world y is down) from any azimuth, warm or
    cool, shading 0.75-1.05; a fill light from below-side at 10-30 % of it (the palms face down);
    an RGB ambient 0.18-0.32. Positive shading in every direction."""
    def direction(el_lo: float, el_hi: float) -> np.ndarray:
        az, el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(el_lo, el_hi))
        return np.array([np.cos(el) * np.sin(az), -np.sin(el), np.cos(el) * np.cos(az)])

    temp = rng.uniform(-1.0, 1.0)  # -1 cool .. +1 warm
    key_rgb = rng.uniform(0.75, 1.05) * np.array([1.0 + 0.07 * temp, 1.0, 1.0 - 0.09 * temp])
    key_dir = direction(25.0, 70.0)
    fill_dir = direction(-60.0, 0.0)
    fill_rgb = rng.uniform(0.1, 0.3) * key_rgb.mean() * np.array([1.0 - 0.05 * temp, 1.0, 1.0 + 0.05 * temp])
    ambient = rng.uniform(0.18, 0.32) * (1.0 + rng.normal(0.0, 0.03, 3))
    for _ in range(20):
        sh = sh_directional(key_dir, key_rgb) + sh_directional(fill_dir, fill_rgb)
        sh[0] += ambient * 2.0 * math.sqrt(math.pi)
        if sh_min_shading(sh) > 0.03:
            break
        ambient = ambient * 1.15
    return Lighting(sh, key_dir, key_rgb, fill_dir, fill_rgb, ambient)


# --------------------------------------------------------------------------------------- backdrops
@dataclass
class Backdrop:
    """The room behind the hands: two sRGB colours in non-skin hues, a noise seed."""

    colour_a: np.ndarray
    colour_b: np.ndarray
    seed: int

    def to_json(self) -> dict:
        return {"colour_a": self.colour_a.tolist(), "colour_b": self.colour_b.tolist(), "seed": self.seed}


SKIN_HUES_DEG = (0.0, 55.0)  # hue range of skin (red-orange-yellow); backdrops stay out of it


def random_backdrop(rng: np.random.Generator) -> Backdrop:
    """Two colours with hues 90-330 degrees (greens, cyans, blues, purples), so no background
    pixel looks like skin, saturation 0.2-0.6, one darker than the other."""
    cols = []
    h0 = rng.uniform(90.0, 330.0)
    for k in range(2):
        h = np.clip(h0 + rng.uniform(-30.0, 30.0), 90.0, 330.0) / 360.0
        s, v = rng.uniform(0.25, 0.6), rng.uniform(0.2, 0.45) if k == 0 else rng.uniform(0.5, 0.85)
        cols.append(np.array(colorsys.hsv_to_rgb(h, s, v)))
    return Backdrop(cols[0], cols[1], int(rng.integers(2**31)))


def backdrop_image(backdrop: Backdrop, size: tuple[int, int], view: int, rng: np.random.Generator) -> np.ndarray:
    """sRGB (H,W,3) background of one view: a linear gradient at a random angle between the two
    colours, textured with fractal noise (walls, cloth; no pixel grain, which would only make the
    PNGs larger); values stay inside the backdrop's hue range."""
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    ang = rng.uniform(0, 2 * np.pi)
    g = (np.cos(ang) * (xx / W - 0.5) + np.sin(ang) * (yy / H - 0.5)) * rng.uniform(1.0, 1.8) + 0.5
    g = np.clip(g, 0.0, 1.0)[..., None]
    img = (1 - g) * backdrop.colour_a + g * backdrop.colour_b
    noise = ValueNoise(backdrop.seed + view)
    scale = max(W, H) / rng.uniform(6.0, 12.0)  # a few blobs across the image
    p = np.stack([xx.ravel() / scale, yy.ravel() / scale, np.full(W * H, 0.37 * view)], 1)
    low = noise.fbm(p, 5).reshape(H, W, 1)
    img = img * (1.0 + 0.2 * low)
    return np.clip(img, 0.0, 1.0)


__all__ = [
    "SkinStyle", "HandAnatomy", "CreaseField", "Lighting", "Backdrop", "ValueNoise", "CREASE_JOINTS",
    "DISPLACEMENT_RANGE_MM", "SKIN_HUES_DEG", "random_skin", "random_lighting", "random_backdrop", "backdrop_image",
    "hand_anatomy", "dorsal_sides", "crease_field", "palm_lines", "skin_albedo", "skin_displacement",
    "srgb_to_linear", "linear_to_srgb", "sh_directional", "sh_min_shading",
]
