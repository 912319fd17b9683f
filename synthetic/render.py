"""Photos and masks of a synthetic scan: detailed hands rendered with our renderer.

``render_scan`` takes a generated ``SyntheticScan`` (true hands and cameras, ``synthetic.generate``)
and gives every view a photo and a mask:

1. each hand's posed model mesh is Loop-subdivided (2 levels) and displaced along its normals by
   the knuckle creases and skin relief of ``synthetic.appearance`` (the "fine" mesh: the truth);
2. a skin albedo is baked into the model's UV atlas (one texture per hand, same person) by
   rasterizing the subdivided UV mesh and evaluating the procedural albedo at each texel's rest
   point; the fine mesh's per-vertex albedo is the same function at its vertices;
3. both hands are one scene: rasterize -> interpolate (uv, normals) -> texture -> 2nd-order SH
   Lambertian shading in linear RGB -> over a per-view background -> antialias (nvdiffrast's
   analytic silhouette antialiasing) at ``supersample`` x the resolution, box-filtered down, then
   encoded to sRGB;
4. the mask is the coverage of the fine meshes at the image's pixel centres (both hands).

The random draws use their own stream ``default_rng([seed, 0xA11])``, so a scan's keypoints are
the same whether or not it is rendered. ``write_appearance`` / ``load_appearance`` store and read
the appearance truth under ``gt/`` (layout in ``synthetic/__init__``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from capture.camera import Camera, scene_depth_range, to_clip
from renderer.context import RenderContext, make_context
from renderer.mesh_ops import Subdivision, loop_subdivide
from renderer.mesh_ops import face_normals as _face_normals
from renderer.ops import antialias, interpolate, rasterize, texture
from renderer.shading import sh_shading, vertex_normals
from synthetic.appearance import (
    Backdrop,
    Lighting,
    SkinStyle,
    backdrop_image,
    crease_field,
    dorsal_sides,
    hand_anatomy,
    linear_to_srgb,
    random_backdrop,
    random_lighting,
    random_skin,
    skin_albedo,
    skin_displacement,
    srgb_to_linear,
)

APPEARANCE_FORMAT = "handrecon.synthetic_appearance/1"
STREAM = 0xA11  # second seed word of the appearance's random stream
_MIRROR = np.array([-1.0, 1.0, 1.0])


@dataclass
class FineHand:
    """The true detailed hand of one side (world metres; albedo linear RGB)."""

    side: str
    vertices: np.ndarray  # (N,3) subdivided and displaced
    faces: np.ndarray  # (F,3)
    smooth_vertices: np.ndarray  # (N,3) subdivided, before displacement
    normals: np.ndarray  # (N,3) unit normals of the smooth mesh: the displacement direction
    displacement_mm: np.ndarray  # (N,) along the normals (grooves negative)
    crease_mm: np.ndarray  # (N,) crease depth (>= 0), the part of the displacement at the joints
    albedo: np.ndarray  # (N,3)
    uv: np.ndarray  # (U,2) subdivided model uv, OBJ convention (v up)
    uv_faces: np.ndarray  # (F,3)
    texture: np.ndarray  # (T,T,3) albedo in the atlas; row 0 is v = 1 (as the PNG is stored)
    base_vertices: np.ndarray  # (V,3) the model's posed mesh
    base_faces: np.ndarray
    joints: np.ndarray  # (21,3) posed joints (metres), for checks


@dataclass
class SceneAppearance:
    """Everything ``render_scan`` put into a scan's photos."""

    hands: dict[str, FineHand]
    skin: SkinStyle
    lighting: Lighting
    backdrop: Backdrop
    levels: int
    supersample: int
    texture_size: int
    seed: int
    specular: float = 0.0  # Blinn-Phong sheen strength of the key and fill lights (0 = Lambertian)
    shininess: float = 30.0


# ---------------------------------------------------------------------------------------- hands
_SUBDIVISIONS: dict[tuple, Subdivision] = {}


