"""A user's own image folder, ``root/<class_name>/...``, read from disk one image at a time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from auxloss.errors import AuxLossError
from auxloss.zoo.data.common import DataRequest, DictDataset, LazyColumn, split_dataset

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "folder_splits", "image_to_tensor", "load_image_folder"]

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


def image_to_tensor(image: Any, height: int, width: int, grayscale: bool) -> Tensor:
    """A PIL image as float32 ``(3 or 1, height, width)`` in [0, 1]: converted to RGB (or ``L``), resized
    bilinearly when its size differs, then ``pixel / 255``. Every image source (folders, Hugging Face datasets)
    reads its images through this, so the same picture gives the same tensor whichever way it was stored."""
    Image = _pillow()
    im = image.convert("L" if grayscale else "RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.BILINEAR)  # type: ignore[attr-defined]
    arr = np.asarray(im, dtype=np.float32) / 255.0
    chw = arr[None] if grayscale else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))


def _pillow() -> object:
    try:
        from PIL import Image
    except ImportError:
        raise AuxLossError(
            "Reading images needs Pillow, which is not installed. Install it with `pip install Pillow`."
        ) from None
    return Image


class ImageFiles(LazyColumn):
    """Image files decoded when read: each converted to RGB (or ``L``) and resized bilinearly to (H, W).

    Only the paths are held, so a folder of any size costs a few bytes per image until it is read, and the
    column pickles cheaply into ``DataLoader`` worker processes.
    """

    def __init__(self, paths: Sequence[Path], height: int, width: int, grayscale: bool) -> None:
        self.paths = tuple(Path(p) for p in paths)
        self.height, self.width, self.grayscale = int(height), int(width), bool(grayscale)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 1 if self.grayscale else 3, self.height, self.width))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def load(self, index: int) -> Tensor:
        Image = _pillow()
        p = self.paths[index]
        try:
            with Image.open(p) as im:  # type: ignore[attr-defined]
                return image_to_tensor(im, self.height, self.width, self.grayscale)
        except (OSError, ValueError) as exc:
            raise AuxLossError(
                f"Could not read image {p.absolute()} ({exc}); delete or replace the file."
            ) from None

    def take(self, indices: Tensor) -> ImageFiles:
        return ImageFiles([self.paths[i] for i in indices.tolist()], self.height, self.width, self.grayscale)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self.paths)} files, {tuple(self.shape[1:])})"


def load_image_folder(
    root: str | Path,
    *,
    image_size: int | Sequence[int] = (32, 32),
    grayscale: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    verify: bool = True,
) -> DictDataset:
    """Images from ``root/<class_name>/...``, one class per subfolder, read and resized with Pillow.

    Classes are the subfolder names sorted (hidden ones skipped); ``"target"`` is the index into that list
    (also ``dataset.classes``). Images are found recursively inside each class folder, matched by
    extension case-insensitively, in sorted path order. Every image is converted to RGB (or ``L`` with
    ``grayscale=True``) and resized bilinearly to ``image_size`` = (height, width), whatever its own size.

    The images are streamed: ``"input"`` is an :class:`ImageFiles` column that decodes an image when its
    item is read, so memory holds the paths and labels only. With ``verify=True`` (the default) every file's
    header is opened once here, without decoding its pixels, so a file that is not an image fails now rather
    than hours into training; ``verify=False`` skips that pass for very large folders.

    Keys: ``"input"`` float32 ``(3 or 1, H, W)`` in [0, 1]; ``"target"`` int64 class index.

    Raises:
        AuxLossError: ``root`` is not a folder; it has no class subfolders; no images are found (naming the
            extensions looked for); a class folder holds no images; an image cannot be read.
    """
    Image = _pillow()
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
    paths: list[Path] = [p for name in classes for p in files[name]]
    targets = np.array([i for i, name in enumerate(classes) for _ in files[name]], dtype=np.int64)
    if verify:
        for p in paths:
            try:
                # open() reads the header only; the pixels are decoded in ImageFiles.load.
                with Image.open(p):  # type: ignore[attr-defined]
                    pass
            except (OSError, ValueError) as exc:
                raise AuxLossError(
                    f"Could not read image {p.absolute()} ({exc}); delete or replace the file."
                ) from None
    return DictDataset(
        {"input": ImageFiles(paths, height, width, grayscale), "target": targets},
        num_classes={"target": len(classes)},
        class_names={"target": classes},
        info={"source": "image-folder", "root": str(root.absolute())},
    )


def folder_splits(request: DataRequest) -> dict[str, DictDataset]:
    """The registry's builder: disjoint random train/val/test subsets of one image folder."""
    if not request.root:
        raise AuxLossError("data.name 'folder' needs data.root: the folder holding one subfolder per class.")
    full = load_image_folder(request.root, **request.params)
    return split_dataset(full, None, request.n_train, request.n_val, request.n_test, request.seed, "folder")
