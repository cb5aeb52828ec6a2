"""The sequential, memory-bounded block runner (GPTQ, Frantar et al. 2022, §4 "layer-wise";
AWQ, Lin et al. 2024, use the same schedule).

``run_sequential`` captures the inputs of block 0 once, then for each block ``i``:

1. moves block ``i`` to the compute device (the other blocks stay where they are, e.g. CPU),
2. calls ``process_block(ctx)`` — the method collects statistics through :meth:`BlockContext.hook_linears`
   / :meth:`BlockContext.forward` and may change weights with :meth:`BlockContext.set_weight`,
3. re-runs the block on its inputs *with the changed weights* and replaces each input by the output
   in place (so errors of earlier blocks are seen by later ones),
4. restores the weights changed with ``restore=True`` and moves the block back.

Only one set of captured hidden states ``N x [B, T, H]`` is alive at a time (plus one batch during
step 3, plus whatever a method keeps with ``forward(keep_outputs=True)``); :class:`ActivationLedger`
counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_quant.calibration.blocks import BlockList, find_blocks, forward_owner
from lightning_quant.calibration.capture import ActivationLedger, BlockInput, capture_block_inputs
from lightning_quant.calibration.data import to_batches
from lightning_quant.calibration.distributed import block_gathered, fsdp_units, owning_unit, reshard_all, runnable
from lightning_quant.targets import linear_kind

__all__ = ["BlockContext", "CalibrationReport", "run_sequential"]

LinearHook = Callable[[str, nn.Module, Tensor, Tensor], None]
InputHook = Callable[[str, nn.Module, Tensor], None]


class _InputsCaptured(Exception):
    """Raised by a capture hook once every hooked module has its input: the rest of the block is skipped."""


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(
            f"NaN/Inf activations {where}; calibration needs finite activations. Check the model's weights "
            "and the calibration data (e.g. train in float32/bfloat16 instead of float16)."
        )


class BlockContext:
    """One block during calibration; handed to ``process_block``.

    Attributes:
        index / name: block index and qualified prefix (``"model.layers.3"``).
        block: the block module (on ``device``). inputs: its :class:`BlockInput` list.
        ledger: the run's :class:`ActivationLedger`.
        float_inputs: with ``run_sequential(float_stream=True)``, what the *float* model feeds this block
            (every earlier block run with its original weights), batch for batch beside ``inputs``; else ``None``.
    """

    def __init__(self, index: int, name: str, block: nn.Module, inputs: list[BlockInput],
                 device: torch.device, ledger: ActivationLedger, float_inputs: list[BlockInput] | None = None) -> None:
        self.index, self.name, self.block, self.inputs = index, name, block, inputs
        self.device, self.ledger, self.float_inputs = device, ledger, float_inputs
        self.current: BlockInput | None = None
        self._saved: dict[nn.Module, Tensor] = {}

    # ---- running the block -------------------------------------------------------------
    def _run(self, inp: BlockInput) -> Tensor:
        self.current = inp
        try:
            return _first(self.block(inp.hidden, *inp.args, **inp.kwargs))
        finally:
            self.current = None

    @torch.no_grad()
    def forward(self, keep_outputs: bool = False) -> list[Tensor] | None:
        """Run the block on every input with the current weights (hooks fire).

        With ``keep_outputs`` returns the outputs ``[B, T, H]`` (counted by the ledger until
        :meth:`release`), e.g. AWQ's float block outputs.
        """
        outs = [] if keep_outputs else None
        for inp in self.inputs:
            y = self._run(inp)
            if outs is not None:
                outs.append(y)
                self.ledger.add(y)
        return outs

    def release(self, outputs: list[Tensor]) -> None:
        """Forget outputs kept by :meth:`forward` (ledger accounting)."""
        for y in outputs:
            self.ledger.remove(y)
        outputs.clear()

    @torch.no_grad()
    def propagate(self, float_stream: bool = False) -> None:
        """Replace every input by the block's output (called by the engine after ``process_block``, and with
        ``float_stream`` for :attr:`float_inputs` once the original weights are back)."""
        for inp in self.float_inputs if float_stream else self.inputs:
            y = self._run(inp).detach()
            _check_finite(y, f"at the output of block {self.name}")
            self.ledger.add(y)
            self.ledger.remove(inp.hidden)
            inp.hidden = y

    # ---- looking inside -------------------------------------------------------------------
    def linears(self, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The entries of ``targets`` (qualified name -> module) that live in this block, in module order."""
        ids = {id(m) for m in self.block.modules()}
        return {n: m for n, m in targets.items() if id(m) in ids}

    def token_rows(self, x: Tensor) -> Tensor:
        """``[B, T, F] -> [tokens, F]`` keeping only real (unpadded) tokens of the current batch."""
        rows = x.reshape(-1, x.shape[-1])
        mask = None if self.current is None else self.current.token_mask
        if mask is not None and mask.numel() == rows.shape[0]:
            rows = rows[mask.reshape(-1).to(rows.device)]
        return rows

    @contextmanager
    def hook_linears(self, modules: dict[str, nn.Module], fn: LinearHook) -> Iterator[None]:
        """Call ``fn(name, module, x, y)`` on every forward of each module while active.

        ``x`` is the module's input as ``[tokens, in]`` (padding removed), ``y`` its raw output.
        """
        handles = []
        for name, mod in modules.items():
            def hook(m, args, out, _name=name):
                fn(_name, m, self.token_rows(args[0]), out)
            handles.append(mod.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def capture_inputs(self, modules: dict[str, nn.Module], fn: InputHook, of_float_model: bool = False) -> None:
        """Run the block on every input calling ``fn(name, module, x)`` with each module's input
        ``[tokens, in]`` (padding removed), without computing what follows the last of them.

        With ``of_float_model`` it runs what the float model computes instead: the block with its original
        weights (those changed by :meth:`set_weight` are swapped back for the run) on :attr:`float_inputs`;
        calls come in the same order as for ``inputs``, batch for batch.

        The first input runs the whole block and records the calls. If each module ran exactly
        once, later inputs stop as soon as the last one has its input (capturing q/k/v skips the
        rest of the block); otherwise every input runs the whole block. ``fn`` sees the same
        tensors as with :meth:`hook_linears` + :meth:`forward`.
        """
        calls: list[str] = []
        stop_after: list[str] = []

        def make(name: str):
            def pre(m, args):
                fn(name, m, self.token_rows(args[0]))
                calls.append(name)
                if stop_after and name == stop_after[0]:
                    raise _InputsCaptured
            return pre

        if of_float_model and self.float_inputs is None:
            raise ValueError("capture_inputs(of_float_model=True) needs the float stream: call "
                             "run_sequential(..., float_stream=True).")
        handles = [mod.register_forward_pre_hook(make(n)) for n, mod in modules.items()]
        try:
            with self._original_weights() if of_float_model else nullcontext():
                for i, inp in enumerate(self.float_inputs if of_float_model else self.inputs):
                    try:
                        self._run(inp)
                    except _InputsCaptured:
                        pass
                    if i == 0 and sorted(calls) == sorted(modules):  # each module once per forward
                        stop_after.append(calls[-1])
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _original_weights(self) -> Iterator[None]:
        """The weights changed by :meth:`set_weight` (``restore=True``) swapped back to their originals while active."""
        current = {m: m.weight.detach().clone() for m in self._saved}
        with torch.no_grad():
            for m, w in self._saved.items():
                m.weight.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for m, w in current.items():
                    m.weight.copy_(w)

    @torch.no_grad()
    def sequential_groups(self, modules: dict[str, nn.Module]) -> list[list[str]]:
        """Split ``modules`` into groups in call order; modules fed the *same* input tensor form one
        group (Llama: ``[q, k, v], [o], [gate, up], [down]``) — the "true sequential" order. Modules
        the block never calls come last, one group each."""
        seen: list[tuple[str, Tensor]] = []  # holds the inputs alive, so identity is meaningful
        handles = []
        for name, mod in modules.items():
            def hook(m, args, _name=name):
                seen.append((_name, args[0]))
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            self._run(self.inputs[0])
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        last_key = None
        for name, key in seen:
            if any(name in g for g in groups):
                continue
            if groups and key is last_key:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_key = key
        missing = [n for n in modules if not any(n in g for g in groups)]
        return groups + [[n] for n in missing]

    # ---- changing weights --------------------------------------------------------------------
    @torch.no_grad()
    def set_weight(self, module: nn.Module, weight: Tensor, restore: bool = True) -> None:
        """Overwrite a linear-like module's ``[out, in]`` weight (Conv1D handled).

        With ``restore`` the original is put back after the block has been propagated, so the model
        is unchanged when the run ends (the caller swaps in packed layers itself).
        """
        if restore and module not in self._saved:
            self._saved[module] = module.weight.detach().clone()
        linear_kind(module).write_weight(module, weight)

    def restore_weights(self) -> None:
        with torch.no_grad():
            for module, w in self._saved.items():
                module.weight.copy_(w)
        self._saved.clear()


@dataclass(frozen=True)
class CalibrationReport:
    """What a :func:`run_sequential` call did (per rank)."""

    block_path: str
    num_blocks: int
    num_batches: int
    num_tokens: int
    activation_bytes: int  #: bytes of one set of captured hidden states
    peak_activation_bytes: int  #: most captured-activation bytes alive at once (ledger)


def _module_device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _move_outside_blocks(model: nn.Module, blocks: nn.Module, device: torch.device) -> dict:
    """Move parameters/buffers not inside ``blocks`` to ``device``; returns their old devices."""
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    old = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None and id(t) not in inside and t.device != device:
                    old[(mod, k)] = t.device
                    t.data = t.data.to(device)
    return old


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("calibrating blocks", total=total)


ProcessBlock = Callable[[BlockContext], None]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    calibration,
    process_block: ProcessBlock,
    *,
    block_path: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    batch_size: int = 8,
    float_stream: bool = False,
) -> CalibrationReport:
    """Calibrate ``model`` block by block (see the module docstring).

    Args:
        model: the full model (HF causal LM, peft model, a module whose forward takes token ids, or a module
            holding one such as a LightningModule without ``forward``: see :func:`.blocks.forward_owner`).
        calibration: token ids ``[N, T]`` or an iterable of batches (:mod:`.data`); under DDP, this
            rank's share.
        process_block: ``fn(ctx: BlockContext) -> None``, called once per block in order.
        block_path: dotted path of the block list when :func:`find_blocks` cannot guess it.
        device: compute device for the block being processed (default: where block 0 lives).
        progress: show a rich progress bar of blocks done (off by default, as in ``CalibrationOptions``).
        batch_size: rows per batch when ``calibration`` is a single tensor.
        float_stream: also carry what the *float* model feeds each block (:attr:`BlockContext.float_inputs`,
            propagated with the original weights after each block is restored): one more set of hidden
            states alive and one more block forward per block. GPTAQ's cross term needs it.
    """
    blocks: BlockList = find_blocks(model, block_path)
    batches = to_batches(calibration, batch_size)
    dev = torch.device(device) if device is not None else _module_device(blocks.blocks[0])
    was_training = model.training
    model.eval()
    moved = _move_outside_blocks(model, blocks.blocks, dev)
    ledger = ActivationLedger()
    bar = None
    try:
        inputs = capture_block_inputs(forward_owner(model, blocks.path), blocks.blocks[0], batches, dev, ledger)
        units = fsdp_units(model)
        reshard_all(units)  # FSDP2: the capture forward stopped inside; keep only shards from here on
        for inp in inputs:
            _check_finite(inp.hidden, "at the input of the first block")
        float_inputs = None
        if float_stream:
            float_inputs = [BlockInput(i.hidden.clone(), i.args, i.kwargs, i.token_mask) for i in inputs]
            for inp in float_inputs:
                ledger.add(inp.hidden)
        set_bytes = ledger.live_bytes
        bar = _progress(len(blocks), progress)
        for i, block in enumerate(blocks.blocks):
            home = _module_device(block)
            block.to(dev)
            ctx = BlockContext(i, blocks.name(i), runnable(block), inputs, dev, ledger, float_inputs)  # FSDP1: inner module
            unit = owning_unit(units, blocks.name(i))
            with block_gathered(None if unit is None else units[unit]):  # FSDP2: this block's full weights only
                try:
                    process_block(ctx)
                    ctx.propagate()
                    if float_inputs is not None:
                        ctx.restore_weights()
                        ctx.propagate(float_stream=True)
                finally:
                    ctx.restore_weights()
                    block.to(home)
            if bar is not None:
                bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()
        for (mod, k), d in moved.items():
            t = mod._parameters.get(k) if k in mod._parameters else mod._buffers.get(k)
            t.data = t.data.to(d)
        model.train(was_training)
    return CalibrationReport(blocks.path, len(blocks), len(batches), sum(i.num_tokens for i in inputs),
                             set_bytes, ledger.peak_bytes)
