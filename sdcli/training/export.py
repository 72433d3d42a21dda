"""sdcli export: a model (a train-unet folder above all) as one original-layout .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from sdcli.errors import SdcliError


def export_single_file(model_path: str, dst: str, raw: bool = False, fp32: bool = False,
                       overwrite: bool = False) -> int:
    """Write the model (its saved weights: the EMA ones for a training run; with `raw`, the latest
    checkpoint's trained weights) to `dst`. Returns the file's size in bytes."""
    from sdcli.fileio import check_output
    from sdcli.loading import load_model
    from sdcli.loading.save import save_single_file
    from sdcli.training import checkpoint

    dst_path = Path(dst).expanduser()
    if dst_path.suffix.lower() != ".safetensors":
        raise SdcliError(f"the output must end in .safetensors, not {dst_path.name}")
    check_output(dst_path, overwrite)  # before the load
    model = load_model(model_path)
    if raw:
        state = checkpoint.latest(Path(model_path).expanduser())
        if state is None or state.get("config", {}).get("kind") != "unet":
            raise SdcliError(f"--raw takes the weights of a train-unet run's latest checkpoint, and {model_path} has "
                             "none; drop --raw to export the model as it is")
        for name in ("unet", "text_encoder"):
            part = {k.removeprefix(name + "."): v for k, v in state["model"].items() if k.startswith(name + ".")}
            if part:  # assign: the loaded weights are views of a read-only file mapping
                model.component(name).load_state_dict(part, strict=True, assign=True)
    save_single_file(model, dst_path, dtype=torch.float32 if fp32 else torch.float16, overwrite=overwrite)
    return dst_path.stat().st_size
