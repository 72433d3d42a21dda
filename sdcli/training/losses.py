"""Training objectives (LDM): the denoiser's noise regression and the autoencoder's reconstruction, KL,
perceptual and adversarial terms."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.errors import SdcliError

# --- denoiser ---------------------------------------------------------------------------------------


def diffusion_target(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the UNet regresses: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0. abar: [B, 1, 1, 1]."""
    if prediction == "eps":
        return eps
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def snr_weights(abar: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v;
    ones when gamma is 0."""
    if not gamma:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


# --- autoencoder ------------------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix as LDM uses it: strided 4x4 convs, BatchNorm, LeakyReLU; one
    logit per overlapping patch. [B, 3, H, W] -> [B, 1, h, w]"""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(width * mult),
                    nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's balance of the adversarial term: |d rec / d w| / |d g / d w| at the decoder's last layer w,
    clamped to [0, 1e4] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# VGG16 `features` as torchvision numbers them: conv layers (with a ReLU after each) and max pools.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the layers LPIPS compares


class VGGPerceptual(nn.Module):
    """LPIPS-style distance on VGG16 features: unit-normalised activations at five depths, squared
    differences weighted per channel (LPIPS's learned `lin` layers when the file has them, else uniformly),
    averaged over pixels and summed over depths. [B, 3, H, W] x2 in [-1, 1] -> [B]"""

    def __init__(self, lin: list[torch.Tensor] | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                ch = v
        self.features = nn.Sequential(*layers)
        widths = [64, 128, 256, 512, 512]
        self.lin = [w.reshape(-1) for w in lin] if lin else [torch.full((c,), 1.0 / c) for c in widths]
        # LPIPS's input scaling layer (ImageNet statistics for inputs in [-1, 1])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for fx, fy, w in zip(self._taps(x), self._taps(y), self.lin, strict=True):
            total = total + ((fx - fy) ** 2 * w.to(fx)[None, :, None, None]).sum(1).mean(dim=(1, 2))
        return total


def load_vgg16(path: str | Path) -> VGGPerceptual:
    """VGG16 weights from a .safetensors file with torchvision's `features.N.weight` names (any prefix), and
    optionally LPIPS's `lin0..lin4` layers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise SdcliError(f"VGG16 weights not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SdcliError(f"{path} is not a .safetensors file ({e}); convert VGG16 weights with `sdcli convert`") \
            from None
    features = {k[k.index("features.") + len("features."):]: v for k, v in tensors.items() if "features." in k}
    lin = [next((v for k, v in tensors.items() if k.startswith(f"lin{i}.") and k.endswith("weight")), None)
           for i in range(5)]
    model = VGGPerceptual(lin if all(w is not None for w in lin) else None)
    expected = model.features.state_dict()
    wrong = [k for k in expected if k not in features or features[k].shape != expected[k].shape]
    if wrong:
        raise SdcliError(f"{path} does not hold VGG16 features (torchvision's features.N.weight names): "
                         f"{wrong[0]} is missing or has another shape")
    model.features.load_state_dict({k: features[k].float() for k in expected})
    return model
