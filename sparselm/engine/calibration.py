"""The sequential calibration engine: one decoder block at a time.

1. Capture what the model passes to its first decoder block (hidden states plus every
   keyword argument: attention mask, rotary position embeddings, cache objects...) by a
   forward pre-hook that stops the forward pass there, so nothing past the embeddings runs.
2. For each block i: move it to the compute device, let the caller collect statistics and
   compress it (`process_block(ctx)`), then re-run the *compressed* block on its inputs to
   produce the next block's inputs, so every block is calibrated on what the compressed
   model before it really produces (as SparseGPT and GPTQ do), and move it back.

Only one block sits on the compute device at a time: models larger than GPU memory can be
calibrated with `device="cuda"` while the rest stays in CPU memory.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparselm.adapters import get_adapter


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the model need not run."""


class StopBlock(Exception):
    """Raised by a statistics hook once it has seen everything it needs from one block call:
    `BlockContext.forward` catches it and skips the rest of that call (its output is not needed)."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInput:
    args: tuple  # args[0] is the hidden state [B, S, D]
    kwargs: dict


@dataclass
class BlockContext:
    """What `process_block` gets: the block, its index and a way to run it on all inputs."""

    index: int
    block: nn.Module
    inputs: list[BlockInput]
    device: torch.device
    outputs: list[torch.Tensor] | None = field(default=None)

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        """Run the block (as it is now) on every calibration batch; hooks on it see the inputs.

        A hook may raise `StopBlock` to cut a call short when it has what it needs; the outputs
        of such calls are missing from the returned list."""
        outs = []
        for inp in self.inputs:
            try:
                out = self.block(*inp.args, **inp.kwargs)
            except StopBlock:
                continue
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                         device: torch.device | str | None = None) -> list[BlockInput]:
    """Inputs of decoder block 0 for every calibration batch (on `device`)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Everything but the blocks goes to the compute device for the capture; blocks stay put.
    block_ids = {id(p) for p in blocks.parameters()}
    moved = []
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in block_ids and p.device != device:
            moved.append((p, p.data.device))
            p.data = p.data.to(device)
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        captured.append(BlockInput(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                   dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            try:
                model(input_ids=calib_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for p, dev in moved:
            p.data = p.data.to(dev)
    if not captured:
        raise RuntimeError("the model never called its first decoder block; is the adapter right?")
    for inp in captured:
        if not inp.args:  # hidden states passed by keyword: make them positional for re-runs
            inp.args = (inp.kwargs.pop("hidden_states"),)
        inp.kwargs = _to(inp.kwargs, device)
    return captured


def run_blockwise(model: nn.Module, calib_ids: torch.Tensor, process_block: Callable[[BlockContext], None], *,
                  batch_size: int = 8, device: torch.device | str | None = None, progress: bool = True,
                  desc: str = "blocks", after_last: Callable[[list[torch.Tensor]], None] | None = None) -> None:
    """Call `process_block(ctx)` for every decoder block in order, feeding each block the
    outputs of the already-processed (compressed) blocks before it. With `after_last`, the
    last processed block's outputs (one [batch, seq, hidden] tensor per calibration batch, on
    the processing device) are passed to it at the end (e.g. to calibrate the LM head)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inputs = capture_block_inputs(model, calib_ids, batch_size, device)
    for i in tqdm(range(len(blocks)), desc=desc, disable=not progress, dynamic_ncols=True):
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        ctx = BlockContext(i, block, inputs, device)
        process_block(ctx)
        if i + 1 < len(blocks) or after_last is not None:  # the compressed block feeds the next one
            outs = ctx.forward()
            if len(outs) != len(inputs):
                raise RuntimeError("a hook stopped the block forward that produces the next block's inputs; "
                                   "remove statistics hooks before process_block returns")
            inputs = [BlockInput((o,) + inp.args[1:], inp.kwargs) for o, inp in zip(outs, inputs)]
        block.to(home)
    if after_last is not None and blocks:
        after_last([inp.args[0] for inp in inputs])
