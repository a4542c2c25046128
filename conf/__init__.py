"""cogvx-train's Hydra configs. This directory ships inside the package as ``cogvx_train.conf``."""
