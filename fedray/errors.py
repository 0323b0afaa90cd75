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


class RunStopped(FedrayError):
    """A run stopped itself because its input cannot work: every update of
    ``server.max_rejected_rounds`` consecutive aggregations was rejected. Exit code 2."""

    prefix = "run stopped"


class Interrupted(Exception):
    """A run ended by Ctrl-C or SIGTERM after saving what it needs to resume
    (``exit_code``: 130 or 143)."""

    def __init__(self, signal_name: str, exit_code: int, run_dir: str, version: int, checkpoint: str | None):
        super().__init__(f"interrupted by {signal_name} at aggregation {version}")
        self.signal_name, self.exit_code, self.run_dir, self.version, self.checkpoint = (
            signal_name, exit_code, run_dir, version, checkpoint)
