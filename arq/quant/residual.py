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

With ``QuantConfig.residual_shortcuts`` (the default) both operands of every block's add are
on the stream too, as in torchao's pt2e int8 flow, which quantizes every add input: the shortcut
operand passes through a ``shortcut_quantizer`` of the same ``b`` bits,

* a computed shortcut (a ResNet's downsampling 1x1 convolution + BatchNorm; of the add's two
  operands, the one fewer nodes away from the block's input) is quantized before the add
  (signed: it has no ReLU);
* an identity shortcut is the block's input. Where that input is not already a block's output
  (the first block, after the stem), the input itself is quantized at the block's entry, for
  every use: the branch then reads the stream's values, as in every later block.

So every add of the integer model adds two uint8 code tensors (oneDNN's ``sum`` post-op) and the
convolutions before those quantizers write codes, not float32. Which block inputs come from
another block is read from the model's ``torch.fx`` trace (blocks kept whole; by parts where the
whole cannot be traced); where that is unknown, no entry quantizer is added and such a block adds
a float input.
``residual_shortcuts=False`` leaves shortcuts in float (arq before 2026-11-28, and files saved
then).

A block is a module whose own traced forward (``torch.fx``, submodules kept whole) returns
``add(a, b)`` or ``relu(add(a, b))`` of two computed tensors. Such a module is replaced by a
``torch.fx.GraphModule`` of the same forward with the quantizers inserted; its parameters and
buffers keep their names, so state dicts and :func:`arq.quant.save` files keep their keys (plus
``<block>.residual_quantizer.scale`` and ``.signed``, and the same for ``shortcut_quantizer``).
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from arq.quant.modules import QUANT_LAYER_TYPES
from arq.quant.quantizers import ActivationQuantizer, QuantConfig

#: the submodule name of a block's residual-stream quantizer
RESIDUAL_QUANTIZER = "residual_quantizer"
#: the submodule name of a block's shortcut-operand quantizer (``QuantConfig.residual_shortcuts``)
SHORTCUT_QUANTIZER = "shortcut_quantizer"


class _BlockTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule stays a call (a Sequential of blocks
    then returns its last block's call, not the add inside it)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name != ""


def _residual_add(graph: torch.fx.Graph, modules: dict) -> torch.fx.Node:
    """What a block's graph returns, under its ReLU if any (the add, in a block)."""
    from arq.quant.execution import _is_relu

    result = next(node for node in graph.nodes if node.op == "output").args[0]
    return result.args[0] if _is_relu(result, modules) and result.args else result


def _residual_graph(module: nn.Module) -> torch.fx.Graph | None:
    """``module``'s traced graph when it returns ``[relu](add(a, b))``, else None."""
    try:
        graph = _BlockTracer().trace(module)
    except Exception:  # not traceable: not a block arq can see
        return None
    result = next(node for node in graph.nodes if node.op == "output").args[0]
    if not isinstance(result, torch.fx.Node):
        return None
    from arq.quant.execution import _is_add  # the integer path's patterns (it imports this module)

    inner = _residual_add(graph, dict(module.named_modules()))
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


def _distance_from_input(node: torch.fx.Node) -> int:
    """The number of nodes on the longest path from the graph's inputs to ``node``."""
    depth: dict = {}
    for current in node.graph.nodes:
        depth[current] = 0 if current.op == "placeholder" else 1 + max(
            (depth[parent] for parent in current.all_input_nodes), default=0)
        if current is node:
            break
    return depth[node]


def _shortcut_operand(add: torch.fx.Node) -> torch.fx.Node | None:
    """The add's shortcut operand: a placeholder operand (the identity shortcut), else the one nearer
    the block's input (the 1x1 downsampling convolution against the two-convolution branch);
    None when both are as near."""
    first, second = add.args
    if first.op == "placeholder" or second.op == "placeholder":
        return first if first.op == "placeholder" else second
    near_first, near_second = _distance_from_input(first), _distance_from_input(second)
    if near_first == near_second:
        return None
    return first if near_first < near_second else second


class _BlocksWholeTracer(torch.fx.Tracer):
    """Traces a whole model with the given blocks, arq's layers and quantizers kept whole."""

    def __init__(self, blocks: set[str]):
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (qualified_name in self.blocks or isinstance(module, (*QUANT_LAYER_TYPES, ActivationQuantizer))
                or super().is_leaf_module(module, qualified_name))


def blocks_entered_off_stream(model: nn.Module, blocks: list[str]) -> set[str]:
    """The blocks whose input is computed by something other than a block, in ``model``'s traced
    forward; where ``model`` cannot be traced as a whole (an input check), in its children's, one by
    one. A block whose input comes from outside the traced part is not counted (unknown)."""

    def visit(module: nn.Module, prefix: str) -> set[str]:
        inside = {name[len(prefix):] for name in blocks if name.startswith(prefix)}
        if not inside:
            return set()
        try:
            graph = _BlocksWholeTracer(inside).trace(module)
        except Exception:  # untraceable forward: its children
            return set().union(*(visit(child, f"{prefix}{name}.") for name, child in module.named_children()
                                 if f"{prefix}{name}" not in blocks))
        entered = set()
        for node in graph.nodes:
            if node.op == "call_module" and node.target in inside and node.args:
                source = node.args[0]
                if (isinstance(source, torch.fx.Node) and source.op != "placeholder"
                        and not (source.op == "call_module" and source.target in inside)):
                    entered.add(prefix + node.target)
        return entered

    return visit(model, "")


def _quantize_shortcut(graph: torch.fx.Graph, add: torch.fx.Node, enters_off_stream: bool) -> bool:
    """Insert the ``shortcut_quantizer`` call for ``add``'s shortcut operand; whether one was inserted."""
    shortcut = _shortcut_operand(add)
    if shortcut is None or (shortcut.op == "placeholder" and not enters_off_stream):
        return False
    with graph.inserting_after(shortcut):
        quantized = graph.call_module(SHORTCUT_QUANTIZER, (shortcut,))
    if shortcut.op == "placeholder":  # the block's input joins the stream, for every use
        shortcut.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    else:
        add.replace_input_with(shortcut, quantized)
    return True


def quantize_residual_stream(model: nn.Module, bits: int, config: QuantConfig) -> list[str]:
    """Give every residual block of ``model`` a ``residual_quantizer`` of ``bits`` bits, and with
    ``config.residual_shortcuts`` a ``shortcut_quantizer`` (module docstring), in place
    (uncalibrated: :func:`arq.quant.quantize.calibrate` sets their ranges). Returns the blocks' names."""
    blocks = residual_blocks(model)
    off_stream = blocks_entered_off_stream(model, blocks) if config.residual_shortcuts else set()
    for name in blocks:
        block = model.get_submodule(name)
        graph = _residual_graph(block)
        if config.residual_shortcuts and _quantize_shortcut(graph, _residual_add(graph, dict(block.named_modules())),
                                                            name in off_stream):
            block.add_module(SHORTCUT_QUANTIZER, ActivationQuantizer(bits, config))
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
