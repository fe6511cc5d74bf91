"""Image decoding for the shard stage: conversions to RGB and the reasons bad inputs are rejected."""

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from pipeline import demo_data
from pipeline.images import ImageSettings, RejectedImage, decode_rgb, process_image
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


def test_an_extreme_aspect_ratio_costs_the_output_size_in_memory():
    """A 1x200000 PNG of a few hundred bytes: scaled until its short side reached 256 pixels before the crop, it
    needed 52 GB. Run under an address-space limit 64 MB above what the interpreter already holds."""
    script = textwrap.dedent("""
        import io, resource
        from PIL import Image
        from pipeline.images import ImageSettings, process_image
        thin = io.BytesIO()
        Image.new("L", (1, 200_000), 128).save(thin, "PNG")
        held = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (held + (64 << 20),) * 2)
        out = process_image(thin.getvalue(), ImageSettings(256, True, 90, 89_478_485, 1 << 20))
        print(Image.open(io.BytesIO(out)).size)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(256, 256)"


@pytest.mark.parametrize("peak", [255, 256, 65535])
def test_sixteen_bit_is_scaled_by_its_bit_depth(peak):
    """The same 16-bit value gives the same grey in every image: 255 of 65535 is black, not white."""
    grey = io.BytesIO()
    Image.fromarray(np.full((32, 32), peak, np.uint16)).save(grey, "PNG")
    assert np.asarray(decoded(process_image(grey.getvalue(), SETTINGS))).mean() == pytest.approx(peak >> 8, abs=2)


def test_exif_orientation_is_the_same_whether_kept_or_reencoded():
    """A JPEG whose EXIF says "rotate 90 degrees clockwise" is stored as displayed, with reencode true or false."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16], pixels[:, 16:] = (255, 0, 0), (0, 0, 255)  # left red, right blue: displayed top red, bottom blue
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    tagged = io.BytesIO()
    image.save(tagged, "JPEG", quality=95, exif=exif.tobytes())
    for reencode in (True, False):
        stored = decode_rgb(process_image(tagged.getvalue(), ImageSettings(32, reencode, 95, 10**8, 1 << 20)), 10**8)
        assert stored[2, 16, 0] > 200 and stored[29, 16, 2] > 200, reencode


@pytest.mark.parametrize("mode, key", [("L", 0), ("RGB", (0, 0, 0)), ("P", 0)])
def test_colour_key_transparency_becomes_white(mode, key):
    """PNG tRNS marks one grey level, colour or palette entry transparent: shown white, as alpha is."""
    image = Image.new(mode, (40, 40), 0)
    if mode == "P":
        image.putpalette([0, 0, 0])
    keyed = io.BytesIO()
    image.save(keyed, "PNG", transparency=key)
    assert np.asarray(decoded(process_image(keyed.getvalue(), SETTINGS))).min() > 245


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
