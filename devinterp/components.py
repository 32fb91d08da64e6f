"""Model components as restrictions for the weight-refined λ̂ (:func:`devinterp.estimate_refined_llc`).

A *restriction* says which weights a component's chains move; every other weight stays at w*.
It is either a list of parameter names / ``fnmatch`` patterns (whole tensors, as
``estimate_llc(weights=...)`` takes), or a mapping ``{parameter_name: bool tensor of that
parameter's shape}`` (True = this entry moves), which can name a slice of a tensor, such as one
attention head inside a fused ``qkv`` weight.

- :func:`attention_heads`: one mask per head, named ``"L0H1"`` (layer 0, head 1), for fused
  ``qkv`` projections (``nn.Linear(d, 3d)``; Hugging Face GPT-2's ``c_attn``/``c_proj``
  Conv1D), separate ``q/k/v/o`` projections (Llama-style), TransformerLens ``W_Q/W_K/W_V/W_O``
  and ``nn.MultiheadAttention``. A head's mask covers its query, key and value rows (and their
  biases) and its columns of the output projection; the output bias is shared by all heads and
  belongs to none. With grouped-query attention (fewer key/value heads than query heads) the
  query heads of a group share their key/value rows; otherwise the heads of a layer partition
  those weights.
- :func:`layers` (``"L0"``, ...) and :func:`mlps` (``"L0MLP"``, ...): whole blocks and their
  MLPs, as lists of parameter names.
- :func:`resolve_components`: any restriction -> ``{parameter: bool mask}``, checked;
  :func:`preview`: a readable table of what each component covers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from devinterp.llc.problem import parameter_aliases, sampled_parameters

__all__ = ["Restriction", "attention_heads", "layers", "mlps", "preview", "resolve_components"]

#: A component's restriction: parameter names / fnmatch patterns, or {parameter: bool mask}.
Restriction = Sequence[str] | Mapping[str, Tensor]

#: The shorthands ``components=`` accepts for the component families of this module.
FAMILIES = ("heads", "layers", "mlps")

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")


# --- attention heads ------------------------------------------------------------------------

class _Heads:
    """Accumulates one layer's head masks: ``mark(h, param, index)`` sets entries True."""

    def __init__(self, model_params: Mapping[str, Tensor], prefix: str, num_heads: int) -> None:
        self.params, self.prefix = model_params, prefix
        self.masks: list[dict[str, Tensor]] = [{} for _ in range(num_heads)]

    def mark(self, head: int, local: str, index: Any) -> None:
        name = f"{self.prefix}{local}"
        if name not in self.params:
            return  # e.g. a projection without bias
        mask = self.masks[head].setdefault(
            name, torch.zeros(self.params[name].shape, dtype=torch.bool))
        mask[index] = True


