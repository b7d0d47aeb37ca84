"""Reading the offline attack's input: an .npz of images + labels, or a folder of PNG/JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SUFFIXES = {".png", ".jpg", ".jpeg"}


class InputError(ValueError):
    """Raised when the image input is missing, unreadable or not in the documented form."""


def load_images(path: str | Path, *, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Return images (N, C, H, W) float32 in [0, 1] and labels (N,) int64.

    A folder with sub-folders is read as one class per sub-folder (sorted names); a
    flat folder gives its files (in name order) labels 0, 1, 2, ... cycling through
    `num_classes`, so consecutive batches have distinct labels.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"images not found: {p}")
    images, labels = _npz(p) if p.is_file() else _folder(p, num_classes)
    _check(images, labels, num_classes)
    return images, labels


def _npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise InputError(f"{p} lacks array(s) {sorted(missing)}; it has {sorted(z.files)}")
            return np.asarray(z["images"]), np.asarray(z["labels"])
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{p} is not a readable .npz file: {exc}") from None


def _folder(p: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(d for d in p.iterdir() if d.is_dir())
    if classes:
        files = [(f, i) for i, d in enumerate(classes) for f in sorted(d.iterdir()) if f.suffix.lower() in SUFFIXES]
    else:
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES)
        files = [(f, i % num_classes) for i, f in enumerate(found)]
    if not files:
        raise InputError(f"no PNG/JPEG images in {p}")
    arrays = [_read(f) for f, _ in files]
    grey = all(a.ndim == 2 for a in arrays)
    arrays = [a[None] if grey else _rgb(a).transpose(2, 0, 1) for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"images in {p} differ in size: {sorted(shapes)[:3]}")
    return np.stack(arrays).astype(np.float32) / 255.0, np.array([c for _, c in files], dtype=np.int64)


def _read(f: Path) -> np.ndarray:
    try:
        with Image.open(f) as im:
            grey = im.mode in ("1", "L", "I", "I;16")
            return np.asarray(im.convert("L") if grey else im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {f}: {exc}") from None


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def _check(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.ndim != 4:
        raise InputError(f"images must be N x C x H x W, got shape {images.shape}")
    if images.shape[1] not in (1, 3):
        raise InputError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"images must be float (values in [0, 1]), got {images.dtype}")
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise InputError("image values must be finite and in [0, 1]")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be N integers, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
