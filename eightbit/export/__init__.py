"""Output formats written from the quantized FX graph: ONNX QDQ (`onnx` entry point, `emit`/`emitter` and one
handler per ATen op in `handlers_*`, dynamo as fallback), Q/DQ stripping for float baselines (`strip`), and fully
int8 TFLite (`tflite`, `tflite_writer`, one handler per ATen op in `tflite_handlers*`; `tflite_run` runs LiteRT/TFLM).

May import: `eightbit.qmath`, `eightbit.fileio`, `eightbit.graph`, and modules of this package.  Never
`calibration`, `convert`, `runtime`, `analysis`, `api`, `cli` or `demos`: an exporter reads a finished graph.
"""
