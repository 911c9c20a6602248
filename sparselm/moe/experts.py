"""SwiGLU experts stored as stacked tensors, and the dense shared expert.

Legend for the shape suffixes and comments in the MoE package:
    T = tokens, D = model dim, E = experts, F = expert hidden dim,
    K = experts per token (top-k), A = kept (token, expert) assignments,
    C = capacity (assignments one expert may take).

Each expert is a SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"):
    expert_e(x) = W_down[e] (silu(W_gate[e] x) * W_up[e] x)
The gate and up projections of all experts are one tensor `gate_up_E2FD` of shape
[E, 2F, D] (gate rows first, then up rows), the down projections `down_EDF` [E, D, F].
This is the layout of `transformers`' Mixtral experts, so weights move between the two
without reshaping, and each slice `gate_up_E2FD[e]` is an `nn.Linear` weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.moe.fused import SwiGLUFn
from sparselm.moe.grouped_swiglu import grouped_swiglu


def matmul_rows(n: int) -> int:
    """Rows an expert's matmuls run on when it is routed n rows (bf16/fp16 on CPU, see
    `pads_expert_rows`): n itself up to 64; a multiple of 16 up to 512; above that a
    multiple of 32, and of 1/32 of the power of two below n from 2048 on (at most ~6% more
    rows, about 1.5% on average for groups of ~1000).

    Why, one-off measurements on one core of this project's machines (AMX, oneDNN through
    PyTorch; benchmarks/bench_moe_dispatch.py tracks the effect on the whole layer):
    - oneDNN builds (JIT-compiles) a kernel for every new matmul shape on its first use, and an
      expert's row count changes with every batch: a [~1000, 512] x [512, 2816] product took
      11-14 ms the first time and 3.5 ms after. With new routing every step the MoE training
      step on the issue's dispatch shapes took 1.7-2x the dense MLP's time (1.0x on a repeated
      batch), the no-grad forward 2x its repeated-batch time. Rounded counts repeat.
    - Row counts off the kernels' tile sizes run slower even when set up: the forward
      product at 1000 or 1030 rows took 20-40% longer per row than at 1008 or 1024, the
      weight gradient (the rows are its reduction dimension) ~15% longer at a multiple of 16
      than at a multiple of 32.
    fp32 matmuls (MKL) showed neither effect and are not padded. `SwiGLUExperts.forward_grouped`
    pads the groups it is given; dropless top-k dispatch (dispatch.py) lays its gather out
    padded in the first place.
    """
    if n <= 64:
        return n
    step = 16 if n <= 512 else max(32, 1 << (n.bit_length() - 6))
    return -(-n // step) * step


def pads_expert_rows(x: torch.Tensor) -> bool:
    """Whether expert groups are padded to `matmul_rows` for inputs like x (bf16/fp16 CPU)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def padded_layout(counts: list[int], padded: list[int], src_A: torch.Tensor):
    """Rows grouped by expert (counts[e] rows for expert e, src_A [A] the source row of each),
    each group then padded to padded[e] rows. Returns (src_P [P]: the source row of each padded
    row, 0 for pad rows, which the caller zeroes; moved_A [A]: the padded row of each grouped
    row; pad_rows: the pad rows)."""
    device, rows = src_A.device, src_A.numel()
    count_E, padded_E = torch.tensor(counts, device=device), torch.tensor(padded, device=device)
    extra_E = padded_E.cumsum(0) - count_E.cumsum(0)
    extra_E = torch.cat([extra_E.new_zeros(1), extra_E[:-1]])  # pad rows before each group
    moved_A = torch.arange(rows, device=device) + extra_E.repeat_interleave(count_E, output_size=rows)
    src_P = src_A.new_zeros(sum(padded))
    src_P[moved_A] = src_A
    is_pad = torch.ones(sum(padded), dtype=torch.bool, device=device)
    is_pad[moved_A] = False
    return src_P, moved_A, is_pad.nonzero().squeeze(1)


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts with stacked weights.

    `forward_grouped(x_AD, counts)` runs expert e on the e-th contiguous slice of rows
    (rows sorted by expert); `forward_every_expert(x_TD)` runs every expert on every row
    (the naive reference). Both are differentiable with respect to inputs and weights.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int,
                 init_std: float | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.expert_hidden = expert_hidden
        self.gate_up_E2FD = nn.Parameter(torch.empty(num_experts, 2 * expert_hidden, hidden_size, dtype=dtype))
        self.down_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden, dtype=dtype))
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float | None = None) -> None:
        """Normal init; default std is 1/sqrt(fan_in) like a Linear layer's variance."""
        with torch.no_grad():
            self.gate_up_E2FD.normal_(0.0, init_std or 1.0 / math.sqrt(self.hidden_size))
            self.down_EDF.normal_(0.0, init_std or 1.0 / math.sqrt(self.expert_hidden))

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e applied to rows x_ND [N, D] -> [N, D]."""
        gate_NF, up_NF = F.linear(x_ND, self.gate_up_E2FD[e]).chunk(2, dim=-1)  # [N, F] each
        return F.linear(F.silu(gate_NF) * up_NF, self.down_EDF[e])  # [N, D]

    def forward_grouped(self, x_AD: torch.Tensor, counts: list[int] | torch.Tensor,
                        use_grouped_mm: bool = False) -> torch.Tensor:
        """Rows sorted by expert, `counts[e]` rows for expert e -> [A, D] expert outputs.

        Default: per-expert matmuls on contiguous slices with a fused backward
        (grouped_swiglu.py).
        With `use_grouped_mm`, one `torch._grouped_mm` call per projection replaces the
        per-expert loop (same math; available on CPU for fp32/bf16 in recent PyTorch). It
        needs row strides that are multiples of 16 bytes; other shapes use the loop.
        `counts` may also be an [E] tensor on x's device: grouped_mm uses it without reading it
        back (off the CPU nothing then waits for the GPU); the other paths read it.
        """
        if isinstance(counts, torch.Tensor):
            if not (use_grouped_mm and self.grouped_mm_aligned(x_AD.dtype)) or pads_expert_rows(x_AD):
                counts = counts.tolist()
            else:
                return self._forward_grouped_mm(x_AD, counts)
        if pads_expert_rows(x_AD):
            padded = [matmul_rows(n) for n in counts]
            if padded != counts:
                return self._forward_padded(x_AD, counts, padded, use_grouped_mm)
        if use_grouped_mm and self.grouped_mm_aligned(x_AD.dtype):
            return self._forward_grouped_mm(x_AD, counts)
        return grouped_swiglu(x_AD, self.gate_up_E2FD, self.down_EDF, counts)  # [A, D]

    def _forward_padded(self, x_AD: torch.Tensor, counts: list[int], padded: list[int],
                        use_grouped_mm: bool) -> torch.Tensor:
        """forward_grouped with each group run on `padded[e]` rows (zero rows appended)."""
        src_P, moved_A, pad_rows = padded_layout(counts, padded, torch.arange(x_AD.shape[0], device=x_AD.device))
        x_PD = x_AD.index_select(0, src_P).index_fill(0, pad_rows, 0)
        if use_grouped_mm and self.grouped_mm_aligned(x_AD.dtype):
            y_PD = self._forward_grouped_mm(x_PD, padded)
        else:
            y_PD = grouped_swiglu(x_PD, self.gate_up_E2FD, self.down_EDF, padded)
        return y_PD.index_select(0, moved_A)  # [A, D]

    def grouped_mm_aligned(self, dtype: torch.dtype) -> bool:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (self.hidden_size * itemsize) % 16 == 0 and (self.expert_hidden * itemsize) % 16 == 0

    def _forward_grouped_mm(self, x_AD: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        counts_E = counts if isinstance(counts, torch.Tensor) else torch.tensor(counts, device=x_AD.device)
        offsets = counts_E.cumsum(0).to(torch.int32)  # [E] end offsets
        h_A2F = torch._grouped_mm(x_AD, self.gate_up_E2FD.transpose(-2, -1), offs=offsets)
        act_AF = SwiGLUFn.apply(h_A2F)  # [A, F]; its backward returns a contiguous gradient
        return _contiguous_grad(torch._grouped_mm(act_AF, self.down_EDF.transpose(-2, -1), offs=offsets))

    def forward_every_expert(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: [T, D] -> [E, T, D]. Costs E dense MLPs."""
        h_ET2F = torch.einsum("td,efd->etf", x_TD, self.gate_up_E2FD)  # [E, T, 2F]
        gate_ETF, up_ETF = h_ET2F.chunk(2, dim=-1)
        return torch.einsum("etf,edf->etd", F.silu(gate_ETF) * up_ETF, self.down_EDF)  # [E, T, D]


class SharedSwiGLU(nn.Module):
    """The always-active shared expert(s) of DeepSeekMoE: one dense SwiGLU MLP whose hidden
    size is (number of shared experts) x (expert hidden size)."""

    def __init__(self, hidden_size: int, hidden: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * hidden, bias=False, dtype=dtype)
        self.down = nn.Linear(hidden, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, H] each
        return self.down(F.silu(gate) * up)  # [T, D]


class _ContiguousGradFn(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `torch._grouped_mm`'s backward rejects stride-0 (expanded) gradients, which is what
    e.g. `.sum()` produces; this keeps it usable under any loss.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGradFn.apply(x)


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here for this device/dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # Grad mode forced on: the answer is cached (dispatch.py), and a first call under
        # torch.no_grad() / inference_mode() would otherwise fail the backward and
        # turn grouped_mm off for the whole process.
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(4, 8, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([2, 4], device=device, dtype=torch.int32)
            _contiguous_grad(torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False
