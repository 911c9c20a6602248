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

On a CUDA GPU the loop runs under CUDA graphs (`static_step`, on by default there): eagerly, every
kernel launch costs the host microseconds, and each product of a 2:4 semi-structured weight a
cuSPARSELt set-up of most of a millisecond, so a batch-1 step measured the host, not the weights.
Single-token steps run one captured graph per decoder (static token and position buffers, the
position read on the device: the cache written with `index_copy_`, attention over the whole
cache with positions beyond the current one masked out, argmax and the next position in the
graph too); a prefill from position 0 runs one graph per prompt shape. The same static step runs
eagerly elsewhere (`static_step=True` on CPU), which is how its values are tested without a GPU.

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

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1, fast: bool = True,
                 static_step: bool | None = None):
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
        on_cuda = param.device.type == "cuda"
        self.static_step = on_cuda if static_step is None else bool(static_step)
        rope_type = str(getattr(inner.rotary_emb, "rope_type", "default"))
        static_reason = None
        if self.static_step and "dynamic" in rope_type:  # frequencies depend on the longest position so far
            static_reason = f"rope type {rope_type!r} rescales with the sequence length; static steps use a " \
                            "fixed table"
            if static_step:
                raise SparselmError(f"static steps (CUDA graphs) are not possible for this model: {static_reason}")
            self.static_step = False
        self.cuda_graphs = self.static_step and on_cuda and fast
        if static_reason is not None:
            self._stack, self.fast_path_reason = None, static_reason
        elif self.static_step:
            self._stack, self.fast_path_reason = None, "static steps (CUDA graphs on a GPU)"
            self._init_static(cfg)
        else:
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

    def _init_static(self, cfg) -> None:
        """Buffers of the static step: token ids, the position as a device tensor, the rotary
        table for every position, and the graphs (captured on first use)."""
        device = self.k_cache.device
        positions = torch.arange(self.max_len, device=device).unsqueeze(0)
        with torch.inference_mode(False), torch.no_grad():
            probe = torch.zeros(1, self.max_len, cfg.hidden_size, dtype=self.k_cache.dtype, device=device)
            cos, sin = self.inner.rotary_emb(probe, positions)  # [1, max_len, hd]
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()  # [S, hd]
            self._ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=device)
            self._pos = torch.zeros(1, dtype=torch.long, device=device)
            self._key_pos = torch.arange(self.max_len, device=device)  # [S]
        self._decode_graph = None
        self._decode_logits = None
        self._prefill = {}  # prompt shape -> (graph, ids buffer, logits)

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
        if self.static_step:
            return self._static(ids, start, end)
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
        if self.static_step:
            return self._static_generate(ids, steps)
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
    def _step_modules(self, ids: torch.Tensor, start: int, end: int, advance: bool = True) -> torch.Tensor:
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
        if advance:
            self.pos = end
        return self.head(self.inner.norm(x[:, -1:]))[:, -1]  # [B, V]

    # ---- static steps (CUDA graphs) -------------------------------------------------------

    @torch.inference_mode()
    def _static(self, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        B, T = ids.shape
        if T == 1:
            self._ids.copy_(ids)
            self._pos.fill_(start)
            logits = self._run_decode_step()
            self.pos = end
            return logits.clone()
        if start != 0:  # a chunk after earlier tokens: no graph for that shape
            return self._step_modules(ids, start, end)
        if not self.cuda_graphs:
            logits = self._step_modules(ids, 0, T, advance=False)
        else:
            entry = self._prefill.get(T)
            if entry is None:
                buf = ids.clone()
                graph, logits = self._capture(lambda: self._step_modules(buf, 0, T, advance=False))
                entry = self._prefill[T] = (graph, buf, logits)
            graph, buf, logits = entry
            buf.copy_(ids)
            graph.replay()
        self.pos = end
        return logits.clone()

    def _run_decode_step(self) -> torch.Tensor:
        """One single-token step from `_ids` at `_pos`; afterwards `_ids` holds the argmax and
        `_pos` the next position (both on the device). Returns the step's logits [B, V]."""
        if not self.cuda_graphs:
            return self._decode_body()
        if self._decode_graph is None:
            saved_ids, saved_pos = self._ids.clone(), self._pos.clone()
            self._decode_graph, self._decode_logits = self._capture(self._decode_body, restore=lambda: (
                self._ids.copy_(saved_ids), self._pos.copy_(saved_pos)))
        self._decode_graph.replay()
        return self._decode_logits

    def _capture(self, body, restore=None):
        """(graph, output) of `body` captured in a CUDA graph after warm-up runs on a side stream
        (cuBLAS and cuSPARSELt set up their handles and workspaces there, outside the capture).
        `restore` puts back what a run of `body` changes (the decode step's token and position)."""
        stream = torch.cuda.Stream(device=self.k_cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.k_cache.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                if restore is not None:
                    restore()
                body()
        torch.cuda.current_stream(self.k_cache.device).wait_stream(stream)
        if restore is not None:
            restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        if restore is not None:
            restore()
        return graph, out

    def _decode_body(self) -> torch.Tensor:
        """The capturable single-token step: nothing here reads a device value on the host."""
        B = self.batch_size
        x = self.inner.embed_tokens(self._ids)  # [B, 1, D]
        cos = self._cos.index_select(0, self._pos)[None, None]  # [1, 1, 1, hd]
        sin = self._sin.index_select(0, self._pos)[None, None]
        visible = (self._key_pos <= self._pos)[None, None, None]  # [1, 1, 1, S]: positions written so far
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, 1, self.heads, self.head_dim).transpose(1, 2)  # [B, H, 1, hd]
            k = attn.k_proj(h).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, 1, hd]
            v = attn.v_proj(h).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[i].index_copy_(2, self._pos, k)
            self.v_cache[i].index_copy_(2, self._pos, v)
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=visible,
                                               scale=self.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, 1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.head(self.inner.norm(x))[:, -1]  # [B, V]
        self._ids.copy_(logits.argmax(-1, keepdim=True))
        self._pos.add_(1)
        return logits

    @torch.inference_mode()
    def _static_generate(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        out = torch.empty(self.batch_size, steps, dtype=torch.long, device=ids.device)
        self._ids.copy_(ids)
        self._pos.fill_(self.pos)
        for i in range(steps):  # the argmax and the next position stay on the device
            self._run_decode_step()
            out[:, i] = self._ids[:, 0]
        self.pos += steps
        return out


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
