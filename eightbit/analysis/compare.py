"""Compare calibration methods on one model: one calibration pass, every method computed from its statistics."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from eightbit.api import calibrate
from eightbit.config import AdaRound, Equalize, QuantConfig

DEFAULT_METHODS = ("minmax", "ema", "percentile", "mse", "kl")


@dataclass(frozen=True)
class MethodResult:
    """Accuracy of one (activation method, weight method) pair against the float model."""

    activation_method: str
    weight_method: str
    convert_seconds: float  # deriving ranges and converting; the shared calibration pass is reported apart
    top1_agreement: float  # share of rows whose arg-max matches the float model
    mean_kl: float  # KL(softmax(float) || softmax(int8)), mean over rows
    mean_cosine: float
    recovery: str = "none"  # the accuracy-recovery step applied (RECOVERY_STEPS)


def output_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean softmax KL, mean cosine) of candidate rows against reference rows."""
    ref, cand = reference.flatten(1).double(), candidate.flatten(1).double()
    agreement = float((ref.argmax(1) == cand.argmax(1)).double().mean())
    log_p, log_q = torch.log_softmax(ref, 1), torch.log_softmax(cand, 1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    cosine = float(nn.functional.cosine_similarity(ref, cand, dim=1).mean())
    return agreement, kl, cosine


def compare_methods(
    model: nn.Module,
    calibration_data: Iterable,
    eval_inputs: torch.Tensor,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    weight_methods: Sequence[str] = ("minmax",),
    extra_pairs: Sequence[tuple[str, str]] = (),
    config: QuantConfig | None = None,
    example_inputs=None,
    progress: bool = True,
    input_samples: int = 32,
    input_fn=None,
) -> tuple[float, list[MethodResult]]:
    """Quantize `model` with every activation x weight method pair, then each (activation, weight) pair in
    `extra_pairs`, and measure each against the float model on `eval_inputs`.  Returns (seconds of the one
    shared calibration pass, results).  Output-aware methods (eq, cross_entropy) search on the first
    `input_samples` calibration samples; their search counts in their convert time.  `input_fn`: as in
    `eightbit.calibrate` (calibration batch -> model inputs)."""
    config = config or QuantConfig()
    pairs = [(m, w) for w in weight_methods for m in methods] + [tuple(p) for p in extra_pairs]
    every = [name for pair in pairs for name in pair]
    start = time.perf_counter()
    calibration = calibrate(
        model,
        calibration_data,
        example_inputs,
        config=config,
        methods=every,
        progress=progress,
        input_samples=input_samples,
        input_fn=input_fn,
    )
    pass_seconds = time.perf_counter() - start
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        reference = model.eval()(eval_inputs)
    for module, training in modes:  # the user's model is left as it was given
        module.training = training
    results = []
    for method, weight_method in pairs:
        variant = replace(
            config,
            activations=replace(config.activations, method=method),
            weights=replace(config.weights, method=weight_method),
        )
        start = time.perf_counter()
        qm = calibration.quantize(variant)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            metrics = output_metrics(reference, qm(eval_inputs))
        results.append(MethodResult(method, weight_method, seconds, *metrics))
    return pass_seconds, results


def format_results(results: Sequence[MethodResult], pass_seconds: float | str) -> str:
    """A markdown table, best top-1 agreement (then lowest KL) first; a recovery column when steps were compared."""
    rows = sorted(results, key=lambda r: (-r.top1_agreement, r.mean_kl))
    steps = any(r.recovery != "none" for r in rows)
    passes = pass_seconds if isinstance(pass_seconds, str) else f"{pass_seconds:.1f} s (shared by all methods)"
    lines = [
        f"one calibration pass: {passes}",
        "",
        "| " + ("recovery | " if steps else "") + "activations | weights | top-1 agreement | softmax KL | cosine | "
        "convert s |",
        "|---|---|---|---|---|---|" + ("---|" if steps else ""),
    ]
    lines += [
        "| "
        + (f"{r.recovery} | " if steps else "")
        + f"{r.activation_method} | {r.weight_method} | {r.top1_agreement:.3f} | {r.mean_kl:.4f} | "
        f"{r.mean_cosine:.4f} | {r.convert_seconds:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


# Accuracy-recovery steps `compare_recovery` can apply: (equalize, adaround).  Each uses the config's own
# Equalize / AdaRound settings where it has them, the defaults otherwise.
RECOVERY_STEPS = {
    "none": (False, False),
    "cle": (True, False),
    "adaround": (False, True),
    "cle+adaround": (True, True),
}


def compare_recovery(
    model: nn.Module,
    calibration_data: Iterable,
    eval_inputs: torch.Tensor,
    *,
    steps: Sequence[str] = ("none", "cle"),
    config: QuantConfig | None = None,
    **kwargs,
) -> tuple[dict[str, float], list[MethodResult]]:
    """`compare_methods` once per recovery step (each needs its own calibration pass: equalization rewrites the
    graph first; AdaRound runs in each row's convert).  Returns (pass seconds per step, every row tagged with its
    step).  calibration_data must be re-iterable."""
    unknown = [s for s in steps if s not in RECOVERY_STEPS]
    if unknown:
        raise ValueError(f"unknown recovery steps {unknown}; choose from {sorted(RECOVERY_STEPS)}")
    config = config or QuantConfig()
    seconds, rows = {}, []
    for step in steps:
        equalize, adaround = RECOVERY_STEPS[step]
        variant = replace(
            config,
            equalize=(config.equalize or Equalize()) if equalize else None,
            adaround=(config.adaround or AdaRound()) if adaround else None,
        )
        seconds[step], results = compare_methods(model, calibration_data, eval_inputs, config=variant, **kwargs)
        rows += [replace(r, recovery=step) for r in results]
    return seconds, rows
