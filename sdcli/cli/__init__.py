"""The `sdcli` command line. Commands parse options and call the engine; heavy imports (torch, PIL,
transformers) happen inside command bodies so that `sdcli --help` is instant.

application holds the app and main, options the option types; render, models and train the commands, which
import options and are registered here, in the order `sdcli --help` lists them."""

from sdcli.cli import models, render, train
from sdcli.cli.application import app, main

for _command in (render.generate, render.img2img, render.inpaint, render.upscale, models.info, models.convert,
                 train.train_vae, train.train_unet, models.export):
    app.command()(_command)

__all__ = ["app", "main"]
