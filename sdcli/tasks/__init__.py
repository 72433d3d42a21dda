"""The tasks (txt2img, img2img, inpaint, upscale), one object each: the only place a task is found by name."""

from __future__ import annotations

from sdcli.batch import REQUEST_KEYS, Request
from sdcli.errors import SdcliError
from sdcli.tasks.base import Task
from sdcli.tasks.img2img import Img2Img
from sdcli.tasks.inpaint import Inpaint
from sdcli.tasks.txt2img import Txt2Img
from sdcli.tasks.upscale import Upscale

TASKS: dict[str, Task] = {t.name: t for t in (Txt2Img(), Img2Img(), Inpaint(), Upscale())}
SPECIFIC = frozenset(k for t in TASKS.values() for k in t.keys)  # request keys that only some tasks take
_DEFAULTS = Request()


def takes(task: Task, key: str) -> bool:
    return key not in SPECIFIC or key in task.keys


def rerender_keys(task: Task) -> tuple[str, ...]:
    """What a stored image record can set again (the rest is per-run or per-batch; --lora is in the prompt)."""
    return tuple(k for k in REQUEST_KEYS if k not in ("output", "n_images", "batch_size", "lora") and takes(task, k))


def check_keys(task: Task, r: Request) -> None:
    """A request sets no key that another task takes but this one does not."""
    for key in REQUEST_KEYS:
        if not takes(task, key) and getattr(r, key) != getattr(_DEFAULTS, key):
            takers = " and ".join(t.command for t in TASKS.values() if key in t.keys)
            raise SdcliError(f"--{key.replace('_', '-')} is for {takers}, not {task.command}"
                             + (" (upscale takes --scale)" if key in ("width", "height") else ""))


__all__ = ["SPECIFIC", "TASKS", "Task", "check_keys", "rerender_keys", "takes"]
