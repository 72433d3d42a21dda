"""Extra networks, as AUTOMATIC1111 calls them: LoRAs (and LyCORIS) merged into the weights, and textual-inversion
embeddings spliced into the prompt's token embeddings."""

from __future__ import annotations

# SDXL's text encoders as its LoRAs and embeddings name them, by the encoder's diffusers folder: CLIP ViT-L is
# kohya's lora_te1_ and an embedding's clip_l, OpenCLIP bigG lora_te2_ and clip_g (the refiner's one encoder too)
XL_ROLES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def encoder_roles(cfg) -> list[str | None]:
    """Each text encoder's role, in cfg.texts' order (`cfg`: a ModelConfig): "clip_l" or "clip_g" for SDXL's,
    None for the one encoder of SD 1.x/2.x (kohya's lora_te_, a plain embedding's one tensor)."""
    folders = [folder for _, _, folder in cfg.kind.encoders]
    return [None] if folders == ["text_encoder"] else [XL_ROLES[f] for f in folders]
