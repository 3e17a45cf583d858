"""Image and mask loading shared by every reader, model and metric.

Images come back as (H, W, 3) uint8 RGB whatever the file holds (RGB, grayscale, RGBA, palette, 16-bit
PNG, JPEG); masks as (H, W) bool. Every failure is a :class:`~vmad.errors.DataError` naming the file.

Mask binarisation (stated once, used everywhere):

- ``mask_spec == "png"`` (MVTec AD, WFDD, MPDD, Magnetic-tile, folder masks): the mask is read as 8-bit
  grey levels (the maximum over the colour channels for colour masks, 16-bit values divided by 257) and a
  pixel is a defect when its value is ``>= MASK_THRESHOLD`` (128, i.e. above half intensity). OURS: the
  threshold matters for Magnetic-tile, whose masks hold ~0.4 % in-between values.
- ``mask_spec == "png-nonzero"`` (VisA, NEU-Seg class-id masks): a pixel is a defect when its raw value
  (palette index, class id) is ``!= 0``.
- ``mask_spec == "coco:<image id>"`` (RIAD): the image's COCO polygons / RLE are rasterised
  (:mod:`vmad.data.coco`); any category id is a defect.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from vmad.data.coco import check_coco_image, rasterize_image_mask
from vmad.data.records import Sample
from vmad.errors import DataError

MASK_THRESHOLD = 128
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def inside_root(root: str | Path, relative: str | Path, what: str | Path) -> Path:
    """``root / relative`` for a path read from a data file (``what``, named in the error); DataError unless
    it stays inside ``root``: an absolute path, ``..`` segments leaving ``root`` and symlinks pointing out
    of it are refused (the joined path is resolved, symlinks included, then checked against the resolved
    ``root``). Returns the joined, unresolved path."""
    root = Path(root)
    text = str(relative)
    if not text.strip() or "\x00" in text:
        raise DataError(what, f"empty or invalid path {text!r}")
    rel = Path(text)
    if rel.is_absolute() or rel.drive or rel.root:
        raise DataError(what, f"path {text!r} is absolute; paths must be relative to {root}")
    joined = root / rel
    try:
        real_root = root.resolve()
        real = joined.resolve()
    except (OSError, RuntimeError) as exc:
        raise DataError(what, f"path {text!r} cannot be resolved ({exc})") from None
    if not real.is_relative_to(real_root):
        raise DataError(what, f"path {text!r} leaves the dataset folder {root}")
    return joined


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (truncated files fail here, not later: PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is held False while decoding)."""
    with _decoding(path), Image.open(path) as im:
        im.load()
        return im.copy()


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Decode strictly (PIL's ``LOAD_TRUNCATED_IMAGES`` held False) and turn PIL's errors into a DataError
    naming ``path``."""
    if not path.is_file():
        raise DataError(path, "file not found")
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image file") from None
    except _READ_ERRORS as exc:
        raise DataError(path, f"unreadable or truncated image ({exc})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def reduction_factor(height: int, width: int, max_pixels: int | None) -> int:
    """The smallest integer factor ``f >= 1`` with ``ceil(H / f) * ceil(W / f) <= max_pixels`` (1 when the
    image is at or below the limit, or ``max_pixels`` is None)."""
    if max_pixels is None or height * width <= max_pixels:
        return 1
    f = max(1, math.ceil(math.sqrt(height * width / max(1, max_pixels))))
    while math.ceil(height / f) * math.ceil(width / f) > max_pixels:
        f += 1
    return f


def reduce_image(im: Image.Image, max_pixels: int | None) -> Image.Image:
    """``im`` reduced by :func:`reduction_factor` (box average, ``Image.reduce``); ``im`` itself when it is
    at or below ``max_pixels``. Modes ``reduce`` cannot handle (palette, 16-bit) go through RGB first."""
    factor = reduction_factor(im.height, im.width, max_pixels)
    if factor == 1:
        return im
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    try:
        return im.reduce(factor)
    except ValueError:
        return Image.fromarray(to_rgb_array(im)).reduce(factor)


def read_image_bounded(path: str | Path, max_pixels: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixels, (H, W))``: the image as (h, w, 3) uint8 RGB with ``h * w <= max_pixels``, and its size in
    the file. At or below the limit the pixels are exactly :func:`read_image`'s. Above it the image is
    decoded at a reduced size: JPEG via ``Image.draft`` (the decoder's own 1/2, 1/4, 1/8 scaling), then
    every format is box-reduced by an integer factor (:func:`reduce_image`), so no full-size copy is kept.
    DataError naming the file when it cannot be read."""
    path = Path(path)
    with _decoding(path), Image.open(path) as im:
        width, height = im.size
        if reduction_factor(height, width, max_pixels) == 1:
            im.load()
            return to_rgb_array(im.copy()), (height, width)
        if im.format == "JPEG":
            factor = reduction_factor(height, width, max_pixels)
            im.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        im.load()
        small = reduce_image(im, max_pixels)
        small = im.copy() if small is im else small
    return to_rgb_array(small), (height, width)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image file") from None
    except _READ_ERRORS as exc:
        raise DataError(path, f"unreadable image header ({exc})") from None
    return height, width


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit integer, treated as 16-bit) values to 0..255: divide by 257 and round."""
    return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode to (H, W, 3) uint8 RGB. Alpha is dropped (not composited)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_to_eight(np.asarray(im))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Fully decode an image file to (H, W, 3) uint8 RGB; DataError naming the file when it cannot."""
    path = Path(path)
    return to_rgb_array(open_image(path))


