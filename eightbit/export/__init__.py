"""Output formats written from the quantized FX graph: ONNX QDQ (`onnx` entry point, `emit`/`emitter` and one
handler per ATen op in `handlers_*`, dynamo as fallback) and Q/DQ stripping for float baselines (`strip`).

May import: `eightbit.qmath`, `eightbit.fileio`, `eightbit.graph`, and modules of this package.  Never
`calibration`, `convert`, `runtime`, `analysis`, `api`, `cli` or `demos`: an exporter reads a finished graph.
"""
