"""The error types every stage raises; a leaf module, so any stage can import it.

train.py (and the CLIs) print a GptlabError as one line without a traceback: the
message names the key, file or checkpoint and what to do about it.
"""


class GptlabError(Exception):
    """An error the user can act on: train.py prints it as one line, without a traceback."""


class ConfigError(GptlabError, ValueError):
    """A config value that is bad on its own or does not fit the model, data or machine."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A config value names a file or directory that is not there."""


class DataError(GptlabError, ValueError):
    """Bad data input: a one-line message that names the file, line or setting."""


class CheckpointError(GptlabError, RuntimeError):
    """A checkpoint could not be written or read; the message says which one and why."""


class RunDirBusyError(GptlabError, RuntimeError):
    """Another live run owns the run directory."""
