"""The exception types keras_fancyrnn raises for bad input or settings. Each is a ``ValueError``,
so code that catches Keras's ``ValueError`` for the same mistakes keeps working."""


class ConfigError(ValueError):
    """A setting of ``keras_fancyrnn.config`` that does not exist or has a value it cannot take,
    or a setting this machine cannot honour (a register block this CPU lacks)."""
