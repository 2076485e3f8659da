"""QAT under DistributedDataParallel (2 processes, gloo): ranks stay identical and match one process trained on
the same global batches, observer statistics included."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eightbit import QuantConfig
from eightbit.qat import QATConfig, prepare_qat
from eightbit.qat.distributed import is_main_process

STEPS, GLOBAL_BATCH = 20, 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _data():
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 3, 8, 8, generator=g)
    ys = torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=g)
    return xs, ys


def _qat_model():
    xs, _ = _data()
    # Observing for 5 steps exercises the cross-rank reduction; BatchNorm is frozen because per-rank batch
    # statistics differ from the global batch's (DDP does not synchronise them).
    return prepare_qat(
        Tiny().eval(),
        list(xs[:2]),
        config=QuantConfig(),
        qat=QATConfig(observe_steps=5, freeze_bn_after=0),
        progress=False,
    )


# A small learning rate: LSQ scale gradients jump where a value crosses a rounding boundary, so the last-bit
# differences of DDP's gradient summation order grow with it (at lr 0.01 scales differed by up to 3.4e-5).
def _train(model, shard: slice):
    xs, ys = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.002)
    model.train()
    for step in range(STEPS):
        loss = nn.functional.cross_entropy(model(xs[step][shard]), ys[step][shard])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        qat = _qat_model()
        ddp = nn.parallel.DistributedDataParallel(qat)
        per_rank = GLOBAL_BATCH // world
        _train(ddp, slice(rank * per_rank, (rank + 1) * per_rank))
        assert is_main_process() == (rank == 0)
        torch.save({k: v for k, v in qat.state_dict().items() if isinstance(v, torch.Tensor)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_match_each_other_and_a_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = _qat_model()
    _train(single, slice(0, GLOBAL_BATCH))
    reference = single.state_dict()
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], reference[key], atol=1e-5, rtol=0), key
    moved = [k for k in rank0 if k.endswith("observed_hi") and not torch.equal(rank0[k], _qat_model().state_dict()[k])]
    assert moved  # the observers did run during the 5 observing steps
