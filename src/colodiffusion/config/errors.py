"""The one exception of the config layer (the CLI turns it into exit code 2 without a traceback)."""


class ConfigError(ValueError):
    """A user mistake in the config: one sentence naming the key and what is allowed."""
