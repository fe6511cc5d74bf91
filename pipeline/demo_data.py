"""Demo corpora in ImageNet layout: Fashion-MNIST (installed, or downloaded and checksummed), or synthetic shapes."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.progress import Progress
from pipeline.storage import Location

log = logging.getLogger("vq2")

# Where Fashion-MNIST is looked for, in order: $FASHION_MNIST_DIR, the Debian package's folders, the download cache.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # the data set's own (torchvision's)
FASHION_MNIST_URL_ENV = "FASHION_MNIST_URL"  # another base URL: a mirror
# sha256 of each file's decompressed content. Compressed bytes differ between sources (the Debian package
# recompressed the upstream .gz files, whose published MD5s, 8d4fb7e6... for the training images, it does not
# match), the content does not: its MD5s are the published ones of the decompressed files (f4a8712d...).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Bytes of each decompressed file: no more is ever decompressed, for a gzip of a few hundred kilobytes (from a
# mirror, a download or FASHION_MNIST_DIR) can expand to gigabytes.
FASHION_MNIST_SIZES = {
    "train-images-idx3-ubyte.gz": 47_040_016,
    "train-labels-idx1-ubyte.gz": 60_008,
    "t10k-images-idx3-ubyte.gz": 7_840_016,
    "t10k-labels-idx1-ubyte.gz": 10_008,
}
_SIZE_BY_SHA256 = {FASHION_MNIST_FILES[name]: size for name, size in FASHION_MNIST_SIZES.items()}
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross")
SYNTHETIC_WARNING = ("the demo runs on the synthetic corpus (shapes and textures): its results will not be "
                     "meaningful (reconstructions, samples and metrics of a toy corpus); install Fashion-MNIST "
                     "(see above) and run it again on a fresh storage root")


class MissingDataError(RuntimeError):
    """The files a demo source needs are not installed and cannot be downloaded."""


class ChecksumError(RuntimeError):
    """A Fashion-MNIST file whose content is not the published data set's."""


def fashion_mnist_cache() -> Path:
    """The folder downloads go to: $XDG_CACHE_HOME/vq2/fashion-mnist (default ~/.cache/vq2/fashion-mnist)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vq2" / "fashion-mnist"


def verified_content(path: Path, expected_sha256: str) -> bytes:
    """The decompressed bytes of one Fashion-MNIST file, or a ChecksumError naming the file and both digests
    (or, for a file that decompresses to more than the published one, its size)."""
    limit = _SIZE_BY_SHA256[expected_sha256]
    digest = hashlib.sha256()
    content = bytearray()
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):  # decompressed a chunk at a time: the limit bounds the memory
                digest.update(chunk)
                content += chunk
                if len(content) > limit:
                    raise ChecksumError(f"{path}: decompresses to more than {limit} bytes, the size of the published "
                                        "Fashion-MNIST file: the file is corrupt or another data set")
    except (OSError, EOFError) as error:
        raise ChecksumError(f"{path}: not a readable gzip file ({error})") from None
    if (found := digest.hexdigest()) != expected_sha256:
        raise ChecksumError(f"{path}: content sha256 {found}, expected {expected_sha256} (the published "
                            "Fashion-MNIST): the file is corrupt or another data set")
    return bytes(content)


def download_fashion_mnist(folder: Path, base_url: str | None = None) -> Path:
    """Download the files missing from `folder` from `base_url` (default $FASHION_MNIST_URL, else the data
    set's own), each checked before it is moved into place, so the folder never holds a corrupt file."""
    base_url = (base_url or os.environ.get(FASHION_MNIST_URL_ENV) or FASHION_MNIST_URL).rstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    for name, sha256 in FASHION_MNIST_FILES.items():
        if (folder / name).is_file():
            continue
        url = f"{base_url}/{name}"
        log.info("demo-data: downloading %s", url)
        partial = folder / f".{name}.partial"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
            verified_content(partial, sha256)
        except (urllib.error.URLError, OSError) as error:
            partial.unlink(missing_ok=True)
            raise MissingDataError(f"Fashion-MNIST: cannot download {url}: {error}") from None
        except ChecksumError as error:
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: {error}") from None
        os.replace(partial, folder / name)
    return folder


def fashion_mnist_dir(folders: tuple[str, ...] | None = None, cache: Path | None = None) -> Path:
    """The folder of the four Fashion-MNIST files: $FASHION_MNIST_DIR if set (it must hold them), else the
    first of `folders` (the Debian package's) that does, else the download cache, downloading what it lacks.

    No network and nothing installed is a MissingDataError that says how to install the files.
    """
    if os.environ.get("FASHION_MNIST_DIR"):
        folder = Path(os.environ["FASHION_MNIST_DIR"])
        missing = [name for name in FASHION_MNIST_FILES if not (folder / name).is_file()]
        if missing:
            raise MissingDataError(f"FASHION_MNIST_DIR={folder} lacks {', '.join(missing)}")
        return folder
    for folder in map(Path, FASHION_MNIST_DIRS if folders is None else folders):
        if all((folder / name).is_file() for name in FASHION_MNIST_FILES):
            return folder
    cache = cache or fashion_mnist_cache()
    try:
        return download_fashion_mnist(cache)
    except MissingDataError as error:
        raise MissingDataError(
            f"Fashion-MNIST is not installed and the download failed ({error}). Install it with:\n"
            "    sudo apt-get install dataset-fashion-mnist\n"
            "(Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist), or put the four files (from "
            f"{FASHION_MNIST_URL} or a mirror named by ${FASHION_MNIST_URL_ENV}) in {cache}, or set "
            "FASHION_MNIST_DIR to a folder holding them; or use --source synthetic."
        ) from None


def _idx(folder: Path, name: str, offset: int) -> np.ndarray:
    return np.frombuffer(verified_content(folder / name, FASHION_MNIST_FILES[name]), dtype=np.uint8, offset=offset)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def fashion_mnist(out: Location, per_class: int | None, val_per_class: int | None, size: int = 32,
                  folder: Path | None = None) -> int:
    """Write Fashion-MNIST as `train|val/<class>/<id>.png` (val: the 10,000 test images), padded to `size`
    and RGB: the first `per_class` (`val_per_class`) images of each class, None for all; returns the file count."""
    folder = folder or fashion_mnist_dir()
    written = 0
    for split, prefix, count in (("train", "train", per_class), ("val", "t10k", val_per_class)):
        images = _idx(folder, f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx(folder, f"{prefix}-labels-idx1-ubyte.gz", 8)
        chosen = [np.flatnonzero(labels == label)[:count] for label in range(len(FASHION_MNIST_CLASSES))]
        progress = Progress(f"demo-data fashion-mnist {split}", sum(map(len, chosen)), every_s=10.0)
        pad = max(size - 28, 0)
        for name, indices in zip(FASHION_MNIST_CLASSES, chosen):
            for index in indices:
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
