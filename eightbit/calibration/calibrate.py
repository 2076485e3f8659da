"""Observer insertion and the single streaming calibration pass."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from eightbit.calibration.methods import lookup_method
from eightbit.calibration.observers import InputSamples, Observer, Statistic, release_scratch
from eightbit.config import QuantSpec
from eightbit.graph.placement import Placement

OBSERVER_PREFIX = "eightbit_observer_"


def activation_axis(spec: QuantSpec) -> int | None:
    """Channel axis for activation statistics: NCHW channels unless the spec says otherwise."""
    if not spec.per_channel:
        return None
    return 1 if spec.channel_axis is None else spec.channel_axis


def insert_observers(
    gm: fx.GraphModule, placement: Placement, spec: QuantSpec, needs: frozenset[Statistic] | None = None
) -> dict[str, Observer]:
    """Insert one observer per tensor group after each member tensor; returns group name -> observer.

    needs: statistics to collect (default: what the spec's method needs)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    needs = lookup_method(spec.method).needs if needs is None else needs
    observers: dict[str, Observer] = {}
    for group, members in placement.groups.items():
        observer = Observer(spec, activation_axis(spec), label=f"tensor {members[0]!r}", needs=needs)
        target = OBSERVER_PREFIX + group
        gm.add_submodule(target, observer)
        observers[group] = observer
        for name in members:
            node = nodes[name]
            # Observers of inputs go after the last input so that every placeholder stays ahead of them.
            with gm.graph.inserting_after(last_input if node.op == "placeholder" else node):
                call = gm.graph.call_module(target, (node,))
            only = placement.consumers.get(name)  # None: every consumer reads the quantized value
            node.replace_all_uses_with(
                call,
                delete_user_cb=lambda user, call=call, only=only: (
                    user is not call and not _is_guard(user) and (only is None or user.name in only)
                ),
            )
    gm.recompile()
    return observers


def _is_guard(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("_guards")


def as_model_inputs(batch) -> tuple[tuple, dict]:
    """A calibration item as (args, kwargs): a tensor/array, a tuple/list of them, or a dict of keyword inputs."""
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding (a UserDict)
        return (), {k: _to_tensor(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_to_tensor(v) for v in batch), {}
    return (_to_tensor(batch),), {}


def _to_tensor(value):
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _check_finite(args: tuple, kwargs: dict, index: int) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"calibration batch {index} contains NaN or Inf; remove or repair those samples "
                "(calibration ranges computed from them would be meaningless)"
            )


def run_calibration(
    gm: fx.GraphModule, data: Iterable, *, progress: bool = True, samples: InputSamples | None = None
) -> int:
    """Run every calibration batch through the observed graph once; returns the number of batches.

    Memory stays flat: observers keep statistics, never activations; `samples`, when given, keeps the first
    few model inputs (a bounded number) for output-aware methods.
    """
    total = len(data) if hasattr(data, "__len__") else None
    batches = 0
    try:
        with torch.no_grad():
            for batches, batch in enumerate(tqdm(data, total=total, desc="calibrating", disable=not progress), 1):
                args, kwargs = as_model_inputs(batch)
                _check_finite(args, kwargs, batches - 1)
                gm(*args, **kwargs)
                if samples is not None and not kwargs:
                    samples.update(args)
    finally:
        release_scratch()
    if batches == 0:
        raise ValueError(
            "calibration_data yielded no batches; pass an iterable or DataLoader of representative model inputs "
            "(a few hundred samples is typical)"
        )
    return batches
