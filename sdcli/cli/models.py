"""The commands that read and write model files: info, convert and export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sdcli.cli.options import ModelArg, PredictionOpt, VaeOpt
from sdcli.errors import SdcliError, printable


def info(
    model: ModelArg,
    vae: VaeOpt = None,
    prediction: PredictionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Show a model's format, variant, prediction type, parameter counts and dtypes (reads headers only), a
    LoRA's format, targets, ranks and alphas, an embedding's vectors, or the generation parameters stored in a
    PNG."""
    from sdcli.fileio import write_stdout

    if _is_png(model):
        from sdcli.metadata import read_parameters_text, read_png

        if vae or prediction:
            raise SdcliError("--vae and --prediction apply to models, not to images")
        # the text is the file's: escaped (json.dumps escapes every control character itself)
        text = json.dumps(read_png(model)) if as_json else printable(read_parameters_text(model), keep="\n\t")
        write_stdout(text + "\n")
        return
    if lora := _lora_file(model):
        if vae or prediction:
            raise SdcliError("--vae and --prediction apply to models, not to LoRAs")
        summary = lora.summary()
        write_stdout((_json(summary) if as_json else _describe_lora(summary)) + "\n")
        return
    if embedding := _embedding(model):
        if vae or prediction:
            raise SdcliError("--vae and --prediction apply to models, not to embeddings")
        write_stdout((_json(embedding) if as_json else _describe_embedding(embedding)) + "\n")
        return
    from sdcli.loading import inspect_model

    summary = inspect_model(model, vae=vae, prediction=prediction.value if prediction else None).summary()
    write_stdout((_json(summary) if as_json else _describe(summary)) + "\n")


def _json(summary: dict) -> str:
    """One JSON object; a number JSON cannot hold (NaN, infinity: from a damaged file) is an error, not output
    that JSON readers refuse."""
    try:
        return json.dumps(summary, allow_nan=False)
    except ValueError:
        raise SdcliError(f"{printable(summary['path'])}: what it describes holds a number that is not finite (NaN "
                         "or infinity), which JSON cannot hold: the file is damaged") from None


