"""``quantize_``: swap a model's float layers for quantized ones, in place (torchao's convention)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import QuantConv2d, QuantLinear

__all__ = ["quantize_"]

_SWAPS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantize_(
    model: nn.Module,
    weight_bits=8,
    act_bits=8,
    *,
    quantizer: str = "lsq",
    act_signed: bool = True,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    backend: Optional[str] = None,
    fuse_relu: bool = False,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` by a QuantConv2d / QuantLinear.

    The new layers share the old layers' ``weight`` and ``bias`` Parameters (an optimizer built
    before still updates them, and the float weights are kept); the quantizers' parameters (scales,
    logits) are new, so build the optimizer after this call to train them. Only modules of exactly
    these types are swapped (subclasses such as ``MultiheadAttention``'s out_proj use the weight
    directly and are left alone), and only where ``filter_fn(module, fully_qualified_name)`` is
    true when given.

    Args:
        weight_bits, act_bits: as for QuantConv2d (an int, or a tuple for mixed precision;
            act_bits None leaves activations unquantized).
        quantizer: "lsq" (default here: learnable scales, the QAT choice) or "paper".
        act_signed: quantize activations on a grid for either sign (the signed one; the mid-rise
            one where act_bits holds 1, see ``quantizers.symmetric_grid``). True by default
            because a layer's input may be negative (e.g. the first layer); pass False when every
            quantized layer's input is non-negative (after ReLU) to use the full unsigned range.
        filter_fn: ``(module, fqn) -> bool`` choosing which matching layers to swap.
        backend: ops backend for the quantizers, None for the automatic choice.
        fuse_relu: inside an ``nn.Sequential``, an ``nn.ReLU`` directly followed by a swapped layer
            is folded into that layer's activation quantizer (``fuse_relu=True``, the relu grid)
            and replaced by ``nn.Identity``: the values and gradients of the ReLU followed by that
            layer quantizing on the unsigned grid (``act_signed=False``), bit for bit (an in-place
            ReLU included: in a chain its input has no other reader), and one activation-sized
            tensor less kept for backward per fold. With the default ``act_signed=True`` the fold
            therefore also changes that layer's grid, from signed to unsigned: its input is
            non-negative, and the unsigned grid spends all its levels there. Needs ``act_bits``.

    A layer that appears more than once (one module shared by several places) becomes one quantized
    layer shared the same way. Lazy layers must be materialised (one forward pass) first.

    Returns ``model`` (modified in place).
    """
    if fuse_relu and act_bits is None:
        raise ValueError("fuse_relu folds ReLUs into the activation quantizers; it needs act_bits")
    if type(model) in _SWAPS:
        raise ValueError("quantize_ swaps the children of model in place; model itself is a "
                         f"{type(model).__name__}: wrap it in a container (e.g. nn.Sequential) first")
    quant_kwargs = dict(weight_bits=weight_bits, act_bits=act_bits, quantizer=quantizer, act_signed=act_signed,
                        backend=backend)
    _swap_children(model, "", filter_fn, quant_kwargs, fuse_relu, {})
    return model


def _swap_children(parent: nn.Module, prefix: str, filter_fn, quant_kwargs: dict, fuse_relu: bool,
                   swapped: Dict[int, Tuple[nn.Module, bool, str]]) -> None:
    """Swap under ``parent``; ``swapped``: id of each layer swapped so far -> (its quantized layer,
    whether a ReLU was folded into it, where it was first seen), so that a shared layer stays shared."""
    previous = None  # (name, module) of the sibling before, in a Sequential
    # _modules, not named_children(): that yields a module shared by two names once
    for name, child in list(parent._modules.items()):
        fqn = prefix + name
        if child is None:
            continue
        if isinstance(child, LazyModuleMixin) and child.has_uninitialized_params():
            raise ValueError(f"quantize_: {fqn} is a {type(child).__name__} whose parameters are not initialised "
                             "yet; run one forward pass first, so that its weight has a shape")
        cls = _SWAPS.get(type(child))
        if cls is not None and (filter_fn is None or filter_fn(child, fqn)):
            fold = fuse_relu and isinstance(parent, nn.Sequential) and previous is not None \
                and type(previous[1]) is nn.ReLU
            if id(child) in swapped:
                quantized, folded, first = swapped[id(child)]
                if folded != fold:
                    raise ValueError(f"quantize_: {first} and {fqn} are one module, and fuse_relu would fold a "
                                     "ReLU into one use only; give each use its own module, or pass "
                                     "fuse_relu=False")
            else:
                kwargs = dict(quant_kwargs, fuse_relu=True, act_signed=False) if fold else quant_kwargs
                try:
                    quantized = cls.from_float(child, **kwargs)
                except ValueError as e:
                    raise ValueError(f"quantize_: {fqn}: {e}") from None
                swapped[id(child)] = (quantized, fold, fqn)
            setattr(parent, name, quantized)
            if fold:
                setattr(parent, previous[0], nn.Identity())
        else:
            _swap_children(child, fqn + ".", filter_fn, quant_kwargs, fuse_relu, swapped)
        previous = (name, child)
