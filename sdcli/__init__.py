"""sdcli: Stable Diffusion (latent diffusion) from the command line."""

__version__ = "0.1.0"
