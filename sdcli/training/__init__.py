"""Training the autoencoder (train-vae) and the denoiser (train-unet): configs, data, objectives, the loop."""
