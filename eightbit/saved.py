"""Saved quantization parameters and calibration caches: the weights fingerprint that ties them to one model, and
the checks that refuse files that would give a silently wrong model (other weights, another format version,
impossible scales or zero points, tensor groups that do not match the graph)."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from eightbit.calibration.calibrate import activation_axis
from eightbit.calibration.encodings import Encoding
from eightbit.config import QuantSpec
from eightbit.graph.placement import Placement
from eightbit.graph.utils import attr_value

ENCODINGS_VERSION = 1
# 2: the cache records the weights fingerprint (version 1 caches were keyed on the graph only).
CACHE_VERSION = 2


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name, dtype, shape and bytes (about 0.1 s per 100 MB)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach()
        t = t.dequantize() if t.is_quantized else t
        t = t.to_dense() if t.layout != torch.strided else t
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        if t.numel() and t.device.type != "meta":
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_cache(payload, path: Path, placement: Placement, fingerprint: str) -> None:
    """Refuse a calibration cache that another format version, graph or set of weights produced."""
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a readable eightbit calibration cache; delete it")
    version = payload.get("version")
    if version != CACHE_VERSION:
        raise ValueError(
            f"the calibration cache {path} has format version {version}; this eightbit writes version "
            f"{CACHE_VERSION}. Delete it (or pass another cache path) to calibrate again"
        )
    if payload.get("groups") != placement.groups:
        raise ValueError(f"the calibration cache {path} was made for a different model or config; delete it")
    if payload.get("weights") != fingerprint:
        raise ValueError(
            f"the calibration cache {path} was made for other weights: the model's weights fingerprint "
            f"({fingerprint[:12]}) differs from the cache's ({str(payload.get('weights'))[:12]}), so its statistics "
            "are stale. Delete it (or pass another cache path) to calibrate again"
        )


def read_encodings(source) -> dict:
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, Path)):
        raise ValueError(f"encodings must be a path or a dict saved by save_encodings, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"encodings file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid eightbit encodings file (JSON): {exc}") from None


def warn_if_other_weights(source: dict, fingerprint: str) -> None:
    """Encodings saved with a fingerprint of other weights may not fit this model (files without one pass)."""
    saved = source.get("weights_fingerprint")
    if saved is not None and saved != fingerprint:
        warnings.warn(
            "eightbit: these encodings were made for other weights (weights fingerprint differs); their ranges "
            "may not fit this model. Calibrate again if the weights changed.",
            UserWarning,
            stacklevel=3,
        )


def load_activation_encodings(source, placement: Placement, spec: QuantSpec, gm: fx.GraphModule):
    """The saved activation encodings, checked against the graph's tensor groups and the config's spec."""
    if not isinstance(source, dict) or source.get("version") != ENCODINGS_VERSION or "activations" not in source:
        version = source.get("version") if isinstance(source, dict) else None
        raise ValueError(f"unsupported encodings (version {version}); re-run calibration")
    saved = source["activations"]
    if not isinstance(saved, dict) or not all(isinstance(e, dict) for e in saved.values()):
        raise ValueError("malformed encodings: 'activations' must map tensor groups to encodings; re-run calibration")
    expected = {g: list(m) for g, m in placement.groups.items()}
    found = {g: list(e.get("tensors", [])) for g, e in saved.items()}
    if expected != found:
        raise ValueError(
            "the encodings were made for a different model or config (tensor groups differ); re-run calibration"
        )
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for group, entry in saved.items():
        try:
            enc = Encoding(**{**entry, "range": tuple(entry["range"]) if entry.get("range") else None})
        except TypeError as exc:
            raise ValueError(f"malformed encodings for tensor group {group!r}: {exc}") from None
        _check_encoding(f"tensor group {group!r}", enc, spec, _channels(nodes[enc.tensors[0]], enc.axis))
        out[group] = enc
    return out


def _channels(node: fx.Node, axis: int | None) -> int:
    val = node.meta.get("val")
    if axis is None or not isinstance(val, torch.Tensor) or not -val.dim() <= axis < val.dim():
        return 1
    size = val.shape[axis]
    return int(size) if isinstance(size, int) else -1  # -1: a dynamic axis, length not checked


def _check_encoding(label: str, enc: Encoding, spec: QuantSpec, channels: int) -> None:
    if (enc.qmin, enc.qmax) != (spec.qmin, spec.qmax):
        raise ValueError(
            f"encodings of {label} use codes qmin..qmax = {enc.qmin}..{enc.qmax}, the config's activations "
            f"{spec.qmin}..{spec.qmax}; quantize with the config the encodings were made with"
        )
    if enc.axis != activation_axis(spec):
        raise ValueError(f"encodings of {label} have channel axis {enc.axis}, the config {activation_axis(spec)}")
    if not isinstance(enc.scale, list) or not isinstance(enc.zero_point, list):
        raise ValueError(f"malformed encodings of {label}: scale and zero_point must be lists")
    want = channels if channels > 0 else len(enc.scale)
    if len(enc.scale) != want or len(enc.zero_point) != want:
        kind = "per-tensor" if enc.axis is None else f"per-channel on axis {enc.axis}"
        raise ValueError(
            f"encodings of {label} ({kind}): scale and zero point must have {want} value{'s' * (want != 1)}, got "
            f"{len(enc.scale)} and {len(enc.zero_point)}"
        )
    bad = [s for s in enc.scale if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0]
    if bad:
        raise ValueError(f"encodings of {label}: every scale must be finite and > 0, got {bad[:4]}; re-run calibration")
    out = [z for z in enc.zero_point if not isinstance(z, int) or not enc.qmin <= z <= enc.qmax]
    if out:
        raise ValueError(f"encodings of {label}: zero point {out[:4]} outside the code range [{enc.qmin}, {enc.qmax}]")


def saved_weight_ranges(
    source: dict, placement: Placement, gm: fx.GraphModule
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> saved weight range (per channel, or 0-d for per-tensor weights), checked finite with lo <= hi
    and against the graph's quantized layers (names, and one value per channel of a per-channel range)."""
    layers = _weight_channels(placement, gm)
    found = {}
    weights = source.get("weights", {})
    if not isinstance(weights, dict):
        raise ValueError("malformed encodings: 'weights' must map layers to encodings; re-run calibration")
    for name, enc in weights.items():
        if not isinstance(enc, dict) or not enc.get("range"):
            continue
        try:
            lo, hi = (torch.tensor(v, dtype=torch.float32) for v in enc["range"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed saved weight range of layer {name!r}: {exc}") from None
        if lo.shape != hi.shape or not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo <= hi).all()):
            raise ValueError(f"saved weight range of layer {name!r} is not a finite range with lo <= hi")
        if name not in layers:
            raise ValueError(f"saved weight range of layer {name!r}: this model has no such quantized layer")
        axis, weight = enc.get("axis"), layers[name]
        channels = weight.shape[axis] if isinstance(axis, int) and -weight.dim() <= axis < weight.dim() else 1
        if lo.numel() != channels:
            raise ValueError(
                f"saved weight range of layer {name!r} has {lo.numel()} values, its weight {channels} channels"
            )
        found[name] = (lo, hi) if axis is not None else (lo.reshape(()), hi.reshape(()))
    return found


def _weight_channels(placement: Placement, gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Quantized layer node name -> its constant weight."""
    out = {}
    for node in gm.graph.nodes:
        rule = placement.quantized_ops.get(node.name)
        if rule is not None and rule.weight_arg is not None and node.op == "call_function":
            w = attr_value(gm, node.args[rule.weight_arg]) if len(node.args) > rule.weight_arg else None
            if w is not None:
                out[node.name] = w
    return out
