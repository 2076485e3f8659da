"""The working IR and its rewrites: capture (torch.export -> ATen FX graph), the eightbit torch ops, Q/DQ placement
(op rules as data, one generic algorithm), graph helpers, and graph transforms over pure tensor functions
(`transforms/`: BN folding, pad fusion, attention decomposition, SmoothQuant, bias correction).

May import: `eightbit.qmath`, `eightbit.config`, and modules of this package.  Never `calibration`, `convert`,
`export`, `runtime`, `analysis`, `api`, `cli` or `demos`: a graph rewrite knows nothing of statistics or formats.
"""
