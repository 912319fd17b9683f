"""Which mask pixels a silhouette or photometric term may trust: forearms, broken views, missing hands.

Real masks are not silhouettes of the hand model: they run up the forearm for a variable length
(the model ends at the wrist), some are broken (small fragments) and some miss a hand or fingers.
Fitting against them as they are pulls the hand up the arm and into the fragments. So, per view:

- *Forearm* (``forearm = connected``, the default): the parts of the mask outside the rendered
  hands that touch a projected wrist ring and reach beyond a few pixels from the hands are the
  arm, ignored with a dilated band. Found in the data, so a bent wrist (the forearm need not
  continue the model's wrist) and masks without arms (synthetic hands) are both right.
- *Forearm* (``forearm = proxy``): each hand gets a proxy forearm, a flared tube extruded from the model's own wrist
  boundary loop away from the hand, rendered in one scene with both hands. Mask pixels where a
  proxy is the visible surface (dilated by a few pixels, never over a visible hand) are ignored.
  A proxy rather than an image half-plane at the projected wrist: it is right under
  foreshortening (a hand pointing at the camera), keeps the other hand where it passes in front of
  the arm, and ignores only the arm's width, not everything behind the wrist line.
- *Broken views*: the IoU of the keypoint-fitted hands against the forearm-free mask; a view far
  below the others (``bad_view_ratio`` x median, or below ``bad_view_min_iou``) is dropped from
  the image terms and logged.
- *Missing hands*: in a kept view, a hand whose visible render is mostly outside the mask
  (coverage below ``missing_hand_coverage``) was not segmented there; that hand's region (dilated)
  is ignored in that view and the view is reported as partial.
- *Missing parts* (multi-view consensus, once the hands fit well): rendered hand pixels far
  outside a view's mask whose surface points the other views' masks contain (most of them) are
  that mask's misses (fingers lost against a bright background), ignored and reported.
- *Unsupported mask pixels* (visual-hull consistency, at the same time): a mask pixel whose ray
  meets no point that the other kept views' masks (most of those that see it) contain was
  segmented by this view alone (a shadow, background, an arm's stub the others show under the
  sleeve); such pixels are ignored and reported. The check uses only the masks and the cameras
  (the hands only bound the depths searched along each ray), never the render's coverage.

Only mask pixels are ever ignored for the forearm: a background pixel beside the arm stays
background, so a hand bulging into it still pays.

Everything here runs without gradient: it decides weight maps, the losses use them.
Views of different image sizes are rendered on a common canvas (``pad_cameras``): a camera with
the same K and a larger image size maps pixels to the same places, and the padding has weight 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture.camera import Camera
from renderer.context import RenderContext

log = logging.getLogger("handrecon")


@dataclass
class MaskConf:
    """Robust mask handling (the ``masks`` conf section)."""

    # Proxy forearm: length (metres) and radial scale of the wrist loop at the wrist and at the far end.
    forearm_length: float = 0.3
    forearm_scale_start: float = 1.15
    forearm_scale_end: float = 1.6
    # Dilation of the ignored forearm region, pixels of the original image size.
    forearm_dilate_px: float = 12.0
    # How the forearm is found: connected (the mask's parts outside the hands that touch a wrist),
    # proxy (mask pixels under the proxy tube) or both.
    forearm: str = "connected"
    # A view is dropped when its IoU is below bad_view_ratio x the median IoU or below bad_view_min_iou.
    bad_view_ratio: float = 0.6
    bad_view_min_iou: float = 0.3
    # A hand whose visible render is covered by the mask below this fraction is missing from that mask.
    missing_hand_coverage: float = 0.5
    # Dilation of an ignored missing-hand region, pixels of the original image size.
    missing_hand_dilate_px: float = 16.0
    # A hand smaller than this many pixels (at the loaded size) in a view is not judged there.
    min_hand_pixels: int = 50
    # Multi-view consensus for masks that miss parts of a hand (fingers against a bright
    # background): rendered hand pixels farther than consensus_outside_px (original pixels) from
    # a view's mask whose surface points fall inside the masks (grown by consensus_tolerance_px)
    # of at least consensus_ratio of the other views are taken as the mask's misses and ignored;
    # a view needs consensus_min_pixels (loaded size) of them to count. 0 ratio = off.
    consensus_outside_px: float = 12.0
    consensus_tolerance_px: float = 8.0
    consensus_ratio: float = 0.8
    consensus_min_pixels: int = 20
    # The contour term's rendered->mask part pulls a rendered contour point toward the mask's
    # nearest contour. Inside the mask that is right only next to the mask's contour: deeper in,
    # the point is the rim of a gap the render opens between fingers that the mask shows touching
    # (or of a hole), and the nearest mask contour lies beyond the finger, so the pull widens the
    # gap. Rendered contour points deeper inside the mask than this (pixels at the loaded size)
    # get no rendered->mask pull (the silhouette term and the mask->rendered part close such gaps;
    # points outside the mask are still pulled in). < 0 = pulled at any depth.
    contour_inner_px: float = 2.0
    # Visual-hull support of mask pixels (once the hands and cameras fit well): a usable mask
    # pixel whose ray has no point inside the masks (grown by hull_tolerance_px, original pixels)
    # of at least hull_ratio of the other kept views that see that point (at least 3) is something
    # no other view segmented: a shadow, background, or an arm's stub that the other views show
    # under the sleeve. Such pixels are ignored (and counted in the view's note); a view with
    # hull_min_pixels (loaded size) of them off the forearm is partial. hull_samples depths per
    # ray, over the hands' depth range grown by hull_depth_margin (metres). hull_ratio = 0 = off.
    hull_ratio: float = 0.8
    hull_tolerance_px: float = 8.0
    hull_min_pixels: int = 20
    hull_samples: int = 160
    hull_depth_margin: float = 0.25

    @staticmethod
    def from_conf(conf: Mapping[str, Any] | None) -> "MaskConf":
        section: Mapping[str, Any] = conf["masks"] if conf is not None and "masks" in conf else {}
        out = MaskConf()
        for key in out.__dataclass_fields__:
            if key in section:
                setattr(out, key, type(getattr(out, key))(section[key]))
        if out.forearm not in ("connected", "proxy", "both"):
            raise ValueError(f"masks.forearm must be connected, proxy or both, got {out.forearm!r}")
        return out


@dataclass
class ViewMasks:
    """Targets and weights of the image terms, on the render canvas.

    ``target`` (V,H,W) the given masks as float; ``valid`` (V,H,W) 1 where a pixel counts (inside
    the image, not forearm, not a missing hand's region, not a mask pixel without visual-hull
    support); ``view_weight`` (V,) 0 for dropped views.
    ``status[v]`` is 'ok', 'partial' or 'dropped'; ``notes[v]`` says why."""

    names: list[str]
    target: torch.Tensor
    inside: torch.Tensor  # (V,H,W) 1 inside each view's real image (canvas padding = 0)
    valid: torch.Tensor
    view_weight: torch.Tensor
    status: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    iou_initial: list[float] = field(default_factory=list)
    forearm: torch.Tensor | None = None  # (V,H,W) bool ignored forearm pixels
    missing: torch.Tensor | None = None  # (V,H,W) bool ignored missing-hand pixels
    unsupported: torch.Tensor | None = None  # (V,H,W) bool mask pixels no other view's mask supports
    # rendered contour points deeper inside the mask than this (pixels) get no rendered->mask pull
    # from the contour term (MaskConf.contour_inner_px); < 0 = at any depth
    contour_inner_px: float = -1.0

    @property
    def weight(self) -> torch.Tensor:
        """Per-pixel weight of the image terms: valid pixels of kept views."""
        return self.valid * self.view_weight[:, None, None]

    def summary(self) -> dict[str, Any]:
        return {n: {"status": s, "note": t} for n, s, t in zip(self.names, self.status, self.notes)}

    def contours(self, views: Any, margin: int, max_points: int) -> Any:
        """The contour targets (``losses.mask_contours``) of ``views`` (an index into V); recomputed
        whenever the forearm maps move. Rendered contour points deeper than ``contour_inner_px``
        inside the mask get no rendered->mask pull (``inner_ok`` false there: the contour term
        clamps the field at 0, see ``MaskConf.contour_inner_px``)."""
        from fitting.losses import mask_contours

        c = mask_contours(self.target[views], self.valid[views], margin, max_points, self.inside[views])
        if self.contour_inner_px >= 0:
            c = replace(c, inner_ok=c.inner_ok & (c.field >= -self.contour_inner_px))
        return c


# ------------------------------------------------------------------------------------------ canvas
def pad_cameras(cameras: Sequence[Camera]) -> tuple[list[Camera], tuple[int, int]]:
    """Cameras on one canvas of the largest (H, W) (same K: pixels keep their coordinates)."""
    H = max(c.height for c in cameras)
    W = max(c.width for c in cameras)
    out = [c if (c.width, c.height) == (W, H) else Camera(c.K, c.R, c.t, W, H, c.name) for c in cameras]
    return out, (H, W)


def pad_stack(arrays: Sequence[np.ndarray | None], hw: tuple[int, int], channels: int | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack per-view arrays (H_v, W_v[, C]) on the canvas (zeros elsewhere) as float32."""
    H, W = hw
    shape = (len(arrays), H, W) + ((channels,) if channels else ())
    out = np.zeros(shape, np.float32)
    for i, a in enumerate(arrays):
        if a is None:
            continue
        a = np.asarray(a, np.float32)
        out[i, : a.shape[0], : a.shape[1]] = a
    return torch.from_numpy(out).to(device)


