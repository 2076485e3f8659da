"""Integer-only reference execution of an int8 TFLite model (what `eightbit.export.tflite` writes): int8 and int32
tensors only, requantization by fixed-point multiplier and shift as TFLite defines it (`fixed_point`), one kernel
per TFLite operator (`kernels`; LOGISTIC and SOFTMAX in gemmlowp fixed point, `nonlinear`), bit-exact with
TensorFlow Lite Micro; narrower accumulators (int16, saturating or spilling to int32 every n products) are
simulated and measured per layer (`executor`).

May import: modules of this package only (it reads .tflite files).  Never `graph`, `calibration`, `convert`,
`api`, `export`, `runtime`, `analysis`, `cli` or `demos`: the reference needs nothing but the file.
"""
