"""Formula-driven images for pretraining a backbone without downloads (``pretrained: procedural``).

Machines without internet cannot fetch ImageNet weights, and a classifier trained from random
weights on a few hundred images gives weak CAMs, which every later stage inherits. Formula-driven
supervised pretraining (FractalDB, Kataoka et al., ACCV 2020) shows that a network pretrained to
classify images rendered from formulas learns transferable low- and mid-level features. This module
renders such images from two kinds of formula-defined families:

* **shape families** (``num_shapes``): closed curves r(theta) of the superformula (Gielis 2003;
  m-fold symmetry, exponents n1, n2, n3) times a smooth random radial harmonic perturbation, from
  polygons and stars to irregular blobs;
* **texture families** (``num_textures``): a kind (grating, binary grating, plaid, checker, dots,
  concentric rings, band-pass noise) at a frequency in cycles per object size; the orientation and
  two colours (any hue) are drawn per instance, so neither identifies a family.

An object is one shape in one texture; each image composes 1 to ``max_objects`` objects of random
families, at random size, aspect ratio, rotation and position, onto a cluttered background (colour
gradient, low-frequency colour blobs, strokes of random colours, sensor noise). The labels of an
image are the shape and texture families of the objects that stay visible (multi-label, as the WSSS
classifier is trained; shape and texture are separate labels so that each is learnt on its own).
Families are random formula parameters, not the segmentation classes of any dataset, and no
segmentation mask is used.

Every image is a pure function of ``(seed, index)`` (numpy ``SeedSequence``), and the families of
``(seed, num_shapes, num_textures)``, so a training run can be repeated byte for byte.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: Bump whenever the images for the same parameters change (recorded in the pretrained file).
GENERATOR_VERSION = 2  # 2: shape and texture families as separate labels

#: Texture kinds a texture family is drawn from.
TEXTURE_KINDS = ("grating", "binary_grating", "plaid", "checker", "dots", "rings", "noise")


@dataclass(frozen=True)
class Shape:
    """A shape family: the superformula ``r(t) = (|cos(m t/4)|^n2 + |sin(m t/4)|^n3)^(-1/n1)``
    times ``1 + sum_k amp_k cos(k t + phase_k)`` (k = 2, 3, ...)."""

    m: int
    n1: float
    n2: float
    n3: float
    harmonic_amp: Tuple[float, ...]
    harmonic_phase: Tuple[float, ...]


@dataclass(frozen=True)
class Texture:
    """A texture family: a kind of :data:`TEXTURE_KINDS` at ``freq`` cycles per object size
    (orientation random per instance)."""

    kind: str
    freq: float


@dataclass(frozen=True)
class Categories:
    """The categories of a generator seed: ``len(shapes)`` shape families and ``len(textures)``
    texture families. An object is one shape in one texture; its labels are the shape's index and
    ``len(shapes)`` + the texture's index, so there are ``len(shapes) + len(textures)`` labels."""

    shapes: Tuple[Shape, ...]
    textures: Tuple[Texture, ...]

    @property
    def num_labels(self) -> int:
        return len(self.shapes) + len(self.textures)


def make_categories(num_shapes: int, num_textures: int, seed: int) -> Categories:
    """The shape and texture families of generator seed ``seed`` (deterministic). Texture kinds
    cycle through :data:`TEXTURE_KINDS` so every kind is used; the families of one kind spread
    their frequencies evenly (log scale, jittered) over [1.5, 8] cycles per object."""
    if num_shapes < 1 or num_textures < 1:
        raise ValueError(f"need at least one shape and one texture family, got {num_shapes} and {num_textures}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, num_shapes, num_textures]))
    shapes = []
    for i in range(num_shapes):
        n_harm = int(rng.integers(1, 4))
        shapes.append(
            Shape(
                m=int(rng.integers(3, 11)) if i % 4 else 0,  # every 4th a smooth (m = 0) blob
                n1=float(np.exp(rng.uniform(math.log(0.3), math.log(8.0)))),
                n2=float(np.exp(rng.uniform(math.log(0.5), math.log(8.0)))),
                n3=float(np.exp(rng.uniform(math.log(0.5), math.log(8.0)))),
                harmonic_amp=tuple(float(a) for a in rng.uniform(0.0, 0.25 if i % 4 == 0 else 0.1, n_harm)),
                harmonic_phase=tuple(float(p) for p in rng.uniform(0.0, 2 * math.pi, n_harm)),
            )
        )
    kinds = [TEXTURE_KINDS[i % len(TEXTURE_KINDS)] for i in range(num_textures)]
    per_kind = {k: kinds.count(k) for k in set(kinds)}
    seen: dict = {}
    textures = []
    for k in kinds:
        j = seen[k] = seen.get(k, -1) + 1
        lo, hi = 1.5, 8.0  # the kind's frequencies spread evenly on a log scale, with jitter
        f = lo * (hi / lo) ** ((j + rng.uniform(0.25, 0.75)) / per_kind[k])
        textures.append(Texture(kind=k, freq=float(f)))
    order = rng.permutation(num_textures)
    return Categories(tuple(shapes), tuple(textures[i] for i in order))


def outline(shape: Shape, n: int = 96) -> np.ndarray:
    """The shape's closed curve as ``(n, 2)`` points, scaled to a radius of at most 0.5."""
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    a = np.abs(np.cos(shape.m * t / 4.0)) ** shape.n2 + np.abs(np.sin(shape.m * t / 4.0)) ** shape.n3
    r = np.power(np.maximum(a, 1e-6), -1.0 / shape.n1)
    r = r / max(float(r.max()), 1e-6)
    for k, (amp, ph) in enumerate(zip(shape.harmonic_amp, shape.harmonic_phase), start=2):
        r = r * (1.0 + amp * np.cos(k * t + ph))
    r = np.clip(r, 0.15 * float(r.max()), None)  # no degenerate spikes through the centre
    r = 0.5 * r / float(r.max())
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))) * 255.0


