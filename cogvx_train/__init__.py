"""cogvx-train: train CogVideoX-style text-to-video diffusion models end to end.

Importing the package has no side effects: no config is registered, nothing is downloaded, no heavy module is
imported. The command-line tools live in :mod:`cogvx_train.cli`.
"""

__version__ = "0.1.0"
