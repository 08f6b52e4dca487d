"""What makes the examples behave like command-line tools: a quiet start and progress lines.

``quiet_startup()`` imports TensorFlow and TensorFlow Datasets without their start-up noise. It
sets ``TF_CPP_MIN_LOG_LEVEL`` to 2 unless it is set, and drops from what the imports write to
stderr TensorFlow's C++ log lines below that level: TensorFlow writes some of them (oneDNN, CPU
features) before its C++ logging reads the variable, so the variable alone does not hold them
back. It also turns off TFDS's progress bars and hides TFDS's Python warnings (its errors still
show). Everything else stays visible: errors, Python warnings, and keras_fancyrnn's own log (the
``keras_fancyrnn`` logger). ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.

``Progress`` prints ``[k/N] label (elapsed 1m05s, about 3m20s left)`` for a loop over N
settings, models or evaluations.

The examples run as ``python examples/<name>.py``, which puts this folder on ``sys.path``; they
import this module and call ``quiet_startup()`` before anything imports TensorFlow. It imports
only the standard library itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TextIO

# A C++ log line of TensorFlow's: severity, MMDD, time, thread id, file:line]
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
# Lines that belong to start-up messages but carry no severity of their own
_INFO_LINES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow"),  # CPU features
)


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as an int (0: everything, 1: no INFO, 2: no WARNING, 3: no
    ERROR); 0 when it is unset or not a number."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def drop_startup_noise(text: str, min_level: int | None = None) -> str:
    """``text`` without TensorFlow's C++ log lines of a severity below ``min_level`` (default:
    ``min_log_level()``) and without the start-up lines that have no severity of their own
    (absl's "before InitializeLog" notice, the CPU-feature line's second half, both INFO-like)."""
    level = min_log_level() if min_level is None else min_level
    if level <= 0:
        return text
    kept = []
    for line in text.splitlines(keepends=True):
        match = _LOG_LINE.match(line)
        if match and _SEVERITY[match.group(1)] < level:
            continue
        if any(pattern.match(line) for pattern in _INFO_LINES):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _stderr_without_noise() -> Iterator[None]:
    """Captures file descriptor 2 (where TensorFlow's C++ code writes) for the block, then
    writes what was captured back to stderr without the noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(drop_startup_noise(captured.read().decode(errors="replace")))
            sys.stderr.flush()


class _HideTfdsWarnings(logging.Filter):
    """Drops TFDS's records below ERROR from the absl logger (TFDS logs through absl)."""

    def __init__(self, tfds_dir: str):
        super().__init__()
        self.tfds_dir = tfds_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.tfds_dir)


def quiet_startup() -> None:
    """Imports TensorFlow and TFDS without their start-up noise (see the module docstring).
    Call it before anything imports TensorFlow; calling it again does nothing new."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        with _stderr_without_noise():
            import tensorflow  # noqa: F401
            import tensorflow_datasets  # noqa: F401
    import tensorflow_datasets as tfds

    if min_log_level() <= 0:
        return
    tfds.disable_progress_bar()
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _HideTfdsWarnings) for f in absl_logger.filters):
        absl_logger.addFilter(_HideTfdsWarnings(os.path.dirname(tfds.__file__) + os.sep))


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: rounded to the second, then to the minute above an hour."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress of a loop over ``total`` units of work, one line per unit:

        [k/N] label (elapsed 1m05s, about 3m20s left)

    The time left assumes each unit still to run takes the mean time of those done; it is left
    out until one is done. Call ``start`` before a unit runs (k is that unit; a unit started
    before and not finished counts as done) or ``finish`` after it (k counts it as done), or
    both. The clock starts when the object is made; ``clock`` (seconds) and ``stream`` (default:
    stdout) are there for tests.
    """

    def __init__(self, total: int, *, clock: Callable[[], float] = time.perf_counter,
                 stream: TextIO | None = None):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        self.total, self.done = total, 0
        self._running = False  # a unit was started and not finished
        self._clock, self._stream = clock, stream
        self._started = clock()

    def start(self, label: str) -> str:
        """Prints and returns the line of the unit about to run, number ``done + 1`` (after
        counting the one running, if any, as done)."""
        if self._running:
            self.done += 1
        if self.done >= self.total:
            raise ValueError(f"all {self.total} units are done; none is left to start")
        self._running = True
        return self._print(self.done + 1, label)

    def finish(self, label: str) -> str:
        """Counts one more unit as done; prints and returns its line."""
        if self.done >= self.total:
            raise ValueError(f"all {self.total} units are already done")
        self.done += 1
        self._running = False
        return self._print(self.done, label)

    def line(self, k: int, label: str) -> str:
        """``[k/N] label (elapsed …, about … left)`` at the clock's current time."""
        elapsed = self._clock() - self._started
        when = f"elapsed {format_duration(elapsed)}"
        if self.done == self.total:
            when += ", done"
        elif self.done > 0:
            left = elapsed / self.done * (self.total - self.done)
            when += f", about {format_duration(left)} left"
        return f"[{k}/{self.total}] {label} ({when})"

    def _print(self, k: int, label: str) -> str:
        text = self.line(k, label)
        print(text, file=self._stream or sys.stdout, flush=True)
        return text
