"""The one exception type users see: a one-line message that names the fix."""


class SdrtError(Exception):
    """A user-facing failure. The CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, always
