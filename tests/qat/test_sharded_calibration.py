"""Sharded calibration: 2 gloo ranks, each calibrating on half of the data, merge to one pass's encodings."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eightbit
from eightbit.qat.distributed import merge_calibration
from tests.helpers import ResidualNet, calibration_batches

PERCENTILE = eightbit.QuantConfig(activations=eightbit.uint8_activations(method="percentile"))


def _model():
    torch.manual_seed(0)
    return ResidualNet().eval()


def _worker(rank: int, world: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shard = calibration_batches(n=4)[rank::world]
        calibration = eightbit.calibrate(_model(), shard, methods=["percentile"], progress=False)
        merge_calibration(calibration)
        encodings = {
            "minmax": calibration.quantize().encodings(),
            "percentile": calibration.quantize(PERCENTILE).encodings(),
        }
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(encodings, f)
    finally:
        dist.destroy_process_group()


def test_two_shards_give_the_encodings_of_one_pass(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    calibration = eightbit.calibrate(_model(), calibration_batches(n=4), methods=["percentile"], progress=False)
    single = json.loads(json.dumps(calibration.quantize().encodings()))
    assert ranks[0] == ranks[1]
    for kind in ("activations", "weights"):
        for name, enc in single[kind].items():
            got = ranks[0]["minmax"][kind][name]
            assert got["scale"] == enc["scale"] and got["zero_point"] == enc["zero_point"], name
            if enc.get("mean") is not None:
                assert torch.allclose(torch.tensor(got["mean"]), torch.tensor(enc["mean"]), atol=1e-6), name

    # Histograms are re-binned onto a common grid before summing: percentile ranges agree to a few bins.
    for name, enc in calibration.quantize(PERCENTILE).encodings()["activations"].items():
        got = ranks[0]["percentile"]["activations"][name]
        assert abs(got["scale"][0] - enc["scale"][0]) <= 0.02 * enc["scale"][0], name
