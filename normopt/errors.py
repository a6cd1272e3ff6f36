"""Errors that the CLI turns into one clear line on stderr and their exit code."""


class NormoptError(Exception):
    """A bad input or usage: the message is one line meant for the user."""

    exit_code = 2


class VerificationFailed(Exception):
    """The optimized model is not equivalent to its input (exit code 1)."""

    exit_code = 1

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class InternalError(Exception):
    """normopt produced something it must not write (a bug, not a bad input): exit code 3."""

    exit_code = 3
