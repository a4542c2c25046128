"""The one exception a user should ever see for a wrong config, a wrong path or a wrong checkpoint."""


class ConfigError(ValueError):
    """A mistake in the user's input. The CLI prints each message as one line and exits with status 2.

    Messages are full sentences that say what is wrong and what would work, e.g.
    "data.num_frames=48 is not of the form 4k+1; use 45 or 49."
    """

    def __init__(self, messages: str | list[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))
