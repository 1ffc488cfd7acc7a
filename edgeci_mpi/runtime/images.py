"""Input images for ``run``: an image file, a folder of them, or seeded random tensors.

Files are decoded with PIL (PNG, JPEG, ...), converted to RGB (or L for one-channel models),
resized so the shorter side is ``size / 0.875`` and centre-cropped to the model's input, then
normalised with the ImageNet mean and standard deviation: torchvision's usual evaluation
transform, done by hand so no transform object has to agree across versions.

An :class:`ImageStream` hands images out one at a time, so a stream of thousands keeps one in
memory.  Files are all decoded once on rank 0 before any tile moves (so a bad file is reported
before the run starts) and decoded again when their turn comes; random image ``i`` comes from
its own seed, so a resumed stream can start anywhere and get the same images.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .failure import RunError

#: PIL modes converted to RGB or grey without loss or guessing: bilevel, 8-bit grey, palette,
#: RGB and its YCbCr form (JPEG).  Anything else is refused by :func:`check_image`.
READABLE_MODES = {"1", "L", "P", "RGB", "YCbCr"}
_MODE_WORDS = {"RGBA": "an alpha channel", "LA": "an alpha channel", "PA": "an alpha channel",
               "RGBa": "an alpha channel", "La": "an alpha channel", "CMYK": "CMYK colour",
               "I": "32-bit integer pixels", "F": "floating-point pixels",
               **dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N"), "16-bit pixels")}
#: An image upscaled more than this to reach the model's input is refused as too small.
MAX_UPSCALE = 4.0
#: Pixels of the largest image read (a 64-megapixel photo; its RGB decode takes 192 MB).
#: Checked from the header before anything is decoded, so a decompression bomb - a small file
#: that claims a huge image - costs nothing; below PIL's own bomb limit (89 Mpx), so PIL
#: never warns about an image that is read.
MAX_PIXELS = 64_000_000
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


def check_image(img, path: str | Path, chw: tuple[int, int, int]) -> None:
    """Refuse what the RGB/grey conversion would get wrong instead of guessing: an alpha
    channel (what lies under transparent pixels is arbitrary), CMYK (needs the file's colour
    profile), 16-bit, integer or float pixels (PIL's conversion to 8 bits clips them), and an
    image so small that it would be upscaled more than :data:`MAX_UPSCALE` times."""
    name = repr(str(path))
    if img.mode not in READABLE_MODES:
        what = _MODE_WORDS.get(img.mode, f"{img.mode} pixels")
        raise RunError(f"image {name} has {what} (PIL mode {img.mode}); edgeci-mpi reads 8-bit "
                       "RGB or greyscale images: convert it first")
    _, h, w = chw
    px = img.size[0] * img.size[1]
    if px > MAX_PIXELS:
        raise RunError(f"image {name} is {img.size[0]}x{img.size[1]} ({px / 1e6:.0f} "
                       f"megapixels), more than edgeci-mpi reads ({MAX_PIXELS / 1e6:.0f}): "
                       "shrink it first (or it is a decompression bomb)")
    need = math.ceil(max(h, w) / 0.875 / MAX_UPSCALE)
    if min(img.size) < need:
        raise RunError(f"image {name} is {img.size[0]}x{img.size[1]}, too small for the "
                       f"model's {h}x{w} input (it would be upscaled more than "
                       f"{MAX_UPSCALE:.0f}x; the shorter side needs at least {need} px)")


def load_image(path: str | Path, chw: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise RunError(f"image {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # sizes are checked here, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
        with img:
            check_image(img, path, chw)  # header only: mode and size
            img.load()
            return preprocess(img, chw)
    except Image.DecompressionBombError as e:  # over twice PIL's limit: refused at open
        raise RunError(f"image {str(path)!r} is too large to read (decompression bomb?): "
                       f"{str(e).split('.')[0]}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
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


def random_image(i: int, chw: tuple[int, int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + 1_000_003 * seed + i)
    return torch.randn(1, *chw, generator=g)


class ImageStream:
    """The run's images, by index: ``len``, ``labels`` and ``image(i)``."""

    def __init__(self, chw: tuple[int, int, int], labels: list[str],
                 files: list[Path] | None, seed: int):
        self.chw, self.labels, self.files, self.seed = chw, labels, files, seed

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        if self.files is not None:
            return load_image(self.files[i], self.chw)
        return random_image(i, self.chw, self.seed)

    def __iter__(self):
        return (self.image(i) for i in range(len(self)))


def load_inputs(chw: tuple[int, int, int], image: str | None, image_dir: str | None,
                n_random: int | None, seed: int) -> ImageStream:
    """The stream for whichever input option was given (default: one random image); every
    file is decoded once here, so a bad one is refused now."""
    if image or image_dir:
        files = [Path(image)] if image else image_files(image_dir)
        for f in files:
            load_image(f, chw)
        return ImageStream(chw, [str(f) for f in files], files, seed)
    n = 1 if n_random is None else n_random
    if n < 1:
        raise RunError(f"--images must be at least 1, got {n}")
    return ImageStream(chw, [f"random#{i}" for i in range(n)], None, seed)
