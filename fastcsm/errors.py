"""What the commands (`fastcsm ...`, `python -m fastcsm.server`) exit with, and the error that carries it.

Errors a user can cause end in one line on stderr and an exit code, never a traceback:
    0 success · 1 internal error (with traceback) · 2 bad arguments or input (text, voice,
    context, audio files, lengths, settings) · 3 the model or codec could not be loaded · 130 interrupted.
"""

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CliError(Exception):
    """A user error: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code
