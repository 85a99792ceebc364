"""Progress a person can read: one live line on a terminal, plain periodic lines in a job's log.

    driver (`svdray train`)                        rank-0 worker (the training loop)
      board = create_board(run)  ----named actor---  reporter = BoardReporter(run)
      with watch(board, Progress("train", N)):         reporter.step(step, loss=..., ...)
          trainer.fit()                                reporter.note("step 7: ...")

The training loop runs in Ray workers while `trainer.fit()` blocks the driver, so rank 0 posts its
latest state to a small named actor (fire and forget, at most a few times a second) and a driver
thread polls it. `Progress` draws the line itself: steps done/total, elapsed, ETA, rate and the
caller's fields (loss EMA, val_loss, trial counts).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

import ray
import ray.data

from svdray.actors import fresh_named_actor


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A progress line for `total` units of work. On a terminal it is redrawn in place; otherwise
    (a log file, a pipe) a plain line is printed every `interval` seconds and at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "steps",
        stream: TextIO | None = None,
        interval: float = 10.0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self._stream = stream
        self.live = self.stream.isatty()
        self.interval = interval
        self.started = time.monotonic()
        self.done = 0
        self.first: tuple[int, float] | None = None  # (done, time) when counting began: the ETA's rate
        self.fields: dict[str, str] = {}
        self.last_line = -math.inf
        self.printed: int | None = None  # `done` of the last plain line
        self.closed = False

    @property
    def stream(self) -> TextIO:
        # Looked up when written to, not held: a sweep's progress callback is pickled by Tune, and
        # the console a driver runs in (pytest's capture, a notebook's) need not be picklable.
        return self._stream or sys.stdout

    def update(self, done: int, **fields: str) -> None:
        now = time.monotonic()
        if self.first is None:
            # A resumed run starts past 0: its rate counts from the first update seen.
            self.first = (done, now) if done > 0 else (0, self.started)
        self.done = done
        self.fields.update({k: v for k, v in fields.items() if v})
        if self.live:
            self._draw()
        elif now - self.last_line >= self.interval or (done >= self.total and self.printed != done):
            self.last_line = now
            self._print()

    def line(self) -> str:
        now = time.monotonic()
        elapsed = now - self.started
        eta = "?"
        if self.first is not None and self.done > self.first[0] and now > self.first[1]:
            rate = (self.done - self.first[0]) / (now - self.first[1])
            eta = format_duration((self.total - self.done) / rate)
        if self.done >= self.total:
            eta = "0:00"
        percent = 100 * self.done / self.total if self.total else 100
        parts = [
            f"{self.label} {self.done}/{self.total} {self.unit} ({percent:3.0f}%)",
            f"elapsed {format_duration(elapsed)}",
            f"ETA {eta}",
            *(f"{k} {v}" for k, v in self.fields.items()),
        ]
        return " | ".join(parts)

    def _print(self) -> None:
        self.printed = self.done
        print(self.line(), file=self.stream, flush=True)

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self.line())
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (a warning from the workers), printed above the live line."""
        if self.live:
            self.stream.write("\r\033[K" + message + "\n")
            self._draw()
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """The final line: in place of the live one, or as the last plain line."""
        if self.closed:
            return
        self.closed = True
        if self.live:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self.printed != self.done:
            self._print()


def board_name(run: str) -> str:
    return f"svdray-progress:{run}"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest state of a run as rank 0 posted it, and the notes not yet shown by the driver."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.notes: list[str] = []

    def post(self, state: dict[str, Any], notes: list[str]) -> None:
        self.state.update(state)
        self.notes.extend(notes)

    def take(self) -> tuple[dict[str, Any], list[str]]:
        notes, self.notes = self.notes, []
        return dict(self.state), notes


def create_board(run: str):
    """A fresh board for this run (one left from an earlier run in this driver is replaced)."""
    return fresh_named_actor(ProgressBoard, board_name(run))


class BoardReporter:
    """The worker side: rank 0 posts each step's numbers (`smoothed`, e.g. the loss, as an EMA), at
    most every `every` seconds, plus every validation and the last step. No board (a Tune trial,
    whose driver shows trial counts instead): nothing is sent."""

    def __init__(self, run: str, total: int, smoothed: str = "loss", every: float = 0.5, decay: float = 0.9):
        try:
            self.board = ray.get_actor(board_name(run))
        except ValueError:
            self.board = None
        self.total, self.smoothed, self.every, self.decay = total, smoothed, every, decay
        self.ema: float | None = None
        self.last_post = -math.inf
        self.pending_notes: list[str] = []

    def step(self, step: int, value: float, samples_per_s: float, val_loss: float | None = None) -> None:
        if math.isfinite(value):
            self.ema = value if self.ema is None else self.decay * self.ema + (1 - self.decay) * value
        now = time.monotonic()
        if self.board is None:
            return
        urgent = val_loss is not None or step >= self.total or self.pending_notes
        if now - self.last_post < self.every and not urgent:
            return
        self.last_post = now
        state = {"step": step, "samples/s": samples_per_s, f"{self.smoothed} (EMA)": self.ema}
        if val_loss is not None:
            state["val_loss"] = val_loss
        self.board.post.remote(state, self.pending_notes)
        self.pending_notes = []

    def note(self, message: str) -> None:
        self.pending_notes.append(message)


def training_fields(state: dict[str, Any]) -> dict[str, str]:
    """The posted numbers as the line shows them (`step` is the count itself)."""
    return {
        name: f"{value:.2f}" if name == "samples/s" else f"{value:.4g}"
        for name, value in state.items()
        if name != "step" and isinstance(value, (int, float))
    }


@contextlib.contextmanager
def watch(board: Any, progress: Progress, poll: float = 0.5) -> Iterator[Progress]:
    """Show what the board holds until the block ends (a driver thread polls it)."""
    stop = threading.Event()

    def show() -> None:
        state, notes = ray.get(board.take.remote(), timeout=30)
        for message in notes:
            progress.note(message)
        if "step" in state:
            progress.update(int(state["step"]), **training_fields(state))

    def poll_loop() -> None:
        while not stop.wait(poll):
            with contextlib.suppress(Exception):  # the board is gone or slow: try again next time
                show()

    thread = threading.Thread(target=poll_loop, name="svdray-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            show()  # what arrived since the last poll: the final step
        progress.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


def collect_rows(dataset: ray.data.Dataset, label: str, total: int, unit: str) -> list[dict[str, Any]]:
    """All rows of a Ray Dataset (as `take_all` gives them), counted on a progress line as they come."""
    progress = Progress(label, total, unit=unit)
    rows = []
    for row in dataset.iter_rows():
        rows.append(row)
        progress.update(len(rows))
    progress.close()
    return rows
