"""`make demo-qat`: quantization-aware training wins back what 4-bit PTQ loses, on Fashion-MNIST.

A small MobileNet-style CNN (depthwise separable convolutions, BatchNorm, ReLU6) is trained in fp32 here (3 epochs,
a few minutes on 2 cores; the weights are kept in the output folder and reused by later runs), quantized to 4-bit
weights and activations by PTQ, then fine-tuned with QAT for at most two epochs (initialised by the PTQ
calibration, BatchNorm folding simulated and frozen after the first epoch, the fp32 model as distillation
teacher).  Prints fp32 / PTQ / QAT accuracy on the 10k test images in PyTorch and from the exported QAT model on
ONNX Runtime and OpenVINO, and writes the QAT training curve as a PNG.  Data: the Debian package
`dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from eightbit import QATConfig, QuantConfig, int8_weights, prepare_qat, quantize, uint8_activations
from eightbit.analysis.figures import pyplot, save_png
from eightbit.fileio import atomic_path
from eightbit.runtime.backends import Backend, RuntimeOptions, load

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images normalised, N x 1 x 28 x 28 float32; labels int64) of the 'train' or 't10k' split."""
    images, labels = DATA / f"{split}-images-idx3-ubyte.gz", DATA / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(
            f"{images} is missing: install the data with `apt-get install -y dataset-fashion-mnist` (make demo-qat "
            "does it)"
        )
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (torch.from_numpy(x.copy()).float() / 255 - MEAN) / STD
    return x, torch.from_numpy(y.astype(np.int64))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class TinyMobileNet(nn.Module):
    """Stem conv (stride 2), three depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, BN, ReLU6), pooled
    classifier: 14x14 and 7x7 feature maps, so that a training epoch takes well under a minute on 2 cores."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        layers = [_conv_bn(1, w, 3, stride=2)]
        for c_in, c_out, stride in ((w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)):
            layers += [_conv_bn(c_in, c_in, 3, stride, groups=c_in), _conv_bn(c_in, c_out, 1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def train_epochs(
    model: nn.Module, x, y, *, epochs: float, lr: float, batch: int, seed: int, log=None, teacher=None
) -> None:
    """Adam with cosine decay over `epochs` (fractions allowed); `log(epoch, loss, accuracy)` every 20 steps, with
    the loss and batch accuracy averaged over those 20 steps.  With a `teacher`, the loss adds the KL divergence
    to its predictions (distillation, the usual companion of QAT)."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x) // batch
    total = int(epochs * steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    model.train()
    step, order, window = 0, torch.randperm(len(x), generator=generator), []
    while step < total:
        i = step % steps_per_epoch
        if i == 0 and step:
            order = torch.randperm(len(x), generator=generator)
        idx = order[i * batch : (i + 1) * batch]
        logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        if teacher is not None:
            with torch.no_grad():
                target = F.softmax(teacher(x[idx]), dim=1)
            loss = loss + F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        window.append((loss.item(), (logits.argmax(1) == y[idx]).float().mean().item()))
        if log is not None and (step % 20 == 0 or step == total):
            log(step / steps_per_epoch, *np.mean(window, axis=0))
            window = []
    model.eval()


@torch.no_grad()
def accuracy(model, x, y, batch: int = 1000) -> float:
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def runtime_accuracy(path: Path, backend: Backend, x, y, batch: int = 1000) -> float:
    runner = load(path, backend, RuntimeOptions(threads=2))
    name = runner.input_names[0]
    hits = 0
    for i in range(0, len(x), batch):
        logits = runner.run({name: x[i : i + batch].numpy()})[0]
        hits += int((logits.argmax(1) == y[i : i + batch].numpy()).sum())
    return 100.0 * hits / len(x)


def plot_curve(points: list[tuple[float, float, float]], path: Path, fp32: float, ptq: float) -> None:
    """QAT training loss and batch accuracy against epochs, with the fp32 and PTQ test accuracies as lines."""
    plt = pyplot()
    epochs, losses, accs = (np.array(v) for v in zip(*points, strict=True))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, losses)
    a.set(xlabel="epoch", ylabel="training loss", title="QAT (4-bit weights and activations)")
    b.plot(epochs, 100 * accs, label="QAT batch accuracy", alpha=0.6)
    b.axhline(fp32, color="g", linestyle="--", label=f"fp32 test {fp32:.2f}%")
    b.axhline(ptq, color="r", linestyle="--", label=f"PTQ test {ptq:.2f}%")
    b.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(max(0, min(ptq, 100 * accs.min()) - 5), 100))
    b.legend(loc="lower right")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="folder for the ONNX file and the PNG")
    parser.add_argument("--fp32-epochs", type=float, default=3.0)
    parser.add_argument("--qat-epochs", type=float, default=2.0, help="at most 2")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads (1: small kernels gain little from more, and a "
        "shared machine loses much from oversubscription)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.qat_epochs <= 2:
        parser.error("--qat-epochs must be in (0, 2]")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("t10k")

    start = time.perf_counter()
    model = TinyMobileNet()
    cache = out / f"tiny_mobilenet_fp32_e{args.fp32_epochs:g}_s{args.seed}.pt"
    if cache.exists():  # trained by an earlier run with the same settings
        model.load_state_dict(torch.load(cache, weights_only=True))
        model.eval()
    else:
        train_epochs(model, x_train, y_train, epochs=args.fp32_epochs, lr=3e-3, batch=128, seed=args.seed)
        with atomic_path(cache, overwrite=True) as tmp:
            torch.save(model.state_dict(), tmp)
    fp32 = accuracy(model, x_test, y_test)
    print(f"fp32: {fp32:.2f}% after {args.fp32_epochs:g} epochs ({time.perf_counter() - start:.0f} s; weights {cache})")

    # The stem (1 input channel: the image itself) stays float, as LSQ keeps its first layer at 8 bits: 16 grey
    # levels of input lose detail that no training recovers.  PTQ and QAT use the same config.
    config = QuantConfig(
        weights=int8_weights(bits=args.bits),
        activations=uint8_activations(bits=args.bits, method="percentile"),
        keep_float=("features.0",),
    )
    calibration = list(x_train[:2048].split(256))
    ptq = quantize(model, calibration, config=config, progress=False)
    ptq_acc = accuracy(ptq, x_test, y_test)
    print(f"PTQ W{args.bits}A{args.bits}: {ptq_acc:.2f}%")

    start = time.perf_counter()
    steps_per_epoch = len(x_train) // 128
    qat = prepare_qat(model, calibration, config=config, qat=QATConfig(freeze_bn_after=steps_per_epoch), progress=False)
    curve: list[tuple[float, float, float]] = []
    train_epochs(
        qat,
        x_train,
        y_train,
        epochs=args.qat_epochs,
        lr=1e-3,
        teacher=model,
        batch=128,
        seed=args.seed + 1,
        log=lambda e, loss, acc: curve.append((e, loss, acc)),
    )
    qat_acc = accuracy(qat, x_test, y_test)
    print(
        f"QAT W{args.bits}A{args.bits}: {qat_acc:.2f}% after {args.qat_epochs:g} epochs "
        f"({time.perf_counter() - start:.0f} s)"
    )
    converted = qat.convert()
    converted_acc = accuracy(converted, x_test, y_test)
    path = out / f"fashion_mnist_qat_w{args.bits}a{args.bits}.onnx"
    report = converted.export_onnx(path, overwrite=True)
    print(f"exported {path} ({path.stat().st_size / 1e3:.0f} kB); {report.parity}")
    ort_acc = runtime_accuracy(path, Backend.ORT, x_test, y_test)
    ov_acc = runtime_accuracy(path, Backend.OPENVINO, x_test, y_test)
    png = out / "fashion_mnist_qat_curve.png"
    plot_curve(curve, png, fp32, ptq_acc)
    print(f"training curve: {png}")
    print()
    rows = [
        ("fp32", "PyTorch", fp32),
        (f"PTQ W{args.bits}A{args.bits}", "PyTorch (simulated int)", ptq_acc),
        (f"QAT W{args.bits}A{args.bits}", "PyTorch (QAT model, eval)", qat_acc),
        (f"QAT W{args.bits}A{args.bits}", "PyTorch (converted)", converted_acc),
        (f"QAT W{args.bits}A{args.bits}", "ONNX Runtime", ort_acc),
        (f"QAT W{args.bits}A{args.bits}", "OpenVINO", ov_acc),
    ]
    print("| model | runs on | test accuracy (10k) | vs fp32 |")
    print("|---|---|---|---|")
    for name, runtime, acc in rows:
        print(f"| {name} | {runtime} | {acc:.2f}% | {acc - fp32:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
