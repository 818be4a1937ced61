"""Formula-driven images for pretraining a backbone without downloads (``pretrained: procedural``).

Machines without internet cannot fetch ImageNet weights, and a classifier trained from random
weights on a few hundred images gives weak CAMs, which every later stage inherits. Formula-driven
supervised pretraining (FractalDB, Kataoka et al., ACCV 2020) shows that a network pretrained to
classify images rendered from formulas learns transferable low- and mid-level features. This module
renders such images: ``num_categories`` categories, each defined by formulas only,

* a **shape**: a closed curve r(theta) from the superformula (Gielis 2003; m-fold symmetry,
  exponents n1, n2, n3) times a smooth random radial harmonic perturbation, so categories range
  from polygons and flowers to irregular blobs;
* a **texture**: one or two sinusoidal gratings (category frequency and orientation), optionally
  thresholded into a binary pattern, or band-pass noise; two colours drawn per instance (any hue),
  so colour never identifies a category;

and composes 1-3 instances of random categories, each at a random size, aspect ratio, rotation and
position, onto a cluttered background (colour gradient, low-frequency colour blobs, strokes of
random colours, sensor noise). The label of an image is the set of categories it shows
(multi-label, as the WSSS classifier is trained). Categories are random formula parameters, not the
segmentation classes of any dataset, and no segmentation mask exists or is used.

Every image is a pure function of ``(seed, index)`` (numpy ``SeedSequence``), and the categories of
``(seed, num_categories)``, so a training run can be repeated byte for byte.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: Bump whenever the images for the same parameters change (recorded in the pretrained file).
GENERATOR_VERSION = 1

#: Texture kinds a category draws from.
TEXTURE_KINDS = ("grating", "binary_grating", "plaid", "binary_plaid", "noise")


@dataclass(frozen=True)
class Category:
    """The formula parameters of one pretraining category."""

    # superformula r(t) = (|cos(m t / 4)|^n2 + |sin(m t / 4)|^n3)^(-1 / n1)
    m: int
    n1: float
    n2: float
    n3: float
    # radial perturbation: 1 + sum_k amp_k cos(k t + phase_k), k = 2..2+len(amp)-1
    harmonic_amp: Tuple[float, ...]
    harmonic_phase: Tuple[float, ...]
    texture: str
    # texture frequencies in cycles per object size, orientations in radians
    freq: Tuple[float, float]
    angle: Tuple[float, float]


def make_categories(num_categories: int, seed: int) -> List[Category]:
    """The ``num_categories`` categories of generator seed ``seed`` (deterministic)."""
    if num_categories < 2:
        raise ValueError(f"num_categories must be >= 2, got {num_categories}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, num_categories]))
    cats = []
    for _ in range(num_categories):
        n_harm = int(rng.integers(1, 4))
        cats.append(
            Category(
                m=int(rng.integers(0, 11)),
                n1=float(rng.uniform(0.3, 6.0)),
                n2=float(rng.uniform(0.5, 6.0)),
                n3=float(rng.uniform(0.5, 6.0)),
                harmonic_amp=tuple(float(a) for a in rng.uniform(0.0, 0.18, n_harm)),
                harmonic_phase=tuple(float(p) for p in rng.uniform(0.0, 2 * math.pi, n_harm)),
                texture=TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))],
                freq=(float(rng.uniform(1.5, 7.0)), float(rng.uniform(1.5, 7.0))),
                angle=(float(rng.uniform(0, math.pi)), float(rng.uniform(0, math.pi))),
            )
        )
    return cats


def outline(cat: Category, n: int = 96) -> np.ndarray:
    """The category's closed curve as ``(n, 2)`` points, scaled to a radius of at most 0.5."""
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    a = np.abs(np.cos(cat.m * t / 4.0)) ** cat.n2 + np.abs(np.sin(cat.m * t / 4.0)) ** cat.n3
    r = np.power(np.maximum(a, 1e-6), -1.0 / cat.n1)
    r = r / max(float(r.max()), 1e-6)
    for k, (amp, ph) in enumerate(zip(cat.harmonic_amp, cat.harmonic_phase), start=2):
        r = r * (1.0 + amp * np.cos(k * t + ph))
    r = np.clip(r, 0.15 * float(r.max()), None)  # no degenerate spikes through the centre
    r = 0.5 * r / float(r.max())
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))) * 255.0


def _texture(cat: Category, X: np.ndarray, Y: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] at object-frame coordinates ``X, Y`` (pixels from the centre)."""
    u = (X / size, Y / size)
    spin = rng.uniform(-0.3, 0.3)  # small per-instance jitter of orientation and frequency
    scale = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * math.pi, 2)

    def grating(i: int) -> np.ndarray:
        a = cat.angle[i] + spin
        return 0.5 + 0.5 * np.sin(
            2 * math.pi * cat.freq[i] * scale * (u[0] * math.cos(a) + u[1] * math.sin(a)) + phase[i]
        )

    if cat.texture in ("grating", "binary_grating"):
        v = grating(0)
    elif cat.texture in ("plaid", "binary_plaid"):
        v = 0.5 * (grating(0) + grating(1))
    else:  # band-pass noise at the category's frequency
        n = max(2, int(round(cat.freq[0] * scale)) + 1)
        coarse = rng.random((n + 1, n + 1)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(X.shape[::-1], Image.BICUBIC)
        v = np.asarray(img, dtype=np.float32) / 255.0
    if cat.texture.startswith("binary"):
        v = (v > 0.5).astype(np.float32)
    return v


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
    index: int, seed: int, categories: Sequence[Category], size: int, max_objects: int = 3
) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of generator ``seed``: ``(uint8 (size, size, 3), sorted category ids)``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    H = W = size
    img = background(rng, H, W)
    labels = set()
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    while not labels:  # redraw until at least one object is visible
        _draw_objects(img, labels, rng, categories, size, max_objects, xx, yy)
    img = img + rng.normal(0.0, 4.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.array(sorted(labels), dtype=np.int64)


def _draw_objects(img, labels, rng, categories, size, max_objects, xx, yy) -> None:
    H, W = img.shape[:2]
    n_obj = int(rng.integers(1, max_objects + 1))
    for k in rng.choice(len(categories), size=n_obj, replace=True):
        cat = categories[int(k)]
        extent = float(np.exp(rng.uniform(math.log(0.25), math.log(0.8)))) * size
        aspect = float(rng.uniform(0.75, 1.33))
        theta = float(rng.uniform(0, 2 * math.pi))
        cx, cy = rng.uniform(0.15, 0.85, 2) * (W, H)
        pts = outline(cat) * (extent * aspect, extent / aspect)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = pts @ rot.T + (cx, cy)
        mask_im = Image.new("L", (W, H), 0)
        ImageDraw.Draw(mask_im).polygon([tuple(p) for p in pts], fill=255)
        alpha = np.asarray(mask_im, dtype=np.float32)[..., None] / 255.0
        if float(alpha.sum()) < 0.01 * H * W:
            continue  # mostly outside the image: not shown, not labelled
        X = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        Y = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        v = _texture(cat, X, Y, extent, rng)[..., None]
        c1, c2 = _colour(rng), _colour(rng)
        obj = c1[None, None] * (1 - v) + c2[None, None] * v
        img *= 1 - alpha
        img += obj * alpha
        labels.add(int(k))
