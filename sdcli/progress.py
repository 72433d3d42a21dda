"""Progress bars and messages on stderr (stdout is for data: PNG bytes or JSON lines)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from sdcli.errors import printable


class Progress:
    """A batch bar and a per-image step bar (step, it/s, ETA), shown only on a terminal and without --quiet."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)
        self.live = not quiet and sys.stderr.isatty()
        self._bar = None

    def message(self, text: str, force: bool = False) -> None:
        text = printable(text)  # notes echo paths and prompts: no escape sequence reaches the terminal
        if force or not self.quiet:
            if self._bar is not None:
                self._bar.console.print(text, markup=False, highlight=False)
            else:
                print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def batch(self, total: int) -> Iterator["Progress"]:
        if not self.live:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task) -> Text:
                return Text(f"{task.speed:.2f} it/s" if task.speed else "")

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                   TimeRemainingColumn())
        with RichProgress(*columns, console=self.console, transient=True) as bar:
            self._bar = bar
            self._batch_task = bar.add_task("images", total=total) if total > 1 else None
            try:
                yield self
            finally:
                self._bar = None

    def advance(self) -> None:
        if self._bar is not None and self._batch_task is not None:
            self._bar.advance(self._batch_task)

    @contextlib.contextmanager
    def image(self, label: str, steps: int, preview=None) -> Iterator[Callable[[dict], None] | None]:
        """Yields the sampler's per-step callback, which takes k-diffusion's dict (its "i": the step). `preview`:
        the live preview's path, named beside the bar (or in a line when there is none)."""
        if self._bar is None:
            if preview is not None:
                self.message(f"image {label}: live preview in {preview}")
            yield None
            return
        task = self._bar.add_task(f"image {label}" + (f" (preview: {printable(str(preview))})" if preview else ""),
                                  total=steps)
        try:
            yield lambda step: self._bar.update(task, completed=step["i"] + 1)
        finally:
            self._bar.remove_task(task)

    @contextlib.contextmanager
    def training(self, total: int, done: int) -> Iterator[Callable[[int, float], None]]:
        """A bar of optimizer steps with the loss, it/s and ETA; yields update(step, loss). Off the terminal
        (or with --quiet) a line every 10% instead."""
        if not self.live:
            every = max(1, (total - done) // 10)
            yield lambda step, loss: (step % every == 0 or step == total) and self.message(
                f"step {step}/{total}  loss {loss:.4g}")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            self._bar = bar
            task = bar.add_task("train", total=total, completed=done, loss="-", rate="")
            try:
                yield lambda step, loss: bar.update(
                    task, completed=step, loss=f"{loss:.4g}",
                    rate=f"{bar.tasks[task].speed:.2f} it/s" if bar.tasks[task].speed else "")
            finally:
                self._bar = None
