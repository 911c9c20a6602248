"""A minimal decode loop for Llama-family models, to measure what the weights cost.

At batch 1 a decode step of a small model is mostly framework work: the transformers forward
builds masks, cache objects, attention-interface dispatch and output records, and its
`DynamicCache` concatenates the whole cache every step. None of that depends on the weights,
so it hides what a sparse or smaller weight saves. `LeanDecoder` runs the same modules
(embedding, norms, q/k/v/o and MLP projections, LM head: dense `nn.Linear` or packed
`SparseLinear` alike) with a preallocated KV cache written in place and one SDPA call per
layer, which is what a lean serving loop does. Its logits equal the transformers forward's
(tested), so speed measured through it is the speed of the same model.

Single-token steps of fp32 and bf16 models on CPU go further when the C++ extension is built: the
embedding lookup, the whole stack of blocks, the final norm and the LM head run in one call
(`DecodeStack`, kernels/csrc/decode_step.cpp), the norms, rotary embedding, cache writes and
attention as plain loops; at batch 1 the projections of one input (q/k/v, gate/up) share one
parallel region (dense `nn.Linear` through the stack's own GEMV, bitmask- and CSR-packed
`SparseLinear` through their row kernels), other formats and batch sizes go through the sparse kernels
and `at::linear` (what `nn.Linear` runs). Dense and packed models take the same path, so the
per-step cost they share shrinks and what their weights cost is what differs. Prefill, other
dtypes, other projection modules or a model the stack does not fit run the Python loop;
`fast_path_reason` says why. bf16 models take the C++ step only whole (batch 1, every projection
dense, bitmask- or CSR-packed, the embedding and head included): it reads the bf16 weights widened to
fp32, keeps activations in fp32 and stores keys and values in the bf16 cache, where the
transformers forward rounds to bf16 after every operation, so its logits (returned in bf16, like
the forward's; `generate` takes its argmaxes from the fp32 values) agree with that forward's to
bf16 precision rather than exactly.
The stack reads the modules' weight tensors in place: build the decoder after the model is final
(packing or replacing a module afterwards is not seen by an existing decoder).

Supported: the llama, mistral and qwen2 adapter families with full attention (no sliding
window inside the decoded length), rotary position embeddings computed by the model's own
rotary module (so every rope scaling variant the model uses is honoured).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.errors import SparselmError

LEAN_FAMILIES = ("llama", "mistral", "qwen2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Prefill and greedy decode with a preallocated cache for up to `max_len` positions.

        dec = LeanDecoder(model, max_len=256, batch_size=1)
        logits = dec.step(prompt_ids)      # [B, V], last position; fills the cache
        logits = dec.step(next_ids[:, None])
        dec.reset()                        # start a new sequence
    """

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1, fast: bool = True):
        from sparselm.adapters import get_adapter

        adapter = get_adapter(model)
        if adapter.family not in LEAN_FAMILIES:
            raise SparselmError(f"the lean decode loop supports the {', '.join(LEAN_FAMILIES)} families; this model "
                                f"is {adapter.family!r}: benchmark it with the transformers forward instead")
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_len:
            raise SparselmError(f"the model attends within a sliding window of {window} tokens, shorter than "
                                f"{max_len}; the lean decode loop implements full attention only")
        inner = model.model
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, name):
                raise SparselmError(f"model.model has no {name!r}: not the Llama layout the lean loop expects")
        self.model, self.inner, self.head = model, inner, model.lm_head
        self.layers = list(inner.layers)
        attn = self.layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        param = next(model.parameters())
        shape = (len(self.layers), batch_size, self.kv_heads, max_len, self.head_dim)  # [L, B, Hkv, S, hd]
        dtype = self.inner.embed_tokens.weight.dtype
        self.k_cache = torch.zeros(shape, dtype=dtype, device=param.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=param.device)
        self.max_len, self.batch_size, self.pos = max_len, batch_size, 0
        self._stack_full = False  # embedding, blocks, final norm and LM head all in the C++ step
        self._stack, self.fast_path_reason = (None, "turned off (fast=False)") if not fast else \
            self._build_stack(cfg)

    def _build_stack(self, cfg) -> tuple[object | None, str | None]:
        """The C++ decode stack for single-token steps, or None and the reason it cannot run."""
        from sparselm.kernels import load_extension

        ext = load_extension()
        if ext is None or not hasattr(ext, "DecodeStack"):
            return None, "the C++ extension is not built"
        if self.k_cache.dtype not in (torch.float32, torch.bfloat16) or self.k_cache.device.type != "cpu":
            return None, f"the C++ decode step takes fp32 or bf16 models on CPU, this one is {self.k_cache.dtype} on " \
                         f"{self.k_cache.device.type}"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return None, f"the C++ decode step implements SiLU MLPs, the model uses {cfg.hidden_act!r}"
        rope_type = str(getattr(self.inner.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope_type:  # frequencies depend on the longest position seen so far
            return None, f"rope type {rope_type!r} rescales with the sequence length; the C++ step uses a fixed table"
        positions = torch.arange(self.max_len, device=self.k_cache.device).unsqueeze(0)
        with torch.inference_mode():
            probe = torch.zeros(1, self.max_len, cfg.hidden_size)
            cos, sin = self.inner.rotary_emb(probe, positions)  # [1, max_len, hd]
        if cos.shape[-1] != self.head_dim:
            return None, "the rotary table does not cover the whole head dim (partial rotary)"
        try:
            stack = ext.DecodeStack(self.heads, self.kv_heads, self.head_dim, float(self.scaling), cos[0].float()
                                    .contiguous(), sin[0].float().contiguous(), self.k_cache, self.v_cache)
        except RuntimeError as err:  # a head layout the stack does not take (e.g. an odd head dim)
            return None, str(err).splitlines()[0]
        for i, layer in enumerate(self.layers):
            norms = [_rms_norm_parts(layer.input_layernorm), _rms_norm_parts(layer.post_attention_layernorm)]
            attn, mlp = layer.self_attn, layer.mlp
            modules = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                      [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            specs = [_projection_spec(m, self.k_cache.dtype) for m in modules]
            if None in norms:
                return None, f"layer {i}: a norm is not an RMSNorm with weight and epsilon"
            if None in specs:
                bad = modules[specs.index(None)]
                return None, f"layer {i}: projection {type(bad).__name__} is neither nn.Linear (of the model's dtype) " \
                             "nor SparseLinear"
            try:
                stack.add_block(norms[0][0], norms[0][1], norms[1][0], norms[1][1], specs)
            except RuntimeError as err:  # shapes the stack does not fit (e.g. per-layer head counts)
                return None, f"layer {i}: {str(err).splitlines()[0]}"
        # Embedding lookup, final norm and LM head join the C++ step when they fit it (else
        # the stack runs the blocks and they run in Python).
        norm, embed = _rms_norm_parts(self.inner.norm), self.inner.embed_tokens
        head = _projection_spec(self.head, self.k_cache.dtype)
        if norm is not None and head is not None and type(embed) is nn.Embedding and embed.max_norm is None \
                and embed.weight.dtype == self.k_cache.dtype and embed.weight.is_contiguous():
            try:
                stack.set_head(norm[0], norm[1], head)
                stack.set_embedding(embed.weight.detach())
                self._stack_full = True
            except RuntimeError:
                pass
        if self.k_cache.dtype == torch.bfloat16 and not (self._stack_full and stack.single_region):
            self._stack_full = False
            return None, "a bf16 model runs the C++ step only whole: batch 1, every projection dense or " \
                         "bitmask- or CSR-packed, the embedding and LM head included"
        return stack, None

    def reset(self) -> None:
        self.pos = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run `ids` [B, T] at the next T positions; returns the last position's logits [B, V]."""
        B, T = ids.shape
        start, end = self.pos, self.pos + T
        if B != self.batch_size:
            raise SparselmError(f"this decoder was built for batch {self.batch_size}, got {B}")
        if end > self.max_len:
            raise SparselmError(f"{end} positions exceed the cache of {self.max_len}; build the decoder with a "
                                f"larger max_len")
        if T == 1 and self._stack_full:
            # Embedding, every block, final norm and LM head in one C++ call. No autograd
            # bookkeeping to switch off: the stack's tensors are detached.
            try:
                logits = self._stack.step_tokens(ids, start)  # [B, V] fp32
            except RuntimeError as err:  # e.g. a token id outside the vocabulary
                raise SparselmError(str(err).splitlines()[0]) from None
            self.pos = end
            return logits if self.k_cache.dtype == torch.float32 else logits.to(self.k_cache.dtype)
        return self._step_modules(ids, start, end)

    def generate(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding from the current position: `steps` single-token steps, the first fed
        `ids` [B, 1] and each next one the argmax of the previous logits. Returns those argmaxes
        [B, steps]. With the whole step in C++ the loop runs there too (no Python per token)."""
        B = ids.shape[0]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise SparselmError(f"steps must be a whole number >= 0, got {steps!r}")
        if ids.shape != (self.batch_size, 1):
            raise SparselmError(f"generate takes ids [batch {self.batch_size}, 1], got {list(ids.shape)}")
        if self.pos + steps > self.max_len:
            raise SparselmError(f"{self.pos + steps} positions exceed the cache of {self.max_len}; build the "
                                f"decoder with a larger max_len")
        if self._stack_full:
            try:
                out = self._stack.generate(ids, self.pos, steps)
            except RuntimeError as err:
                raise SparselmError(str(err).splitlines()[0]) from None
            self.pos += steps
            return out
        out = torch.empty(B, steps, dtype=torch.long, device=ids.device)
        with torch.inference_mode():
            for i in range(steps):
                ids = self.step(ids).argmax(-1, keepdim=True)
                out[:, i] = ids[:, 0]
        return out

    @torch.inference_mode()
    def _step_modules(self, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        B, T = ids.shape
        x = self.inner.embed_tokens(ids)  # [B, T, D]
        if T == 1 and self._stack is not None:
            self.pos = end
            x = self._stack.step(x.view(B, -1), start).view(B, 1, -1)  # every block, one C++ call
            return self.head(self.inner.norm(x))[:, -1]  # [B, V]
        positions = torch.arange(start, end, device=ids.device).unsqueeze(0)  # [1, T]
        cos, sin = self.inner.rotary_emb(x, positions)  # [1, T, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, hd]
        mask = None
        if T > 1 and start > 0:  # a chunk after earlier tokens: causal within the chunk, all before it
            mask = torch.ones(T, end, dtype=torch.bool, device=ids.device).tril(start)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[i, :, :, start:end] = k
            self.v_cache[i, :, :, start:end] = v
            keys, values = self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.pos = end
        return self.head(self.inner.norm(x[:, -1:]))[:, -1]  # [B, V]


def _rms_norm_parts(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm (x / rms(x) * weight, computed in fp32), else None."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or not type(norm).__name__.endswith("RMSNorm") \
            or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return weight.detach(), float(eps)


def _projection_spec(module: nn.Module | None, dtype: torch.dtype = torch.float32):
    """How `DecodeStack` runs a projection of a model of `dtype`: (kind, tensors, bias, in, out,
    n, m), or None."""
    from sparselm.pack import SparseLinear

    if isinstance(module, SparseLinear):
        buf = module._buffers
        if not buf["values"].is_cpu or buf["values"].dtype not in (torch.float32, torch.bfloat16):
            return None
        kind, names = {"csr": (1, ("crow_indices", "col_indices", "values")),
                       "bitmask": (2, ("mask", "row_offsets", "values")),
                       "nm": (3, ("indices", "values"))}[module.format]
        bias = module._parameters.get("bias")
        return (kind, [buf[n] for n in names], None if bias is None else bias.detach(), module.in_features,
                module.out_features, module.n or 0, module.m or 0)
    if type(module) is nn.Linear and module.weight.dtype == dtype and module.weight.is_cpu:
        bias = None if module.bias is None else module.bias.detach()
        return (0, [module.weight.detach()], bias, module.in_features, module.out_features, 0, 0)
    return None
