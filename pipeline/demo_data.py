"""Demo corpora in ImageNet layout: Fashion-MNIST from its Debian package, or synthetic shapes and bad files."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.progress import Progress
from pipeline.storage import Location

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross")


class MissingDataError(RuntimeError):
    """The files a demo source needs are not installed."""


def fashion_mnist_dir() -> Path:
    """The folder of the four Fashion-MNIST idx files, or a MissingDataError that says how to install them."""
    candidates = [os.environ["FASHION_MNIST_DIR"]] if "FASHION_MNIST_DIR" in os.environ else []
    for folder in map(Path, candidates + list(FASHION_MNIST_DIRS)):
        if (folder / "train-images-idx3-ubyte.gz").exists():
            return folder
    raise MissingDataError(
        "Fashion-MNIST is not installed. Install it with:\n"
        "    sudo apt-get install dataset-fashion-mnist\n"
        "(Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist), or set FASHION_MNIST_DIR to a folder "
        "holding train-images-idx3-ubyte.gz and the three other idx files; or use --source synthetic."
    )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        return np.frombuffer(stream.read(), dtype=np.uint8, offset=offset)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def fashion_mnist(out: Location, per_class: int, val_per_class: int, size: int = 32) -> int:
    """Write Fashion-MNIST as `train|val/<class>/<id>.png`, padded to `size` and RGB; returns the file count."""
    folder = fashion_mnist_dir()
    written = 0
    for split, prefix, count in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        progress = Progress(f"demo-data fashion-mnist {split}", count * len(FASHION_MNIST_CLASSES))
        pad = max(size - 28, 0)
        for label, name in enumerate(FASHION_MNIST_CLASSES):
            for index in np.flatnonzero(labels == label)[:count]:
                grey = np.pad(images[index], ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
                rgb = Image.fromarray(grey, "L").convert("RGB")
                (out / f"{split}/{name}/{prefix}-{index:05d}.png").write_bytes(_png(rgb))
                written += 1
                progress.advance(1, 1)
    return written


def _shape(class_name: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One deterministic labelled image: a textured background and the class's shape or pattern."""
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (height, width, 1))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, 3)) % 256)
    short = min(width, height)
    r = int(short * rng.uniform(0.2, 0.4))
    cx, cy = int(width * rng.uniform(0.35, 0.65)), int(height * rng.uniform(0.35, 0.65))
    step = max(2, int(short * rng.uniform(0.06, 0.15)))
    if class_name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif class_name == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif class_name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif class_name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(1, r // 3))
    elif class_name == "cross":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    elif class_name == "hstripes":
        for y in range(0, height, 2 * step):
            draw.rectangle((0, y, width, y + step - 1), fill=colour)
    elif class_name == "vstripes":
        for x in range(0, width, 2 * step):
            draw.rectangle((x, 0, x + step - 1, height), fill=colour)
    else:  # checker
        for y in range(0, height, step):
            for x in range((y // step % 2) * step, width, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    return image


def bad_files(width: int, height: int) -> dict[str, bytes]:
    """Files that exercise the shard stage's input handling, by name: rejected ones and ones it converts."""
    rng = np.random.default_rng(0)
    photo = _shape("circle", rng, width, height)
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    cmyk = io.BytesIO()
    photo.convert("CMYK").save(cmyk, "JPEG")
    deep = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    bomb = io.BytesIO()
    # 10000 x 10000 one-bit pixels: a 12 kB file that would decode to 100 M pixels.
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG", optimize=True)
    return {
        # rejected
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "zero-byte.jpg": b"",
        "notes.txt": b"this is not an image\n",
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + rng.bytes(2000),
        "bomb.png": bomb.getvalue(),
        "bad name \u00e9.png": _png(photo),
        # converted to RGB and accepted
        "cmyk.jpg": cmyk.getvalue(),
        "grey16.png": _png(Image.fromarray(deep)),
        "grey.png": _png(photo.convert("L")),
        "alpha.png": _png(photo.convert("RGBA")),
    }


REJECTED_BAD_FILES = ("truncated.jpg", "zero-byte.jpg", "notes.txt", "corrupt.jpg", "bomb.png", "bad name \u00e9.png")


def synthetic(
    out: Location,
    per_class: int,
    val_per_class: int,
    size: tuple[int, int] = (64, 64),
    classes: int = len(SYNTHETIC_CLASSES),
    image_format: str = "jpg",
    with_bad_files: bool = False,
    first_index: int = 0,
) -> int:
    """Write `train|val/<class>/<id>.<format>` of deterministic shapes; image i of a class is always the same.
    `first_index` lets a corpus grow: indices first_index .. first_index+per_class-1 are written."""
    width, height = size
    names = SYNTHETIC_CLASSES[:classes]
    written = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        progress = Progress(f"demo-data synthetic {split}", count * len(names))
        for label, name in enumerate(names):
            for index in range(first_index, first_index + count):
                seed = [label, index, 0 if split == "train" else 1]
                image = _shape(name, np.random.default_rng(seed), width, height)
                data = io.BytesIO()
                image.save(data, "JPEG" if image_format == "jpg" else "PNG", quality=90)
                (out / f"{split}/{name}/{split}-{index:06d}.{image_format}").write_bytes(data.getvalue())
                written += 1
                progress.advance(1, 1)
    if with_bad_files:
        for file_name, data in bad_files(width, height).items():
            # Written by name on purpose (unsafe names included): the stage must reject them, not the writer.
            target = Location(f"{out.uri}/train/{names[0]}/{file_name}", out.endpoint_url, out.region)
            target.fs.pipe_file(target.path, data)
            written += 1
    return written
