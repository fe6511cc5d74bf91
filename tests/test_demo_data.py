"""Real data by default: Fashion-MNIST from FASHION_MNIST_DIR, the Debian package or a checksummed download."""

import gzip
import hashlib
import http.server
import shutil
import socket
import threading
import tracemalloc
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
from PIL import Image

from pipeline import demo_data
from pipeline.storage import Location

# MD5s of the decompressed files as the data set's users publish them (the .gz MD5s of the upstream README
# are of one compression of them; the Debian package ships another).
PUBLISHED_CONTENT_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


@pytest.fixture
def no_fashion_dir(monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serving(folder):
    """An HTTP server on loopback serving `folder` from a thread (listening before it is yielded); its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_installed_files_are_the_published_data_set(no_fashion_dir):
    folder = demo_data.fashion_mnist_dir()  # the Debian package's (make installs it), else downloaded
    for name, sha256 in demo_data.FASHION_MNIST_FILES.items():
        content = demo_data.verified_content(folder / name, sha256)
        assert hashlib.md5(content).hexdigest() == PUBLISHED_CONTENT_MD5[name], name


def test_download_checks_every_file_and_keeps_no_corrupt_one(tmp_path, no_fashion_dir, monkeypatch):
    source = demo_data.fashion_mnist_dir()
    mirror, corrupt = tmp_path / "mirror", tmp_path / "corrupt"
    shutil.copytree(source, mirror)
    shutil.copytree(source, corrupt)
    with gzip.open(source / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = bytearray(stream.read())
    labels[100] = (labels[100] + 1) % 10  # one label changed: a valid gzip of the wrong content
    with gzip.open(corrupt / "t10k-labels-idx1-ubyte.gz", "wb") as stream:
        stream.write(bytes(labels))

    cache = tmp_path / "cache"
    with serving(mirror) as url:
        monkeypatch.setenv(demo_data.FASHION_MNIST_URL_ENV, url)
        assert demo_data.fashion_mnist_dir(folders=(), cache=cache) == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(demo_data.FASHION_MNIST_FILES)
    for name in demo_data.FASHION_MNIST_FILES:
        assert (cache / name).read_bytes() == (source / name).read_bytes()
    # A second look finds the cache complete and downloads nothing (the server is gone).
    assert demo_data.fashion_mnist_dir(folders=(), cache=cache) == cache

    cache = tmp_path / "cache-corrupt"
    with serving(corrupt) as url:
        monkeypatch.setenv(demo_data.FASHION_MNIST_URL_ENV, url)
        with pytest.raises(demo_data.ChecksumError, match=r"t10k-labels-idx1-ubyte.gz.*content sha256 .* expected 0402a96d"):
            demo_data.fashion_mnist_dir(folders=(), cache=cache)
    assert "t10k-labels-idx1-ubyte.gz" not in {p.name for p in cache.iterdir()}
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]


def test_nothing_installed_and_no_download_says_how_to_install(tmp_path, no_fashion_dir, monkeypatch):
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv(demo_data.FASHION_MNIST_URL_ENV, f"http://127.0.0.1:{port}/")
    with pytest.raises(demo_data.MissingDataError, match="apt-get install dataset-fashion-mnist") as error:
        demo_data.fashion_mnist_dir(folders=(str(tmp_path / "none"),), cache=tmp_path / "cache")
    assert f"127.0.0.1:{port}" in str(error.value)


def test_files_that_are_not_fashion_mnist_are_refused(tmp_path, monkeypatch):
    # The four idx files in their standard format but of other content: the old reader took them as the data set.
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as stream:
            stream.write(b"\0" * 16 + np.full((20, 28, 28), 200, np.uint8).tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as stream:
            stream.write(b"\0" * 8 + (np.arange(20) % 10).astype(np.uint8).tobytes())
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(demo_data.ChecksumError, match="train-images-idx3-ubyte.gz: content sha256"):
        demo_data.fashion_mnist(Location(str(tmp_path / "corpus")), per_class=2, val_per_class=1)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(demo_data.MissingDataError, match="FASHION_MNIST_DIR=.*empty lacks"):
        demo_data.fashion_mnist_dir()


def test_fashion_mnist_to_imagenet_layout(tmp_path, no_fashion_dir):
    out = Location(str(tmp_path / "corpus"))
    assert demo_data.fashion_mnist(out, per_class=2, val_per_class=1) == 30
    files = out.list_files()
    assert len(files) == 30
    assert {name.split("/")[1] for name in files} == set(demo_data.FASHION_MNIST_CLASSES)
    assert sum(name.startswith("val/") for name in files) == 10
    # The first training image of the data set is an ankle boot (label 9), padded from 28 to 32 pixels.
    image = Image.open(tmp_path / "corpus/train/ankle-boot/train-00000.png")
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert image.getpixel((0, 0)) == (0, 0, 0) and np.asarray(image).max() > 200


def test_a_gzip_bomb_is_refused_without_being_decompressed_whole(tmp_path, no_fashion_dir, monkeypatch):
    """A 64 MiB label file in a gzip of 64 KiB: no more than the published file's size (60,008 bytes) and a chunk is
    decompressed (the old reader took all 64 MiB into memory, then compared checksums)."""
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as stream:
        for _ in range(64):
            stream.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 17
    tracemalloc.start()
    try:
        with pytest.raises(demo_data.ChecksumError, match=f"{bomb}: decompresses to more than 60008 bytes"):
            demo_data.verified_content(bomb, demo_data.FASHION_MNIST_FILES[bomb.name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes"

    # As the demo meets it: in FASHION_MNIST_DIR beside the real files.
    installed = demo_data.fashion_mnist_dir()
    for name in demo_data.FASHION_MNIST_FILES:
        if name != bomb.name:
            shutil.copy(installed / name, tmp_path / name)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(demo_data.ChecksumError, match="train-labels-idx1-ubyte.gz: decompresses to more than"):
        demo_data.fashion_mnist(Location(str(tmp_path / "corpus")), per_class=1, val_per_class=1)
