"""Input images for ``run``: an image file, a folder of them, or seeded random tensors.

Files are decoded with PIL (PNG, JPEG, ...), converted to RGB (or L for one-channel models),
resized so the shorter side is ``size / 0.875`` and centre-cropped to the model's input, then
normalised with the ImageNet mean and standard deviation: torchvision's usual evaluation
transform, done by hand so no transform object has to agree across versions.  All images are
loaded on rank 0 before any tile moves, so a bad file is reported before the run starts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .failure import RunError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def preprocess(img, chw: tuple[int, int, int]) -> torch.Tensor:
    """A PIL image -> normalised ``1 x C x H x W`` float32 tensor."""
    from PIL import Image

    c, h, w = chw
    if c not in (1, 3):
        raise RunError(f"the model takes {c}-channel input; image files give 1 (grey) or 3 (RGB)")
    img = img.convert("RGB" if c == 3 else "L")
    scale = max(h, w) / 0.875 / min(img.size)
    size = (max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale)))
    img = img.resize(size, Image.BILINEAR)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean = np.asarray(MEAN if c == 3 else (float(np.mean(MEAN)),), np.float32)[:, None, None]
    std = np.asarray(STD if c == 3 else (float(np.mean(STD)),), np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((a - mean) / std))[None]


def load_image(path: str | Path, chw: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise RunError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            return preprocess(img, chw)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, RunError):
            raise
        raise RunError(f"cannot read image {str(path)!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}") from None


def image_files(folder: str | Path) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise RunError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise RunError(f"image folder {str(folder)!r} holds no image files "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def random_images(n: int, chw: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
    if n < 1:
        raise RunError(f"--images must be at least 1, got {n}")
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randn(1, *chw, generator=g) for _ in range(n)]


def load_inputs(chw: tuple[int, int, int], image: str | None, image_dir: str | None,
                n_random: int | None, seed: int) -> tuple[list[torch.Tensor], list[str]]:
    """(tensors, labels) for whichever input option was given (default: one random image)."""
    if image:
        return [load_image(image, chw)], [str(image)]
    if image_dir:
        files = image_files(image_dir)
        return [load_image(f, chw) for f in files], [str(f) for f in files]
    n = 1 if n_random is None else n_random
    return random_images(n, chw, seed), [f"random#{i}" for i in range(n)]
