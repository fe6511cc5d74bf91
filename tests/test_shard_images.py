"""Image decoding for the shard stage: conversions to RGB and the reasons bad inputs are rejected."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import demo_data
from pipeline.images import ImageSettings, RejectedImage, process_image
from pipeline.storage import Location

SETTINGS = ImageSettings(image_size=32, reencode=True, jpeg_quality=90, max_pixels=89_478_485, max_file_bytes=1 << 20)
BAD = demo_data.bad_files(120, 90)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated.jpg", "corrupt image data"),
        ("zero-byte.jpg", "empty file"),
        ("notes.txt", "not an image"),
        ("corrupt.jpg", "unreadable header"),
        ("bomb.png", "decompression bomb: 10000x10000 pixels exceed the limit"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(name, reason):
    with pytest.raises(RejectedImage, match=reason):
        process_image(BAD[name], SETTINGS)


@pytest.mark.parametrize("name", ["cmyk.jpg", "grey16.png", "grey.png", "alpha.png"])
def test_odd_modes_become_rgb_at_the_configured_size(name):
    image = decoded(process_image(BAD[name], SETTINGS))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def test_sixteen_bit_keeps_its_range():
    grey = np.asarray(decoded(process_image(BAD["grey16.png"], SETTINGS)))
    assert grey.max() > 128  # the top 8 bits, not everything clipped to 255
    assert grey.min() < 250


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    out = io.BytesIO()
    clear.save(out, "PNG")
    assert np.asarray(decoded(process_image(out.getvalue(), SETTINGS))).min() > 245


def test_too_large_files_are_rejected():
    settings = ImageSettings(32, True, 90, 89_478_485, max_file_bytes=100)
    with pytest.raises(RejectedImage, match="larger than 100 bytes"):
        process_image(BAD["cmyk.jpg"], settings)


def test_center_crop_of_a_wide_image():
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 100, 100))  # left third blue: cropped away
    out = io.BytesIO()
    wide.save(out, "PNG")
    pixels = np.asarray(decoded(process_image(out.getvalue(), SETTINGS)))
    assert pixels.shape == (32, 32, 3) and pixels[..., 0].min() > 200


def test_keep_original_bytes_of_rgb_jpegs_only():
    keep = ImageSettings(None, False, 90, 89_478_485, 1 << 20)
    rgb_jpeg = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(rgb_jpeg, "JPEG")
    assert process_image(rgb_jpeg.getvalue(), keep) == rgb_jpeg.getvalue()
    converted = decoded(process_image(BAD["alpha.png"], keep))
    assert (converted.format, converted.mode, converted.size) == ("JPEG", "RGB", (120, 90))


def test_kept_images_of_another_size_are_rejected_with_a_reason():
    """With reencode false nothing is resized, so an image must already have image_size: never passed on."""
    keep_32 = ImageSettings(32, False, 90, 89_478_485, 1 << 20)
    for size, mode, image_format in (((32, 32), "RGB", "JPEG"), ((32, 32), "RGBA", "PNG")):
        right = io.BytesIO()
        Image.new(mode, size, (10, 200, 30)).save(right, image_format)
        kept = decoded(process_image(right.getvalue(), keep_32))
        assert (kept.format, kept.size) == ("JPEG", (32, 32))
    for size, mode, image_format in (((50, 40), "RGB", "JPEG"), ((32, 33), "RGB", "JPEG"), ((64, 64), "RGBA", "PNG")):
        wrong = io.BytesIO()
        Image.new(mode, size, (10, 200, 30)).save(wrong, image_format)
        with pytest.raises(RejectedImage, match=rf"{size[0]}x{size[1]} pixels, not 32x32 \(dataset.reencode is false"):
            process_image(wrong.getvalue(), keep_32)


def test_synthetic_corpus_is_deterministic(tmp_path):
    first, second = Location(str(tmp_path / "a")), Location(str(tmp_path / "b"))
    demo_data.synthetic(first, per_class=2, val_per_class=1, size=(40, 30), classes=3, with_bad_files=True)
    demo_data.synthetic(second, per_class=2, val_per_class=1, size=(40, 30), classes=3, with_bad_files=True)
    assert first.list_files() == second.list_files()
    assert len(first.list_files()) == 3 * 3 + len(BAD)
    for key in first.list_files():
        with open(f"{first.path}/{key}", "rb") as a, open(f"{second.path}/{key}", "rb") as b:
            assert a.read() == b.read()
