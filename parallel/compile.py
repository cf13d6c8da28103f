"""Compiled transformer blocks (``compile: true``): each block's ``forward`` goes through ``torch.compile``
(TorchDynamo + Inductor), one block at a time, as torchtitan's ``apply_compile`` does.

What is compiled: every :class:`~model.decoder.DecoderLayer`, :class:`~model.vision.VisionBlock` and CoCa
:class:`~model.coca.TextBlock`. Blocks of one class share their graphs (parameters are graph inputs), so a model
compiles a handful of graphs whatever its depth.

What stays eager, at graph breaks marked ``torch.compiler.disable`` where they are defined: the attention cores
(a loop over packed documents on host metadata, whose count and lengths change every batch; under context
parallelism, the key/value exchange), and the routed experts (the grouped GEMM, which has no fake-tensor kernel
outside bf16; under expert parallelism, the all-to-all dispatch whose sizes are read on the host). Those are
library kernels a compiler would not fuse; what the graphs fuse is everything between them: norms, RoPE,
projections' epilogues, SwiGLU/GELU, routing, residuals.

Order with activation checkpointing (parallel/activation_checkpoint.py): the checkpoint hooks stay on the module's
``__call__`` and only ``forward`` is compiled, so checkpointing wraps the compiled graphs, eagerly. torchtitan
compiles *around* its checkpoint wrapper instead (Dynamo then traces the checkpoint as one region), but that needs a
block without graph breaks, which ours are not (for its MoE blocks, broken at the expert dispatch, torchtitan also
compiles the parts inside the checkpoint wrapper). So:

* the policy can change between curriculum stages without a recompile (the hooks are read at each call);
* ``full`` recomputes the compiled graphs during the backward, like any other forward;
* ``selective`` sees each compiled graph as one operation (``wrap_inductor_compiled_regions``) and keeps its outputs,
  which hold what its own partitioner saved for the backward (matmul outputs; fused pointwise work is recomputed
  inside the compiled backward): the policy's choice, made by the compiler. The eager attention cores are
  recomputed, as in an eager block.

Blocks of one class share Dynamo's cache of graphs, most recent first. A checkpointed block must recompute with the
graphs its forward ran, so a graph compiled later in the same forward must not also accept an earlier block's call.
Blocks differ in one way Dynamo guards on: the first decoder layer's input is a view (the token embeddings with the
image features scattered in, or a context-parallel shard), the others' are not, and a graph compiled for a view
also guards its base's shape (one compiled later for a plain tensor accepts both). So a view entering a compiled
block is copied first (one copy of the first layer's input per micro-batch).

A block whose graphs would recompile past Dynamo's limit fails the step (``fail_on_recompile_limit_hit``) instead of
running eagerly: nothing falls back silently.
"""

from __future__ import annotations

import torch
from torch import nn

from model.coca import TextBlock
from model.decoder import DecoderLayer
from model.vision import VisionBlock

__all__ = ["COMPILED_BLOCKS", "apply_compile", "compiled_block_names"]

COMPILED_BLOCKS = (DecoderLayer, VisionBlock, TextBlock)
# Per compiled graph: run it as one operation that the selective checkpointing policy can keep (see above).
INDUCTOR_OPTIONS = {"wrap_inductor_compiled_regions": True}


def apply_compile(model: nn.Module) -> int:
    """Compile the ``forward`` of every transformer block of ``model`` (in place, idempotent). Compilation itself
    happens at a block's first call, on the dtype and device its parameters have then.

    Returns:
        The number of blocks compiled.
    """
    # Past the limit Dynamo would run the block eagerly with a warning; a run asked to compile must not. The limit
    # counts graphs per function: {dense, MoE} layers x {trained, frozen} parts x shapes (static first, then each
    # varying dim symbolic), over a curriculum whose row lengths and layouts change; torch's default (8) is reached.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for block in model.modules():
        if isinstance(block, COMPILED_BLOCKS) and not _is_compiled(block):
            # An instance attribute: ``nn.Module.__call__`` (and the checkpoint hooks on it) calls it; parameter
            # names, the state dict and the module tree do not change.
            block.forward = torch.compile(block.forward, options=INDUCTOR_OPTIONS)
            # First among the pre-hooks, so that the checkpoint saves (and recomputes from) the copy.
            block.register_forward_pre_hook(_copy_view_input, prepend=True)
            count += 1
    return count


def _copy_view_input(block: nn.Module, args: tuple) -> tuple | None:
    # See the module docstring: every call of a compiled block gets a hidden state that is not a view.
    if args and isinstance(args[0], torch.Tensor) and args[0]._base is not None:
        return (args[0].clone(), *args[1:])
    return None


def compiled_block_names(model: nn.Module) -> list[str]:
    """Names of the blocks of ``model`` whose forward is compiled."""
    return [name for name, block in model.named_modules() if _is_compiled(block)]


def _is_compiled(block: nn.Module) -> bool:
    # torch.compile's wrapper keeps the function it compiles here.
    return hasattr(block.__dict__.get("forward"), "_torchdynamo_orig_callable")
