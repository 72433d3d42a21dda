"""Half-precision weight storage: a model's weights kept in float16 (half the memory) and upcast one layer at a
time, as it runs, to the dtype of that layer's input, so that on the CPU every product is still float32 (ComfyUI's
"manual cast" ops). The images are those of the float32 model with its weights rounded to float16.

    model = checkpoint.load(device, storage=torch.float16)  # read from the file as fp16, then store_half
    store_half(model)  # or on a model already loaded: its layers made casting ones, their weights rounded

store_half changes each layer's class, never its parameters' names: state-dict keys stay the checkpoint's, and
loading.patch.Patcher (LoRA) still replaces a weight with a new Parameter in the weight's dtype (W + delta summed
in float32, then rounded to float16) and puts the very original back on restore.

`pick_weights` is --weights' decision (auto: fp16 when the RAM available would not hold the float32 model).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.batch import check_weights

STORAGE = {"fp32": None, "fp16": torch.float16}  # --weights -> Checkpoint.load's storage
# What a generate needs beyond the weights (imports 0.45 GiB, a 512 px UNet step 0.3, the 1024 px one 1.3, the
# VAE decode 0.55 at 512 px and 1.7 at 1024 px): SD 1.5 peaks at 4.77 GiB at 512 px with its 3.97 GiB of fp32
# weights (scripts/measure_weights_memory.py); the margin covers 1024 px
WORKING_BYTES = 5 << 29  # 2.5 GiB


def _cast(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None,
          slot: int = 0) -> torch.Tensor | None:
    """`t` on `like`'s device in `dtype` (`like`'s by default), for this call only (`t` itself when it already
    is). Without autograd it is written into a scratch buffer kept per device, dtype and `slot` (a weight 0, its
    bias 1), for the memory of the largest weight: a new tensor each layer made an SD 1.5 step 1.17x the fp32
    one, the buffer 1.07x (scripts/measure_weights_memory.py)."""
    if t is None:
        return None
    dtype = dtype or like.dtype
    if t.dtype == dtype and t.device == like.device:
        return t
    if torch.is_grad_enabled():  # (off in inference mode too)
        return t.to(device=like.device, dtype=dtype)  # autograd may keep the weight: a tensor of its own
    key = (like.device, dtype, slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < t.numel():
        with torch.inference_mode(False):  # usable inside and outside inference mode
            buf = _SCRATCH[key] = torch.empty(t.numel(), device=like.device, dtype=dtype)
    return buf[:t.numel()].view(t.shape).copy_(t)


_SCRATCH: dict = {}


def _autocast(x: torch.Tensor) -> bool:
    """Autocast casts the weights of linear layers and convolutions itself: casting first would cast twice."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 asks per device
        return torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()


class CastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _autocast(x):
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x, slot=1))


class CastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _autocast(x):
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x, slot=1))


def _norm_weights(m: nn.Module, x: torch.Tensor) -> tuple:
    """A norm's weight and bias in float32 at least: its math stays float32 whatever the input (a bf16 input
    under autocast gives a bf16 output, as float32 weights do; float16 statistics would overflow)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return _cast(m.weight, x, wide), _cast(m.bias, x, wide, slot=1)


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, *_norm_weights(self, x), self.eps)


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, *_norm_weights(self, x), self.eps)


class CastEmbedding(nn.Embedding):
    compute_dtype = torch.float32  # its input is ids: store_half sets the dtype its vectors come out in

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the rows gathered, then cast: the same values as casting the whole table first, for a fraction of it
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse).to(self.compute_dtype)


# exact classes only: a subclass may compute otherwise, and is left in the compute dtype
CASTS = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.GroupNorm: CastGroupNorm, nn.LayerNorm: CastLayerNorm,
         nn.Embedding: CastEmbedding}
_CASTING = tuple(CASTS.values())


def store_half(module: nn.Module, dtype: torch.dtype = torch.float16, compute: torch.dtype = torch.float32):
    """Keep `module`'s layer weights in `dtype` and compute in their inputs' dtype (`compute` for embeddings),
    in place; any other floating-point parameter or buffer (SDXL's text_projection) is rounded to `dtype` and
    kept in `compute`, so that what no casting layer owns still runs as before, and a loaded model gives what
    Checkpoint.load(storage=dtype) gives. Weights already in `dtype` are not copied (a memory-mapped file's
    stay views of it). Returns `module`."""
    for m in module.modules():
        cast = CASTS.get(type(m))
        if cast is not None:
            m.__class__ = cast
        if isinstance(m, CastEmbedding):
            m.compute_dtype = compute
        casting = isinstance(m, _CASTING)
        for name, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and (p.dtype != dtype or not casting):
                m._parameters[name] = nn.Parameter(_stored(p.detach(), dtype, None if casting else compute),
                                                   requires_grad=p.requires_grad)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                m._buffers[name] = _stored(b, dtype, compute)
    return module


def _stored(t: torch.Tensor, dtype: torch.dtype, compute: torch.dtype | None) -> torch.Tensor:
    """`t` rounded to `dtype` (as a load in `dtype` rounds it), then kept in `compute` when given."""
    t = t.to(dtype)
    return t if compute is None else t.to(compute)


def stored_half(module: nn.Module) -> bool:
    """Whether store_half made `module`'s layers casting ones."""
    return any(isinstance(m, _CASTING) for m in module.modules())


# --- --weights auto ---------------------------------------------------------------------------------------

def available_ram(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's estimate of the bytes a new allocation can take without swapping (MemAvailable), or None
    where it cannot be read (not Linux, an old kernel, a sandbox)."""
    try:
        text = Path(meminfo).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    found = re.search(r"^MemAvailable:\s+(\d+)\s*kB\s*$", text, re.MULTILINE)
    return int(found[1]) * 1024 if found else None


def fp32_bytes(*checkpoints) -> int:
    """What loading.Checkpoint(s) need in RAM with float32 weights: 4 bytes a parameter, plus WORKING_BYTES."""
    return sum(4 * p.parameters for c in checkpoints if c is not None for p in c.parts.values()) + WORKING_BYTES


def pick_weights(name: str, needed: int, device: torch.device | str = "cpu", available: int | None = None) -> str:
    """--weights -> "fp32" or "fp16". auto: fp16 on the CPU when the RAM available (`available`, or
    MemAvailable) is less than `needed` (fp32_bytes), fp32 when it holds that or cannot be read; fp32 on a GPU,
    whose weights are in its own memory and whose precision is autocast's (--precision)."""
    check_weights(name)
    if name != "auto":
        return name
    if torch.device(device).type != "cpu":
        return "fp32"
    free = available_ram() if available is None else available
    return "fp16" if free is not None and free < needed else "fp32"