def _num_heads(module: nn.Module) -> int | None:
    for attr in ("num_heads", "n_head", "n_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def _rows(lo: int, hi: int) -> tuple[slice, ...]:
    return (slice(lo, hi),)


def _cols(lo: int, hi: int) -> tuple[slice, ...]:
    return (slice(None), slice(lo, hi))


def _transformer_lens(m: nn.Module, acc_for: Any) -> _Heads | None:
    """TransformerLens: W_Q (head, d_model, d_head), W_O (head, d_head, d_model)."""
    own = dict(m.named_parameters(recurse=False))
    if not {"W_Q", "W_O"} <= set(own):
        return None
    heads = own["W_Q"].shape[0]
    acc = acc_for(heads)
    for h in range(heads):
        for local in ("W_Q", "b_Q", "W_O"):
            acc.mark(h, local, (h,))
        for kind in ("K", "V"):
            for local in (f"W_{kind}", f"b_{kind}", f"_W_{kind}", f"_b_{kind}"):
                if local in own:  # grouped-query attention keeps fewer K/V heads (_W_K)
                    acc.mark(h, local, (h * own[local].shape[0] // heads,))
    return acc


def _multihead(m: nn.Module, acc_for: Any) -> _Heads | None:
    """``nn.MultiheadAttention``: in_proj rows [q; k; v], out_proj columns."""
    if not isinstance(m, nn.MultiheadAttention):
        return None
    heads, d, hd = m.num_heads, m.embed_dim, m.head_dim
    acc = acc_for(heads)
    for h in range(heads):
        lo, hi = h * hd, (h + 1) * hd
        for j, local in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            acc.mark(h, local, _rows(lo, hi))
            acc.mark(h, "in_proj_weight", _rows(j * d + lo, j * d + hi))
            acc.mark(h, "in_proj_bias", _rows(j * d + lo, j * d + hi))
        acc.mark(h, "out_proj.weight", _cols(lo, hi))
    return acc


def _conv1d_fused(m: nn.Module, acc_for: Any) -> _Heads | None:
    """Hugging Face GPT-2: Conv1D weights are (in, out): c_attn columns [q | k | v], c_proj rows."""
    attn, proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    heads = _num_heads(m)
    if attn is None or proj is None or heads is None or type(attn).__name__ != "Conv1D":
        return None
    d = attn.weight.shape[0]
    hd = d // heads
    acc = acc_for(heads)
    for h in range(heads):
        lo, hi = h * hd, (h + 1) * hd
        for j in range(3):
            acc.mark(h, "c_attn.weight", _cols(j * d + lo, j * d + hi))
            acc.mark(h, "c_attn.bias", _rows(j * d + lo, j * d + hi))
        acc.mark(h, "c_proj.weight", _rows(lo, hi))
    return acc


def _separate(m: nn.Module, acc_for: Any) -> _Heads | None:
    """Llama-style q_proj / k_proj / v_proj / o_proj ``nn.Linear`` layers (rows; o columns)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
        return None
    heads = _num_heads(m)
    hd = getattr(m, "head_dim", None)
    if heads is None and isinstance(hd, int):
        heads = m.q_proj.out_features // hd
    if heads is None:
        return None
    hd = m.q_proj.out_features // heads
    kv = m.k_proj.out_features // hd
    acc = acc_for(heads)
    for h in range(heads):
        lo, hi = h * hd, (h + 1) * hd
        g = h * kv // heads
        for local in ("q_proj", "k_proj", "v_proj"):
            a, b = (lo, hi) if local == "q_proj" else (g * hd, (g + 1) * hd)
            acc.mark(h, f"{local}.weight", _rows(a, b))
            acc.mark(h, f"{local}.bias", _rows(a, b))
        acc.mark(h, "o_proj.weight", _cols(lo, hi))
    return acc


def _linear_fused(m: nn.Module, acc_for: Any) -> _Heads | None:
    """A module with ``num_heads`` and one ``nn.Linear(d, 3d)`` (rows [q; k; v], each viewed as
    (head, head_dim)) followed by one ``nn.Linear(d, d)`` output projection (columns)."""
    heads = _num_heads(m)
    if heads is None:
        return None
    linears = {n: c for n, c in m.named_children() if isinstance(c, nn.Linear)}
    fused = [n for n, c in linears.items() if c.out_features == 3 * c.in_features]
    if len(fused) != 1:
        return None
    d = linears[fused[0]].in_features
    outs = [n for n, c in linears.items() if n != fused[0] and c.in_features == c.out_features == d]
    if len(outs) != 1 or d % heads:
        return None
    hd = d // heads
    acc = acc_for(heads)
    for h in range(heads):
        lo, hi = h * hd, (h + 1) * hd
        for j in range(3):
            acc.mark(h, f"{fused[0]}.weight", _rows(j * d + lo, j * d + hi))
            acc.mark(h, f"{fused[0]}.bias", _rows(j * d + lo, j * d + hi))
        acc.mark(h, f"{outs[0]}.weight", _cols(lo, hi))
    return acc


_LAYOUTS = (_transformer_lens, _multihead, _conv1d_fused, _separate, _linear_fused)


def _attention_modules(model: nn.Module) -> list[tuple[str, list[dict[str, Tensor]]]]:
    """(module name, per-head masks) of every attention module, in module order."""
    params = dict(model.named_parameters())
    found: list[tuple[str, list[dict[str, Tensor]]]] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{f}.") for f, _ in found if f):
            continue
        prefix = f"{name}." if name else ""
        for layout in _LAYOUTS:
            acc = layout(m, lambda heads, prefix=prefix: _Heads(params, prefix, heads))
            if acc is not None:
                found.append((name, acc.masks))
                break
    return found


def attention_heads(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """One restriction per attention head, ``{"L0H0": {parameter: bool mask}, ...}``.

    Layer ``L<i>`` is the i-th attention module in module order. Raises ``ValueError`` when
    the model has no attention layout this module knows (name the entries yourself then, as
    ``{parameter: bool mask}``).
    """
    found = _attention_modules(model)
    if not found:
        raise ValueError(
            f"found no attention heads in {type(model).__name__}: known layouts are a fused "
            "nn.Linear(d, 3d) qkv with num_heads, Hugging Face GPT-2 c_attn/c_proj, "
            "q_proj/k_proj/v_proj/o_proj, TransformerLens W_Q/W_K/W_V/W_O and "
            "nn.MultiheadAttention; pass components={name: {parameter: bool mask}} instead")
    return {f"L{i}H{h}": masks for i, (_, heads) in enumerate(found)
            for h, masks in enumerate(heads)}


# --- layers and MLPs ------------------------------------------------------------------------

def _blocks(model: nn.Module) -> list[str]:
    """Module names of the model's blocks: the enclosing list element of each attention module,
    else the parameterized elements of its largest ``ModuleList`` / ``Sequential``."""
    out: list[str] = []
    for name, _ in _attention_modules(model):
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        block = ".".join(parts[: digits[-1] + 1]) if digits else name
        if block not in out:
            out.append(block)
    if out:
        return out
    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            kids = [f"{name}.{n}" if name else n for n, c in m.named_children()
                    if any(True for _ in c.parameters())]
            if len(kids) > len(best):
                best = kids
    return best


def _names_under(model: nn.Module, prefix: str) -> list[str]:
    return [n for n in dict(model.named_parameters()) if n.startswith(f"{prefix}.")]


def layers(model: nn.Module) -> dict[str, list[str]]:
    """One restriction per block, ``{"L0": [parameter names], ...}``: the transformer blocks
    (the list element holding each attention module), else the parameterized elements of the
    model's largest ``nn.ModuleList`` / ``nn.Sequential``."""
    blocks = _blocks(model)
    out = {f"L{i}": _names_under(model, b) for i, b in enumerate(blocks)}
    out = {k: v for k, v in out.items() if v}
    if not out:
        raise ValueError(f"found no layers in {type(model).__name__} (no attention blocks, "
                         "ModuleList or Sequential with parameters); pass components="
                         "{name: [parameter names]} instead")
    return out


def mlps(model: nn.Module) -> dict[str, list[str]]:
    """One restriction per block's MLP (a child named ``mlp``, ``feed_forward``, ``ffn`` or
    ``mlp_block``), ``{"L0MLP": [parameter names], ...}``."""
    out = {}
    for i, block in enumerate(_blocks(model)):
        for child in _MLP_NAMES:
            names = _names_under(model, f"{block}.{child}")
            if names:
                out[f"L{i}MLP"] = names
                break
    if not out:
        raise ValueError(f"found no MLPs in the blocks of {type(model).__name__} (a child "
                         f"named one of {_MLP_NAMES}); pass components={{name: [parameter "
                         "names]} instead")
    return out


# --- resolution and preview -----------------------------------------------------------------

def resolve_components(model: nn.Module, components: Mapping[str, Restriction] | str
                       ) -> dict[str, dict[str, Tensor]]:
    """Every component as ``{canonical parameter name: bool mask}``, in the model's parameter
    order, each with at least one True entry. ``components`` may also be one of ``"heads"``,
    ``"layers"``, ``"mlps"``. Raises ``ValueError`` / ``TypeError`` naming the bad component."""
    if isinstance(components, str):
        families = {"heads": attention_heads, "layers": layers, "mlps": mlps}
        if components not in families:
            raise ValueError(f"components={components!r}: the shorthands are {FAMILIES}; else "
                             "pass a mapping {name: [parameter names] or {parameter: mask}}")
        components = families[components](model)
    if not isinstance(components, Mapping) or not components:
        raise TypeError("components must be a non-empty mapping {name: [parameter names] or "
                        f"{{parameter: bool mask}}}} or one of {FAMILIES}, got {components!r}")
    named = dict(model.named_parameters())
    aliases = parameter_aliases(model)
    out = {}
    for cname, spec in components.items():
        if not isinstance(cname, str) or not cname:
            raise TypeError(f"component names must be non-empty strings, got {cname!r}")
        if isinstance(spec, Mapping):
            masks = _resolve_masks(cname, spec, named, aliases)
        else:
            try:
                chosen = sampled_parameters(model, spec)
            except (TypeError, ValueError) as e:
                raise type(e)(f"component {cname!r}: {e}") from None
            masks = {k: torch.ones(p.shape, dtype=torch.bool) for k, p in chosen.items()}
        out[cname] = {k: masks[k] for k in named if k in masks}
    return out


def _resolve_masks(cname: str, spec: Mapping[str, Any], named: Mapping[str, Tensor],
                   aliases: Mapping[str, str]) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    for pname, mask in spec.items():
        if pname not in aliases:
            close = fnmatch.filter(list(named), f"*{pname.rsplit('.', 1)[-1]}*")[:5]
            raise ValueError(f"component {cname!r}: {pname!r} is not a parameter of the model "
                             f"(similar names: {close}); use names from model.named_parameters()")
        canonical = aliases[pname]
        shape = tuple(named[canonical].shape)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"component {cname!r}: the mask of {pname!r} must be a bool tensor "
                            f"of shape {shape} (True = this entry moves), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}; pass mask.bool()")
        if tuple(mask.shape) != shape:
            raise ValueError(f"component {cname!r}: the mask of {pname!r} has shape "
                             f"{tuple(mask.shape)}, the parameter has {shape}")
        mask = mask.detach().cpu()
        masks[canonical] = masks[canonical] | mask if canonical in masks else mask.clone()
    masks = {k: m for k, m in masks.items() if bool(m.any())}
    if not masks:
        raise ValueError(f"component {cname!r} moves no entry (every mask is all False); give "
                         "it at least one True entry or leave it out")
    return masks


def preview(model: nn.Module, components: Mapping[str, Restriction] | str) -> str:
    """A readable table of what each component moves: component, parameter, shape, entries
    moved (of the parameter's total), and each component's total. Check masks with it before
    a long estimate."""
    resolved = resolve_components(model, components)
    rows = [("component", "parameter", "shape", "entries")]
    for cname, masks in resolved.items():
        total = 0
        for pname, mask in masks.items():
            n = int(mask.sum())
            total += n
            rows.append((cname, pname, "×".join(map(str, mask.shape)) or "scalar",
                         f"{n} of {mask.numel()}"))
        rows.append((cname, "(total)", "", str(total)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)

