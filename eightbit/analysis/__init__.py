"""Insight into a quantized model: accuracy metrics and the calibration-method comparison (`eightbit compare`), and the
MCU/NPU deployment report of an int8 .tflite (`deployment`); PNG figures
written atomically (`figures`); per-layer error of a quantized model (`layers`, on the switchable float/int8
graph of `reference`) and the accuracy-driven fallback that keeps the most sensitive ops float (`fallback`).

May import anything else in eightbit.  Never `cli` or `demos`.
"""
