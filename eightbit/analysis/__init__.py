"""Insight into a quantized model: accuracy metrics and the calibration-method comparison (`eightbit compare`), the
MCU/NPU deployment report of an int8 .tflite (`deployment`, `eightbit report --target mcu`) with LiteRT's kernel sets
against TFLite Micro (`runtime_agreement`), per-layer error of a quantized model (`layers`, on the switchable
float/int8 graph of `reference`) and the accuracy-driven fallback that keeps the most sensitive ops float
(`fallback`), per-op int8 vs float time and the speed-driven fallback (`speed`), the batch-sweep report (`sweep`,
`eightbit bench --sweep`); PNG figures written atomically (`figures`).

May import anything else in eightbit.  Never `cli` or `demos`.
"""
