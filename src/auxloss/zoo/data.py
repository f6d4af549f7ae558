"""Built-in datasets whose items are ``dict[str, Tensor]``: a main ``"target"`` plus auxiliary labels.

Every dataset here is a :class:`DictDataset`. Each item is a dict with ``"input"`` (what the model sees),
``"target"`` (the main label, int64) and any number of auxiliary attribute keys, so PyTorch's default
collate turns a list of items into a dict batch that auxiliary heads can read their targets from.

Sources, none of which downloads anything at run time:

* :func:`make_shapes` -- a generated image set ("recognise the shape; as an auxiliary task predict its
  colour, size, position, texture or mask"), with knobs for data size, pixel noise and label noise.
* :func:`load_digits_dataset` -- scikit-learn's bundled 8x8 handwritten digits (ships with the package).
* :func:`load_fashion_mnist` -- Fashion-MNIST read from IDX files already on disk (:func:`read_idx`).
* :func:`load_image_folder` -- a user's own ``root/<class_name>/*.png`` folder, read with Pillow.

:data:`DATASETS` names the built-in sources and :func:`available_datasets` says which can be loaded here.
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from auxloss.errors import AuxLossError, close_matches

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "DATASETS",
    "DIGIT_LOOPS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_GROUP_OF_LABEL",
    "IMAGE_EXTENSIONS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "DatasetSpec",
    "DictDataset",
    "available_datasets",
    "fashion_mnist_available",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "make_shapes",
    "make_shapes_splits",
    "read_idx",
]


# ----------------------------------------------------------------------------------------------------------
# DictDataset
# ----------------------------------------------------------------------------------------------------------


def _describe_lengths(lengths: Mapping[str, int]) -> str:
    return ", ".join(f"{k!r}: {v}" for k, v in lengths.items())


class DictDataset(Dataset[dict[str, Tensor]]):
    """A dataset of equal-length tensors, one per key; item ``i`` is ``{key: tensor[i] for each key}``.

    Args:
        tensors: key -> tensor (or numpy array, converted without copying where possible). All must have
            the same, non-zero first dimension: the number of items.
        num_classes: key -> number of classes, for the integer-valued keys where it is known (a key whose
            class count is unknown, or which is not a class label, such as ``"input"``, is simply absent).
        class_names: key -> the names of its classes, index ``c`` naming class ``c``.
        info: free-form metadata (how the data was made: generator, seed, source folder, ...).

    Attributes:
        tensors: the dict of tensors (shared, not copied: do not resize them).
        num_classes: as given.
        class_names: as given.
        info: as given.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor | np.ndarray],
        *,
        num_classes: Mapping[str, int] | None = None,
        class_names: Mapping[str, Sequence[str]] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tensors, Mapping) or len(tensors) == 0:
            raise AuxLossError(
                "DictDataset needs a non-empty dict of tensors, e.g. DictDataset({'input': x, 'target': y}); "
                f"got {type(tensors).__name__} {tensors!r:.80}."
            )
        converted: dict[str, Tensor] = {}
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise AuxLossError(
                    f"DictDataset keys must be strings (they become batch keys); got key {key!r} of type "
                    f"{type(key).__name__}. Rename it to a string."
                )
            if isinstance(value, np.ndarray):
                array = np.ascontiguousarray(value)
                if not array.flags.writeable:
                    # torch warns on read-only buffers (it cannot promise not to write): copy those.
                    array = array.copy()
                try:
                    value = torch.from_numpy(array)
                except TypeError:
                    raise AuxLossError(
                        f"DictDataset value for key {key!r} is a numpy array of dtype {array.dtype}, which "
                        "torch cannot hold; convert it to a numeric dtype first."
                    ) from None
            if not isinstance(value, Tensor):
                raise AuxLossError(
                    f"DictDataset value for key {key!r} must be a torch.Tensor or numpy array; got "
                    f"{type(value).__name__}. Convert it with torch.as_tensor(...)."
                )
            if value.dim() == 0:
                raise AuxLossError(
                    f"DictDataset value for key {key!r} is a scalar tensor; every value needs a first "
                    "dimension indexing the items. Give one value per item, e.g. value.expand(n)."
                )
            converted[key] = value

        lengths = {k: int(v.shape[0]) for k, v in converted.items()}
        if len(set(lengths.values())) > 1:
            # Name the keys that disagree with the most common length: usually one key is the odd one out.
            counts: dict[int, int] = {}
            for n in lengths.values():
                counts[n] = counts.get(n, 0) + 1
            common = max(counts, key=lambda n: counts[n])
            odd = {k: n for k, n in lengths.items() if n != common}
            raise AuxLossError(
                "DictDataset tensors must all have the same first dimension (the number of items); "
                f"key(s) {sorted(odd)} have length(s) {_describe_lengths(odd)} while the others have "
                f"{common} (all lengths: {_describe_lengths(lengths)}). Slice or pad them to one length."
            )
        n = next(iter(lengths.values()))
        if n == 0:
            raise AuxLossError(
                f"DictDataset has 0 items (keys {sorted(converted)} are all empty); give it at least one item."
            )

        self.tensors: dict[str, Tensor] = converted
        self.num_classes: dict[str, int] = {}
        for key, count in dict(num_classes or {}).items():
            self._check_known_key(key, "num_classes")
            if int(count) < 1:
                raise AuxLossError(f"num_classes[{key!r}] must be a positive integer; got {count!r}.")
            self.num_classes[key] = int(count)
        self.class_names: dict[str, tuple[str, ...]] = {}
        for key, names in dict(class_names or {}).items():
            self._check_known_key(key, "class_names")
            names = tuple(str(s) for s in names)
            if key in self.num_classes and len(names) != self.num_classes[key]:
                raise AuxLossError(
                    f"class_names[{key!r}] has {len(names)} names but num_classes[{key!r}] is "
                    f"{self.num_classes[key]}; give one name per class."
                )
            self.class_names[key] = names
        self.info: dict[str, Any] = dict(info or {})
        self._len = n

    def _check_known_key(self, key: str, what: str) -> None:
        if key not in self.tensors:
            hint = close_matches(key, self.tensors)
            raise AuxLossError(
                f"{what} names key {key!r}, which is not one of the dataset's keys {sorted(self.tensors)}"
                + (f"; did you mean {hint[0]!r}?" if hint else ".")
            )

    @property
    def keys(self) -> list[str]:
        """The item keys, in insertion order."""
        return list(self.tensors)

    @property
    def classes(self) -> list[str]:
        """The names of the ``"target"`` classes (class ``i`` is ``classes[i]``), where known."""
        if "target" not in self.class_names:
            raise AttributeError("this DictDataset has no class names for 'target'")
        return list(self.class_names["target"])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        # Tensor indexing raises IndexError out of range, which keeps ``for item in dataset`` working.
        return {k: v[index] for k, v in self.tensors.items()}

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> DictDataset:
        """A new :class:`DictDataset` holding the items at ``indices`` (ints, or a boolean mask)."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.dim() != 1 or idx.numel() != len(self):
                raise AuxLossError(
                    f"subset got a boolean mask of shape {tuple(idx.shape)}; a mask needs exactly one "
                    f"entry per item ({len(self)})."
                )
            idx = idx.nonzero().flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.long)
        elif idx.is_floating_point() or idx.is_complex():
            raise AuxLossError(f"subset indices must be integers; got dtype {idx.dtype}. Use .long().")
        idx = idx.to(torch.long).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise AuxLossError(
                f"subset indices must lie in [-{len(self)}, {len(self) - 1}]; got values from "
                f"{int(idx.min())} to {int(idx.max())}."
            )
        return DictDataset(
            {k: v[idx] for k, v in self.tensors.items()},
            num_classes=self.num_classes,
            class_names=self.class_names,
            info=self.info,
        )

    def __repr__(self) -> str:
        parts = []
        for k, v in self.tensors.items():
            desc = f"{k}: {str(v.dtype).replace('torch.', '')}{list(v.shape[1:])}"
            if k in self.num_classes:
                desc += f" ({self.num_classes[k]} classes)"
            parts.append(desc)
        return f"DictDataset(n={len(self)}, " + ", ".join(parts) + ")"


# ----------------------------------------------------------------------------------------------------------
# Generated shapes
# ----------------------------------------------------------------------------------------------------------

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


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AuxLossError(f"{name} must be an integer; got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise AuxLossError(f"{name} must be {bound}; got {value}.")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise AuxLossError(f"{name} must be a number in [0, 1]; got {value!r}.") from None
    if not 0.0 <= f <= 1.0:
        raise AuxLossError(f"{name} must be in [0, 1]; got {value}.")
    return f


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
        "image_size": _check_int("image_size", image_size, 16),
        "noise": noise_f,
        "label_noise": _check_fraction("label_noise", label_noise),
        "n_shapes": _check_int("n_shapes", n_shapes, 2, len(SHAPES)),
        "n_colours": _check_int("n_colours", n_colours, 1, len(COLOURS)),
        "clutter": _check_fraction("clutter", clutter),
        "correlation": _check_fraction("correlation", correlation),
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
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    params = _shapes_kwargs(
        image_size, noise, label_noise, n_shapes, n_colours, clutter, correlation, max_rotation
    )
    arrays = _generate_shapes(n, np.random.default_rng(seed), **params)
    return _shapes_dataset(arrays, params, {"seed": seed})


SPLITS: tuple[str, ...] = ("train", "val", "test")


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
    seed = _check_int("seed", seed, 0)
    sizes = {
        "train": _check_int("n_train", n_train, 1),
        "val": _check_int("n_val", n_val, 1),
        "test": _check_int("n_test", n_test, 1),
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


# ----------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------------

# Digits drawn with a closed loop. 4 counts as open: handwritten 4s are mostly drawn open at the top, and
# at 8x8 the printed closed triangle is rarely visible, so calling it "loop" would make a noisy label.
DIGIT_LOOPS: frozenset[int] = frozenset({0, 6, 8, 9})


def load_digits_dataset(*, flatten: bool = False) -> DictDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled with scikit-learn, never downloaded).

    Keys: ``"input"`` float32 ``(1, 8, 8)`` (``(64,)`` with ``flatten=True``) scaled from 0-16 to [0, 1];
    ``"target"`` the digit (10 classes); ``"parity"`` ``digit % 2`` (0 even, 1 odd); ``"loop"`` 1 for
    digits with a closed loop (:data:`DIGIT_LOOPS`: 0, 6, 8, 9; 4 counts as open), else 0.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise AuxLossError(
            "The digits dataset needs scikit-learn, which is not installed. Install it with "
            "`pip install scikit-learn` or `pip install auxloss[data]`."
        ) from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    x = images.reshape(len(images), 64) if flatten else images[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    loop = np.isin(y, sorted(DIGIT_LOOPS)).astype(np.int64)
    return DictDataset(
        {"input": x, "target": y, "parity": y % 2, "loop": loop},
        num_classes={"target": 10, "parity": 2, "loop": 2},
        class_names={
            "target": [str(d) for d in range(10)],
            "parity": ["even", "odd"],
            "loop": ["open", "loop"],
        },
        info={"source": "sklearn.datasets.load_digits", "flatten": flatten},
    )


# ----------------------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype (the format's numbers are big-endian).
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed, into a native-endian numpy array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32. Compression is
    detected from the gzip magic bytes, not from the file name.

    Raises:
        AuxLossError: the file is missing, or corrupt (bad magic number, bad gzip stream, truncated or with
            trailing bytes); the message names the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AuxLossError(f"IDX file {path.absolute()} does not exist; check the path.") from None
    except OSError as exc:
        raise AuxLossError(f"Could not read IDX file {path.absolute()}: {exc}.") from None
    fix = "Re-download or re-extract it."
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise AuxLossError(
                f"IDX file {path} is a corrupt or truncated gzip file ({exc}). {fix}"
            ) from None
    if len(raw) < 4:
        raise AuxLossError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the header. {fix}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise AuxLossError(
            f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} (expected 0x0000 followed by a "
            f"type code in {[hex(c) for c in _IDX_DTYPES]} and the number of dimensions). {fix}"
        )
    ndim = raw[3]
    if ndim == 0:
        raise AuxLossError(f"IDX file {path} declares 0 dimensions; it is corrupt. {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AuxLossError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes). {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise AuxLossError(
            f"IDX file {path} is {what}: dims {dims} of {dtype.name} need {expected} bytes, the file has "
            f"{len(raw)}. {fix}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    # Copy into native byte order: callers get a writable array that torch.from_numpy accepts.
    return data.astype(dtype.newbyteorder("="), copy=True)


FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Coarse category of each garment: the auxiliary "group" label.
FASHION_MNIST_GROUPS: tuple[str, ...] = ("top", "bottom", "dress", "footwear", "bag")
FASHION_MNIST_GROUP_OF_LABEL: tuple[int, ...] = (
    0,  # T-shirt/top -> top
    1,  # Trouser -> bottom
    0,  # Pullover -> top
    2,  # Dress -> dress
    0,  # Coat -> top
    3,  # Sandal -> footwear
    0,  # Shirt -> top
    3,  # Sneaker -> footwear
    4,  # Bag -> bag
    3,  # Ankle boot -> footwear
)
_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_FASHION_HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (the Debian package puts the IDX files under "
    f"{FASHION_MNIST_DEFAULT_ROOT}/), or pass root= a folder holding the IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
    "each optionally .gz)."
)


def _fashion_candidates(root: Path, prefix: str, kind: str) -> list[Path]:
    """Where one file may be: the standard name, gzipped or not, in root or in a torchvision-style raw/."""
    ndim = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    dirs = [root, root / "raw", root / "FashionMNIST" / "raw"]
    return [d / (name + ext) for d in dirs for name in names for ext in ("", ".gz")]


def _find_fashion_file(root: Path, prefix: str, kind: str) -> Path | None:
    for p in _fashion_candidates(root, prefix, kind):
        if p.is_file():
            return p
    return None


def _check_split(split: str) -> str:
    if split not in _FASHION_PREFIX:
        hint = close_matches(str(split), _FASHION_PREFIX)
        raise AuxLossError(
            f"Fashion-MNIST split must be 'train' or 'test'; got {split!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
        )
    return split


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DEFAULT_ROOT) -> bool:
    """Whether all four Fashion-MNIST IDX files (train and test, images and labels) are under ``root``."""
    root = Path(root)
    return all(
        _find_fashion_file(root, prefix, kind) is not None
        for prefix in _FASHION_PREFIX.values()
        for kind in ("images", "labels")
    )


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_DEFAULT_ROOT,
    split: str = "train",
    *,
    flatten: bool = False,
) -> DictDataset:
    """Fashion-MNIST from IDX files on disk (60,000 train / 10,000 test 28x28 greyscale garments).

    Looks in ``root`` (then ``root/raw`` and ``root/FashionMNIST/raw``, torchvision's layout) for
    ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each raw or ``.gz``. Nothing is downloaded.

    Keys: ``"input"`` float32 ``(1, 28, 28)`` (``(784,)`` with ``flatten=True``) in [0, 1]; ``"target"`` the
    garment class (10, :data:`FASHION_MNIST_CLASSES`); ``"group"`` its coarse category (5,
    :data:`FASHION_MNIST_GROUPS`): top = {T-shirt/top, Pullover, Coat, Shirt}, bottom = {Trouser},
    dress = {Dress}, footwear = {Sandal, Sneaker, Ankle boot}, bag = {Bag}.

    Raises:
        AuxLossError: bad split; folder or files missing (naming what was looked for where, and how to get
            them); a corrupt file; images and labels that disagree.
    """
    split = _check_split(split)
    root = Path(root)
    prefix = _FASHION_PREFIX[split]
    if not root.is_dir():
        raise AuxLossError(
            f"Fashion-MNIST folder {root.absolute()} does not exist (looked for {prefix}-images-idx3-ubyte[.gz] "
            f"and {prefix}-labels-idx1-ubyte[.gz] there). {_FASHION_HOW_TO_GET}"
        )
    found = {kind: _find_fashion_file(root, prefix, kind) for kind in ("images", "labels")}
    missing = [kind for kind, p in found.items() if p is None]
    if missing:
        looked = "; ".join(
            f"{kind}: "
            + ", ".join(str(p) for p in _fashion_candidates(root.absolute(), prefix, kind)[:2])
            + " (also .gz, and under raw/ and FashionMNIST/raw/)"
            for kind in missing
        )
        raise AuxLossError(
            f"Fashion-MNIST {split} {' and '.join(missing)} not found. Looked for {looked}. "
            f"{_FASHION_HOW_TO_GET}"
        )
    images_path, labels_path = found["images"], found["labels"]
    assert images_path is not None and labels_path is not None
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise AuxLossError(
            f"{images_path} should hold uint8 images of shape (n, height, width); it holds {images.dtype} "
            f"of shape {images.shape}. Check that images and labels files are not swapped."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise AuxLossError(
            f"{labels_path} should hold one label per image ({len(images)} in {images_path.name}); it holds "
            f"shape {labels.shape}. The two files come from different splits or one is damaged."
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise AuxLossError(
            f"{labels_path} has labels outside 0-9 (min {int(labels.min())}, max {int(labels.max())}); "
            "it is not a Fashion-MNIST labels file."
        )
    x = images.astype(np.float32) / 255.0
    x = x.reshape(len(x), -1) if flatten else x[:, None]
    y = labels.astype(np.int64)
    group = np.asarray(FASHION_MNIST_GROUP_OF_LABEL, dtype=np.int64)[y]
    return DictDataset(
        {"input": x, "target": y, "group": group},
        num_classes={"target": 10, "group": len(FASHION_MNIST_GROUPS)},
        class_names={"target": FASHION_MNIST_CLASSES, "group": FASHION_MNIST_GROUPS},
        info={"source": "fashion-mnist", "split": split, "root": str(root.absolute()), "flatten": flatten},
    )


# ----------------------------------------------------------------------------------------------------------
# A user's own image folder
# ----------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    else:
        try:
            h, w = image_size  # type: ignore[misc]
            hw = (int(h), int(w))
        except (TypeError, ValueError):
            raise AuxLossError(
                f"image_size must be an int or a (height, width) pair; got {image_size!r}."
            ) from None
    if min(hw) < 1:
        raise AuxLossError(f"image_size must be positive; got {image_size!r}.")
    return hw


def load_image_folder(
    root: str | Path,
    *,
    image_size: int | Sequence[int] = (32, 32),
    grayscale: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> DictDataset:
    """Images from ``root/<class_name>/...``, one class per subfolder, read and resized with Pillow.

    Classes are the subfolder names sorted (hidden ones skipped); ``"target"`` is the index into that list
    (also ``dataset.classes``). Images are found recursively inside each class folder, matched by
    extension case-insensitively, in sorted path order. Every image is converted to RGB (or ``L`` with
    ``grayscale=True``) and resized bilinearly to ``image_size`` = (height, width), whatever its own size.

    Keys: ``"input"`` float32 ``(3 or 1, H, W)`` in [0, 1]; ``"target"`` int64 class index.

    Raises:
        AuxLossError: ``root`` is not a folder; it has no class subfolders; no images are found (naming the
            extensions looked for); a class folder holds no images; an image cannot be read.
    """
    try:
        from PIL import Image
    except ImportError:
        raise AuxLossError(
            "load_image_folder needs Pillow, which is not installed. Install it with `pip install Pillow`."
        ) from None
    height, width = _image_size_hw(image_size)
    exts = tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))
    if not exts:
        raise AuxLossError(f"extensions is empty; give at least one, e.g. {IMAGE_EXTENSIONS}.")
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise AuxLossError(
            f"Image folder {root.absolute()} {what}. Give the folder that holds one subfolder per class "
            "(root/<class_name>/*.png)."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
        extra = (
            f" It holds {len(loose)} image(s) directly; move them into one subfolder per class."
            if loose
            else ""
        )
        raise AuxLossError(
            f"Image folder {root.absolute()} has no class subfolders; expected root/<class_name>/<image>.{extra}"
        )

    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")

    files = {d.name: sorted(p for p in d.rglob("*") if is_image(p)) for d in class_dirs}
    if not any(files.values()):
        raise AuxLossError(
            f"No images found under {root.absolute()} in its class folders {sorted(files)}; looked for "
            f"files ending in {', '.join(exts)}. Pass extensions=... if yours differ."
        )
    empty = [name for name, fs in files.items() if not fs]
    if empty:
        raise AuxLossError(
            f"Class folder(s) {empty} under {root.absolute()} hold no images (looked for {', '.join(exts)}); "
            "add images or remove those folders, since an empty class cannot be learned."
        )

    classes = [d.name for d in class_dirs]
    channels = 1 if grayscale else 3
    paths: list[Path] = [p for name in classes for p in files[name]]
    targets = np.array([i for i, name in enumerate(classes) for _ in files[name]], dtype=np.int64)
    x = np.empty((len(paths), channels, height, width), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("L" if grayscale else "RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise AuxLossError(
                f"Could not read image {p.absolute()} ({exc}); delete or replace the file."
            ) from None
        x[i] = arr[None] if grayscale else arr.transpose(2, 0, 1)
    return DictDataset(
        {"input": x, "target": targets},
        num_classes={"target": len(classes)},
        class_names={"target": classes},
        info={"source": "image-folder", "root": str(root.absolute())},
    )


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


def _sklearn_installed() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: how to load it and whether it can be loaded on this machine.

    Calling the spec calls its loader: ``DATASETS["shapes"](n=500, seed=1)``.
    """

    name: str
    loader: Callable[..., DictDataset]
    description: str
    is_available: Callable[[], bool] = field(default=lambda: True)
    how_to_get: str = ""

    def __call__(self, **kwargs: Any) -> DictDataset:
        return self.loader(**kwargs)


DATASETS: dict[str, DatasetSpec] = {
    "shapes": DatasetSpec(
        "shapes",
        make_shapes,
        "Generated coloured shapes; target = shape, aux = colour/size/position/texture/mask/background.",
    ),
    "digits": DatasetSpec(
        "digits",
        load_digits_dataset,
        "scikit-learn's 8x8 handwritten digits; target = digit, aux = parity/loop.",
        _sklearn_installed,
        "`pip install scikit-learn` or `pip install auxloss[data]`",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        load_fashion_mnist,
        "Fashion-MNIST from local IDX files; target = garment, aux = group.",
        fashion_mnist_available,
        _FASHION_HOW_TO_GET,
    ),
}


def available_datasets() -> list[str]:
    """Names of the built-in datasets that can be loaded here (packages installed, files present)."""
    return [name for name, spec in DATASETS.items() if spec.is_available()]


def load_dataset(name: str, **kwargs: Any) -> DictDataset:
    """Load built-in dataset ``name`` (a key of :data:`DATASETS`) with ``kwargs`` for its loader."""
    if name not in DATASETS:
        hint = close_matches(name, DATASETS)
        raise AuxLossError(
            f"Unknown dataset {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else ".")
            + f" Built-in datasets: {sorted(DATASETS)}."
        )
    # The loaders themselves raise errors that say what is missing and how to get it.
    return DATASETS[name](**kwargs)
