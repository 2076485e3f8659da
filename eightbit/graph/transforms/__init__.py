"""Graph transforms on the captured ATen FX graph; each pass is a thin wrapper around pure tensor math.

May import what `eightbit.graph` may."""

from eightbit.graph.transforms.fold_bn import fold_batchnorm, fold_bn
from eightbit.graph.transforms.fuse_pad import fuse_pad_into_conv
from eightbit.graph.transforms.spellings import normalize_spellings

__all__ = ["fold_batchnorm", "fold_bn", "fuse_pad_into_conv", "normalize_spellings"]
