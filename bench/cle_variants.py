"""What is left of the per-tensor error after cross-layer equalization (issue 12): one CLE calibration of
EfficientNet-Lite0 with per-tensor int8 weights (bench/recover.py's protocol: 256 crops seed 1, 200 held-out crops
seed 7), then one conversion per activation method x bias-correction variant, judged against fp32.

Bias-correction variants: `analytic` (as shipped: E[(W_q - W) x] from the input's channel mean), `padded` (the same
expectation counting the conv's zero padding: the mean of conv(mean image, W_q - W) over the output positions;
an experiment, patched in here, not shipped: it measured worse) and `none`.

    .venv/bin/python bench/cle_variants.py --acts minmax mse percentile --bc analytic padded none
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eightbit import Equalize, Granularity, QuantConfig, calibrate, int8_weights, qmath, uint8_activations  # noqa: E402
from eightbit import convert as convert_module  # noqa: E402
from eightbit.analysis.compare import output_metrics  # noqa: E402
from eightbit.graph import ops  # noqa: E402

_plain_shift = convert_module._bias_shift


def _input_size(node):
    while isinstance(node, torch.fx.Node):
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is not None:
            return tuple(shape)
        node = node.args[0] if node.args else None
    return None


def _padded_shift(node, rule, args, dq_of_call, w, q, enc):
    shift = _plain_shift(node, rule, args, dq_of_call, w, q, enc)
    if shift is None or node.target is not ops.CONV2D_PADDED or not any(node.args[4]):
        return shift
    _, _, _, stride, pads, dilation, groups = node.args
    shape = _input_size(args[0])
    mean = torch.tensor(dq_of_call[args[rule.activation_args[0]]].mean, dtype=torch.float64)
    scale, zp = enc.tensors_()
    error = (qmath.dequantize(q, scale, zp, enc.axis) - w.detach().float()).double()
    image = mean.reshape(1, -1, 1, 1).expand(1, mean.numel(), shape[2], shape[3])
    out = F.conv2d(F.pad(image, [pads[1], pads[3], pads[0], pads[2]]), error, None, stride, 0, dilation, groups)
    return out.mean(dim=(0, 2, 3)).float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--acts", nargs="+", default=["minmax", "mse", "percentile"])
    parser.add_argument("--bc", nargs="+", default=["analytic", "padded", "none"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    from eightbit.demos import zoo

    model, calibration, evaluation = zoo.efficientnet_protocol(args.calib, args.eval)
    with torch.no_grad():
        reference = model(evaluation)
    weights = int8_weights(granularity=Granularity.PER_TENSOR)
    start = time.perf_counter()
    cal = calibrate(model, calibration, config=QuantConfig(weights=weights, equalize=Equalize()), methods=args.acts)
    print(f"calibrated in {time.perf_counter() - start:.0f} s\n")
    print("| activations | bias correction | top-1 agreement | softmax KL | cosine |\n|---|---|---|---|---|")
    for act in args.acts:
        for bc in args.bc:
            convert_module._bias_shift = _padded_shift if bc == "padded" else _plain_shift
            config = QuantConfig(
                weights=weights,
                activations=uint8_activations(method=act),
                equalize=Equalize(),
                bias_correction=bc != "none",
            )
            with torch.no_grad():
                agreement, kl, cosine = output_metrics(reference, cal.quantize(config)(evaluation))
            print(f"| {act} | {bc} | {agreement:.3f} | {kl:.4f} | {cosine:.4f} |", flush=True)
    convert_module._bias_shift = _plain_shift
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
