"""Config validation, derived values and the Hydra resolvers the CLI registers."""

from cogvx_train.config.errors import ConfigError

__all__ = ["ConfigError"]
