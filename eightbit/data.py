"""Calibration inputs from files: a folder of images, `.npy` arrays or `.pt` tensors."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class Normalization(enum.Enum):
    """How pixel values in [0, 255] become model inputs."""

    TFLITE = "tflite"  # (x - 127.5) / 127.5, as EfficientNet-Lite and most TF-Lite models expect
    IMAGENET = "imagenet"  # (x / 255 - mean) / std with the ImageNet statistics
    UNIT = "unit"  # x / 255


_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """Resize the shorter side to `resize` (bicubic), centre-crop `size`, normalize, HWC -> CHW."""

    size: int = 224
    resize: int = 256
    normalization: Normalization = Normalization.IMAGENET

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.resize:
            raise ValueError(f"need 0 < size <= resize, got size={self.size}, resize={self.resize}")

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.resize(
            (max(self.resize, round(w * scale)), max(self.resize, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        pixels = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.float32)
        if self.normalization is Normalization.TFLITE:
            pixels = (pixels - 127.5) / 127.5
        elif self.normalization is Normalization.IMAGENET:
            pixels = (pixels / 255.0 - _MEAN) / _STD
        else:
            pixels = pixels / 255.0
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_sample(path: Path, preprocess: ImagePreprocess | None = None) -> torch.Tensor:
    """The tensor a calibration file holds, as stored (an image: preprocessed, with a batch axis)."""
    preprocess = preprocess or ImagePreprocess()
    suffix = path.suffix.lower()
    try:
        if suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                return preprocess(image).unsqueeze(0)
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path} holds a {type(value).__name__}, expected one tensor")
            return value.float()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from exc
    raise ValueError(f"unsupported calibration file {path}")


def calibration_files(folder: str | Path) -> list[Path]:
    """The usable files in `folder`, sorted; clear errors for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy", ".pt"})
    if not files:
        raise ValueError(f"no images, .npy or .pt files in {folder}")
    return files


def folder_batches(
    folder: str | Path,
    *,
    batch_size: int = 16,
    preprocess: ImagePreprocess | None = None,
    sample_shape: tuple[int, ...] | None = None,
    limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Stream batches from a folder.  Files holding one sample (e.g. CHW without a batch axis) get one added
    when `sample_shape` says how many dimensions a sample has.  Every file must hold samples of one shape (and
    of `sample_shape` without its batch axis, when given): the error names the files that differ."""
    preprocess = preprocess or ImagePreprocess()
    pending: list[torch.Tensor] = []
    files = calibration_files(folder)[:limit]
    first: tuple[Path, torch.Size, torch.Size] | None = None  # the first file, its shape as stored and batched
    for path in files:
        stored = load_sample(path, preprocess)
        sample = stored
        if sample_shape is not None and sample.dim() == len(sample_shape) - 1:
            sample = sample.unsqueeze(0)
        _check_sample_shape(path, stored.shape, sample.shape, first, sample_shape)
        first = first or (path, stored.shape, sample.shape)
        pending.append(sample)
        if sum(s.shape[0] for s in pending) >= batch_size:
            yield torch.cat(pending)
            pending = []
    if pending:
        yield torch.cat(pending)


def _check_sample_shape(path: Path, stored, batched, first, sample_shape) -> None:
    """`batched` is the file's shape with its batch axis, `stored` as read (for the message); `first` the same
    of the first file."""
    if first is not None and tuple(batched[1:]) != tuple(first[2][1:]):
        raise ValueError(
            f"calibration files of different shapes: {first[0].name} holds {tuple(first[1])}, {path.name} holds "
            f"{tuple(stored)}; every file must hold samples of one shape (pass --input-shape when some files "
            "have a batch axis and some do not)"
        )
    if sample_shape is not None and tuple(batched[1:]) != tuple(sample_shape[1:]):
        raise ValueError(
            f"{path.name} holds shape {tuple(stored)}, but --input-shape (sample_shape) {tuple(sample_shape)} "
            f"asks for samples of shape {tuple(sample_shape[1:])}; fix --input-shape or the files"
        )
