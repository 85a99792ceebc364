"""What a `svdray` command prints: our own lines and progress by default, everything with --verbose.

Quiet (the default) keeps the libraries' chatter out of the console: Ray's, MLflow's and the
Hugging Face libraries' log levels go to errors only, their download/loading progress bars off, and
Ray workers' output stays in Ray's log files (`ray.init(log_to_driver=False)`, see
`svdray.train.trainer.init_ray`). The choice travels in `SVDRAY_VERBOSE`, which a local Ray
instance started by this process hands on to its workers, as it does the library variables below.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "SVDRAY_VERBOSE"
COMMAND_ENV = "SVDRAY_COMMAND"  # the `svdray ...` command line, for the MLflow runs it starts

# Read by the Hugging Face libraries when they first log; a local Ray instance started from this
# process passes them on to every worker. jobs/runtime_env.yaml sets the same for Ray jobs.
QUIET_LIBRARY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
}
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "matplotlib", "py.warnings")


class QuietFormatter(logging.Formatter):
    """Our own notes as plain lines; anything else names its level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith("svdray") and record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose_output: bool = False) -> None:
    """Set up logging for a command; call before the libraries are imported."""
    if verbose_output:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        return
    for key, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    # Our notes go to stdout with the progress lines (in order); warnings and errors to stderr.
    notes = logging.StreamHandler(sys.stdout)
    notes.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (notes, problems):
        handler.setFormatter(QuietFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[notes, problems])
    logging.getLogger("svdray").setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation notices from inside the libraries are for their maintainers, not our users.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_ray_data() -> None:
    """Ray Data's progress bars off (the progress shown is ours), after its own logging setup (which
    runs when ray.data is imported): quiet, its loggers go to errors only, so the one-time warning
    that the bars are off is not printed either."""
    import ray.data

    if not verbose():
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def quiet_diffusers() -> None:
    """diffusers' loading bars ("Loading pipeline components") follow no environment variable."""
    if not verbose():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
