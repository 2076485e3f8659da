import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import eightbit
from eightbit.analysis.fallback import accuracy_fallback, load_best
from eightbit.analysis.reference import Reference
from tests.analysis.outlier_models import OutlierMLP, batches

EVAL = torch.randn(256, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def quantized():
    model = OutlierMLP().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eightbit.CollapsedRangeWarning)
        qm = eightbit.quantize(model, batches(), progress=False)
    ranking = qm.analyze(batches(), progress=False).ranking
    return model, qm, ranking


def fidelity(model) -> float:
    """1 - relative L2 error of the output against the float model (1.0 for the float model)."""
    with torch.no_grad():
        want, got = OutlierMLP()(EVAL), model(EVAL)
    return 1.0 - float((got - want).norm() / want.norm())


def test_fallback_keeps_exactly_the_outlier_layer_float(quantized, tmp_path):
    model, qm, ranking = quantized
    assert fidelity(qm) < 0.95  # the int8 model misses the target below...
    result = qm.fallback(fidelity, max_drop=0.03, out=tmp_path / "fb", ranking=ranking)
    assert result.met and result.best.float_ops == [OutlierMLP.OUTLIER_OP]  # ...and one float layer meets it
    assert result.model.config.keep_float_nodes == (OutlierMLP.OUTLIER_OP,)
    # float model, int8 model, then 1 op float: the search stops at the first k that meets the target.
    assert result.evaluations == 3 == len((tmp_path / "fb" / "log.jsonl").read_text().splitlines()) - 1
    info = json.loads((tmp_path / "fb" / "best" / "keep_float.json").read_text())
    assert info["keep_float_nodes"] == [OutlierMLP.OUTLIER_OP] and info["meets"]


def test_search_bisects_to_the_fewest_ops(quantized, tmp_path):
    model, qm, ranking = quantized

    # A metric that needs the 3 most sensitive ops float: doubling 1, 2, 4 then bisection tries 3.
    def needs_three(m) -> float:
        return 1.0 if m is model else len(m.config.keep_float_nodes) / 3

    result = accuracy_fallback(qm, needs_three, max_drop=0.0, out=tmp_path / "fb", ranking=ranking, export=False)
    assert len(result.best.float_ops) == 3
    assert [len(c.float_ops) for c in result.candidates] == [0, 0, 1, 2, 4, 3]
    assert result.evaluations == 6


def test_interrupted_search_keeps_its_best_model_loadable(quantized, tmp_path):
    model, qm, ranking = quantized
    calls = []

    def flaky(m) -> float:
        calls.append(m)
        if len(calls) > 3:
            raise RuntimeError("evaluation server went away")
        return 1.0 if m is model else 0.1 * len(m.config.keep_float_nodes)  # never meets 0.999

    out = tmp_path / "fb"
    with pytest.raises(RuntimeError, match="went away"):
        accuracy_fallback(qm, flaky, max_drop=0.001, out=out, ranking=ranking)
    info = json.loads((out / "best" / "keep_float.json").read_text())
    assert info["keep_float_nodes"] == ranking[:1] and not info["meets"]  # the best of the two int8 candidates
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["stopped"].startswith("interrupted: RuntimeError")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", eightbit.MostlyFloatWarning)  # one of four layers float, as asked
        best = load_best(out, model, batches(1)[0])
    assert best.config.keep_float_nodes == tuple(ranking[:1])
    session = ort.InferenceSession(str(out / "best" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: EVAL.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, best(EVAL).numpy(), atol=1e-3)


def test_time_budget_stops_with_the_best_so_far(quantized, tmp_path):
    model, qm, ranking = quantized
    result = accuracy_fallback(
        qm, fidelity, max_drop=0.0001, out=tmp_path / "fb", ranking=ranking, time_budget=0.0, export=False
    )
    assert result.stopped == "time budget spent" and result.evaluations == 1  # only the float model


def test_variant_without_float_ops_is_the_int8_model(quantized):
    model, qm, _ = quantized
    assert torch.equal(Reference(qm, model).variant([])(EVAL), qm(EVAL))


def test_keep_float_nodes_is_checked():
    with pytest.raises(ValueError, match="did you mean 'linear_2'"):
        eightbit.quantize(
            OutlierMLP(), batches(), config=eightbit.QuantConfig(keep_float_nodes=("linear_22",)), progress=False
        )
    with pytest.raises(TypeError, match="tuple of op names"):
        eightbit.QuantConfig(keep_float_nodes="linear")


def test_bad_arguments_are_refused(quantized, tmp_path):
    model, qm, ranking = quantized
    with pytest.raises(ValueError, match="max_drop"):
        accuracy_fallback(qm, fidelity, max_drop=-1, out=tmp_path / "a", ranking=ranking)
    with pytest.raises(ValueError, match="not int8"):
        accuracy_fallback(qm, fidelity, max_drop=0.1, out=tmp_path / "b", ranking=["nope"])
    with pytest.raises(ValueError, match="ranking"):
        accuracy_fallback(qm, fidelity, max_drop=0.1, out=tmp_path / "c")
