"""sdcli export: a model (a train-unet folder above all) as one original-layout .safetensors file, or as a
diffusers folder."""

from __future__ import annotations

from pathlib import Path

import torch

from sdcli.errors import SdcliError


def export(model_path: str, dst: str, raw: bool = False, fp32: bool = False, overwrite: bool = False) -> int:
    """Write the model (its saved weights: the EMA ones for a training run; with `raw`, the latest checkpoint's
    trained weights) to `dst`: one original-layout file if it ends in .safetensors, else a diffusers folder.
    Returns the bytes written."""
    from sdcli.fileio import check_output
    from sdcli.loading import PICKLE_SUFFIXES, load_model
    from sdcli.loading.save import save_diffusers, save_single_file

    dst_path = Path(dst).expanduser()
    single = dst_path.suffix.lower() == ".safetensors"
    if dst_path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdcliError(f"sdcli writes safetensors only: end OUT in .safetensors (one file) or give a folder "
                         f"(a diffusers model), not {dst_path.name}")
    if single:
        check_output(dst_path, overwrite)  # before the load
    elif dst_path.exists() and not (dst_path.is_dir() and (overwrite or not any(dst_path.iterdir()))):
        raise SdcliError(f"{dst_path} exists{' and is not a folder' if not dst_path.is_dir() else ''}: choose a new "
                         "folder" + (" or pass --overwrite" if dst_path.is_dir() else ""))
    model = load_model(model_path)
    if raw:
        _load_raw(model, Path(model_path).expanduser())
    dtype = torch.float32 if fp32 else torch.float16
    if single:
        save_single_file(model, dst_path, dtype=dtype, overwrite=overwrite)
        return dst_path.stat().st_size
    save_diffusers(model, dst_path, dtype=dtype)
    return sum(f.stat().st_size for f in dst_path.rglob("*") if f.is_file())


def _load_raw(model, run: Path) -> None:
    """The trained (not EMA) weights of a train-unet run's latest checkpoint, into `model`."""
    from sdcli.training import checkpoint

    state = checkpoint.latest(run)
    if state is None or state.get("config", {}).get("kind") != "unet":
        raise SdcliError(f"--raw takes the weights of a train-unet run's latest checkpoint, and {run} has none; "
                         "drop --raw to export the model as it is")
    for name in ("unet", "text_encoder"):
        part = {k.removeprefix(name + "."): v for k, v in state["model"].items() if k.startswith(name + ".")}
        if part:  # assign: the loaded weights are views of a read-only file mapping
            model.component(name).load_state_dict(part, strict=True, assign=True)
