"""LyCORIS's weight deltas (LoHa, LoKr) and DoRA's weight decomposition, as AUTOMATIC1111's Lora extension
computes them (network_hada.py, network_lokr.py, lyco_helpers.py, network.py), checked against peft's LoHa, LoKr
and DoRA layers in tests/test_lycoris.py. Pure tensor math: reading files and naming modules is lora.py's.

LoHa (Hadamard product of two low-rank products), per factor pair i = 1, 2:
    plain  hada_wi_a [out, r], hada_wi_b [r, in*kh*kw] (or [r, in, kh, kw]):  Wi = a @ b
    CP     hada_ti [r, r, kh, kw], hada_wi_a [r, out], hada_wi_b [r, in]:   Wi[o,i,y,x] = sum t[p,q,y,x] a[p,o] b[q,i]
    delta = W1 * W2 (elementwise), rank = hada_w1_b.shape[0]
LoKr (Kronecker product): w1 = lokr_w1 [a, c] or lokr_w1_a [a, r] @ lokr_w1_b [r, c];
    w2 = lokr_w2 [b, d(, kh, kw)], or lokr_w2_a [b, r] @ lokr_w2_b [r, d*kh*kw], or the CP form above with
    lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d];  delta = kron(w1, w2) -> [a*b, c*d(, kh, kw)].
    rank = lokr_w2_b.shape[0], else lokr_w1_b.shape[0], else None (both factors full: the scale is 1, whatever
    the file's alpha, as in A1111 and LyCORIS, which writes alpha = dim there).

How the lead combines them (A1111's NetworkModule.calc_scale and finalize_updown since its DoRA support):
    delta, rank = loha(t, W.shape)                    # or lokr(t, W.shape)
    scale = t["scale"] if present, else alpha / rank if alpha and rank, else 1.0      # calc_scale
    no DoRA:  W' = W + multiplier * scale * delta
    DoRA:     W' = W + multiplier * decompose(W, scale * delta, dora_scale)
i.e. A1111 scales the delta by alpha / rank BEFORE the decomposition and by the multiplier AFTER it: the
multiplier blends linearly between W and the decomposed weight (ComfyUI's weight_decompose does the same with
its strength). That is what sdcli follows. LyCORIS's own merge (apply_weight_decompose(W + scale*delta, m))
instead gives (W + s*delta) * (m * (dora_scale / norm - 1) + 1), which equals A1111's at multiplier 1 only.
W is the weight as it stands when this network is applied (A1111 applies several networks in turn, each seeing
the weight the earlier ones left), so DoRA patches are functions of the current weight (Patcher's callable
changes).

DoRA layouts, told apart by dora_scale's shape for a weight [out, in, ...]:
    [1, in, 1, ...] or [in]   one magnitude per input column: A1111's, the DoRA paper's, LyCORIS's wd_on_out=False
    [out, 1, 1, ...] or [out] one magnitude per output row: LyCORIS's default (wd_on_out=True), and peft's
A1111 itself only takes column norms, so a rows-layout file broadcasts [out, 1] / [1, in] into a scrambled
[out, in] there; ComfyUI detects rows by shape[0] == out but then divides by the norm of W alone. sdcli takes the
norm of W + scale * delta along the layout's axes for both, as LyCORIS and peft define DoRA. A 1-D scale of a
square weight is taken as rows (peft's lora_magnitude_vector is the only 1-D writer). peft keeps a conv's
magnitudes as [1, out, 1, 1], which would read as columns: a reader of PEFT files reshapes them to [out] first.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from sdcli.errors import ModelLoadError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KEYS = LOHA_KEYS + LOKR_KEYS  # every tensor-name suffix (after "<module>.") the two formats use
_LOHA_NEEDED = LOHA_KEYS[:4]
_EPS = torch.finfo(torch.float32).eps  # keeps an all-zero row or column finite (LyCORIS and ComfyUI add it too)


def kind(suffixes: Iterable[str]) -> str | None:
    """'loha' or 'lokr' when one module's tensor suffixes make a whole module of that format (A1111's
    create_module tests), else None: not LyCORIS, incomplete, or a mix of both."""
    s = set(suffixes)
    is_loha = all(k in s for k in _LOHA_NEEDED)
    has_1 = "lokr_w1" in s or {"lokr_w1_a", "lokr_w1_b"} <= s
    has_2 = "lokr_w2" in s or {"lokr_w2_a", "lokr_w2_b"} <= s
    if is_loha and not s & set(LOKR_KEYS):
        return "loha"
    if has_1 and has_2 and not s & set(LOHA_KEYS):
        return "lokr"
    return None


def loha(t: Mapping[str, Tensor], shape: torch.Size) -> tuple[Tensor, int]:
    """One LoHa module's unscaled delta in the weight's `shape`, and the rank its alpha is divided by."""
    _need(t, _LOHA_NEEDED, "LoHa")
    try:
        w1 = _low_rank(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
        w2 = _low_rank(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
        delta = _fit(w1, shape, "LoHa") * _fit(w2, shape, "LoHa")  # Hadamard product
    except RuntimeError:  # factors whose inner sizes disagree
        raise ModelLoadError(f"the LoHa factors do not fit together ({_sizes(t, LOHA_KEYS)})") from None
    return delta, rank(t)


def lokr(t: Mapping[str, Tensor], shape: torch.Size) -> tuple[Tensor, int | None]:
    """One LoKr module's unscaled delta kron(w1, w2) in the weight's `shape`, and the rank its alpha is divided
    by, or None when both factors are full matrices (then the scale is 1)."""
    if kind(t) != "lokr":
        raise ModelLoadError(f"a LoKr module needs lokr_w1 (or lokr_w1_a and lokr_w1_b) and lokr_w2 (or lokr_w2_a "
                             f"and lokr_w2_b); it has {_sizes(t, LOKR_KEYS)}")
    try:
        w1 = _wide(t["lokr_w1"]) if "lokr_w1" in t else _low_rank(t["lokr_w1_a"], t["lokr_w1_b"], None)
        if "lokr_w2" in t:
            w2 = _wide(t["lokr_w2"])
        else:  # [b, d*kh*kw] flat, or [b, d, kh, kw] from the CP form
            w2 = _low_rank(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
        # [a, c] (x) [b, d, kh, kw]: w1 gets size-1 kernel axes, so kron gives [a*b, c*d, kh, kw]; a flat
        # [b, d*kh*kw] w2 gives [a*b, c*d*kh*kw], the same values in the same order
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))
        delta = _fit(torch.kron(w1, w2.contiguous()), shape, "LoKr")
    except RuntimeError:
        raise ModelLoadError(f"the LoKr factors do not fit together ({_sizes(t, LOKR_KEYS)})") from None
    return delta, rank(t)


def decompose(weight: Tensor, updown: Tensor, dora_scale: Tensor) -> Tensor:
    """DoRA: the change C with weight + C = dora_scale * (weight + updown) / ||weight + updown||, the norm taken
    per input column or per output row as dora_scale's shape says (module docstring). `updown` is the delta
    already scaled by alpha / rank; multiply C by the multiplier (A1111). Computed in float32 (or float64)."""
    w = _wide(weight)
    merged = w + updown.to(w.device, w.dtype).reshape(w.shape)
    axis = magnitude_axis(tuple(w.shape), tuple(dora_scale.shape))
    if axis is None:
        raise ModelLoadError(dora_problem(tuple(w.shape), tuple(dora_scale.shape)))
    others = [d for d in range(w.ndim) if d != axis]  # the norm runs over every axis but the magnitude's
    keep = [w.shape[d] if d == axis else 1 for d in range(w.ndim)]  # [out, 1, ...] or [1, in, ...]
    norm = torch.linalg.vector_norm(merged, dim=others, keepdim=True) + _EPS
    magnitude = dora_scale.to(w.device, w.dtype).reshape(keep)
    return merged * (magnitude / norm) - w


# --- sizes and bounds, before any delta is made (lora.check) ------------------------------------------------

def rank(shapes: Mapping[str, Sequence[int] | Tensor]) -> int | None:
    """The rank a LoHa or LoKr module's alpha is divided by: hada_w1_b's rows; LoKr's w2 factor's, else its w1
    factor's (A1111's order), else None (both factors full). Takes shapes or the tensors themselves."""
    for key in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in shapes:
            return int(_shape(shapes[key])[0])
    return None


def delta_shape(shapes: Mapping[str, tuple]) -> tuple[int, int]:
    """A LoHa or LoKr module's delta as [rows, columns] (a kernel's axes folded into the columns), from its
    tensors' shapes alone, as loha and lokr build it; ValueError saying which factors do not fit together."""
    k = kind(shapes)
    if k == "loha":
        halves = [_product(shapes, f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}") for i in (1, 2)]
        if halves[0] != halves[1]:  # multiplied elementwise
            raise ValueError(f"its two LoHa halves make {list(halves[0])} and {list(halves[1])} changes")
        return halves[0]
    if k != "lokr":
        raise ValueError(f"it is neither a whole LoHa nor a whole LoKr module ({', '.join(sorted(shapes))})")
    if "lokr_w1" in shapes:
        w1 = _matrix(shapes, "lokr_w1", exact=True)
    else:
        w1 = _product(shapes, "lokr_w1_a", "lokr_w1_b", None)
    w2 = _product(shapes, "lokr_w2_a", "lokr_w2_b", "lokr_t2") if "lokr_w2" not in shapes else \
        _flat(_matrix(shapes, "lokr_w2"))
    return w1[0] * w2[0], w1[1] * w2[1]  # kron


def bound(t: Mapping[str, Tensor]) -> float:
    """An upper bound on the largest value of a LoHa or LoKr module's unscaled delta (its sizes checked by
    delta_shape), from its factors' absolute values: far cheaper than the delta itself."""
    if kind(t) == "loha":
        return product_bound(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1")) * \
            product_bound(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
    w1 = _largest(t["lokr_w1"]) if "lokr_w1" in t else product_bound(t["lokr_w1_a"], t["lokr_w1_b"], None)
    w2 = _largest(t["lokr_w2"]) if "lokr_w2" in t else product_bound(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
    return w1 * w2  # each value of kron(w1, w2) is one value of w1 times one of w2


def product_bound(a: Tensor, b: Tensor, t: Tensor | None) -> float:
    """An upper bound on |_low_rank(a, b, t)|: |sum_k a[i,k] b[k,j]| <= sum_k max_i |a[i,k]| max_j |b[k,j]|; in
    the CP form, sum_pq max_o |a[p,o]| max |t[p,q]| max_i |b[q,i]| (a LoRA's up, down and mid are the same two
    forms). Reductions only: an elementwise pass over the factors costs several times more on a CPU."""
    b_rows = absmax(b.reshape(b.shape[0], -1), 1)
    if t is None:
        return float(absmax(a.reshape(a.shape[0], -1), 0) @ b_rows)
    return float(absmax(a, 1) @ absmax(t.reshape(*t.shape[:2], -1), 2) @ b_rows)


def absmax(x: Tensor, dim: int | None = None) -> Tensor:
    """max |x| (along `dim`) in float64; NaN where x holds one, so a bound made of these is finite only when its
    factors are. (On a CPU these are the fastest forms: aminmax along a dim is several times slower.)"""
    if dim is not None:
        return x.abs().amax(dim).double()
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi.double(), -lo.double())


def _product(shapes: Mapping[str, tuple], a: str, b: str, t: str | None) -> tuple[int, int]:
    """[rows, columns] of _low_rank's product of factors a and b (and t, when the module has it)."""
    sa, sb = _matrix(shapes, a), _matrix(shapes, b)
    if t is None or t not in shapes:
        if math.prod(sa[1:]) != sb[0]:
            raise ValueError(f"its {a} {list(sa)} and {b} {list(sb)} do not multiply")
        return sa[0], math.prod(sb[1:])
    st = _matrix(shapes, t)
    if len(sa) != 2 or len(sb) != 2 or st[:2] != (sa[0], sb[0]):
        raise ValueError(f"its {t} {list(st)}, {a} {list(sa)} and {b} {list(sb)} do not fit together (the CP form "
                         "is [r, r, kh, kw], [r, out], [r, in])")
    return sa[1], sb[1] * math.prod(st[2:])


def _matrix(shapes: Mapping[str, tuple], key: str, exact: bool = False) -> tuple[int, ...]:
    s = tuple(shapes[key])
    if len(s) < 2 or (exact and len(s) != 2):
        raise ValueError(f"its {key} is {list(s)}, not a matrix")
    return s


def _flat(s: tuple) -> tuple[int, int]:
    return s[0], math.prod(s[1:])


def _shape(x: Sequence[int] | Tensor) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Tensor) else tuple(x)


def _largest(x: Tensor) -> float:
    return float(absmax(x))


# --- helpers ---------------------------------------------------------------------------------------------

def _low_rank(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
    """a @ b for the plain form (a [out, r], b [r, ...] flattened: [out, prod(...)]), or the CP (Tucker) form
    with t [r, r, kh, kw], a [r, out], b [r, in] -> [out, in, kh, kw] (lyco_helpers.make_weight_cp)."""
    a, b = _wide(a), _wide(b)
    if t is None:
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
    return torch.einsum("pq...,po,qi->oi...", _wide(t), a, b)


def _fit(delta: Tensor, shape: torch.Size, name: str) -> Tensor:
    """The delta in the weight's shape: its values must be exactly as many (A1111 reshapes when they are)."""
    if delta.numel() != shape.numel():
        raise ModelLoadError(f"the {name} factors make a {list(delta.shape)} change, but the weight is {list(shape)}")
    return delta.reshape(shape)


def magnitude_axis(wshape: tuple, dshape: tuple) -> int | None:
    """0 when dora_scale holds one magnitude per output row, 1 per input column (module docstring), None when its
    shape is neither."""
    if len(wshape) < 2:
        return None
    out, inn = wshape[0], wshape[1]
    if len(dshape) == 1:
        if dshape[0] == out:
            return 0
        if dshape[0] == inn:
            return 1
    elif len(dshape) <= len(wshape) and all(d == 1 for d in dshape[2:]):
        if tuple(dshape[:2]) == (out, 1):
            return 0
        if tuple(dshape[:2]) == (1, inn):
            return 1
    return None


def dora_problem(wshape: tuple, dshape: tuple) -> str | None:
    """What is wrong with a dora_scale of shape `dshape` for a weight of shape `wshape`, or None."""
    if len(wshape) < 2:
        return f"DoRA needs a matrix or conv weight, not one of shape {list(wshape)}"
    if magnitude_axis(wshape, dshape) is None:
        return (f"dora_scale is {list(dshape)}, but for a {list(wshape)} weight it must be [1, {wshape[1]}, ...] "
                f"(per input) or [{wshape[0]}, 1, ...] (per output)")
    return None


def _need(t: Mapping[str, Tensor], keys: Iterable[str], name: str) -> None:
    missing = [k for k in keys if k not in t]
    if missing:
        raise ModelLoadError(f"a {name} module lacks {', '.join(missing)}")


def _sizes(t: Mapping[str, Tensor], keys: Iterable[str]) -> str:
    return ", ".join(f"{k} {list(t[k].shape)}" for k in keys if k in t) or "none of them"


def _wide(x: Tensor) -> Tensor:
    """Half-precision factors are multiplied in float32: products of many small values lose too much in fp16."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x
