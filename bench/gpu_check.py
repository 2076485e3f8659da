"""CUDA checks on a lent GPU machine (not part of CI; nothing in eightbit requires a GPU).

1. A CUDA model handed to `eightbit.quantize`: a correct result or a clear error, never a silent mix of devices.
2. QAT trains on CUDA: prepare on CPU, `.to("cuda")`, 30 steps, back to CPU, convert, export, ONNX Runtime parity.
3. QAT step vs fp32 step on CUDA (demo CNN and ResNet-18), synchronised timing.
4. DDP with the NCCL backend (1 rank; 2 ranks on one GPU where NCCL allows it): observer reduction runs on NCCL.

    PYTHONPATH=.:bench python3 bench/gpu_check.py --out OUT
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eightbit  # noqa: E402
from eightbit import prepare_qat  # noqa: E402
from eightbit.demos.demo_qat import TinyMobileNet  # noqa: E402
from eightbit.qat import QATConfig  # noqa: E402


def section(title: str):
    print(f"\n=== {title}", flush=True)


def check_cuda_model_quantize(device: str) -> None:
    section("1. quantize() given a model on " + device)
    model = TinyMobileNet().eval().to(device)
    data = [torch.randn(16, 1, 28, 28, device=device) for _ in range(2)]
    try:
        qm = eightbit.quantize(model, data, progress=False)
        x = torch.randn(8, 1, 28, 28)
        ref = model.cpu()(x) if device != "cpu" else model(x)
        try:
            out = qm(x)
        except Exception as exc:  # noqa: BLE001
            print(f"qm(cpu input) raised {type(exc).__name__}: {exc}")
            out = qm(x.to(device)).cpu()
        cos = nn.functional.cosine_similarity(out.flatten(1).cpu(), ref.flatten(1).cpu()).mean()
        print(
            f"quantize OK; output cos vs float {float(cos):.4f}; model param device now "
            f"{next(model.parameters()).device}"
        )
    except Exception as exc:  # noqa: BLE001
        print(f"quantize raised {type(exc).__name__}: {str(exc)[:600]}")


def check_qat_on_device(device: str, out: Path) -> None:
    section("2. QAT trains on " + device)
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    xs = torch.randn(30, 64, 1, 28, 28)
    ys = torch.randint(0, 10, (30, 64))
    qat = prepare_qat(model, [xs[0], xs[1]], progress=False, qat=QATConfig())
    qat = qat.to(device).train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        loss = nn.functional.cross_entropy(qat(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    devices = {str(p.device) for p in qat.parameters()}
    buffers = {str(b.device) for b in qat.buffers()}
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; parameter devices {devices}; buffer devices {buffers}")
    qat = qat.cpu().eval()
    x = xs[0][:16]
    with torch.no_grad():
        ref = qat(x)
    qm = qat.convert()
    with torch.no_grad():
        got = qm(x)
    print(f"convert: max |QAT - converted| {float((ref - got).abs().max()):.4g}")
    path = out / "qat_cuda.onnx"
    qm.export_onnx(path)
    print(f"exported {path.name} ({path.stat().st_size} bytes) with the parity check passing")


def _step_time(model: nn.Module, x, y, device: str, steps: int = 20, rounds: int = 5) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for r in range(rounds + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        if r:  # the first round is warm-up
            times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def check_step_time(device: str) -> None:
    section("3. QAT step vs fp32 step on " + device)
    from models import resnet18

    print("| model | batch | fp32 step ms | QAT step ms | QAT / fp32 |")
    print("|---|---|---|---|---|")
    for name, model, x, classes in (
        ("demo TinyMobileNet", TinyMobileNet().eval(), torch.randn(128, 1, 28, 28), 10),
        ("ResNet-18", resnet18(), torch.randn(32, 3, 224, 224), 1000),
    ):
        y = torch.randint(0, classes, (x.shape[0],))
        qat = prepare_qat(model, [x[:8]], progress=False).to(device)
        fp32 = model.to(device)
        xd, yd = x.to(device), y.to(device)
        f = _step_time(fp32, xd, yd, device)
        q = _step_time(qat, xd, yd, device)
        print(f"| {name} | {'x'.join(map(str, x.shape))} | {1e3 * f:.2f} | {1e3 * q:.2f} | {q / f:.2f}x |", flush=True)


def _ddp_worker(rank: int, world: int, device_of_rank, results) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        device = device_of_rank(rank)
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = TinyMobileNet().eval()
        g = torch.Generator().manual_seed(1)
        xs = torch.randn(12, 2 * world, 1, 28, 28, generator=g)
        ys = torch.randint(0, 10, (12, 2 * world), generator=g)
        qat = prepare_qat(model, [xs[0]], progress=False, qat=QATConfig(observe_steps=4)).to(device).train()
        ddp = nn.parallel.DistributedDataParallel(qat, device_ids=[device])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        for x, y in zip(xs, ys, strict=True):
            share = slice(2 * rank, 2 * rank + 2)
            loss = nn.functional.cross_entropy(ddp(x[share].to(device)), y[share].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in qat.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            spread = max(float((g_ - gathered[0]).abs().max()) for g_ in gathered)
            results.put(f"NCCL world {world}: 12 steps, max parameter difference across ranks {spread:.3g}")
    finally:
        dist.destroy_process_group()


def check_ddp_nccl() -> None:
    section("4. DDP on NCCL")
    for world in (1, 2):
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        os.environ["MASTER_PORT"] = str(29533 + world)
        try:
            mp.spawn(_ddp_worker, args=(world, _cuda0, results), nprocs=world, join=True)
            print(results.get(timeout=5))
        except Exception as exc:  # noqa: BLE001
            print(f"NCCL world {world} failed: {type(exc).__name__}: {str(exc)[-400:]}")


def _cuda0(rank: int) -> int:
    return 0  # one GPU: every rank on device 0 (NCCL may refuse duplicates; that is reported, not hidden)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=tempfile.mkdtemp())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="", help="comma-separated section numbers to skip")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    print(
        f"torch {torch.__version__}; device {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
    )
    steps = [
        ("1", lambda: check_cuda_model_quantize(args.device)),
        ("2", lambda: check_qat_on_device(args.device, out)),
        ("3", lambda: check_step_time(args.device)),
        ("4", check_ddp_nccl),
    ]
    for key, step in steps:
        if key in skip:
            continue
        try:
            step()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
