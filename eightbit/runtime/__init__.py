"""Runtimes: ONNX Runtime / OpenVINO runners with thread control (`backends`), timing and per-op profiles
(`benchmark`), per-kernel times tied to ONNX nodes (`profile`), the int8-vs-fp32 check of one file (`speedcheck`),
batch-sweep measurement (`sweep`), CPU feature detection (`hw`), the `eightbit bench` command (`cli`), and a LiteRT
runner (`tflite`).

May import: `eightbit.fileio`, `eightbit.export` (to strip Q/DQ for the float baseline), and modules of this
package.  Never `graph`, `calibration`, `convert`, `api`, `analysis`, `cli` or `demos`: a runtime sees files.
"""