def subdivision(model: Any, levels: int) -> Subdivision:
    """Loop subdivision of the model's mesh with its UV atlas carried along (linear UVs); kept
    per topology, since building the sparse matrices costs more than rendering a small scan."""
    key = (model.source, model.side, levels, model.num_vertices, int(model.faces.shape[0]), int(model.uv.shape[0]))
    if key not in _SUBDIVISIONS:
        _SUBDIVISIONS[key] = loop_subdivide(model.faces, model.num_vertices, levels, uv_faces=model.uv_faces,
                                            n_uv=int(model.uv.shape[0]))
    return _SUBDIVISIONS[key]


def fine_hand(model: Any, params: Any, skin: SkinStyle, hand_seed: int, levels: int = 2, texture_size: int = 512,
              ctx: RenderContext | None = None) -> FineHand:
    """The detailed true hand for ``params`` of ``model`` (a built-in HandModel with a UV atlas).

    Rest points (where albedo and creases are defined) come from the same subdivision applied to
    the rest mesh of the hand's own shape, mirrored to the right-hand frame for a left hand."""
    if getattr(model, "uv", None) is None or getattr(model, "uv_faces", None) is None:
        raise ValueError(f"hand model {model.source!r} has no UV atlas; synthetic photos need the built-in model")
    left = model.side == "left"
    m = _MIRROR if left else np.ones(3)
    with torch.no_grad():
        out = model.forward(params)
        posed = out.vertices[0].double()
        rest = model.rest_vertices(params.betas.to(model.template))[0].double().numpy() * m
        rest_j = model.rest_joints(params.betas.to(model.template))[0].double().numpy() * m
    faces = model.faces
    right_faces = faces[:, [0, 2, 1]] if left else faces  # winding of the mirrored-back (right) hand
    rest_t = torch.as_tensor(rest)
    base_normals = vertex_normals(rest_t, right_faces).numpy()
    weights = model.weights.double()
    sides = dorsal_sides(model.uv.numpy().astype(np.float64), model.uv_faces.numpy(), faces.numpy(), base_normals,
                         weights.numpy())
    an = hand_anatomy(rest, rest_j, model.tip_vertex_ids.numpy(), model.tip_weights.double().numpy(), weights.numpy(),
                      base_normals, sides)

    sub = subdivision(model, levels)
    f_faces = sub.faces
    P = sub.apply(posed)
    C = sub.apply(rest_t)
    W = sub.apply(weights).numpy()
    sign = -1.0 if left else 1.0  # sub.faces follow the side's winding; the mirrored-back hand has the other
    NC = (sign * vertex_normals(C, f_faces)).numpy()
    NP = vertex_normals(P, f_faces)
    C_mm = C.numpy() * 1000.0
    creases = crease_field(C_mm, W, an, skin, hand_seed)
    albedo = skin_albedo(C_mm, NC, W, an, skin, hand_seed, creases)
    disp = skin_displacement(C_mm, creases, skin, hand_seed)
    verts = P + NP * torch.as_tensor(disp / 1000.0)[:, None]

    uv = sub.apply_uv(model.uv.double()).numpy()
    uv_faces = sub.uv_faces.numpy()
    tex = bake_texture(uv, uv_faces, f_faces.numpy(), C_mm, NC, W, lambda p, n, w: skin_albedo(p, n, w, an, skin, hand_seed),
                       texture_size, ctx)
    return FineHand(
        side=model.side, vertices=verts.numpy(), faces=f_faces.numpy().astype(np.int64), smooth_vertices=P.numpy(),
        normals=NP.numpy(), displacement_mm=disp, crease_mm=creases.depth, albedo=albedo, uv=uv,
        uv_faces=uv_faces.astype(np.int64), texture=tex, base_vertices=posed.numpy(), base_faces=faces.numpy().astype(np.int64),
        joints=out.joints[0].double().numpy(),
    )


