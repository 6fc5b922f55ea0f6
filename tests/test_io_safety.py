"""Files that cannot be written or read safely: a full disk during a checkpoint save, and images
beyond Pillow's decompression-bomb limit, in training data as anywhere else. Each ends in one
UserError line (exit code 2 in the scripts) and leaves what was on disk intact."""
from __future__ import annotations

import errno
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import IO

import pytest
import torch
from PIL import Image

import utils.io
from datasets.build import build_datasets
from datasets.images import check_image_header, load_mask, load_rgb
from tests.fixtures import make_mvtec_folder
from utils.errors import UserError
from utils.io import atomic_write, save_torch

# --------------------------------------------------------------------------- a full disk


def _checkpoint() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(50_000, dtype=torch.float32)}  # ~200 kB: several writes


def _folder_after(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_during_torch_save_is_a_user_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_torch(path, {"weight": torch.ones(3)})
    before = path.read_bytes()

    real_mkstemp = tempfile.mkstemp

    def full_disk_mkstemp(*args, **kwargs):
        # The temporary file is created as usual, but every byte written to it goes to /dev/full,
        # which fails as a full disk does (ENOSPC), deep inside torch.save.
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(utils.io.tempfile, "mkstemp", full_disk_mkstemp)
    with pytest.raises(UserError) as caught:
        save_torch(path, _checkpoint())

    message = str(caught.value)
    assert f"cannot write {path} (No space left on device)" in message
    assert "the previous best.pt is unchanged" in message and "\n" not in message
    assert path.read_bytes() == before
    assert _folder_after(path) == ["best.pt"], "no temporary file left behind"


class _FailsAfter:
    """A file that takes ``limit`` bytes, then fails as a full disk does."""

    def __init__(self, file: IO[bytes], limit: int) -> None:
        self.file, self.limit, self.written = file, limit, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_torch_save_failing_mid_way_is_a_user_error(tmp_path):
    path = tmp_path / "last.pt"
    # torch.save turns the OSError of its file into a RuntimeError ("unexpected pos ..."): the
    # OSError survives only as the context of that RuntimeError.
    expected = r"cannot write .*last\.pt \(No space left on device\); last\.pt was not written"
    with pytest.raises(UserError, match=expected):
        atomic_write(path, lambda f: torch.save(_checkpoint(), _FailsAfter(f, 4096)))
    assert _folder_after(path) == []


def test_an_error_that_is_not_about_the_disk_stays_what_it_is(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}")

    def broken(_: IO[bytes]) -> None:
        raise RuntimeError("a bug, not a full disk")

    with pytest.raises(RuntimeError, match="a bug, not a full disk"):
        atomic_write(path, broken)
    assert path.read_text() == "{}" and _folder_after(path) == ["results.json"]


# --------------------------------------------------------------------------- decompression bombs


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A tiny PNG file whose header claims ``side`` x ``side`` 8-bit grey pixels (400 M for the
    default: beyond twice Pillow's MAX_IMAGE_PIXELS, so Pillow refuses to open it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_the_bomb_is_one_for_pillow(tmp_path):
    # Without this, the tests below could pass on a file Pillow merely finds corrupt.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb_png(tmp_path / "bomb.png"))


@pytest.mark.parametrize("reader", ["header", "rgb", "mask"])
def test_an_image_beyond_the_bomb_limit_is_a_one_line_user_error(tmp_path, reader):
    path = bomb_png(tmp_path / "huge.png")
    read = {"header": lambda: check_image_header(path), "rgb": lambda: load_rgb(path),
            "mask": lambda: load_mask(path, 64)}[reader]
    with pytest.raises(UserError) as caught:
        read()
    message = str(caught.value)
    assert f"image {path} is too large to decode safely" in message and "downscale it" in message
    assert "\n" not in message


def test_a_bomb_among_the_training_images_is_named_before_training(tmp_path):
    root = make_mvtec_folder(tmp_path / "data", "widget", n_train=4, n_good_test=1, n_defect=1, size=32)
    bomb = bomb_png(root / "widget" / "train" / "good" / "999.png")
    with pytest.raises(UserError, match=f"image {bomb} is too large to decode safely"):
        build_datasets("mvtec", root, "widget", 64, 0.25, 0)


def test_header_check_returns_the_size(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(path)
    assert check_image_header(path) == (30, 20)
