"""User-facing errors: each renders as one line and maps to exit code 2."""


class FedrayError(Exception):
    """A mistake in user input (config, data folder, address...).

    The CLI prints ``str(err)`` as a single line and exits with code 2.
    """

    prefix = "error"

    def __str__(self) -> str:
        return f"{self.prefix}: {self.args[0] if self.args else ''}"


class ConfigError(FedrayError):
    """A bad configuration value; ``field`` is the dotted path (``data.partition.alpha``)."""

    prefix = "config error"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DataError(FedrayError):
    """A data file or folder is missing or malformed; the message names it."""

    prefix = "data error"
