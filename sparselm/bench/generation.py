"""Generation benchmark: prefill and decode speed, memory, bandwidth, FLOPs and energy, for a
dense model and its packed variants, measured in the same process one after another.

Per variant (legend: P = prompt tokens, D = decoded tokens):
- prefill tokens/s: B*P / best time of one forward over the prompt (fresh KV cache);
- decode tokens/s: B*D / best time of D greedy single-token steps with the KV cache (best of
  `repeats`, as `timeit` advises on cores shared with other processes; the median is kept too);
- resident weight bytes: every parameter and buffer of the model (tied tensors once), and
  the part held by the decoder linears;
- decode bandwidth: weight bytes x decode steps/s, the figure of merit of a memory-bound
  decode (gpt-fast style);
- FLOPs per token: 2 x multiply-adds the kernels execute (a dense layer executes all of its
  weights, zeros included; a packed layer only its non-zeros) plus attention over the cache;
- peak RSS of the process during the variant (Linux resets the high-water mark through
  /proc/self/clear_refs), and on CUDA the peak allocated memory of the variant (its weights and
  what its prefill and decode allocate; the other variants' copies are not counted);
- energy per decoded token from RAPL / NVML where readable, else the reason it is not.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparselm.bench.energy import EnergyMeter
from sparselm.errors import SparselmError

CPU_VARIANTS = ("dense", "auto", "csr", "bitmask", "nm")  # the packed formats run by the CPU kernels
GPU_VARIANTS = ("dense", "2:4")  # "2:4": PyTorch's semi-structured tensors (cuSPARSELt / CUTLASS)
VARIANTS = CPU_VARIANTS + GPU_VARIANTS[1:]


def default_variants(device: str | torch.device) -> tuple[str, ...]:
    """The variants that can run on this device: CPU packed formats, or dense vs 2:4 on CUDA."""
    return GPU_VARIANTS if torch.device(device).type == "cuda" else CPU_VARIANTS


@dataclass
class GenerationResult:
    variant: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_tokens_per_s_median: float
    decode_ms_per_token: float
    weight_bytes: int
    linear_weight_bytes: int
    decode_bandwidth_gb_s: float
    flops_per_token: float
    peak_rss_mb: float | None
    gpu_peak_allocated_mb: float | None
    energy_j_per_token: float | None
    pack_choices: dict = field(default_factory=dict)
    decode_s_rounds: list = field(default_factory=list)  # seconds of each timed decode, in round order


def _semi_structured_parts(tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The tensors a 2:4 semi-structured weight really holds (kept values, metadata), else None."""
    try:
        from torch.sparse import SparseSemiStructuredTensor
    except ImportError:
        return None
    if not isinstance(tensor, SparseSemiStructuredTensor):
        return None
    # each layout keeps its compressed weight (and the transposed copy some kernels use) in these
    names = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
    return [part for part in (getattr(tensor, n, None) for n in names) if isinstance(part, torch.Tensor)]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory: the compressed parts of a 2:4 semi-structured tensor."""
    parts = _semi_structured_parts(tensor)
    if parts is not None:
        return sum(p.numel() * p.element_size() for p in parts)
    return tensor.numel() * tensor.element_size()


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, shared storages counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if _semi_structured_parts(tensor) is not None:  # a wrapper without a storage of its own
            total += tensor_bytes(tensor)
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def linear_stats(model: nn.Module) -> tuple[int, int]:
    """(bytes, multiply-adds per token) of every linear layer the forward runs, LM head included."""
    from sparselm.pack.sparse_linear import SparseLinear

    nbytes = macs = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            nbytes += module.packed_nbytes()
            macs += module.nnz
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            nbytes += tensor_bytes(module.weight)
            # a 2:4 weight's kernel executes only the kept half of the products
            semi = _semi_structured_parts(module.weight) is not None
            macs += module.weight.numel() // 2 if semi else module.weight.numel()
    return nbytes, macs


def densify(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear by an equivalent nn.Linear (for the dense baseline), in place."""
    from sparselm.pack.sparse_linear import SparseLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.values.dtype, device=module.values.device)
            dense.weight.data = module.dense_weight()
            if module.bias is not None:
                dense.bias.data = module.bias.detach().clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _forward_step(model: nn.Module):
    """A function (ids, cache) -> (last-position logits, cache) for this transformers version."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def step(ids, cache):
        kwargs = {cache_arg: cache} if cache is not None else {}
        out = model(input_ids=ids, use_cache=True, **kwargs, **extra)
        new_cache = getattr(out, "cache", None) if cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1:], new_cache  # [B, 1, V]

    return step


RUNTIMES = ("transformers", "lean")


def _lean_step(model: nn.Module, max_len: int, batch_size: int):
    """The same (ids, cache) -> (logits [B, 1, V], cache) contract over `LeanDecoder`, and its
    greedy loop (ids [B, 1], steps) -> tokens [B, steps], in C++ when the step is."""
    from sparselm.bench.lean_decode import LeanDecoder

    decoder = LeanDecoder(model, max_len=max_len, batch_size=batch_size)

    def step(ids, cache):
        if cache is None:
            decoder.reset()
        return decoder.step(ids).unsqueeze(1), decoder

    return step, decoder.generate


def _attention_macs_per_token(model: nn.Module, context: int) -> int:
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) // max(1, heads))
    return 2 * layers * heads * head_dim * context  # q.k over the cache, then p.v


class _GenerationRun:
    """One model, one prompt: warm-up once, then time prefill + greedy decode on demand."""

    def __init__(self, model: nn.Module, prompt_len: int, new_tokens: int, batch_size: int, seed: int,
                 runtime: str = "transformers"):
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit and prompt_len + new_tokens > limit:
            raise SparselmError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's context of "
                                f"{limit}; lower --prompt-len or --new-tokens")
        if min(prompt_len, new_tokens, batch_size) < 1:
            raise SparselmError("prompt length, new tokens and batch size must all be >= 1")
        self.model, self.new_tokens = model.eval(), new_tokens
        self.device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len), generator=g).to(self.device)
        # greedy: the runtime's own decode loop (lean), or None for the step-and-argmax loop below
        self.step, self.greedy = (_forward_step(model), None) if runtime == "transformers" else \
            _lean_step(model, prompt_len + new_tokens, batch_size)
        self.meter = EnergyMeter(str(self.device))
        self.cuda = self.device.type == "cuda"
        self.own_bytes = resident_weight_bytes(model)
        self.gpu_peak_mb: float | None = None
        self.prefill_s: list[float] = []
        self.decode_s: list[float] = []
        self.energy_j: list[float | None] = []
        self.peak_rss_mb: float | None = None
        with torch.inference_mode():
            logits, cache = self.step(self.prompt[:, :8], None)  # warm-up: allocator, lazy init
            for _ in range(4):
                logits, cache = self.step(logits.argmax(-1), cache)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run_once(self) -> None:
        rss_reset = _reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            # the other variants' copies stay allocated meanwhile: count this model's weights and
            # what its run allocates, not them
            others = torch.cuda.memory_allocated(self.device) - self.own_bytes
        with torch.inference_mode():
            self._sync()
            start = time.perf_counter()
            logits, cache = self.step(self.prompt, None)
            self._sync()
            self.prefill_s.append(time.perf_counter() - start)
            token = logits.argmax(-1)  # [B, 1]
            self.meter.start()
            start = time.perf_counter()
            if self.greedy is not None:
                self.greedy(token, self.new_tokens)
            else:
                for _ in range(self.new_tokens):
                    logits, cache = self.step(token, cache)
                    token = logits.argmax(-1)
            self._sync()
            self.decode_s.append(time.perf_counter() - start)
            self.energy_j.append(self.meter.stop())
        if rss_reset:
            self.peak_rss_mb = max(self.peak_rss_mb or 0.0, _peak_rss_mb() or 0.0)
        if self.cuda:
            peak = (torch.cuda.max_memory_allocated(self.device) - others) / 2**20
            self.gpu_peak_mb = max(self.gpu_peak_mb or 0.0, peak)

    def result(self, variant: str, pack_choices: dict | None = None) -> GenerationResult:
        model, batch, prompt_len = self.model, self.prompt.shape[0], self.prompt.shape[1]
        steps_per_s = self.new_tokens / min(self.decode_s)
        weight_bytes = resident_weight_bytes(model)
        linear_bytes, linear_macs = linear_stats(model)
        macs = linear_macs + _attention_macs_per_token(model, prompt_len + self.new_tokens // 2)
        energy = None
        if self.energy_j and self.energy_j[0] is not None:
            energy = statistics.median(self.energy_j) / (self.new_tokens * batch)
        return GenerationResult(
            variant=variant,
            prefill_tokens_per_s=batch * prompt_len / min(self.prefill_s),
            decode_tokens_per_s=batch * steps_per_s,
            decode_tokens_per_s_median=batch * self.new_tokens / statistics.median(self.decode_s),
            decode_ms_per_token=1e3 / steps_per_s,
            weight_bytes=weight_bytes,
            linear_weight_bytes=linear_bytes,
            decode_bandwidth_gb_s=weight_bytes * steps_per_s / 1e9,
            flops_per_token=2.0 * macs,
            peak_rss_mb=self.peak_rss_mb,
            gpu_peak_allocated_mb=self.gpu_peak_mb,
            energy_j_per_token=energy,
            pack_choices=pack_choices or {},
            decode_s_rounds=list(self.decode_s),
        )


def measure_generation(model: nn.Module, variant: str = "dense", *, prompt_len: int = 128,
                       new_tokens: int = 64, batch_size: int = 1, repeats: int = 3, seed: int = 0,
                       pack_choices: dict | None = None, runtime: str = "transformers") -> GenerationResult:
    """Measure one model as it is (see module docstring). Greedy decoding on random prompts."""
    if repeats < 1:
        raise SparselmError(f"repeats must be >= 1, got {repeats}")
    if runtime not in RUNTIMES:
        raise SparselmError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    run = _GenerationRun(model, prompt_len, new_tokens, batch_size, seed, runtime=runtime)
    for _ in range(repeats):
        run.run_once()
    return run.result(variant, pack_choices)


def _prepare_variant(candidate: nn.Module, variant: str, device: torch.device, batch_size: int,
                     progress: bool) -> dict:
    """Turn the dense copy `candidate` (already on `device`) into `variant` in place; returns the
    per-layer choices, or raises SparselmError when the variant cannot run here."""
    from sparselm.pack.auto import pack

    if variant == "2:4":
        if device.type != "cuda":
            raise SparselmError("the 2:4 variant runs PyTorch's semi-structured kernels, which need a CUDA GPU; "
                                "on CPU the 2:4 layout runs as variant nm")
        from sparselm.pack.semi_structured import to_semi_structured

        report = to_semi_structured(candidate)
        if not report.converted:
            reasons = sorted(set(report.kept_dense.values()))
            raise SparselmError(f"no layer could use the 2:4 kernels ({'; '.join(reasons)[:300]})")
        return {"2:4": len(report.converted), "dense": len(report.kept_dense)}
    if device.type != "cpu":
        raise SparselmError(f"variant {variant} runs sparselm's CPU kernels; on {device.type} use the "
                            "2:4 variant (or --device cpu)")
    return pack(candidate, variant, batch_size=batch_size, progress=progress).counts()


def compare_generation(model: nn.Module, variants=None, *, batch_size: int = 1, prompt_len: int = 128,
                       new_tokens: int = 64, repeats: int = 3, progress: bool = True,
                       runtime: str = "transformers", device: str | torch.device | None = None) -> dict:
    """Dense vs each packed variant, same prompts, same process. `model` is not modified.

    The variants are timed in interleaved rounds (dense, auto, csr, ..., then again), so a
    drift of the machine (frequency, other processes) hits all of them alike; this keeps one
    copy of the model per variant in memory. Returns {"results": [GenerationResult as dict],
    "skipped": {variant: reason}, "energy": note, "kernels": which kernels ran}. A variant that
    cannot apply (e.g. "nm" on a layer that is not 2:4) is skipped with its reason.
    `runtime`: "transformers" (the model's own forward and cache) or "lean" (`LeanDecoder`: the
    same modules, a preallocated cache and no framework bookkeeping; Llama-family models; its
    greedy decode loop runs in C++ when the whole step does).
    `device`: where every variant runs (default: where `model` is). On CUDA the variants are
    dense and "2:4" (2:4-sparse linears through PyTorch's semi-structured kernels); the CPU
    packed formats are skipped there with the reason.
    """
    from sparselm.kernels.extension import extension_status

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    variants = tuple(variants) if variants is not None else default_variants(device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SparselmError(f"unknown benchmark variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if repeats < 1:
        raise SparselmError(f"repeats must be >= 1, got {repeats}")
    if runtime not in RUNTIMES:
        raise SparselmError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    runs, choices, skipped = {}, {}, {}
    for variant in variants:
        candidate = densify(copy.deepcopy(model)).to(device)
        if variant != "dense":
            try:
                choices[variant] = _prepare_variant(candidate, variant, device, batch_size, progress)
            except SparselmError as err:
                skipped[variant] = str(err)
                continue
        runs[variant] = _GenerationRun(candidate, prompt_len, new_tokens, batch_size, seed=0, runtime=runtime)
    for _ in range(repeats):
        for run in runs.values():
            run.run_once()
    results = [asdict(run.result(variant, choices.get(variant))) for variant, run in runs.items()]
    meter = EnergyMeter(str(device))
    kernels = extension_status() if device.type == "cpu" else \
        f"{torch.cuda.get_device_name(device)}; 2:4 through torch.sparse semi-structured tensors"
    return {"results": results, "skipped": skipped, "kernels": kernels, "device": str(device),
            "threads": torch.get_num_threads(), "batch_size": batch_size, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeats": repeats, "timing": "best of repeats, variants interleaved",
            "runtime": runtime,
            "energy": "measured" if meter.available else f"cannot measure energy: {meter.reason}"}


def generation_table(summary: dict) -> str:
    """Markdown table with ratios against the dense row."""
    rows = summary["results"]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    lines = ["| variant | prefill tok/s | decode tok/s | decode vs dense | weights MiB | weights vs dense | "
             "linears MiB | decode GB/s | GFLOP/token | peak RSS MiB | J/token | layers packed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        speed = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"] if dense else float("nan")
        mem = r["weight_bytes"] / dense["weight_bytes"] if dense else float("nan")
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "n/a"
        energy = f"{r['energy_j_per_token']:.4f}" if r["energy_j_per_token"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{speed:.2f}x | {r['weight_bytes'] / 2**20:.2f} | {mem:.2f}x | "
                     f"{r['linear_weight_bytes'] / 2**20:.2f} | {r['decode_bandwidth_gb_s']:.2f} | "
                     f"{r['flops_per_token'] / 1e9:.4f} | {rss} | {energy} | {r['pack_choices'] or '-'} |")
    for variant, reason in summary["skipped"].items():
        lines.append(f"\nskipped {variant}: {reason}")
    lines.append(f"\nkernels: {summary['kernels']}; runtime: {summary.get('runtime', 'transformers')}; "
                 f"threads: {summary['threads']}; batch {summary['batch_size']}, "
                 f"prompt {summary['prompt_len']}, {summary['new_tokens']} new tokens; energy: {summary['energy']}")
    return "\n".join(lines)