def inside_maps(cameras: Sequence[Camera], hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    return pad_stack([np.ones((c.height, c.width), np.float32) for c in cameras], hw, device=device)


# ----------------------------------------------------------------------------------------- forearm
def wrist_loop(faces: np.ndarray | torch.Tensor) -> np.ndarray:
    """Vertex indices of the longest boundary loop of a mesh, in order: the open wrist of a hand
    model. Raises when the mesh has no boundary (a closed hand has no wrist to extend)."""
    f = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    f = f.astype(np.int64)
    half = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = {(int(a), int(b)) for a, b in half}
    boundary = [(a, b) for a, b in key if (b, a) not in key]
    if not boundary:
        raise ValueError("hand mesh has no boundary loop (no open wrist)")
    nxt = {a: b for a, b in boundary}
    loops, seen = [], set()
    for start in nxt:
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in nxt:
            seen.add(v)
            loop.append(v)
            v = nxt[v]
        loops.append(loop)
    return np.asarray(max(loops, key=len), np.int64)


def forearm_proxy(verts: torch.Tensor, loop: np.ndarray, cfg: MaskConf, rings: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A flared tube (vertices (R*L, 3), faces) extruded from the wrist loop of ``verts`` along the
    loop's normal, pointing away from the hand's centroid; scale grows linearly from
    ``forearm_scale_start`` to ``forearm_scale_end`` over ``forearm_length``; the far end is capped.
    Its faces have no consistent winding: it is only ever used for coverage."""
    v = verts.detach()
    ring = v[torch.as_tensor(loop, device=v.device)]
    c = ring.mean(0)
    # loop plane normal: smallest principal direction of the ring
    _, _, vh = torch.linalg.svd(ring - c, full_matrices=False)
    axis = vh[-1]
    if float(torch.dot(axis, c - v.mean(0))) < 0:
        axis = -axis
    L = len(loop)
    pts = []
    for k in range(rings + 1):
        t = k / rings
        s = cfg.forearm_scale_start + (cfg.forearm_scale_end - cfg.forearm_scale_start) * t
        pts.append(c + axis * (cfg.forearm_length * t) + s * (ring - c))
    pts.append((c + axis * cfg.forearm_length)[None])
    P = torch.cat(pts, 0)
    faces = []
    for k in range(rings):
        a = np.arange(L) + k * L
        b = (np.arange(L) + 1) % L + k * L
        faces.append(np.stack([a, b, b + L], 1))
        faces.append(np.stack([a, b + L, a + L], 1))
    cap = len(P) - 1
    last = np.arange(L) + rings * L
    faces.append(np.stack([last, (np.arange(L) + 1) % L + rings * L, np.full(L, cap)], 1))
    return P, torch.as_tensor(np.concatenate(faces), dtype=torch.long, device=v.device)


def _dilate(m: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation (V,H,W) bool by a (2r+1)^2 square."""
    if radius <= 0:
        return m
    x = F.max_pool2d(m[:, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return x[:, 0] > 0.5


# -------------------------------------------------------------------------------------- the masks
class MaskBuilder:
    """Builds ``ViewMasks`` for a scan: given masks on the canvas, forearm maps from the current
    hands, and (once) the broken-view / missing-hand decisions."""

    def __init__(self, scan: Any, cfg: MaskConf, ctx: RenderContext, scale: float, device: torch.device | str):
        self.cfg = cfg
        self.ctx = ctx
        self.scale = float(scale)
        self.device = torch.device(device)
        self.names = [v.name for v in scan.views]
        self.cameras, self.hw = pad_cameras(scan.cameras)
        self.inside = inside_maps(scan.cameras, self.hw, self.device)
        masks = [v.mask for v in scan.views]
        self.has_mask = torch.tensor([m is not None for m in masks], dtype=torch.float32, device=self.device)
        self.target = pad_stack([None if m is None else m.astype(np.float32) for m in masks], self.hw, device=self.device)
        self.loops: dict[int, np.ndarray] = {}
        self._rings: list[torch.Tensor] = []  # wrist rings (L,3) of the hands last rendered
        # per-view principal-point corrections (V,2), pixels at the loaded size; None = none
        self.offsets: torch.Tensor | None = None

    def _px(self, original_px: float) -> int:
        return int(round(original_px * self.scale))

    @torch.no_grad()
    def render_ids(self, hands: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """Visible mesh id per pixel (V,H,W) of hands followed by their forearm proxies, and the
        number of hands M (ids 0..M-1 are hands, >= M forearm proxies, -1 background)."""
        verts, faces = [], []
        for v, f in hands:
            verts.append(v.detach())
            faces.append(f)
        self._rings = []
        for v, f in hands:
            key = int(f.shape[0])
            if key not in self.loops:  # a closed mesh (no wrist) gets no forearm
                try:
                    self.loops[key] = wrist_loop(f)
                except ValueError:
                    self.loops[key] = np.zeros(0, np.int64)
            if len(self.loops[key]) < 3:
                continue
            self._rings.append(v.detach()[torch.as_tensor(self.loops[key], device=v.device)])
            if self.cfg.forearm == "connected":
                continue
            pv, pf = forearm_proxy(v, self.loops[key], self.cfg)
            verts.append(pv)
            faces.append(pf)
        from fitting.losses import clip_positions, merge
        from renderer.ops import rasterize

        scene = merge(verts, faces)
        pos = clip_positions(scene.verts, self.cameras, offsets=self.offsets)
        rast, _ = rasterize(self.ctx, pos, scene.tri, self.hw, grad_db=False)
        tid = rast[..., 3].long()
        owner = torch.cat([torch.full((f.shape[0],), k, dtype=torch.long, device=tid.device) for k, f in enumerate(faces)])
        ids = torch.where(tid > 0, owner[(tid - 1).clamp_min(0)], torch.full_like(tid, -1))
        self._last = (rast, scene)
        return ids, len(hands)

    @torch.no_grad()
    def forearm_map(self, ids: torch.Tensor, M: int) -> torch.Tensor:
        """Mask pixels where a proxy forearm is visible (dilated), minus pixels where a hand is.
        Only mask pixels: a background pixel beside the arm is background, and a hand bulging
        into it must still pay."""
        hand = (ids >= 0) & (ids < M)
        out = torch.zeros_like(hand)
        if self.cfg.forearm in ("proxy", "both"):
            out |= _dilate(ids >= M, self._px(self.cfg.forearm_dilate_px)) & ~hand & (self.target > 0.5)
        if self.cfg.forearm in ("connected", "both"):
            out |= self._connected_forearm(hand)
        return out

    @torch.no_grad()
    def _connected_forearm(self, hand: torch.Tensor) -> torch.Tensor:
        """Mask pixels of the arm, found in the data: mask pixels outside the rendered hands whose
        nearest hand pixel lies at a wrist (within ``reach`` of a projected wrist ring), in
        connected parts that reach ``reach`` away from the hands, grown over the mask pixels
        connected to them that are clear of the hands (the rest of the arm); dilated by
        ``forearm_dilate_px``, never over a hand. ``reach`` is a quarter of the hand's size in the
        view (at least the dilation): an arm runs far from the hand, a part of the hand the
        render misses (a finger, the thumb's base) does not. So a bent wrist (the forearm need
        not continue the model's wrist) and a mask without arms (a synthetic hand) are both right."""
        from scipy.ndimage import distance_transform_edt, label

        from fitting.geometry import projection_matrices
        from fitting.losses import offset_projections

        out = torch.zeros_like(hand)
        rings = getattr(self, "_rings", [])
        if not rings:
            return out
        r = max(self._px(self.cfg.forearm_dilate_px), 1)
        P = torch.as_tensor(projection_matrices(self.cameras), dtype=torch.float64)
        P = offset_projections(P, None if self.offsets is None else self.offsets.detach().cpu().double())
        X = torch.cat([torch.cat([g.cpu().double(), torch.ones(len(g), 1, dtype=torch.float64)], 1) for g in rings])
        uvw = torch.einsum("vij,nj->vni", P, X).numpy()
        uv = uvw[..., :2] / np.maximum(uvw[..., 2:3], 1e-9)
        H, W = self.hw
        hand_np = hand.cpu().numpy()
        cand_all = ((self.target > 0.5) & ~hand).cpu().numpy()
        for i in range(hand_np.shape[0]):
            cand, hv = cand_all[i], hand_np[i]
            if not cand.any() or not hv.any():
                continue
            reach = max(r, int(round(0.25 * np.sqrt(hv.sum() / len(rings)))))
            px = np.floor(uv[i][uvw[i, :, 2] > 0]).astype(int)
            ok = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H)
            if not ok.any():
                continue
            seed = np.zeros((H, W), bool)
            seed[px[ok, 1], px[ok, 0]] = True
            seed = distance_transform_edt(~seed) <= reach
            dist, (iy, ix) = distance_transform_edt(~hv, return_indices=True)
            at_wrist = cand & seed[iy, ix]
            lab, n = label(at_wrist, structure=np.ones((3, 3), bool))
            if n == 0:
                continue
            keep = np.unique(lab[at_wrist & (dist >= reach)])
            keep = keep[keep > 0]
            if not len(keep):
                continue
            arm = np.isin(lab, keep)
            # the rest of the arm: mask pixels clear of the hands connected to it
            lab2, _ = label(arm | (cand & (dist > r)), structure=np.ones((3, 3), bool))
            grown = np.unique(lab2[arm])
            out[i] = torch.from_numpy(np.isin(lab2, grown[grown > 0])).to(out.device)
        return _dilate(out, r) & ~hand & (self.target > 0.5)

    @torch.no_grad()
    def build(self, hands: Sequence[tuple[torch.Tensor, torch.Tensor]], hand_names: Sequence[str],
              decide: bool = True, previous: ViewMasks | None = None, consensus: bool = True) -> ViewMasks:
        """Weight maps for the current hands.

        ``decide``: judge broken views (unless ``previous`` is given: its drops are kept, so the
        set of views never changes under an optimisation), missing hands and, with ``consensus``,
        the parts of hands a mask misses (meaningful only once the hands and cameras fit well: a
        camera that is still off would make its own view look like it misses the hands).
        Otherwise keep ``previous``'s decisions and only move the forearm maps with the hands."""
        ids, M = self.render_ids(hands)
        forearm = self.forearm_map(ids, M)
        base_valid = self.inside * self.has_mask[:, None, None] * (~forearm).float()
        hand_vis = (ids >= 0) & (ids < M)
        V = len(self.names)
        if not decide and previous is not None:
            missing = previous.missing if previous.missing is not None else torch.zeros_like(forearm)
            unsupported = previous.unsupported if previous.unsupported is not None else torch.zeros_like(forearm)
            valid = base_valid * (~missing).float() * (~unsupported).float()
            return ViewMasks(self.names, self.target, self.inside, valid, previous.view_weight, list(previous.status),
                             list(previous.notes), list(previous.iou_initial), forearm, missing, unsupported,
                             self.cfg.contour_inner_px)

        iou = _iou(hand_vis.float(), self.target, base_valid)
        status, notes = ["ok"] * V, [""] * V
        view_weight = self.has_mask.clone()
        if previous is not None:
            view_weight = previous.view_weight.clone()
            for i in range(V):
                if previous.status[i] == "dropped":
                    status[i], notes[i] = "dropped", previous.notes[i]
            iou = list(previous.iou_initial)
        else:
            for i in range(V):
                if float(self.has_mask[i]) == 0:
                    status[i], notes[i] = "dropped", "no mask"
            kept = [i for i in range(V) if status[i] == "ok"]
            med = float(np.median([iou[i] for i in kept])) if kept else 0.0
            for i in kept:
                thr = max(self.cfg.bad_view_min_iou, self.cfg.bad_view_ratio * med)
                if iou[i] < thr:
                    status[i] = "dropped"
                    notes[i] = (f"mask disagrees with the keypoint-fitted hands: IoU {iou[i]:.2f} < {thr:.2f} "
                                f"(median {med:.2f}); broken or wrong mask")
                    view_weight[i] = 0.0
                    log.warning("masks: view %s dropped from the image terms: %s", self.names[i], notes[i])
        missing = torch.zeros_like(forearm)
        grow = self._px(self.cfg.missing_hand_dilate_px)
        for i in range(V):
            if status[i] != "ok":
                continue
            for k in range(M):
                vis = ids[i] == k
                n = int(vis.sum())
                if n < self.cfg.min_hand_pixels:
                    continue
                cover = float((self.target[i][vis] > 0.5).float().mean())
                if cover < self.cfg.missing_hand_coverage:
                    other = hand_vis[i] & ~vis
                    region = _dilate(vis[None], grow)[0] & ~other
                    missing[i] |= region
                    status[i] = "partial"
                    notes[i] = (notes[i] + "; " if notes[i] else "") + (
                        f"{hand_names[k]} hand mostly missing from the mask (covers {cover:.0%} of its render); "
                        "its region is ignored")
                    log.warning("masks: view %s is partial: %s", self.names[i], notes[i])
        if consensus and self.cfg.consensus_ratio > 0:
            self._consensus(ids, M, status, notes, missing, base_valid)
        unsupported = torch.zeros_like(forearm)
        if consensus and self.cfg.hull_ratio > 0:
            # judged on every mask pixel but a missing hand's region, the forearm's included: the
            # decision is kept while the forearm maps move with the hands
            judged = self.inside * self.has_mask[:, None, None] * (~missing).float()
            unsupported = self._hull_support(status, notes, judged, forearm)
        valid = base_valid * (~missing).float() * (~unsupported).float()
        return ViewMasks(self.names, self.target, self.inside, valid, view_weight, status, notes,
                         [float(x) for x in iou], forearm, missing, unsupported, self.cfg.contour_inner_px)

    @torch.no_grad()
    def _hull_support(self, status: list[str], notes: list[str], valid: torch.Tensor,
                      forearm: torch.Tensor) -> torch.Tensor:
        """Mask pixels (V,H,W) bool of the kept views (where ``valid``) that no other view's mask
        supports (see MaskConf: visual-hull consistency with the calibrated, corrected cameras).
        Every such pixel is ignored from then on and counted in the view's note; a view whose
        unsupported pixels off the ``forearm`` map (the arm is ignored anyway; the other views
        often show it cut at the sleeve) reach ``hull_min_pixels`` becomes partial."""
        from fitting.geometry import projection_matrices
        from fitting.losses import erode, offset_projections

        cfg = self.cfg
        out = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
        voters = [i for i in range(len(self.names)) if status[i] != "dropped" and float(self.has_mask[i]) > 0]
        if len(voters) < 4:
            return out
        _, scene = self._last
        P = torch.as_tensor(projection_matrices(self.cameras), dtype=torch.float64)
        P = offset_projections(P, None if self.offsets is None else self.offsets.detach().cpu().double())
        verts = scene.verts.detach().cpu().double()
        H, W = self.hw
        tol = self._px(cfg.hull_tolerance_px)
        grown = _dilate(self.target > 0.5, tol).cpu()
        ok_map = (valid > 0.5).cpu()
        inside = (self.inside > 0.5).cpu()
        # a view whose mask stays clear of its image's border saw all of what it segmented: a
        # point projecting off its image is not in its silhouette (a view cut to a box around its
        # mask, as ham fits, keeps that knowledge); one whose mask reaches the border abstains there
        rim = inside & ~erode(inside)
        whole = ~((self.target.cpu() > 0.5) & rim).flatten(1).any(1)
        for i in voters:
            m = (self.target[i] > 0.5).cpu() & ok_map[i]
            yx = torch.nonzero(m)
            if len(yx) == 0:
                continue
            Pi = P[i]
            Minv = torch.linalg.inv(Pi[:, :3])
            centre = -(Minv @ Pi[:, 3])
            pix = torch.stack([yx[:, 1] + 0.5, yx[:, 0] + 0.5, torch.ones(len(yx))], 1).double()
            d = pix @ Minv.T
            d = d / d.norm(dim=1, keepdim=True)
            r = (verts - centre).norm(dim=1)
            ts = torch.linspace(max(float(r.min()) - cfg.hull_depth_margin, 1e-3),
                                float(r.max()) + cfg.hull_depth_margin, cfg.hull_samples, dtype=torch.float64)
            supported = torch.zeros(len(yx), dtype=torch.bool)
            chunk = max(1, 400_000 // cfg.hull_samples)
            for k in range(0, len(yx), chunk):
                X = centre + d[k:k + chunk, None, :] * ts[None, :, None]  # (N,T,3) points on the rays
                Xh = torch.cat([X, torch.ones(X.shape[:2] + (1,), dtype=X.dtype)], -1)
                votes = torch.zeros(X.shape[:2])
                seen = torch.zeros(X.shape[:2])
                for j in voters:
                    if j == i:
                        continue
                    x = Xh @ P[j].T
                    z = x[..., 2]
                    uv = x[..., :2] / z.clamp_min(1e-9)[..., None]
                    px, py = uv[..., 0].floor().long(), uv[..., 1].floor().long()
                    inb = (z > 0) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
                    pyc, pxc = py.clamp(0, H - 1), px.clamp(0, W - 1)
                    inb &= inside[j, pyc, pxc]
                    hit = inb & grown[j, pyc, pxc]
                    # a view abstains where its own mask is ignored (a missing hand's region)
                    seen_j = inb & (hit | ok_map[j, pyc, pxc])
                    if bool(whole[j]):
                        seen_j |= (z > 0) & ~inb
                    seen += seen_j.float()
                    votes += hit.float()
                supported[k:k + chunk] = ((seen >= 3) & (votes >= cfg.hull_ratio * seen)).any(1)
            bad = yx[~supported]
            if len(bad) == 0:
                continue
            out[i, bad[:, 0], bad[:, 1]] = True
            n_arm = int(forearm[i].cpu()[bad[:, 0], bad[:, 1]].sum())
            n = len(bad) - n_arm
            notes[i] = (notes[i] + "; " if notes[i] else "") + (
                f"{n} mask px off the forearm (and {n_arm} on it) that no other view's mask supports (visual hull: no "
                f"point of their rays lies in the masks, grown by {cfg.hull_tolerance_px:g} px, of >= "
                f"{cfg.hull_ratio:.0%} of the views that see it) are ignored")
            if n >= cfg.hull_min_pixels:
                if status[i] == "ok":
                    status[i] = "partial"
                log.warning("masks: view %s is partial: %s", self.names[i], notes[i])
            else:
                log.info("masks: view %s: %s", self.names[i], notes[i])
        return out.to(valid.device)

    @torch.no_grad()
    def _consensus(self, ids: torch.Tensor, M: int, status: list[str], notes: list[str], missing: torch.Tensor,
                   base_valid: torch.Tensor) -> None:
        """Mark, in ``missing``, rendered hand pixels that a view's mask lacks but the other views'
        masks confirm (see MaskConf); update status and notes."""
        from fitting.geometry import projection_matrices
        from fitting.losses import offset_projections

        rast, scene = self._last
        voters = [i for i in range(len(self.names)) if status[i] != "dropped"]
        if len(voters) < 3:
            return
        P = torch.as_tensor(projection_matrices(self.cameras), dtype=scene.verts.dtype, device=scene.verts.device)
        P = offset_projections(P, self.offsets)
        H, W = self.hw
        grown = _dilate(self.target > 0.5, self._px(self.cfg.consensus_tolerance_px))
        near = _dilate(self.target > 0.5, self._px(self.cfg.consensus_outside_px))
        tri = scene.tri.long()
        for i in voters:
            far = (ids[i] >= 0) & (ids[i] < M) & ~near[i] & (base_valid[i] > 0.5) & ~missing[i]
            yx = torch.nonzero(far)
            if len(yx) < self.cfg.consensus_min_pixels:
                continue
            r = rast[i, yx[:, 0], yx[:, 1]]
            t = tri[r[:, 3].long() - 1]
            u, w = r[:, 0:1], r[:, 1:2]
            X = u * scene.verts[t[:, 0]] + w * scene.verts[t[:, 1]] + (1 - u - w) * scene.verts[t[:, 2]]
            Xh = torch.cat([X, torch.ones_like(X[:, :1])], -1)
            votes = torch.zeros(len(X), device=X.device)
            seen = torch.zeros(len(X), device=X.device)
            for j in voters:
                if j == i:
                    continue
                x = Xh @ P[j].T
                z = x[:, 2]
                uv = x[:, :2] / z.clamp_min(1e-6)[:, None]
                px, py = uv[:, 0].floor().long(), uv[:, 1].floor().long()
                inb = (z > 0) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
                inb &= self.inside[j, py.clamp(0, H - 1), px.clamp(0, W - 1)] > 0.5
                hit = inb & grown[j, py.clamp(0, H - 1), px.clamp(0, W - 1)]
                seen += inb.float()
                votes += hit.float()
            ok = (seen >= 2) & (votes >= self.cfg.consensus_ratio * seen)
            n = int(ok.sum())
            if n < self.cfg.consensus_min_pixels:
                continue
            support = torch.zeros_like(far)
            support[yx[ok, 0], yx[ok, 1]] = True
            region = _dilate(support[None], self._px(self.cfg.consensus_outside_px) + 1)[0] & (self.target[i] < 0.5)
            region &= (ids[i] >= 0) & (ids[i] < M) | _dilate(support[None], 1)[0]
            missing[i] |= region
            if status[i] == "ok":
                status[i] = "partial"
            notes[i] = (notes[i] + "; " if notes[i] else "") + (
                f"mask misses {n} px of the hands (farther than {self.cfg.consensus_outside_px:g} px from it) that "
                f">= {self.cfg.consensus_ratio:.0%} of the other views' masks contain; that region is ignored")
            log.warning("masks: view %s is partial: %s", self.names[i], notes[i])


def _iou(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """IoU per view over the valid pixels; two empty sets score 1."""
    p = (pred > 0.5) & (valid > 0.5)
    t = (target > 0.5) & (valid > 0.5)
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return [1.0 if float(u) == 0 else float(i / u) for i, u in zip(inter, union)]


def iou_report(pred: torch.Tensor, vm: ViewMasks) -> dict[str, Any]:
    """IoU per view of a rendered coverage (V,H,W) against the masks three ways: ``iou`` over the
    usable pixels (forearm, missing-hand regions and mask pixels without visual-hull support
    excluded: what the fit is judged on), ``iou_no_forearm`` (only the forearm excluded) and
    ``iou_raw`` (the given mask as it is); plus
    each view's status and the mean IoU over the views that were not dropped."""
    inside = vm.inside
    raw = _iou(pred, vm.target, inside)
    no_forearm = _iou(pred, vm.target, inside * (~vm.forearm).float() if vm.forearm is not None else inside)
    usable = _iou(pred, vm.target, vm.valid)
    per_view = {}
    for i, n in enumerate(vm.names):
        per_view[n] = {"iou": usable[i], "iou_no_forearm": no_forearm[i], "iou_raw": raw[i], "status": vm.status[i]}
        if vm.notes[i]:
            per_view[n]["note"] = vm.notes[i]
    kept = [usable[i] for i in range(len(vm.names)) if vm.status[i] != "dropped"]
    return {
        "views": per_view,
        "iou_mean": float(np.mean(kept)) if kept else None,
        "iou_min": float(np.min(kept)) if kept else None,
        "dropped_views": [n for n, s in zip(vm.names, vm.status) if s == "dropped"],
        "partial_views": [n for n, s in zip(vm.names, vm.status) if s == "partial"],
    }
