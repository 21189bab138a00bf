"""The one exception type for user errors: the CLI prints its message on one line and exits with its code."""


class EdgemergeError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class GateFailed(EdgemergeError):
    """An evaluation gate failed: the model was built but does not meet the recipe's thresholds."""

    exit_code = 3
