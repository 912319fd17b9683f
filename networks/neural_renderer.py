"""Neural renderer of the ``neural`` stage: learned per-vertex features plus real per-pixel
quantities -> colour. Modules only; the optimisation lives in ``fitting/neural.py``.

What a pixel sees (``PixelInputs``, all interpolated from the mesh at the pixel's surface point):
the learned vertex features, the HAM albedo (linear), the Lambertian colour of that albedo under
the scene's SH lighting (linear) and, with ``view_inputs``, the unit camera-space normal, the unit
world-space view direction (camera centre -> surface point), their cosine (which side of the
surface the camera sees), the view direction mirrored about the normal and sin/cos positional
encodings of these. No noise channels: every input is a quantity of the scene, so a novel camera
gets meaningful inputs.

Why a residual on the Lambertian colour: the renderer outputs
``max(L exp(g) + d + s E(r), 0)`` (linear RGB) for the Lambertian colour L, the head's log-gain g
and offset d, and the specular term: one learnt surface weight s times a few learnt lobes
(``specular_model``, below). The
head's last layer and s start at zero, so an untrained renderer is exactly the HAM shading and
training only has to learn what the SH-Lambertian model misses (albedo detail the smoothness
prior removed, shading and lighting errors, highlights). It converges in hundreds of steps on a
CPU, and a held-out view starts from the physically based image rather than from an arbitrary
network output.

Why view dependence through lobes: a highlight of distant lights is a function of world
directions, the same for every camera, so lobes fitted to the fitted views' highlights light a
new view's surface correctly; a head that sees the camera's directions can instead learn each
fitted view's look, which does not carry to a new camera (measured on a synthetic scan with skin
sheen, 3 views held out: 29.2 dB with view inputs, 30.2 without). ``view_inputs`` stays
available for captures whose cameras differ in ways the mean lighting does not hold (the real
demo capture: 19.9 dB with, 18.6 without). Two lobe models (``specular_model``):
- ``half_vector`` (default): K learnt distant lights l_k, each adding a_k exp(l_k' (n.h_k - 1))
  where it lights the surface (n.l_k > 0), h_k the unit half vector between the direction to the
  camera and l_k: the n.h dependence of Blinn-Phong and of microfacet distributions, whose
  highlights stretch and sharpen towards grazing views as skin's do;
- ``reflection``: spherical Gaussians over world directions at the view direction mirrored about
  the normal (Ref-NeRF's parameterisation of an environment), circular at every angle.
Measured on 12-view synthetic scans with skin sheen, views 02 06 10 held out (2 x 2 samples per
pixel): half_vector 36.40 / 36.63 / 34.05 / 32.49 / 34.70 dB against reflection's 35.39 / 36.49 /
33.80 / 31.69 / 34.36 on seeds 3 / 5 / 7 / 11 / 13; reflection also drew a faint glow where the
key light's lobe reached surface that had no highlight.

Two heads (``NeuralRendererSpec.kind``):
- ``mlp``: per pixel, inputs (..., C_in) of any leading shape (the stage passes only the covered
  pixels);
- ``unet``: a small UNet over the feature image (B, H, W, C_in) with H and W multiples of
  2**depth (the stage crops each view around the hands), so neighbouring pixels inform each other.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("mlp", "unet")
SPECULAR_MODELS = ("half_vector", "reflection")
# broad at the start: a reflection lobe exp(2 (cos - 1)) is at a third of its peak 60 degrees off
# its axis; the half vector turns half as far as the reflected ray, hence 4 x the sharpness
LOBE_SHARPNESS_INIT = {"reflection": 2.0, "half_vector": 8.0}
LOBE_LOG_AMPLITUDE_INIT = -2.0


def fibonacci_sphere(n: int) -> torch.Tensor:
    """(n, 3) unit vectors spread evenly over the sphere (golden-angle spiral)."""
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * k / max(n, 1)
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    r = torch.sqrt((1.0 - z * z).clamp_min(0.0))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1).float()


@dataclass
class NeuralRendererSpec:
    """Architecture of a renderer (the ``neural`` conf keys of the same names)."""

    kind: str = "mlp"  # mlp | unet
    feature_dim: int = 8  # learned channels per vertex
    hidden: int = 64  # mlp: hidden width
    layers: int = 3  # mlp: hidden layers
    pe_frequencies: int = 2  # sin/cos octaves of the normal, view-direction and reflection encodings
    unet_channels: int = 16  # unet: channels of the first level (doubled per level)
    unet_depth: int = 2  # unet: down-sampling levels
    specular_lobes: int = 8  # learnt specular lobes; 0 = none
    view_inputs: bool = True  # the head sees normal, view and reflected directions (else the surface only)
    damp_specular: bool = False  # the confidence scales the specular term too (records written before it existed)
    specular_model: str = "half_vector"  # half_vector (lights, lobes over n.h) | reflection (lobes over the mirrored ray)

    def validate(self) -> "NeuralRendererSpec":
        if self.kind not in KINDS:
            raise ValueError(f"neural.renderer must be one of {list(KINDS)}, got {self.kind!r}")
        if self.specular_model not in SPECULAR_MODELS:
            raise ValueError(f"neural.specular_model must be one of {list(SPECULAR_MODELS)}, got {self.specular_model!r}")
        for name in ("feature_dim", "hidden", "layers", "unet_channels", "unet_depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"neural.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pe_frequencies", "specular_lobes"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"neural.{name} must be >= 0, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "NeuralRendererSpec":
        known = {f.name: f.type for f in fields(NeuralRendererSpec)}
        # keys a record lacks take what records written before the key meant: no lobes, a head
        # that sees the view (the stage's own default, NeuralConf.view_inputs, is false), a
        # specular term scaled by the confidence, lobes over the reflected ray
        out = NeuralRendererSpec(specular_lobes=0, view_inputs=True, damp_specular=True, specular_model="reflection")
        for k, v in d.items():
            if k not in known:
                raise KeyError(f"neural renderer spec: unknown key {k!r}; known {sorted(known)}")
            setattr(out, k, type(getattr(out, k))(v))
        return out.validate()

    @property
    def input_channels(self) -> int:
        # features, albedo, lambertian[, normal, view direction, facing, reflected view direction,
        # their encodings]
        if not self.view_inputs:
            return self.feature_dim + 3 + 3
        return self.feature_dim + 3 + 3 + 3 + 3 + 1 + 3 + (2 * 3 * 3 + 2) * self.pe_frequencies

    @property
    def multiple(self) -> int:
        """Image sizes the head accepts are multiples of this (1 for the mlp)."""
        return 2 ** self.unet_depth if self.kind == "unet" else 1


@dataclass
class PixelInputs:
    """Per-pixel inputs, each (..., k): features (C), albedo (3, linear), lambertian (3, linear
    colour under the SH light), normal (3, unit, camera frame), view_dir (3, unit, world frame),
    facing (1, normal . view direction: a back face seen through an opening has it > 0 and the
    Lambertian model lights it as if seen from outside); confidence (1): the interpolated
    ``NeuralRenderer.confidence`` (None = 1); reflection (3, unit, world frame): the view direction
    mirrored about the normal. Why the reflection: under distant lights a highlight is a function
    of where the mirrored ray points in the world, the same for every camera, so what the fitted
    views show of it carries to a new view (Ref-NeRF's parameterisation); in the camera frame it
    would depend on the camera."""

    features: torch.Tensor
    albedo: torch.Tensor
    lambertian: torch.Tensor
    normal: torch.Tensor
    view_dir: torch.Tensor
    facing: torch.Tensor  # (..., 1) cosine of the world normal and the view direction (< 0: front face)
    confidence: torch.Tensor | None = None  # (..., 1) in [0, 1]: how much of the correction to apply
    reflection: torch.Tensor | None = None  # (..., 3) unit, world frame (None: from normal and view_dir)


def positional_encoding(x: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[sin(2^k pi x), cos(2^k pi x)] for k < frequencies, over the last dimension (NeRF's)."""
    if frequencies <= 0:
        return x[..., :0]
    scales = (2.0 ** torch.arange(frequencies, device=x.device, dtype=x.dtype)) * math.pi
    xs = (x[..., None, :] * scales[:, None]).flatten(-2)
    return torch.cat([torch.sin(xs), torch.cos(xs)], -1)


class PixelMLP(nn.Module):
    """Per-pixel MLP (..., C_in) -> (..., 6) (log-gain, offset); last layer zero-initialised."""

    def __init__(self, in_channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c = in_channels
        for _ in range(layers):
            mods += [nn.Linear(c, hidden), nn.ReLU(inplace=True)]
            c = hidden
        self.body = nn.Sequential(*mods)
        self.out = nn.Linear(c, 6)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class FeatureUNet(nn.Module):
    """Small UNet (B, C_in, H, W) -> (B, 6, H, W) (log-gain, offset): ``depth`` levels of average-pool down-sampling,
    nearest up-sampling with skip connections; 1x1 output convolution zero-initialised."""

    def __init__(self, in_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, channels, 1)  # per-pixel mixing first: cheap and full-resolution
        self.down = nn.ModuleList()
        c = channels
        widths = [c]
        for _ in range(depth):
            self.down.append(_block(c, 2 * c))
            c *= 2
            widths.append(c)
        self.up = nn.ModuleList()
        for d in range(depth):
            skip = widths[depth - 1 - d]
            self.up.append(_block(c + skip, skip))
            c = skip
        self.out = nn.Conv2d(c, 6, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        skips = [h]
        for blk in self.down:
            h = blk(F.avg_pool2d(h, 2))
            skips.append(h)
        for d, blk in enumerate(self.up):
            skip = skips[self.depth - 1 - d]
            h = blk(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], 1))
        return self.out(h)


class NeuralRenderer(nn.Module):
    """Learned vertex features (``num_vertices`` x ``feature_dim``, the merged scene of the
    stage's hands, zero at the start) and the head. ``forward(PixelInputs)`` -> linear RGB."""

    def __init__(self, num_vertices: int, spec: NeuralRendererSpec) -> None:
        super().__init__()
        self.spec = spec.validate()
        self.features = nn.Parameter(torch.zeros(int(num_vertices), spec.feature_dim))
        # per vertex, how far the learned correction is trusted (1 = fully): the stage lowers it
        # on surface the fitted views hardly saw, where a novel view then falls back to the
        # Lambertian colour instead of an extrapolation of the network
        self.register_buffer("confidence", torch.ones(int(num_vertices), 1))
        if spec.kind == "mlp":
            self.head: nn.Module = PixelMLP(spec.input_channels, spec.hidden, spec.layers)
        else:
            self.head = FeatureUNet(spec.input_channels, spec.unet_channels, spec.unet_depth)
        # specular: K lobes a_k exp(l_k (c_k - 1)) (world axes m_k spread over the sphere at the
        # start: the lights' directions, or the environment's; sharpness l_k, RGB amplitude a_k;
        # c_k = n.h_k or r.m_k, see ``specular``), times one specular weight of the surface (0 at
        # the start). A few smooth lobes can only make highlights; a free map over directions
        # (16 x 32 measured) fitted the noise of the views.
        K = int(spec.specular_lobes)
        self.lobe_axis = nn.Parameter(fibonacci_sphere(K)) if K else None
        self.lobe_sharpness = nn.Parameter(torch.full((K, 1), LOBE_SHARPNESS_INIT[spec.specular_model])) if K else None
        self.lobe_log_amplitude = nn.Parameter(torch.full((K, 3), LOBE_LOG_AMPLITUDE_INIT)) if K else None
        self.specular_weight = nn.Parameter(torch.zeros(())) if K else None

    @property
    def num_vertices(self) -> int:
        return int(self.features.shape[0])

    def encode(self, x: PixelInputs) -> torch.Tensor:
        """The head's input (..., C_in)."""
        if not self.spec.view_inputs:
            return torch.cat([x.features, x.albedo, x.lambertian], -1)
        f = self.spec.pe_frequencies
        r = x.reflection if x.reflection is not None else torch.zeros_like(x.view_dir)
        return torch.cat([x.features, x.albedo, x.lambertian, x.normal, x.view_dir, x.facing, r,
                          positional_encoding(x.normal, f), positional_encoding(x.view_dir, f),
                          positional_encoding(x.facing, f), positional_encoding(r, f)], -1)

    def specular_parameters(self) -> list[nn.Parameter]:
        if self.lobe_axis is None:
            return []
        return [self.lobe_axis, self.lobe_sharpness, self.lobe_log_amplitude, self.specular_weight]

    @torch.no_grad()
    def project_(self) -> None:
        """After an optimiser step: half-vector lobes are lights, which add light and never take
        it, so their weight stays >= 0 (free, it went negative on a scan without highlights and
        darkened it: a unet's training gain 0.6 dB instead of 5)."""
        if self.specular_weight is not None and self.spec.specular_model == "half_vector":
            self.specular_weight.clamp_(min=0.0)

    def specular(self, reflection: torch.Tensor, view_dir: torch.Tensor | None = None) -> torch.Tensor:
        """(..., 3) linear specular colour at surface points seen along unit world view
        directions ``view_dir`` (camera -> point; needed by ``half_vector``) with unit world
        reflected view directions ``reflection``: the specular weight times the lobes' sum
        (zeros without lobes)."""
        if self.lobe_axis is None:
            return torch.zeros_like(reflection)
        axis = F.normalize(self.lobe_axis.float(), dim=-1)
        r = reflection.reshape(-1, 3).float()
        if self.spec.specular_model == "reflection":
            cos, lit = r @ axis.t(), 1.0  # (P, K)
        else:
            if view_dir is None:
                raise ValueError("half_vector lobes need the view directions")
            v = view_dir.reshape(-1, 3).float()
            n = F.normalize(r - v, dim=-1, eps=1e-9)  # r - v = -2 (v.n) n: the normal, on a front face
            h = F.normalize(axis[None] - v[:, None], dim=-1, eps=1e-9)  # (P, K, 3) half vectors
            cos, lit = (n[:, None] * h).sum(-1), (n @ axis.t() > 0).float()
        lobes = torch.exp(self.lobe_sharpness.float().clamp_min(0.0).t() * (cos - 1.0)) * lit
        rgb = self.specular_weight.float() * (lobes @ torch.exp(self.lobe_log_amplitude.float()))
        return rgb.reshape(reflection.shape).to(reflection.dtype)

    def forward(self, x: PixelInputs) -> torch.Tensor:
        """Linear RGB (..., 3): the Lambertian colour L plus the head's correction
        L (exp(g) - 1) + d (log-gain g and offset d: a shadow or a back face is a gain) times the
        confidence, plus the specular colour of the reflected view direction (a highlight), >= 0.
        The confidence damps what is fitted per vertex (features seen over a few pixels), not the
        specular term: its lobes and weight are global, fitted from every view's highlights, and a
        per-vertex pixel count (mean 0.2, median 0.1 or less on ham's twice-subdivided meshes at
        320x256) scaled the highlights by the mesh density instead (held out, 12-view synthetic
        scans: +0.1 to +0.3 dB on four seeds of five, -0.08 on one). For the unet the inputs are
        images (B, H, W, k)."""
        enc = self.encode(x)
        if self.spec.kind == "unet":
            if enc.ndim != 4 or enc.shape[1] % self.spec.multiple or enc.shape[2] % self.spec.multiple:
                raise ValueError(f"the unet renderer takes (B,H,W,C) images with H, W multiples of "
                                 f"{self.spec.multiple}; got {tuple(enc.shape)}")
            delta = self.head(enc.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            delta = self.head(enc)
        delta = delta.to(x.lambertian.dtype)
        corr = x.lambertian * torch.expm1(delta[..., :3].clamp(-10.0, 5.0)) + delta[..., 3:]
        spec = self.specular(x.reflection, x.view_dir) if x.reflection is not None else None
        if spec is not None and self.spec.damp_specular:
            corr = corr + spec
        if x.confidence is not None:
            corr = corr * x.confidence
        if spec is not None and not self.spec.damp_specular:
            corr = corr + spec
        return (x.lambertian + corr).clamp_min(0.0)

    # -------------------------------------------------------------------- state (checkpoints)
    def to_record(self) -> dict[str, Any]:
        """Tensors and plain values only (weights_only checkpoints)."""
        return {"spec": self.spec.to_dict(), "weights": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @staticmethod
    def from_record(rec: Mapping[str, Any], device: torch.device | str = "cpu") -> "NeuralRenderer":
        spec = NeuralRendererSpec.from_dict(rec["spec"])
        weights = {k: torch.as_tensor(v) for k, v in rec["weights"].items()}
        net = NeuralRenderer(int(weights["features"].shape[0]), spec)
        net.load_state_dict(weights)
        return net.to(device)


__all__ = ["KINDS", "SPECULAR_MODELS", "NeuralRendererSpec", "PixelInputs", "positional_encoding", "PixelMLP", "FeatureUNet",
           "NeuralRenderer", "fibonacci_sphere"]
