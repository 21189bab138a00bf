"""The one exception type for user errors: the CLI prints its message on one line and exits with its code."""

MAX_MESSAGE = 2000  # a message longer than this keeps its start and its end (what is wrong, what to do)


def one_line(message: str) -> str:
    """`message` as one printable line of bounded length: line breaks and control characters (which could
    also drive a terminal) become spaces, and an over-long middle is cut."""
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 400] + " [...] " + message[-300:]
    return "".join(c if c.isprintable() else " " for c in message)


class EdgemergeError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str):
        message = one_line(message)
        super().__init__(message)
        self.message = message


class GateFailed(EdgemergeError):
    """An evaluation gate failed: the model was built but does not meet the recipe's thresholds."""

    exit_code = 3
