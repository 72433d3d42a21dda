"""A run's LoRAs: found and checked against the model before it loads, then merged into its weights for the
requests that use them and taken off again bit for bit (loading.patch.Patcher) when the next request uses others.

    loras = Loras(dirs, given)  # given: the --lora entries, whose tags name them by their stems
    loras.prepare(requests' uses, checkpoint.meta_model(), variant)  # every file found, read, matched, checked
    loras.switch(model, uses)  # per batch: nothing to do when the uses are the last batch's
"""

from __future__ import annotations

import os
from pathlib import Path

from sdcli.errors import SdcliError, shown
from sdcli.networks.library import find
from sdcli.networks.lora import LoraFile, check, match, patch, read_lora, targets
from sdcli.networks.tags import LORA_SUFFIXES, LoraUse, lora_name, loras_in

ALIAS = "ss_output_name"  # kohya's name of a LoRA, in its header: A1111 finds a file by it too


def uses_of(prompt: str, negative_prompt: str = "") -> tuple[LoraUse, ...]:
    """The LoRAs a request asks for, from the tags of both prompts (A1111 applies a negative prompt's too)."""
    return (*loras_in(prompt, "the prompt"), *loras_in(negative_prompt, "the negative prompt"))


class Loras:
    def __init__(self, dirs: list[Path], given: tuple[str, ...] = ()):
        """`given`: the files or names of --lora entries, whose tags name them by tags.lora_name: that name
        stands for the given file in the whole run."""
        self.dirs = dirs
        self.given = self._given(given)
        self.files: dict[str, LoraFile] = {}  # a use's name -> its file, read
        self.matched: dict[str, dict[str, str]] = {}  # a use's name -> {module: our weight name}
        self.active: tuple[LoraUse, ...] = ()
        self.patcher = None
        self._hashes: dict[Path, str] = {}  # file -> A1111's short hash, once per run

    def path(self, name: str) -> Path:
        return self._find(self.given.get(name, name))

    def _find(self, name: str) -> Path:
        return find(name, self.dirs, LORA_SUFFIXES, "LoRA", "--lora-dir", alias=ALIAS)

    def _given(self, given: tuple[str, ...]) -> dict[str, str]:
        """{tag name: the --lora entry's file or name}; two files that one tag name would stand for are refused."""
        out: dict[str, str] = {}
        for entry in given:
            name = lora_name(entry)
            if out.setdefault(name, entry) != entry and not os.path.samefile(self._find(out[name]), self._find(entry)):
                raise SdcliError(f"--lora {shown(out[name])} and --lora {shown(entry)} are two files that their "
                                 f"<lora:{name}> tags cannot tell apart: rename one of them")
        return out

    def prepare(self, uses, model, variant: str) -> None:
        """Find, read and check every LoRA `uses` names against `model` (meta weights will do)."""
        table, weights = None, None
        for use in uses:
            if use.name in self.files:
                continue
            if table is None:
                table, weights = targets(model), model.state_dict()
            lora = read_lora(self.path(use.name))
            matched = match(lora, table, variant)
            check(lora, matched, weights, variant)
            self.files[use.name], self.matched[use.name] = lora, matched

    def switch(self, model, uses: tuple[LoraUse, ...]) -> bool:
        """Merge exactly `uses` into `model` (the last batch's taken off first); False when they were merged
        already. A LoRA given twice merges twice, as in A1111."""
        from sdcli.loading.patch import Patcher

        uses = tuple(uses)
        if uses == self.active:
            return False
        if self.patcher is None:
            self.patcher = Patcher(model)
        self.patcher.restore()
        self.active = ()
        for use in uses:
            weights = model.state_dict()  # the current ones: patches stack
            self.patcher.apply(patch(self.files[use.name], use, self.matched[use.name], weights))
        self.active = uses
        return True

    def hashes(self, uses) -> dict[str, str]:
        """A1111's "Lora hashes": {name as the prompt gives it: short hash}."""
        from sdcli.hashing import lora_hash

        out = {}
        for use in uses:
            path = self.files[use.name].path
            if path not in self._hashes:
                self._hashes[path] = lora_hash(path)
            out[use.name] = self._hashes[path]
        return out
