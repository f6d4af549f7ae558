"""The generated shapes: "recognise the shape; as auxiliary tasks predict its colour, size, position, texture or mask".

Everything is drawn from a local ``numpy.random.Generator``, so the same arguments always give the same pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from auxloss._checks import int_in_range, unit_fraction
from auxloss.errors import AuxLossError, close_matches
from auxloss.zoo.data.common import SPLITS, DataRequest, DictDataset

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "make_shapes",
    "make_shapes_splits",
    "shapes_splits",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
# The named colour's fully saturated RGB; its hue is ``60 * index`` degrees.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Quadrant of the object's centre, row-major with y pointing down (image convention).
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
BACKGROUNDS: tuple[str, ...] = ("plain", "cluttered")

# Equivalent-circle radius ranges (fraction of the image side) per size bucket: every shape is scaled so
# that its area equals pi * rho**2, so the bucket is readable from the mask area whatever the shape, and the
# gaps between ranges keep adjacent buckets apart after rasterisation.
_SIZE_RHO: tuple[tuple[float, float], ...] = ((0.09, 0.12), (0.145, 0.175), (0.20, 0.235))
_HUE_JITTER_DEG = 12.0  # well inside the +-30 degrees that separate neighbouring named hues
_TEXTURE_SHADE = 0.55  # brightness of the "off" pixels of a striped/dotted object, relative to its colour
_MIDLINE_MARGIN = 1.0  # pixels between an object's centre and the image midlines: the quadrant is never a tie


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of shape ``shape`` in unit coordinates: every shape fits in the unit circle (circumradius 1)."""
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        half = math.sqrt(0.5)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if name == "triangle":
        # Equilateral, apex up (v < 0 is up), with its centroid at the origin so that the mask centroid is
        # the sampled centre: apex at v = -1, base at v = 0.5, half-width sqrt(3)/2 at the base.
        return (v >= -1.0) & (v <= 0.5) & (np.abs(u) <= (v + 1.0) * (math.sqrt(3.0) / 3.0))
    if name == "cross":
        arm, reach = 0.3, math.sqrt(1.0 - 0.09)
        au, av = np.abs(u), np.abs(v)
        return ((au <= reach) & (av <= arm)) | ((av <= reach) & (au <= arm))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "diamond":
        # A tall rhombus rather than a square on its corner, so no rotation turns it into the square.
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    raise AssertionError(name)  # pragma: no cover - SHAPES and this function are kept in step


