"""The one exception type users see: a one-line message that names the fix, and the argument it is about."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class SdrtError(Exception):
    """A user-facing failure. The CLI prints ``str(err)`` on one line and exits with ``exit_code``.

    ``field`` names the argument the error is about, in the Python API's spelling (``"height"``, ``"steps"``,
    ``"image"``, ...), where one argument is to blame: the server maps it to its clients' spelling by a table.
    """

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        super().__init__(" ".join(message.split()))  # one line, always
        self.field = field


@contextmanager
def needs_extra(what: str, extra: str) -> Iterator[None]:
    """Turn a missing optional dependency inside the block into one line naming the extra that brings it."""
    try:
        yield
    except ImportError as err:
        missing = err.name or str(err)
        raise SdrtError(
            f"{what} needs its extra dependencies ({missing} is missing): pip install 'sdrt[{extra}]'"
        ) from None