def bake_texture(uv: np.ndarray, uv_faces: np.ndarray, faces: np.ndarray, points: np.ndarray, normals: np.ndarray,
                 weights: np.ndarray, albedo_fn: Any, size: int, ctx: RenderContext | None = None) -> np.ndarray:
    """Albedo texture (size, size, 3): the UV mesh is rasterized (row 0 = v 1), each covered
    texel's rest point, normal and skinning weights are interpolated from the mesh vertices and
    ``albedo_fn(points, normals, weights)`` evaluated there; empty texels are filled from their
    neighbours so bilinear lookups at the atlas' borders do not pick up black."""
    ctx = ctx or make_context("cpu")
    uv2v = np.zeros(len(uv), np.int64)
    uv2v[uv_faces.reshape(-1)] = faces.reshape(-1)
    pos = torch.zeros(1, len(uv), 4, dtype=torch.float32)
    pos[0, :, 0] = torch.as_tensor(2.0 * uv[:, 0] - 1.0)
    pos[0, :, 1] = torch.as_tensor(1.0 - 2.0 * uv[:, 1])
    pos[0, :, 3] = 1.0
    tri = torch.as_tensor(uv_faces, dtype=torch.int32)
    rast, _ = rasterize(ctx, pos, tri, (size, size))
    attr = torch.as_tensor(np.concatenate([points[uv2v], normals[uv2v], weights[uv2v]], 1), dtype=torch.float32)
    vals, _ = interpolate(attr[None], rast, tri, ctx=ctx)
    covered = (rast[0, ..., 3] > 0).numpy()
    v = vals[0].numpy()[covered].astype(np.float64)
    n = v[:, 3:6] / np.maximum(np.linalg.norm(v[:, 3:6], axis=1, keepdims=True), 1e-9)
    tex = np.zeros((size, size, 3))
    tex[covered] = albedo_fn(v[:, :3], n, v[:, 6:])
    return dilate(tex, covered, iterations=max(8, size // 32))


def dilate(img: np.ndarray, valid: np.ndarray, iterations: int) -> np.ndarray:
    """Grow ``img`` out of the ``valid`` pixels by repeated 3x3 averaging of valid neighbours."""
    import cv2

    img, valid = img.copy(), valid.copy()
    for _ in range(iterations):
        w = cv2.blur(valid.astype(np.float64), (3, 3), borderType=cv2.BORDER_CONSTANT)
        grow = (~valid) & (w > 0)
        if not grow.any():
            break
        s = cv2.blur(img * valid[..., None], (3, 3), borderType=cv2.BORDER_CONSTANT)
        img[grow] = s[grow] / w[grow][:, None]
        valid = valid | grow
    return img


# -------------------------------------------------------------------------------------- drawing
def render_images(hands: Sequence[FineHand], cameras: Sequence[Camera], sh: np.ndarray, backgrounds: np.ndarray,
                  supersample: int = 2, ctx: RenderContext | None = None,
                  sheen: tuple[float, float, list[tuple[np.ndarray, np.ndarray]]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """sRGB photos (V,H,W,3) float32 in [0,1] and hand ids (V,H,W) int (-1 background, else the
    index into ``hands``) of the fine hands under ``sh`` (9,3) over ``backgrounds`` (V,H,W,3 sRGB).

    Shading is linear (texture albedo x SH irradiance; back faces, i.e. the inside of the open
    wrist, at a fifth of that), composited over the linearised background, antialiased and box-filtered from ``supersample`` x the resolution, then sRGB-encoded. Ids
    are the coverage at the pixel centres at the image resolution (what the masks hold).

    ``sheen`` = (strength, shininess, [(direction towards the light, rgb), ...]) adds skin's
    specular reflection of those lights (Blinn-Phong, untinted, front faces): a view-dependent
    effect no Lambertian model shows, to test renderers that learn one."""
    ctx = ctx or make_context("cpu")
    W, H = cameras[0].width, cameras[0].height
    ss = int(supersample)
    verts = torch.as_tensor(np.concatenate([h.vertices for h in hands]), dtype=torch.float32)
    offsets = np.cumsum([0] + [len(h.vertices) for h in hands])
    tri = torch.as_tensor(np.concatenate([h.faces + o for h, o in zip(hands, offsets)]), dtype=torch.int32)
    uv_offsets = np.cumsum([0] + [len(h.uv) for h in hands])
    uv_tri = torch.as_tensor(np.concatenate([h.uv_faces + o for h, o in zip(hands, uv_offsets)]), dtype=torch.int32)
    # one atlas, hand k in columns [k T, (k+1) T); texture rows run down from v = 1
    uv_all = np.concatenate([np.c_[(h.uv[:, 0] + k) / len(hands), 1.0 - h.uv[:, 1]] for k, h in enumerate(hands)])
    uv_all = torch.as_tensor(uv_all, dtype=torch.float32)
    atlas = torch.as_tensor(np.concatenate([h.texture for h in hands], axis=1)[None], dtype=torch.float32)
    face_hand = np.concatenate([np.full(len(h.faces), k) for k, h in enumerate(hands)])
    normals = vertex_normals(verts, tri)
    face_normals = _face_normals(verts.double(), tri).numpy()
    centroids = verts.double()[tri.long()].mean(1).numpy()
    coeffs = torch.as_tensor(sh, dtype=torch.float32)
    near, far = scene_depth_range(verts.double().numpy(), list(cameras))
    images = np.zeros((len(cameras), H, W, 3), np.float32)
    ids = np.full((len(cameras), H, W), -1, np.int64)
    for vi, cam in enumerate(cameras):
        pos = to_clip(verts, [cam], near, far).contiguous()
        rast, _ = rasterize(ctx, pos, tri, (H * ss, W * ss))
        uvp, _ = interpolate(uv_all, rast, uv_tri, ctx=ctx)
        n, _ = interpolate(normals, rast, tri, ctx=ctx)
        tid = rast[..., 3].long()
        covered = tid > 0
        # texture and shading on the covered pixels only (the hands fill a small part of the image)
        alb = texture(atlas, uvp[covered][None, :, None].contiguous(), filter_mode="linear", boundary_mode="clamp",
                      ctx=ctx)[0, :, 0]
        shade = sh_shading(torch.nn.functional.normalize(n[covered], dim=-1, eps=1e-12), coeffs)
        # the inside of the open wrist, seen through it: back faces, shadowed
        back = torch.as_tensor(((centroids - cam.center) * face_normals).sum(1) > 0)[tid[covered] - 1]
        bg = np.repeat(np.repeat(srgb_to_linear(backgrounds[vi]), ss, axis=0), ss, axis=1)
        colour = torch.as_tensor(bg[None], dtype=torch.float32).clone()
        colour[covered] = alb * shade * torch.where(back, 0.2, 1.0)[:, None]
        if sheen is not None and sheen[0] > 0:
            colour[covered] += highlights(n[covered], interpolate(verts, rast, tri, ctx=ctx)[0][covered], cam.center,
                                          sheen) * (~back)[:, None]
        colour = antialias(colour, rast, pos, tri, ctx=ctx)[0].numpy()
        lin = colour.reshape(H, ss, W, ss, 3).mean(axis=(1, 3))
        images[vi] = linear_to_srgb(lin).astype(np.float32)
        r1, _ = rasterize(ctx, pos, tri, (H, W))
        tid = r1[0, ..., 3].numpy().astype(np.int64)
        ids[vi] = np.where(tid > 0, face_hand[np.maximum(tid - 1, 0)], -1)
    return images, ids


def highlights(normals: torch.Tensor, points: torch.Tensor, camera_centre: np.ndarray,
               sheen: tuple[float, float, list[tuple[np.ndarray, np.ndarray]]]) -> torch.Tensor:
    """Linear RGB (P,3) Blinn-Phong highlights at surface ``points`` (P,3) with ``normals`` seen
    from ``camera_centre``: strength * rgb * max(n.h, 0)^shininess per light lighting the point."""
    strength, shininess, lights = sheen
    n = torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)
    to_cam = torch.nn.functional.normalize(torch.as_tensor(camera_centre, dtype=n.dtype) - points, dim=-1, eps=1e-12)
    out = torch.zeros_like(n)
    for direction, rgb in lights:
        l = torch.as_tensor(np.asarray(direction) / np.linalg.norm(direction), dtype=n.dtype)
        h = torch.nn.functional.normalize(to_cam + l, dim=-1, eps=1e-12)
        lit = ((n * l).sum(-1, keepdim=True) > 0).to(n.dtype)
        lobe = (n * h).sum(-1, keepdim=True).clamp_min(0.0) ** shininess
        out = out + strength * lit * lobe * torch.as_tensor(np.asarray(rgb), dtype=n.dtype)
    return out


def render_scan(synth: Any, seed: int, levels: int = 2, texture_size: int = 512, supersample: int = 2,
                ctx: RenderContext | None = None, specular: float = 0.0, shininess: float = 30.0) -> SceneAppearance:
    """Give every view of ``synth.scan`` its photo and mask (both hands); returns the appearance
    truth and sets ``synth.appearance`` so ``write_synthetic`` stores it under ``gt/``."""
    import handmodel

    if supersample < 1 or texture_size < 16:
        raise ValueError(f"supersample must be >= 1 and texture_size >= 16, got {supersample}, {texture_size}")
    ctx = ctx or make_context("cpu")
    rng = np.random.default_rng([int(seed), STREAM])
    skin = random_skin(rng)
    lighting = random_lighting(rng)
    backdrop = random_backdrop(rng)
    hands = {}
    for k, side in enumerate(synth.hands.params):
        model = handmodel.load("builtin", side=side)
        hands[side] = fine_hand(model, synth.hands.params[side], skin, skin.seed + 7919 * k, levels, texture_size, ctx)
    cams = synth.cameras
    W, H = cams[0].width, cams[0].height
    if any((c.width, c.height) != (W, H) for c in cams):
        raise ValueError("render_scan needs cameras of one image size")
    backgrounds = np.stack([backdrop_image(backdrop, (W, H), vi, np.random.default_rng([int(seed), STREAM, vi]))
                            for vi in range(len(cams))])
    sheen = (specular, shininess, [(lighting.key_direction, lighting.key_rgb), (lighting.fill_direction, lighting.fill_rgb)])
    images, ids = render_images(list(hands.values()), cams, lighting.sh, backgrounds, supersample, ctx,
                                sheen if specular > 0 else None)
    by_name = {v.name: v for v in synth.scan.views}
    for vi, cam in enumerate(cams):
        view = by_name[cam.name]
        view.image = images[vi]
        view.mask = ids[vi] >= 0
    scene = SceneAppearance(hands, skin, lighting, backdrop, levels, supersample, texture_size, int(seed), specular,
                            shininess)
    synth.appearance = scene
    return scene


# ------------------------------------------------------------------------------------- gt files
def _rgb8(linear: np.ndarray) -> np.ndarray:
    return np.round(linear_to_srgb(linear) * 255.0).astype(np.uint8)


def write_appearance(gt_dir: str | Path, scene: SceneAppearance) -> None:
    """``mesh_<side>.ply`` (fine mesh, per-vertex albedo as sRGB colours), ``base_<side>.ply``,
    ``albedo_<side>.png`` and ``appearance.json`` into ``gt_dir``."""
    import cv2
    import trimesh

    gt_dir = Path(gt_dir)
    record: dict[str, Any] = {
        "format": APPEARANCE_FORMAT,
        "colour": "albedo and SH are linear RGB; files hold them sRGB-encoded, 8 bits",
        "sh": scene.lighting.sh.tolist(),
        "sh_convention": "renderer.shading: radiance SH, 9 real functions (Y00, Y1-1, Y10, Y11, Y2-2, Y2-1, Y20, "
                         "Y21, Y22) x RGB; pixel (linear) = albedo * sh_shading(world normal, sh)",
        "lights": scene.lighting.to_json(),
        "skin": scene.skin.to_json(),
        "backdrop": scene.backdrop.to_json(),
        "subdivision_levels": scene.levels,
        "supersample": scene.supersample,
        "specular": {"strength": scene.specular, "shininess": scene.shininess,
                     "model": "Blinn-Phong of the key and fill lights, untinted, front faces; 0 = Lambertian"},
        "seed": scene.seed,
        "hands": {},
    }
    for side, h in scene.hands.items():
        rgba = np.concatenate([_rgb8(h.albedo), np.full((len(h.albedo), 1), 255, np.uint8)], 1)
        trimesh.Trimesh(h.vertices, h.faces, vertex_colors=rgba, process=False).export(str(gt_dir / f"mesh_{side}.ply"))
        trimesh.Trimesh(h.base_vertices, h.base_faces, process=False).export(str(gt_dir / f"base_{side}.ply"))
        if not cv2.imwrite(str(gt_dir / f"albedo_{side}.png"), cv2.cvtColor(_rgb8(h.texture), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            raise OSError(f"could not write {gt_dir / f'albedo_{side}.png'}")
        record["hands"][side] = {
            "mesh": f"mesh_{side}.ply", "base_mesh": f"base_{side}.ply", "texture": f"albedo_{side}.png",
            "vertices": int(len(h.vertices)), "faces": int(len(h.faces)),
            "displacement_mm": {"min": float(h.displacement_mm.min()), "max": float(h.displacement_mm.max()),
                                "mean_abs": float(np.abs(h.displacement_mm).mean())},
            "max_crease_depth_mm": float(h.crease_mm.max()),
        }
    (gt_dir / "appearance.json").write_text(json.dumps(record, indent=1))


def load_appearance(scan_dir: str | Path) -> dict[str, Any]:
    """The appearance truth of a rendered synthetic scan: ``sh`` (9,3), and per side in
    ``hands``: ``vertices``/``faces`` (fine mesh), ``albedo`` (N,3 linear, from the 8-bit
    colours), ``texture`` (T,T,3 linear), ``uv``/``uv_faces`` (subdivided model atlas),
    ``base_vertices``/``base_faces``; plus the JSON record under ``record``."""
    import cv2
    import handmodel
    import trimesh

    gt_dir = Path(scan_dir) / "gt"
    path = gt_dir / "appearance.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the scan was not rendered (scripts/make_synthetic_scan.py "
                                f"without --keypoints_only writes it)")
    record = json.loads(path.read_text())
    if record.get("format") != APPEARANCE_FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {APPEARANCE_FORMAT!r}")
    out: dict[str, Any] = {"sh": np.asarray(record["sh"], np.float64), "record": record, "hands": {}}
    for side, rec in record["hands"].items():
        mesh = trimesh.load(str(gt_dir / rec["mesh"]), process=False, force="mesh")
        base = trimesh.load(str(gt_dir / rec["base_mesh"]), process=False, force="mesh")
        tex = cv2.imread(str(gt_dir / rec["texture"]), cv2.IMREAD_COLOR)
        if tex is None:
            raise ValueError(f"{gt_dir / rec['texture']}: cannot be read as an image")
        model = handmodel.load("builtin", side=side)
        sub = subdivision(model, int(record["subdivision_levels"]))
        out["hands"][side] = {
            "vertices": np.asarray(mesh.vertices, np.float64), "faces": np.asarray(mesh.faces, np.int64),
            "albedo": srgb_to_linear(np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0),
            "texture": srgb_to_linear(cv2.cvtColor(tex, cv2.COLOR_BGR2RGB) / 255.0),
            "uv": sub.apply_uv(model.uv.double()).numpy(), "uv_faces": sub.uv_faces.numpy(),
            "base_vertices": np.asarray(base.vertices, np.float64), "base_faces": np.asarray(base.faces, np.int64),
        }
    return out


__all__ = ["FineHand", "SceneAppearance", "render_scan", "render_images", "fine_hand", "bake_texture",
           "subdivision", "write_appearance", "load_appearance", "APPEARANCE_FORMAT"]
