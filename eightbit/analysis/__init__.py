"""Insight into a quantized model: accuracy metrics and the calibration-method comparison (`eightbit compare`), and the
MCU/NPU deployment report of an int8 .tflite (`deployment`) with LiteRT's kernel sets against TFLite Micro
(`runtime_agreement`); PNG figures written atomically (`figures`).

May import anything else in eightbit.  Never `cli` or `demos`.
"""
