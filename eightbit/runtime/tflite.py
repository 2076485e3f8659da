"""LiteRT (TFLite) runner for timing: a .tflite file on the LiteRT interpreter with XNNPACK and a thread count,
usable wherever `eightbit.runtime.benchmark` takes a runner (`time_interleaved`, `latency`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eightbit.export.tflite_run import litert_interpreter


class LiteRTRunner:
    """One .tflite model on LiteRT (XNNPACK delegate, `threads` threads); feeds by input name."""

    def __init__(self, path: str | Path, threads: int = 2):
        self.path = Path(path)
        self._interp = litert_interpreter(self.path.read_bytes(), threads=threads)
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for detail in self._inputs:
            self._interp.set_tensor(detail["index"], feeds[detail["name"]])
        self._interp.invoke()
        return [self._interp.get_tensor(d["index"]) for d in self._outputs]
