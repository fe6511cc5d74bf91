"""Bounded, robust image decoding to RGB and JPEG re-encoding; bad input becomes a RejectedImage."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.faults import BadInput


class RejectedImage(BadInput):
    """An input that cannot become a training image; the message is the reason kept in the manifest."""


@dataclass(frozen=True)
class ImageSettings:
    """What the shard stage does to each image (from DatasetConfig)."""

    image_size: int | None
    reencode: bool
    jpeg_quality: int
    max_pixels: int
    max_file_bytes: int

    @classmethod
    def from_config(cls, dataset_cfg) -> ImageSettings:
        return cls(
            dataset_cfg.image_size,
            dataset_cfg.reencode,
            dataset_cfg.jpeg_quality,
            dataset_cfg.max_pixels,
            dataset_cfg.max_file_bytes,
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: 16-bit grey by its top 8 bits, transparent pixels white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Scaled by the bit depth, never by the image's own values, so a grey level means one thing in every
        # image. Pillow's "I" holds 16-bit samples too (it scales 16-bit PGMs to 0..65535).
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), "L")
    elif image.mode == "F":
        raise RejectedImage("unsupported mode F (floating point)")
    if "transparency" in image.info:
        # A transparent palette entry, grey level or colour (PNG tRNS): made an alpha channel, handled below.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels become white, as a viewer would show them, not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred square of the image, resized to size x size."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # The square is cut in source coordinates (resize's box), so memory is bounded by the output: scaling the
    # whole image until its short side fits made a 1x200000 image 256x51200000 pixels before the crop.
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)


def _open_bounded(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise RejectedImage("empty file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its own limit; the explicit check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectedImage("not an image") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad input, not a crash
        raise RejectedImage(f"unreadable header: {type(error).__name__}: {error}") from None
    width, height = image.size
    # Checked on the header, before any pixel is decoded: this is what bounds memory.
    if width * height > max_pixels:
        raise RejectedImage(f"decompression bomb: {width}x{height} pixels exceed the limit of {max_pixels}")
    if width == 0 or height == 0:
        raise RejectedImage("zero-sized image")
    return image


def process_image(data: bytes, settings: ImageSettings) -> bytes:
    """JPEG bytes for one sample: the original (RGB JPEG, keep mode) or decoded, RGB, resized, re-encoded."""
    if len(data) > settings.max_file_bytes:
        raise RejectedImage(f"file larger than {settings.max_file_bytes} bytes")
    image = _open_bounded(data, settings.max_pixels)
    if not settings.reencode and settings.image_size and image.size != (settings.image_size, settings.image_size):
        # Kept as they are (not resized), so they must already have the size every later stage expects.
        width, height = image.size
        raise RejectedImage(f"{width}x{height} pixels, not {settings.image_size}x{settings.image_size} "
                            "(dataset.reencode is false, so images are not resized)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if settings.reencode and settings.image_size and image.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target size.
                image.draft("RGB", (settings.image_size, settings.image_size))
            image.load()
            # A JPEG that EXIF says to rotate or flip is re-encoded upright (below), as with reencode true:
            # readers show the stored pixels as they are.
            upright = image.getexif().get(ExifTags.Base.Orientation, 1) == 1
            keep_original = not settings.reencode and image.format == "JPEG" and image.mode == "RGB" and upright
            if keep_original:
                return data
            image = _to_rgb(ImageOps.exif_transpose(image))
            if settings.reencode and settings.image_size:
                image = _resize_center_crop(image, settings.image_size)
            out = io.BytesIO()
            image.save(out, "JPEG", quality=settings.jpeg_quality)
            return out.getvalue()
    except RejectedImage:
        raise
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data surfaces as many error types
        raise RejectedImage(f"corrupt image data: {type(error).__name__}: {error}") from None


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """A stored sample's image as an (H, W, 3) uint8 array, with the same bounds as the shard stage."""
    image = _open_bounded(data, max_pixels)
    try:
        return np.array(_to_rgb(image))  # a writable copy: torch.from_numpy shares it
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data surfaces as many error types
        raise RejectedImage(f"corrupt image data: {type(error).__name__}: {error}") from None
