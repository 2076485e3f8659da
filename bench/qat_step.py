"""Cost of one QAT training step against one fp32 training step of the same model and batch (issue 11).

Both steps are forward + backward + SGD update in training mode (BatchNorm with batch statistics; in QAT, the
simulated BatchNorm folding and every fake quantizer learning).  The two variants are timed side by side in
one process, interleaved (fp32, QAT, QAT, fp32, ...) so a slow phase of the shared machine hits both alike;
each block is `--steps` steps after its own warm-up, and the table shows the median block per step, as wall
time and as this process's CPU time (steadier when other processes share the cores).

    PYTHONPATH=. .venv/bin/python bench/qat_step.py [--rounds 6] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import resnet18  # noqa: E402

from eightbit import prepare_qat  # noqa: E402
from eightbit.demos.demo_qat import TinyMobileNet  # noqa: E402
from eightbit.runtime import hw  # noqa: E402


def _step_timer(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def run(steps: int) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps

    return run


def measure(name: str, model: nn.Module, x: torch.Tensor, classes: int, rounds: int, steps: int) -> dict:
    y = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    qat = prepare_qat(model, [x], progress=False)
    timers = {"fp32": _step_timer(model, x, y), "qat": _step_timer(qat, x, y)}
    times = {"fp32": [], "qat": []}
    for r in range(rounds):
        for kind in ("fp32", "qat") if r % 2 == 0 else ("qat", "fp32"):
            timers[kind](1)  # warm-up after the other variant ran
            times[kind].append(timers[kind](steps))
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
    return dict(name=name, batch=tuple(x.shape), fp32=med["fp32"], qat=med["qat"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = sorted(f for f in hw.cpu_flags() if f.startswith(("avx", "fma", "amx")))
    print(f"torch {torch.__version__}, {args.threads} threads; CPU flags: {' '.join(flags) or 'unknown'}")
    rows = [
        measure("demo TinyMobileNet", TinyMobileNet().eval(), torch.randn(128, 1, 28, 28), 10, args.rounds, args.steps),
        measure("ResNet-18", resnet18(), torch.randn(8, 3, 224, 224), 1000, args.rounds, args.steps),
    ]
    print("| model | batch | fp32 step ms (wall / CPU) | QAT step ms (wall / CPU) | QAT / fp32 (wall / CPU) |")
    print("|---|---|---|---|---|")
    for r in rows:
        batch = "x".join(map(str, r["batch"]))
        (fw, fc), (qw, qc) = r["fp32"], r["qat"]
        print(
            f"| {r['name']} | {batch} | {1e3 * fw:.1f} / {1e3 * fc:.1f} | {1e3 * qw:.1f} / {1e3 * qc:.1f} "
            f"| {qw / fw:.2f}x / {qc / fc:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
