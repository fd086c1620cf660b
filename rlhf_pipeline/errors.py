"""The one exception type that means "the user gave us something we cannot use".

Stage code raises `UserError` for bad input (missing paths, malformed files, invalid options, unreachable
services). The CLI turns it into one `rlhf <command>: error: ...` line and a non-zero exit; anything else
is a bug and keeps its traceback. Every message is redacted (`secrets.redact`): an error line never carries a
password or token, whatever URI or server reply it quotes.
"""

from rlhf_pipeline.secrets import redact


class UserError(Exception):
    """Bad input or environment: reported as one line, exit status `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(redact(message))
        if exit_code is not None:
            self.exit_code = exit_code
