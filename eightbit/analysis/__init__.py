"""Insight into a quantized model: accuracy metrics and the calibration-method comparison (`eightbit compare`).

May import anything else in eightbit.  Never `cli` or `demos`.
"""
