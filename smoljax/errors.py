"""User-facing errors.

Every error a user can cause (a bad file, a bad config, a bad prompt) is a `SmolJaxError`: its message is one line
that says what is wrong and what to do. The CLI prints that line and exits non-zero, with no traceback.
"""


class SmolJaxError(ValueError):
    """A problem with the user's input, explained in one line."""


class ConfigError(SmolJaxError):
    """A config.json or preset that smoljax cannot use."""


class CheckpointError(SmolJaxError):
    """A checkpoint file or directory that is missing, corrupt, truncated or does not match the config."""


class InputError(SmolJaxError):
    """Bad input to a model or to generation: token ids, prompt lengths, images."""