def _texture(tex: Texture, X: np.ndarray, Y: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] at object-frame coordinates ``X, Y`` (pixels from the centre)."""
    a = rng.uniform(0, math.pi)  # orientation: random per instance
    f = tex.freq * rng.uniform(0.9, 1.1)
    u = (X * math.cos(a) + Y * math.sin(a)) / size
    w = (-X * math.sin(a) + Y * math.cos(a)) / size
    p1, p2 = rng.uniform(0, 2 * math.pi, 2)
    if tex.kind == "noise":  # band-pass noise at the family's frequency
        n = max(2, int(round(f)) + 1)
        coarse = rng.random((n + 1, n + 1)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(X.shape[::-1], Image.BICUBIC)
        return np.asarray(img, dtype=np.float32) / 255.0
    if tex.kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * math.pi * f * np.hypot(u, w) + p1)
    g1 = np.sin(2 * math.pi * f * u + p1)
    g2 = np.sin(2 * math.pi * f * w + p2)
    if tex.kind == "grating":
        return 0.5 + 0.5 * g1
    if tex.kind == "binary_grating":
        return (g1 > 0).astype(np.float32)
    if tex.kind == "plaid":
        return 0.5 + 0.25 * (g1 + g2)
    if tex.kind == "checker":
        return (g1 * g2 > 0).astype(np.float32)
    return ((g1 > 0.5) & (g2 > 0.5)).astype(np.float32)  # dots


def background(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    c1, c2 = _colour(rng), _colour(rng)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    g = xx / W * math.cos(a) + yy / H * math.sin(a)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c1[None, None] * (1 - g[..., None]) + c2[None, None] * g[..., None]
    cells = int(rng.integers(2, 6))
    blobs = rng.uniform(-40, 40, (cells, cells, 3)).astype(np.float32)
    img = img + np.stack(
        [np.asarray(Image.fromarray(blobs[..., c]).resize((W, H), Image.BICUBIC)) for c in range(3)], axis=-1
    )
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 5))):  # clutter strokes
        pts = [tuple(p) for p in (rng.random((int(rng.integers(2, 5)), 2)) * (W, H))]
        draw.line(pts, fill=tuple(int(c) for c in _colour(rng)), width=int(rng.integers(1, 4)))
    return np.asarray(canvas, dtype=np.float32)


def render_image(
    index: int, seed: int, categories: Categories, size: int, max_objects: int = 3
) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of generator ``seed``: ``(uint8 (size, size, 3), sorted label ids)``; each
    visible object adds its shape's and its texture's label (:class:`Categories`)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    img = background(rng, size, size)
    labels: set = set()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    while not labels:  # redraw until at least one object is visible
        labels = _draw_objects(img, rng, categories, max_objects, xx, yy)
    img = img + rng.normal(0.0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.array(sorted(labels), dtype=np.int64)


def _draw_objects(img, rng, categories: Categories, max_objects, xx, yy) -> set:
    """Draw 1 to ``max_objects`` objects onto ``img`` in place; returns the labels left visible."""
    H, W = img.shape[:2]
    n_shapes = len(categories.shapes)
    drawn = []  # (alpha, labels) in drawing order: a later object may hide an earlier one
    for _ in range(int(rng.integers(1, max_objects + 1))):
        s = int(rng.integers(n_shapes))
        t = int(rng.integers(len(categories.textures)))
        extent = float(np.exp(rng.uniform(math.log(0.25), math.log(0.8)))) * min(H, W)
        aspect = float(rng.uniform(0.8, 1.25))
        theta = float(rng.uniform(0, 2 * math.pi))
        cx, cy = rng.uniform(0.15, 0.85, 2) * (W, H)
        pts = outline(categories.shapes[s]) * (extent * aspect, extent / aspect)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = pts @ rot.T + (cx, cy)
        mask_im = Image.new("L", (W, H), 0)
        ImageDraw.Draw(mask_im).polygon([tuple(p) for p in pts], fill=255)
        alpha = np.asarray(mask_im, dtype=np.float32)[..., None] / 255.0
        if float(alpha.sum()) < 0.02 * H * W:
            continue  # mostly outside the image: not shown, not labelled
        v = _texture(categories.textures[t], xx - cx, yy - cy, extent, rng)[..., None]
        c1, c2 = _colour(rng), _colour(rng)
        img *= 1 - alpha
        img += (c1[None, None] * (1 - v) + c2[None, None] * v) * alpha
        drawn.append((alpha[..., 0], (s, n_shapes + t)))
    return visible_labels(drawn)


def visible_labels(drawn: Sequence[Tuple[np.ndarray, Tuple[int, ...]]], min_fraction: float = 0.02) -> set:
    """Labels of the objects ``drawn`` (``(alpha HxW in [0, 1], labels)`` in drawing order) that
    keep at least ``min_fraction`` of the image visible after the later objects covered them."""
    if not drawn:
        return set()
    out: set = set()
    hidden = np.zeros_like(drawn[0][0], dtype=np.float32)
    for alpha, labs in reversed(drawn):
        if float((alpha * (1 - hidden)).sum()) >= min_fraction * alpha.size:
            out.update(labs)
        hidden = np.maximum(hidden, alpha)
    return out
