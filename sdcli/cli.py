"""The `sdcli` command line. Commands parse options and call the engine; heavy imports (torch,
transformers) happen inside command bodies so `sdcli --help` is instant."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli.errors import SdcliError

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion (latent diffusion) from the command line.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Prediction(str, enum.Enum):
    eps = "eps"
    v = "v"


# Options shared by every command that loads a model. Paths stay strings so that the loader sees
# exactly what was typed (typer would turn "" into ".").
ModelArg = Annotated[
    str, typer.Argument(help="A .safetensors checkpoint (original layout) or a diffusers model folder.",
                        show_default=False, metavar="MODEL")
]
VaeOpt = Annotated[
    Optional[str],
    typer.Option("--vae", help="Replace the model's VAE with this .safetensors file or folder.", metavar="PATH"),
]
PredictionOpt = Annotated[
    Optional[Prediction],
    typer.Option("--prediction", help="What the UNet predicts; SD 2.x 768 models are 'v' and their files don't say."),
]


@app.command()
def info(
    model: ModelArg,
    vae: VaeOpt = None,
    prediction: PredictionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Show a model's format, variant, prediction type, parameter counts and dtypes (reads headers only)."""
    from sdcli.loading import inspect_model

    summary = inspect_model(model, vae=vae, prediction=prediction.value if prediction else None).summary()
    if as_json:
        print(json.dumps(summary))
        return
    text = summary["text_encoder"]
    fmt = {"single-file": "single-file safetensors (original LDM layout)", "diffusers": "diffusers folder"}
    rows = [
        ("format", fmt[summary["format"]]),
        ("variant", summary["variant"]),
        ("prediction", f"{summary['prediction']} ({summary['prediction_source']})"),
        ("latents", f"{summary['latent_channels']} channels at 1/{summary['vae_factor']} size, "
                    f"scale {summary['latent_scale']}"),
        ("text", f"{'OpenCLIP' if text['layout'] == 'openclip' else 'CLIP'}, {text['layers']} layers, "
                 f"width {text['width']}, conditioning on the "
                 f"{'penultimate' if text['skip_last_layers'] else 'last'} layer"),
    ]
    rows.append(("tokenizer", summary["tokenizer"]))
    if summary["vae_file"]:
        rows.append(("vae file", summary["vae_file"]))
    for name, comp in summary["components"].items():
        rows.append((name.replace("_", " "), f"{comp['parameters'] / 1e6:,.2f}M parameters, {'/'.join(comp['dtypes'])}"))
    print(summary["path"])
    for key, value in rows:
        print(f"  {key:<13} {value}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A pickle checkpoint (.ckpt, .pt, .bin, .pth).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
):
    """Convert a trusted pickle checkpoint to .safetensors, loading tensors only (weights_only=True)."""
    from sdcli.loading.convert import pickle_to_safetensors

    n = pickle_to_safetensors(src, dst, overwrite)
    print(f"wrote {n} tensors to {dst}", file=sys.stderr)


def main() -> None:
    """Console entry point: every mistake of the user's is one line on stderr and exit code 2."""
    from sdcli.runtime import keep_freed_memory

    keep_freed_memory()  # before any model runs: see sdcli.runtime
    args = sys.argv[1:] or ["--help"]  # a bare `sdcli` shows the help
    try:
        code = app(args, prog_name="sdcli", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        print("sdcli: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # unknown option or command, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).replace("Value error, ", "")
        print(f"sdcli: error: {' '.join(message.split())}{hint}", file=sys.stderr)  # one line, always
        sys.exit(getattr(e, "exit_code", 2))
    except SdcliError as e:
        print(f"sdcli: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)  # one line, even for odd paths
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
