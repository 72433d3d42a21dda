"""The helper scripts a new user runs first."""

import subprocess
import sys
from pathlib import Path

import torch

from sdcli.loading import load_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_make_random_model_writes_a_model_that_loads_as_described(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_random_model
    finally:
        sys.path.remove(str(SCRIPTS))
    out = tmp_path / "tiny.safetensors"
    subprocess.run([sys.executable, str(SCRIPTS / "make_random_model.py"), str(out)], check=True,
                   capture_output=True)
    model = load_model(out)
    want = make_random_model.architectures()["tiny"]
    assert (model.cfg.unet, model.cfg.vae, model.cfg.text) == (want.unet, want.vae, want.text)
    ids = model.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        eps = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), model.text_encoder(ids))
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
