"""Calibration: observers that collect streaming statistics, calibration methods (pure functions from statistics
or weights to ranges, in one registry), encodings (ranges -> scale/zero point), the calibration pass, and the
output-aware searches (`layerwise` math, `refine` plumbing).

May import: `eightbit.qmath`, `eightbit.config`, `eightbit.graph`, and modules of this package.  Never `convert`,
`export`, `runtime`, `analysis`, `api`, `cli` or `demos`.  `observers` and `methods` import only `qmath` and each
other: `eightbit.config` reads the method registry to validate names.
"""
