"""Errors a user can act on.

`UserError` carries a one-line message that says what to do; the CLI prints it and exits with code 2
(no traceback unless --debug). Code that detects bad input raises it; everything else is a bug.
"""


class UserError(Exception):
    """Bad input or a bad request: printed as one line by the CLI, exit code 2."""

    exit_code = 2


class VerificationError(UserError):
    """A pass produced a model that fails a check (checker, shape inference, ORT run, error bound)."""

    exit_code = 1  # the compile failed its checks (not a usage error)

    def __init__(self, pass_name: str, what: str):
        self.pass_name = pass_name
        self.what = what
        super().__init__(f"pass '{pass_name}' broke the model: {what}")
