"""Training machinery shared by the VAE and DiT stages: EMA, lr schedules, video writing, checkpoints, resume,
callbacks, throughput/MFU and distributed checks.

Importing this package imports nothing heavy; the submodules are imported where they are used.
"""

from cogvx_train.train.ema import EMA
from cogvx_train.train.lr_schedule import build_lr_lambda

__all__ = ["EMA", "build_lr_lambda"]