def _mask_grey(im: Image.Image) -> np.ndarray:
    """8-bit grey levels of a mask image (max over colour channels; alpha ignored)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(np.asarray(im))
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    if im.mode == "LA":
        return np.asarray(im)[:, :, 0]
    return to_rgb_array(im).max(axis=2)


def _mask_raw_nonzero(im: Image.Image) -> np.ndarray:
    """Pixels whose raw value (class id, palette index) is not 0."""
    arr = np.asarray(im)
    if im.mode == "LA":
        arr = arr[:, :, 0]
    elif arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2)
    return arr != 0


def binarize_mask_file(path: Path, spec: str = "png") -> np.ndarray:
    """Decode a mask file and binarise it by ``spec`` (see the module docstring)."""
    im = open_image(path)
    if spec == "png":
        return _mask_grey(im) >= MASK_THRESHOLD
    if spec == "png-nonzero":
        return _mask_raw_nonzero(im)
    raise DataError(path, f"unknown mask spec {spec!r}")


def mask_is_blank(path: Path, spec: str = "png") -> bool:
    """True when the mask file has no defect pixel (used to label by mask content)."""
    return not bool(binarize_mask_file(path, spec).any())


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if mask.shape == (height, width):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(im) >= MASK_THRESHOLD


def _size_mismatch(mask_path: Path, mask_hw: tuple[int, int], image_path: Path, image_hw: tuple[int, int]):
    return DataError(
        mask_path,
        f"mask size {mask_hw[1]}x{mask_hw[0]} differs from image {image_path} "
        f"size {image_hw[1]}x{image_hw[0]}",
    )


def read_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """Binary (H, W) ground-truth mask of ``sample``; all False for a sample without a mask.

    ``size`` is (height, width): the mask is resized to it with nearest-neighbour sampling. Without it the
    mask has the image's size. A mask whose size differs from its image's is a DataError naming both files.
    """
    image_hw = image_shape(sample.image_path)
    if sample.mask_path is None:
        mask = np.zeros(image_hw, dtype=bool)
    elif sample.mask_spec.startswith("coco:"):
        mask = rasterize_image_mask(sample.mask_path, sample.mask_spec, image_hw, sample.image_path) != 0
    else:
        mask = binarize_mask_file(sample.mask_path, sample.mask_spec)
        if mask.shape != image_hw:
            raise _size_mismatch(sample.mask_path, mask.shape, sample.image_path, image_hw)
    return mask if size is None else _resize_mask(mask, size)


def check_sample(sample: Sample, decode: bool = False) -> None:
    """Check that a sample's files are usable; DataError naming the file otherwise.

    Without ``decode`` only the headers are read (identifiable images, image/mask sizes agree); with it
    image and mask are fully decoded, which also catches truncated files.
    """
    if decode:
        image_hw = read_image(sample.image_path).shape[:2]
    else:
        image_hw = image_shape(sample.image_path)
    if sample.mask_path is None:
        return
    if sample.mask_spec.startswith("coco:"):
        check_coco_image(sample.mask_path, sample.mask_spec, image_hw, sample.image_path, full=decode)
        return
    if decode:
        mask_hw = binarize_mask_file(sample.mask_path, sample.mask_spec).shape
    else:
        mask_hw = image_shape(sample.mask_path)
    if tuple(mask_hw) != tuple(image_hw):
        raise _size_mismatch(sample.mask_path, tuple(mask_hw), sample.image_path, tuple(image_hw))
