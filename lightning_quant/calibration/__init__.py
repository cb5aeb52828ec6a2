"""Calibration engine: generic, method-agnostic, memory-bounded, no Lightning inside.

Used by GPTQ (Hessians per linear) and AWQ (per-group inputs / float outputs); any method that
needs real activations of one decoder block at a time plugs in the same way.

API
---
``run_sequential(model, calibration, process_block, *, block_path=None, device=None, progress=False,
batch_size=8) -> CalibrationReport``
    Finds the blocks, captures block 0's inputs for every batch (hidden states + the positional /
    keyword arguments the block needs: attention mask, position embeddings/ids; KV caches off), then
    for each block: moves it to ``device``, calls ``process_block(ctx)``, re-runs it with the
    (possibly modified) weights to produce the next block's inputs in place, restores weights set
    with ``restore=True`` and moves the block back. Only one set of captured activations lives at a
    time (``CalibrationReport.peak_activation_bytes`` is the engine's own accounting).

``BlockContext`` (what ``process_block`` receives)
    ``index``, ``name`` (``"model.layers.3"``), ``block``, ``inputs: list[BlockInput]``, ``device``;
    ``linears(targets)`` -> the targets inside this block; ``sequential_groups(modules)`` -> call-order
    groups sharing an input (``[[q, k, v], [o], [gate, up], [down]]``);
    ``hook_linears(modules, fn)`` context manager, ``fn(name, module, x [tokens, in], y)`` with padding
    removed; ``capture_inputs(modules, fn)``, ``fn(name, module, x [tokens, in])``, runs the block on all
    inputs but stops after the last of ``modules`` (capture only); ``forward(keep_outputs=False)`` runs
    the block on all inputs (returns outputs when asked, free them with ``release``);
    ``set_weight(module, w [out, in], restore=True)``; ``token_rows(x)``.

``find_blocks(model, override=None) -> BlockList(path, blocks)``
    Largest ``ModuleList`` of identical modules (Llama, GPT-2, OPT, peft-wrapped); ``override`` is a
    dotted path for odd models; the error for a model without one names ``block_path``.

``forward_owner(model, block_path=None)`` / ``forward_owner_path(...)``
    The module calibration calls: ``model`` if it defines ``forward``, else the outermost module on the
    way to the blocks that does (``pl_module.model`` of a LightningModule without ``forward``).
    ``call_model`` checks token ids against the vocabulary (``check_token_ids``) before calling.

``to_batches(calibration, batch_size=8, max_batches=None) -> list[CalibrationBatch]``
    Accepts a LongTensor ``[N, T]``, or an iterable of LongTensors ``[B, T]``, dicts with
    ``input_ids`` (+ optional ``attention_mask``), or ``(x, y)`` tuples whose ``x`` is one of those.

``all_reduce_sum(t)``, ``world_size()``, ``rank()``, ``is_distributed()``, ``shard(items)``
    DDP helpers, no-ops without an initialised process group.
"""

from lightning_quant.calibration.blocks import BlockList, find_blocks, forward_owner, forward_owner_path
from lightning_quant.calibration.capture import (
    ActivationLedger,
    BlockInput,
    call_model,
    capture_block_inputs,
    check_token_ids,
)
from lightning_quant.calibration.data import CalibrationBatch, to_batches
from lightning_quant.calibration.distributed import all_reduce_sum, is_distributed, rank, shard, world_size
from lightning_quant.calibration.sequential import BlockContext, CalibrationReport, run_sequential

__all__ = [
    "ActivationLedger", "BlockContext", "BlockInput", "BlockList", "CalibrationBatch", "CalibrationReport",
    "all_reduce_sum", "call_model", "capture_block_inputs", "check_token_ids", "find_blocks", "forward_owner",
    "forward_owner_path", "is_distributed", "rank",
    "run_sequential", "shard", "to_batches", "world_size",
]