@functools.cache
def _shape_scale(shape: int) -> float:
    """Circumradius per unit equivalent-circle radius: sqrt(pi / area of the unit-circumradius shape)."""
    # Measured on a fine grid with the very mask function used for drawing, so the two cannot disagree.
    g = (np.arange(1024, dtype=np.float64) + 0.5) / 512.0 - 1.0
    u, v = np.meshgrid(g, g)
    area = float(_shape_mask(shape, u, v).mean()) * 4.0
    return math.sqrt(math.pi / area)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; ``h`` in degrees, ``s``/``v`` in [0, 1]; returns (n, 3)."""
    h = np.mod(h, 360.0) / 60.0
    c = v * s
    x = c * (1.0 - np.abs(np.mod(h, 2.0) - 1.0))
    zero = np.zeros_like(c)
    sector = np.floor(h).astype(np.int64) % 6
    # Rows: for each sector, which of (c, x, 0) goes to R, G, B.
    table = np.stack(
        [
            np.stack([c, x, zero], 1),
            np.stack([x, c, zero], 1),
            np.stack([zero, c, x], 1),
            np.stack([zero, x, c], 1),
            np.stack([x, zero, c], 1),
            np.stack([c, zero, x], 1),
        ],
        0,
    )
    rgb = table[sector, np.arange(len(h))]
    return rgb + (v - c)[:, None]


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` labels in ``[0, k)``, as balanced as ``n`` allows, in random order."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _generate_shapes(
    n: int,
    rng: np.random.Generator,
    *,
    image_size: int,
    noise: float,
    label_noise: float,
    n_shapes: int,
    n_colours: int,
    clutter: float,
    correlation: float,
    max_rotation: float,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    S = image_size
    # --- per-sample latent factors, all drawn up front so the result does not depend on ``chunk`` ---
    shape = _balanced_labels(rng, n, n_shapes)
    colour = _balanced_labels(rng, n, n_colours)
    if correlation > 0:
        tied = rng.random(n) < correlation
        colour = np.where(tied, shape % n_colours, colour)
    size = _balanced_labels(rng, n, len(SIZES))
    position = _balanced_labels(rng, n, len(POSITIONS))
    texture = _balanced_labels(rng, n, len(TEXTURES))
    background = (rng.random(n) < clutter).astype(np.int64)

    lo = np.array([r[0] for r in _SIZE_RHO])[size]
    hi = np.array([r[1] for r in _SIZE_RHO])[size]
    rho = rng.uniform(lo, hi) * S  # equivalent-circle radius in pixels
    scale = np.array([_shape_scale(s) for s in range(n_shapes)])[shape]
    ext = rho * scale  # circumradius: the object never reaches further than this from its centre
    theta = np.deg2rad(rng.uniform(-max_rotation, max_rotation, n))

    # Centre: inside the quadrant's half along each axis, at least MARGIN from the midline, and far enough
    # from the border that the whole object stays in the image (so its mask centroid is in the quadrant).
    def centre(upper_half: np.ndarray) -> np.ndarray:
        low_min, low_max = ext + 0.5, S / 2 - _MIDLINE_MARGIN
        t = rng.random(n)
        low_side = low_min + t * (low_max - low_min)
        return np.where(upper_half, S - low_side, low_side)

    cx = centre(position % 2 == 1)
    cy = centre(position // 2 == 1)

    hue = colour * 60.0 + rng.uniform(-_HUE_JITTER_DEG, _HUE_JITTER_DEG, n)
    rgb = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0, n), rng.uniform(0.7, 1.0, n)).astype(np.float32)

    # Texture parameters: stripe direction and phase; dot-grid offset. Period scales with the image.
    period = max(3.0, S / 8.0)
    stripe_angle = rng.uniform(0.0, math.pi, n)
    phase = rng.uniform(0.0, period, (n, 2))

    # Background: a dark grey level with a gentle linear gradient in a random direction.
    bg_level = rng.uniform(0.0, 0.2, n)
    bg_slope = rng.uniform(0.0, 0.15, n)
    bg_angle = rng.uniform(0.0, 2 * math.pi, n)

    # Clutter: three thin line segments in dim random colours, drawn behind the object.
    n_strokes = 3
    stroke_ends = rng.uniform(0.0, S, (n, n_strokes, 4))
    stroke_rgb = (
        _hsv_to_rgb(
            rng.uniform(0, 360, n * n_strokes),
            np.full(n * n_strokes, 0.5),
            rng.uniform(0.35, 0.6, n * n_strokes),
        )
        .reshape(n, n_strokes, 3)
        .astype(np.float32)
    )

    coords = np.arange(S, dtype=np.float32) + 0.5  # pixel centres
    X = coords[None, None, :]
    Y = coords[None, :, None]

    images = np.empty((n, 3, S, S), dtype=np.float32)
    masks = np.empty((n, 1, S, S), dtype=np.float32)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start

        def col(a: np.ndarray, sl: slice = sl) -> np.ndarray:
            # A per-sample value broadcast against (m, S, S) grids.
            return a[sl].astype(np.float32)[:, None, None]

        # Background.
        ramp = (np.cos(col(bg_angle)) * (X - S / 2) + np.sin(col(bg_angle)) * (Y - S / 2)) / S
        bg = np.clip(col(bg_level) + col(bg_slope) * ramp, 0.0, 1.0)
        img = images[sl]  # a view: every step below draws into the output in place
        img[:] = bg[:, None]

        # Clutter strokes (only where background == 1): distance from each pixel to a segment <= 0.7 px.
        has = background[sl].astype(bool)
        if has.any():
            idx = np.nonzero(has)[0]
            for k in range(n_strokes):
                e = stroke_ends[sl][idx, k].astype(np.float32)
                ax, ay, bx, by = (e[:, j, None, None] for j in range(4))
                dx, dy = bx - ax, by - ay
                t = ((X - ax) * dx + (Y - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-6)
                t = np.clip(t, 0.0, 1.0)
                d2 = (X - ax - t * dx) ** 2 + (Y - ay - t * dy) ** 2
                on = d2 <= 0.49
                sub = img[idx]
                np.copyto(sub, stroke_rgb[sl][idx, k][:, :, None, None], where=on[:, None])
                img[idx] = sub

        # Object mask in rotated unit coordinates, one vectorised pass per shape class.
        dx = X - col(cx)
        dy = Y - col(cy)
        c, s, e = np.cos(col(theta)), np.sin(col(theta)), col(ext)
        u = (c * dx + s * dy) / e
        v = (-s * dx + c * dy) / e
        mask = np.zeros((m, S, S), dtype=bool)
        shp = shape[sl]
        for k in range(n_shapes):
            sel = shp == k
            if sel.any():
                mask[sel] = _shape_mask(k, u[sel], v[sel])

        # Texture: 1 where the object shows its full colour, _TEXTURE_SHADE on the "off" pixels.
        tex = texture[sl]
        pattern = np.ones((m, S, S), dtype=np.float32)
        one, shade = np.float32(1.0), np.float32(_TEXTURE_SHADE)
        striped = tex == TEXTURES.index("striped")
        if striped.any():
            a = col(stripe_angle)[striped]
            proj = np.cos(a) * X + np.sin(a) * Y + col(phase[:, 0])[striped]
            pattern[striped] = np.where(np.mod(proj, period) < period / 2, one, shade)
        dotted = tex == TEXTURES.index("dotted")
        if dotted.any():
            ox, oy = col(phase[:, 0])[dotted], col(phase[:, 1])[dotted]
            gx = np.mod(X + ox, period) - period / 2
            gy = np.mod(Y + oy, period) - period / 2
            # Coloured dots on a shaded body.
            pattern[dotted] = np.where(gx * gx + gy * gy <= (0.3 * period) ** 2, one, shade)
        obj = rgb[sl][:, :, None, None] * pattern[:, None]
        np.copyto(img, obj, where=mask[:, None])

        if noise > 0:
            pixel_noise = rng.standard_normal(img.shape, dtype=np.float32)
            pixel_noise *= np.float32(noise)
            img += pixel_noise
        np.clip(img, 0.0, 1.0, out=img)
        masks[sl, 0] = mask

    target = shape.copy()
    if label_noise > 0:
        # Flip exactly round(label_noise * n) labels, each to a *different* class, so label_noise is the
        # true corruption rate rather than (1 - 1/k) of it.
        flip = rng.choice(n, size=round(label_noise * n), replace=False)
        target[flip] = (target[flip] + rng.integers(1, n_shapes, size=len(flip))) % n_shapes

    return {
        "input": images,
        "target": target,
        "colour": colour,
        "size": size,
        "position": position,
        "texture": texture,
        "mask": masks,
        "background": background,
        "shape": shape,
    }


def _shapes_kwargs(
    image_size: int,
    noise: float,
    label_noise: float,
    n_shapes: int,
    n_colours: int,
    clutter: float,
    correlation: float,
    max_rotation: float,
) -> dict[str, Any]:
    try:
        noise_f, rot = float(noise), float(max_rotation)
    except (TypeError, ValueError):
        raise AuxLossError(
            f"noise and max_rotation must be numbers; got noise={noise!r}, max_rotation={max_rotation!r}."
        ) from None
    if not math.isfinite(noise_f) or noise_f < 0:
        raise AuxLossError(f"noise is the std of Gaussian pixel noise and must be >= 0; got {noise!r}.")
    if not 0.0 <= rot <= 45.0:
        # 45 degrees already covers every look of the square (it repeats every 90), and larger angles
        # would make the triangle's "apex up" orientation meaningless.
        raise AuxLossError(f"max_rotation must be between 0 and 45 degrees; got {max_rotation!r}.")
    return {
        # Below 16 px the largest objects cannot fit inside one quadrant-half with the required margins.
        "image_size": int_in_range("image_size", image_size, 16),
        "noise": noise_f,
        "label_noise": unit_fraction("label_noise", label_noise),
        "n_shapes": int_in_range("n_shapes", n_shapes, 2, len(SHAPES)),
        "n_colours": int_in_range("n_colours", n_colours, 1, len(COLOURS)),
        "clutter": unit_fraction("clutter", clutter),
        "correlation": unit_fraction("correlation", correlation),
        "max_rotation": rot,
    }


def _shapes_dataset(
    arrays: dict[str, np.ndarray], params: dict[str, Any], info: dict[str, Any]
) -> DictDataset:
    arrays = dict(arrays)
    clean = arrays.pop("shape")
    n_shapes, n_colours = params["n_shapes"], params["n_colours"]
    num_classes = {"target": n_shapes}
    names: dict[str, Sequence[str]] = {"target": SHAPES[:n_shapes]}
    if params["label_noise"] > 0:
        # Kept as a key (not in info) so that subset() and batching keep it aligned with the items.
        arrays["clean_target"] = clean
        num_classes["clean_target"] = n_shapes
        names["clean_target"] = SHAPES[:n_shapes]
    return DictDataset(
        arrays,
        num_classes={
            **num_classes,
            "colour": n_colours,
            "size": len(SIZES),
            "position": len(POSITIONS),
            "texture": len(TEXTURES),
            "background": len(BACKGROUNDS),
        },
        class_names={
            **names,
            "colour": COLOURS[:n_colours],
            "size": SIZES,
            "position": POSITIONS,
            "texture": TEXTURES,
            "background": BACKGROUNDS,
        },
        info={"generator": "shapes", **params, **info},
    )


def make_shapes(
    n: int,
    *,
    image_size: int = 32,
    noise: float = 0.1,
    seed: int = 0,
    label_noise: float = 0.0,
    n_shapes: int = 6,
    n_colours: int = 6,
    clutter: float = 0.0,
    correlation: float = 0.0,
    max_rotation: float = 15.0,
) -> DictDataset:
    """Generate ``n`` images of one coloured, textured shape each, with the shape as the main label.

    The task is "recognise the object", and every factor used to draw it is also an auxiliary label.
    Generative process, per image, with a local ``numpy.random.Generator(seed)`` (never the global RNG):

    1. Draw the latent factors, each balanced over its classes (as evenly as ``n`` allows) and independent
       of the others: shape (``"target"``, the first ``n_shapes`` of :data:`SHAPES`), colour (the first
       ``n_colours`` of :data:`COLOURS`), size bucket (:data:`SIZES`), quadrant (:data:`POSITIONS`) and
       texture (:data:`TEXTURES`). With probability ``correlation`` the colour is then replaced by
       ``shape % n_colours`` (a spurious shortcut, for studying shortcut learning; 0 by default).
    2. Size: an equivalent-circle radius ``rho`` uniform in the bucket's range (small 0.09-0.12, medium
       0.145-0.175, large 0.20-0.235 of the image side); every shape is scaled so that its area is
       ``pi * rho**2``, so the size bucket is readable from the mask area and tells nothing about the shape.
       Rotation is uniform in ``+-max_rotation`` degrees (15 by default; the diamond is a tall rhombus so
       it never looks like a rotated square).
    3. Position: the centre is uniform within the quadrant, at least 1 px from the image midlines and far
       enough from the border that the whole object is visible, so the mask centroid lies in the quadrant.
    4. Colour: hue ``60 * colour`` degrees plus uniform jitter of +-12 degrees (neighbouring hues are 60
       apart), saturation uniform in [0.65, 1], value uniform in [0.7, 1].
    5. Texture, inside the mask: ``solid``; ``striped`` (stripes of period ``max(3, S/8)`` px at a random
       angle and phase); ``dotted`` (coloured dots on a grid of that period). "Off" pixels of a texture
       show the colour at 55% brightness, so the hue is unchanged everywhere inside the mask.
    6. Background: dark grey (level uniform in [0, 0.2]) with a faint linear gradient; with probability
       ``clutter`` also three thin, dim, randomly coloured line segments behind the object
       (``"background"`` = 1 for such images, 0 otherwise).
    7. Gaussian pixel noise of std ``noise`` is added and the image clipped to [0, 1].
    8. Label noise: exactly ``round(label_noise * n)`` main labels are flipped to a different class chosen
       uniformly (the image keeps the true shape). Only then is there a key ``"clean_target"`` holding the
       uncorrupted labels, for measuring how much of the noise a model memorised.

    Keys of each item (all labels int64):

    * ``"input"``: float32 ``(3, S, S)`` in [0, 1], not normalised (put normalisation in the model).
    * ``"target"``: shape class; ``"colour"``, ``"size"``, ``"position"``, ``"texture"``, ``"background"``.
    * ``"mask"``: float32 ``(1, S, S)`` with the object's binary mask, for a dense auxiliary task.

    ``dataset.num_classes`` gives the class count of each label key (the mask is not listed: it is a
    per-pixel binary map), ``dataset.class_names`` their names, ``dataset.info`` the generation parameters.

    Args:
        n: number of images (the training-set size for low-data studies: a few hundred is hard, a few
            thousand easy for a small CNN at ``noise=0.1``).
        image_size: side ``S`` in pixels, at least 16.
        noise: std of the Gaussian pixel noise; larger makes every task harder.
        seed: seed of the local random generator; the same arguments give the same data.
        label_noise: fraction of main labels flipped to a wrong class, in [0, 1].
        n_shapes: number of shape classes (2-6, the first of :data:`SHAPES`).
        n_colours: number of colour classes (1-6, the first of :data:`COLOURS`).
        clutter: probability that an image has distractor strokes, in [0, 1].
        correlation: probability that the colour is tied to the shape, in [0, 1].
        max_rotation: largest absolute rotation in degrees, 0-45.
    """
    n = int_in_range("n", n, 1)
    seed = int_in_range("seed", seed, 0)
    params = _shapes_kwargs(
        image_size, noise, label_noise, n_shapes, n_colours, clutter, correlation, max_rotation
    )
    arrays = _generate_shapes(n, np.random.default_rng(seed), **params)
    return _shapes_dataset(arrays, params, {"seed": seed})


def make_shapes_splits(
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, DictDataset]:
    """Train/val/test shapes datasets from independent generators derived from ``seed``.

    Each split gets its own sub-seed (``numpy.random.SeedSequence(seed).spawn(3)``), so the splits are
    disjoint (all factors are continuous, so no two images coincide), deterministic given ``seed``, and
    changing one split's size leaves the other splits unchanged. ``kwargs`` are passed to
    :func:`make_shapes`, except that ``label_noise`` applies to the train split only, so validation and
    test measure the clean task.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.
    """
    seed = int_in_range("seed", seed, 0)
    sizes = {
        "train": int_in_range("n_train", n_train, 1),
        "val": int_in_range("n_val", n_val, 1),
        "test": int_in_range("n_test", n_test, 1),
    }
    allowed = {
        "image_size",
        "noise",
        "label_noise",
        "n_shapes",
        "n_colours",
        "clutter",
        "correlation",
        "max_rotation",
    }
    for key in kwargs:
        if key not in allowed:
            hint = close_matches(key, allowed)
            raise AuxLossError(
                f"make_shapes_splits got an unknown option {key!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Options: {sorted(allowed)}."
            )
    defaults: dict[str, Any] = {
        "image_size": 32,
        "noise": 0.1,
        "label_noise": 0.0,
        "n_shapes": 6,
        "n_colours": 6,
        "clutter": 0.0,
        "correlation": 0.0,
        "max_rotation": 15.0,
    }
    params = _shapes_kwargs(**{**defaults, **kwargs})
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    out: dict[str, DictDataset] = {}
    for split, child in zip(SPLITS, children):
        p = dict(params)
        if split != "train":
            p["label_noise"] = 0.0
        arrays = _generate_shapes(sizes[split], np.random.default_rng(child), **p)
        out[split] = _shapes_dataset(arrays, p, {"seed": seed, "split": split})
    return out



def shapes_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: :func:`make_shapes_splits` with the request's sizes, seed and params."""
    return make_shapes_splits(request.n_train, request.n_val, request.n_test, seed=request.seed,
                              **request.params)
