"""Graph transforms on the captured ATen FX graph; each pass is a thin wrapper around pure tensor math."""

from eightbit.transforms.fold_bn import fold_batchnorm, fold_bn
from eightbit.transforms.fuse_pad import fuse_pad_into_conv

__all__ = ["fold_batchnorm", "fold_bn", "fuse_pad_into_conv"]
