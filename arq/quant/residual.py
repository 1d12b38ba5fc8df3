"""The quantized residual stream (``QuantConfig.residual_bits``).

A residual network's blocks end in ``relu(f(x) + shortcut(x))``; the tensors that run from one
block to the next are those block outputs. Left in float32 (the default, as HAQ), the integer
CPU model moves them as float32 and adds them in float. With ``residual_bits = b`` each block's
output is fake-quantized once more,

    s = clamp(round(y / s_r), q_lo, q_hi) * s_r,     y = relu(f(x) + shortcut(x)),

by an :class:`ActivationQuantizer` named ``residual_quantizer`` inside the block, calibrated
like every other activation quantizer (unsigned after a ReLU). The next block's layers then
quantize ``s`` to their own bit widths as before. What the integer model makes of it (uint8
codes between blocks, the add inside oneDNN's convolution) is in :mod:`arq.quant.execution`.

A block is a module whose own traced forward (``torch.fx``, submodules kept whole) returns
``add(a, b)`` or ``relu(add(a, b))`` of two computed tensors. Such a module is replaced by a
``torch.fx.GraphModule`` of the same forward with the quantizer before the return; its
parameters and buffers keep their names, so state dicts and :func:`arq.quant.save` files keep
their keys (plus ``<block>.residual_quantizer.scale`` and ``.signed``).
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from arq.quant.modules import QUANT_LAYER_TYPES
from arq.quant.quantizers import ActivationQuantizer, QuantConfig

#: the submodule name of a block's residual-stream quantizer
RESIDUAL_QUANTIZER = "residual_quantizer"


class _BlockTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule stays a call (a Sequential of blocks
    then returns its last block's call, not the add inside it)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name != ""


def _residual_graph(module: nn.Module) -> torch.fx.Graph | None:
    """``module``'s traced graph when it returns ``[relu](add(a, b))``, else None."""
    try:
        graph = _BlockTracer().trace(module)
    except Exception:  # not traceable: not a block arq can see
        return None
    output = next(node for node in graph.nodes if node.op == "output")
    result = output.args[0]
    if not isinstance(result, torch.fx.Node):
        return None
    from arq.quant.execution import _is_add, _is_relu  # the integer path's patterns (it imports this module)

    modules = dict(module.named_modules())
    inner = result.args[0] if _is_relu(result, modules) and result.args else result
    if (not isinstance(inner, torch.fx.Node) or not _is_add(inner)
            or not all(isinstance(arg, torch.fx.Node) for arg in inner.args)):
        return None
    if any(arg.op == "placeholder" for arg in inner.args) and all(arg.op == "placeholder" for arg in inner.args):
        return None  # adds two inputs: a merge, not a block computing its own branch
    return graph


def residual_blocks(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s residual blocks (module docstring), outermost first."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(block + ".") for block in found):
            continue
        if isinstance(module, (*QUANT_LAYER_TYPES, ActivationQuantizer)) or not list(module.children()):
            continue
        if _residual_graph(module) is not None:
            found.append(name)
    return found


def quantize_residual_stream(model: nn.Module, bits: int, config: QuantConfig) -> list[str]:
    """Give every residual block of ``model`` a ``residual_quantizer`` of ``bits`` bits, in place
    (uncalibrated: :func:`arq.quant.quantize.calibrate` sets its range). Returns the blocks' names."""
    blocks = residual_blocks(model)
    for name in blocks:
        block = model.get_submodule(name)
        graph = _residual_graph(block)
        output = next(node for node in graph.nodes if node.op == "output")
        with graph.inserting_before(output):
            quantized = graph.call_module(RESIDUAL_QUANTIZER, (output.args[0],))
        output.args = (quantized,)
        block.add_module(RESIDUAL_QUANTIZER, ActivationQuantizer(bits, config))
        rewritten = torch.fx.GraphModule(block, graph, class_name=type(block).__name__)
        for child_name, child in block.named_children():  # children the forward never calls keep their keys
            if not hasattr(rewritten, child_name):
                rewritten.add_module(child_name, child)
        rewritten.train(block.training)
        model.set_submodule(name, rewritten)
    return blocks