def _lora_file(path: str):
    """The LoRA a .safetensors file holds, or None when it is not one (a model: inspect_model says what it is)."""
    from sdcli.loading.files import open_safetensors
    from sdcli.networks.lora import UNET, read_lora

    file = Path(path)
    try:
        if file.suffix.lower() != ".safetensors" or not file.is_file():
            return None
        if file.stat().st_size == 0:
            raise SdcliError(f"{printable(path)} is empty (0 bytes): not a model, LoRA or embedding; download it "
                             "again")
    except OSError:  # a name too long, ...: inspect_model says so
        return None
    keys = open_safetensors(file)
    if any(k.startswith((UNET, "first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys) or not any(
            k.startswith(("lora_", "unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return None
    return read_lora(file)


def _embedding(path: str) -> dict | None:
    """What `sdcli info` shows of a textual-inversion embedding, or None when the file is not one (a model, or
    a damaged file: inspect_model says what it is)."""
    from sdcli.networks.embeddings import summary

    return summary(path)


def _describe_embedding(summary: dict) -> str:
    widths = summary.get("widths")  # SDXL's: one tensor per text encoder
    width = ", ".join(f"{role} {w}" for role, w in widths.items()) if widths else str(summary["width"])
    rows = [("kind", "textual-inversion embedding"),
            ("vectors", f"{summary['vectors']} (of the 75 tokens a prompt chunk holds)"),
            ("width", width), ("made for", summary["family"] or "unknown")]
    return "\n".join(printable(line) for line in [summary["path"], *(f"  {k:<13} {v}" for k, v in rows)])


def _describe_lora(summary: dict) -> str:
    rows = [("kind", "LoRA"), ("format", summary["format"]),
            ("targets", f"{', '.join(summary['targets'])}; {summary['modules']} modules"),
            ("rank", ", ".join(map(str, summary["ranks"])) or "-"),
            ("alpha", ", ".join(f"{a:g}" for a in summary["alphas"]) or "the rank (scale 1)"),
            ("made for", summary["family"] or "unknown")]
    rows += [(k, v if len(v) <= 200 else v[:200] + "...") for k, v in summary["training"].items()]
    return "\n".join(printable(line) for line in [summary["path"], *(f"  {k:<13} {v}" for k, v in rows)])


def _describe(summary: dict) -> str:
    """`sdcli info`'s lines for a model; what they echo from its files (paths, names) escaped."""
    fmt = {"single-file": "single-file safetensors (original LDM layout)", "diffusers": "diffusers folder"}
    rows = [
        ("format", fmt[summary["format"]]),
        ("variant", summary["variant"]),
        ("prediction", f"{summary['prediction']} ({summary['prediction_source']})"),
        ("latents", f"{summary['latent_channels']} channels at 1/{summary['vae_factor']} size, "
                    f"scale {summary['latent_scale']}"),
    ]
    encoders, added = summary["text_encoders"], summary["added_conditioning"]
    if added is None:  # SD 1.x/2.x: one text encoder, named by its layout
        text = summary["text_encoder"]
        rows.append(("text", f"{'OpenCLIP' if text['layout'] == 'openclip' else 'CLIP'}, {text['layers']} layers, "
                             f"width {text['width']}, conditioning on the "
                             f"{'penultimate' if text['skip_last_layers'] else 'last'} layer"))
        rows.append(("tokenizer", summary["tokenizer"]))
    else:
        rows += _describe_xl(summary, encoders, added)
    if summary["vae_file"]:
        rows.append(("vae file", summary["vae_file"]))
    models = {e["part"]: e["model"] for e in encoders if added is not None and e["model"]}
    for name, comp in summary["components"].items():
        rows.append((name.replace("_", " "), f"{comp['parameters'] / 1e6:,.2f}M parameters, "
                     f"{'/'.join(comp['dtypes'])}" + (f" ({models[name]})" if name in models else "")))
    rows += [("note", note) for note in summary["notes"]]
    width = max(13, *(len(k) for k, _ in rows))  # 13: SD 1.x/2.x's lines as they always were
    return "\n".join(printable(line) for line in [summary["path"], *(f"  {k:<{width}} {v}" for k, v in rows)])


def _describe_xl(summary: dict, encoders: list[dict], added: dict) -> list[tuple[str, str]]:
    """SDXL's lines: each text encoder and tokenizer, the joined context and the added conditioning."""
    rows = []
    for i, e in enumerate(encoders):
        layer = "penultimate" if e["skip_last_layers"] else "last"
        line = (f"{e['model'] or 'CLIP'}: {e['layers']} layers, width {e['width']}, conditioning on the {layer} "
                f"layer{'' if e['final_norm'] else ' without the final norm'}")
        if e["pooled"]:
            line += f"; the pooled vector: its last layer's end token, projected to {e['projection_dim']} wide"
        rows.append(("text" + (f" {i + 1}" if len(encoders) > 1 else ""), line))
    if len(encoders) > 1:
        rows.append(("context", f"{summary['context_dim']} wide: the encoders' hidden states joined "
                                f"({' + '.join(str(e['width']) for e in encoders)})"))
    numbers = added["numbers"]
    rows.append(("added cond", f"{added['width']} wide: the pooled vector ({added['pooled_width']}) and "
                          f"{len(numbers)} numbers, {added['number_width']} wide each ({', '.join(numbers)})"))
    for i, e in enumerate(encoders):
        rows.append(("tokenizer" + (f" {i + 1}" if len(encoders) > 1 else ""), e["tokenizer"]))
    return rows


def _is_png(path: str) -> bool:
    """An image to read parameters from (other image types get a clear error from the PNG reader)."""
    from sdcli.metadata import has_png_signature

    return path.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")) or has_png_signature(path)


def convert(
    src: Annotated[Path, typer.Argument(help="A pickle checkpoint (.ckpt, .pt, .bin, .pth).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
):
    """Convert a trusted pickle checkpoint to .safetensors, loading tensors only (weights_only=True)."""
    from sdcli.loading.convert import pickle_to_safetensors

    n = pickle_to_safetensors(src, dst, overwrite)
    print(f"wrote {n} tensors to {dst}", file=sys.stderr)


def export(
    model: Annotated[str, typer.Argument(help="A train-unet output folder, or any model sdcli loads.",
                                         show_default=False, metavar="MODEL")],
    dst: Annotated[str, typer.Argument(help="A .safetensors file (the original single-file layout), or a folder (a "
                                       "diffusers model).", show_default=False, metavar="OUT")],
    raw: Annotated[bool, typer.Option("--raw", help="The latest checkpoint's trained weights instead of their EMA.")]
    = False,
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep fp32 weights (default: fp16, half the size).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT (a folder's files) if it exists.")]
    = False,
):
    """Write a model as one original-layout (LDM) .safetensors file, which A1111, ComfyUI and diffusers'
    from_single_file read, or as a diffusers folder (fp16 by default both ways)."""
    from sdcli.training.export import export

    n = export(model, dst, raw=raw, fp32=fp32, overwrite=overwrite)
    print(f"wrote {dst} ({n / 1e6:.1f} MB)", file=sys.stderr)
