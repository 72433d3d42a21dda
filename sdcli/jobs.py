"""Requests planned into image jobs, with seeds and output paths, before any model is loaded (so a mistake
costs nothing), and the checks of those paths (--resume's done images, existing outputs)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdcli.batch import MAX_SEED, MAX_SIZE, Request
from sdcli.errors import SdcliError
from sdcli.output_names import NAME, check_png, expand, output_template, slug

@dataclass(frozen=True)
class Job:
    request: Request  # resolved: seed, schedule, width and height set
    group: int  # which request (prompt) of the run it renders
    index: int  # 1-based over the run
    batch_index: int  # 0-based within its prompt's images
    path: str  # "-" for stdout
    key: str  # identifies the job for --resume: settings and position, not the random seed


def plan(requests: list[Request], model_name: str, size: Callable[[Request], tuple[int, int]],
         now: datetime.datetime | None = None, name: str = NAME,
         draw: Callable[[int], int] | None = None) -> list[Job]:
    """Resolve seeds, schedules, sizes (`size(request)` for what -W/-H leave open) and output paths for every
    image. `draw(n)`: a random number below n, for the prompts without --seed (processes that plan the same run
    side by side pass the same seeded draw, and the same `now`)."""
    from sdcli.networks.tags import strip_tags  # {prompt} in file names: the words, not the LoRAs
    from sdcli.sampling import SAMPLERS  # the sampler's own schedule

    now = now or datetime.datetime.now()
    draw = draw or secrets.randbelow
    jobs: list[Job] = []
    for position, r in enumerate(requests):
        random_seed = r.seed is None
        base_seed = draw(MAX_SEED + 1 - r.n_images) if random_seed else r.seed
        width, height = size(r)
        if max(width, height) > MAX_SIZE:  # the tasks say where a size comes from; this holds whatever it is
            raise SdcliError(f"prompt {position + 1} would render at {width}x{height}, over {MAX_SIZE} px a side")
        r = dataclasses.replace(r, schedule=r.schedule or SAMPLERS[r.sampler].schedule, width=width, height=height)
        template = output_template(r.output, name)
        settings = {**dataclasses.asdict(r), "output": None, "position": position, "model": model_name}  # once
        for i in range(r.n_images):
            seed = (base_seed + i) % (MAX_SEED + 1)
            resolved = dataclasses.replace(r, seed=seed)
            fields = dict(seed=seed, prompt=slug(strip_tags(r.prompt)),
                          image=slug(Path(r.image).stem) if r.image else "",
                          index=len(jobs) + 1, steps=r.steps, sampler=r.sampler,
                          schedule=r.schedule, cfg=f"{r.cfg_scale:g}", width=r.width, height=r.height,
                          model=model_name, date=now.strftime("%Y-%m-%d"), time=now.strftime("%H%M%S"),
                          batch_index=i)
            path = expand(template, fields)
            check_png(path, path)
            identity = {**settings, "seed": None if random_seed else seed, "batch_index": i}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            jobs.append(Job(resolved, position, len(jobs) + 1, i, path, key))
    _check_paths(jobs)
    return jobs


def _check_paths(jobs: list[Job]) -> None:
    seen: dict[str, int] = {}
    for job in jobs:
        if job.path == "-":
            continue
        if job.path in seen:
            raise SdcliError(f"images {seen[job.path]} and {job.index} would both be written to {job.path}: "
                             "add {index} to --output")
        seen[job.path] = job.index


def done_keys(jobs: list[Job]) -> set[str]:
    """Job keys of the images already written into the jobs' output folders (for --resume)."""
    from sdcli.metadata import read_png

    keys: set[str] = set()
    for folder in {Path(j.path).parent for j in jobs if j.path != "-"}:
        if not folder.is_dir():
            continue
        for png in folder.glob("*.png"):
            try:
                key = read_png(png).get("job")
            except SdcliError:
                continue
            if key:
                keys.add(key)
    return keys


def check_outputs(jobs: list[Job], overwrite: bool) -> None:
    """Existing files, and folders that cannot be written, are found before the model loads."""
    from sdcli.fileio import check_output, probe_folder

    folders = set()
    for job in jobs:
        if job.path == "-":
            continue
        path = Path(job.path)
        if path.exists() or path.is_symlink():
            check_output(path, overwrite)
        folders.add(path.parent)
    for folder in folders:
        probe_folder(folder)
