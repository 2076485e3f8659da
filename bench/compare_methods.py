"""Calibration-method comparison on real models (issue: every calibration method, compared).

EfficientNet-Lite0 with its ImageNet weights: calibrated on augmented crops of the 20 ImageNet photos,
judged on a disjoint set of augmented crops (top-1 agreement and softmax KL against fp32).  Run twice:
weights per-channel (the default) and per-tensor, where the depthwise layers make methods differ most.
The output-aware methods (cross_entropy, and EasyQuant: eq activations, and eq/eq for both) search on the
first `--samples` calibration crops; their search time is in the "convert s" column.

    .venv/bin/python bench/compare_methods.py [--calib 256] [--eval 200] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eightbit import Granularity, QuantConfig, int8_weights  # noqa: E402
from eightbit.analysis.compare import DEFAULT_METHODS, compare_methods, format_results  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32, help="calibration crops searched by eq/cross_entropy")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from eightbit.demos import zoo

    model, calibration, evaluation = zoo.efficientnet_protocol(args.calib, args.eval)
    for title, weights in (
        ("weights int8 per-channel", int8_weights()),
        ("weights int8 per-tensor", int8_weights(granularity=Granularity.PER_TENSOR)),
    ):
        seconds, results = compare_methods(
            model,
            calibration,
            evaluation,
            config=QuantConfig(weights=weights),
            methods=(*DEFAULT_METHODS, "cross_entropy", "eq"),
            weight_methods=("minmax", "mse"),
            extra_pairs=(("eq", "eq"),),
            progress=False,
            input_samples=args.samples,
        )
        print(f"\n### EfficientNet-Lite0, {title}, {args.calib} calibration crops, {args.eval} eval crops\n")
        print(format_results(results, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
