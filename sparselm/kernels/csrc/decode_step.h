// One decode position (T = 1) through a stack of Llama-style decoder blocks in one C++ call.
//
// At batch 1 a small model's decode step is mostly interpreter work: every norm, rotation,
// cache write and residual add is a Python-level PyTorch call of a few microseconds, about a
// hundred per block, which together cost more than the block's weights. `DecodeStack` runs the
// same arithmetic (RMSNorm in fp32, rotary embedding from the model's own cos/sin table,
// in-place KV cache, softmax attention with grouped KV heads, SwiGLU MLP, residuals) in plain
// loops, optionally with the embedding lookup, final norm and LM head (`step_tokens`). At
// batch 1, dense fp32, bitmask- and CSR-packed projections of the same input run in one parallel
// region (dense through a 4-row GEMV, packed through the bitmask or CSR row kernel): at::linear's
// dispatch and a region per product cost as much as a 256-wide product. When every projection
// (the head included) is one of those, `step_tokens` runs the whole token in a single
// parallel region (see `single_region`): on the small built-in model that took dense decode
// from ~500 to ~400 us per token and bitmask-packed from ~390 to ~280. Other formats and
// batch sizes go through the sparse kernels' entry points and `at::linear` (what `nn.Linear`
// runs). Dense and packed models pay the same per-step cost, so what differs between them is
// what the weights cost. Activations are fp32; bf16 models (bf16 weights, embedding and KV
// cache) run through the single-region step, their weights widened to fp32 as they are read
// and keys and values rounded to bf16 as the cache stores them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace sparselm {

// kind: 0 dense ([weight]), 1 CSR ([crow, col, values]), 2 bitmask ([mask, offsets, values]),
// 3 N:M compressed ([indices, values]).
struct Projection {
  int64_t kind = 0;
  std::vector<at::Tensor> tensors;
  std::optional<at::Tensor> bias;
  int64_t in_features = 0, out_features = 0, n = 0, m = 0;
  at::Tensor operator()(const at::Tensor& x) const;  // [B, in] -> [B, out]
};

using ProjectionSpec = std::tuple<int64_t, std::vector<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t,
                                  int64_t, int64_t>;

struct DecodeBlock {
  at::Tensor norm1, norm2;  // RMSNorm weights [D]
  double eps1 = 1e-6, eps2 = 1e-6;
  Projection q, k, v, o, gate, up, down;
};

class DecodeStack {
 public:
  // cos, sin: [max_len, head_dim] fp32 (the model's rotary table); k_cache, v_cache:
  // [L, B, Hkv, max_len, head_dim] fp32 or bf16, shared with the caller (prefill writes them).
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling, at::Tensor cos, at::Tensor sin,
              at::Tensor k_cache, at::Tensor v_cache);
  // projections in the order q, k, v, o, gate, up, down.
  void add_block(at::Tensor norm1, double eps1, at::Tensor norm2, double eps2,
                 const std::vector<ProjectionSpec>& projections);
  // The model's final norm and LM head, for `step_tokens`.
  void set_head(at::Tensor norm, double eps, const ProjectionSpec& head);
  // x: [B, D] hidden states of the token at position `pos`; returns the stack's output [B, D].
  at::Tensor step(at::Tensor x, int64_t pos) const;
  // The same step followed by the final norm and the head: logits [B, V] (needs set_head).
  at::Tensor step_logits(at::Tensor x, int64_t pos) const;
  // The input embedding table [V, D], for `step_tokens`.
  void set_embedding(at::Tensor weight);
  // ids [B, 1] (int64) -> logits [B, V]: embedding lookup, step_logits.
  at::Tensor step_tokens(at::Tensor ids, int64_t pos) const;
  // Greedy decoding: `steps` calls of step_tokens from position `pos`, each fed the argmax of
  // the previous logits (the first fed `ids` [B, 1]); returns those argmaxes [B, steps].
  at::Tensor generate(at::Tensor ids, int64_t pos, int64_t steps) const;
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Whether step_tokens runs the whole step in one parallel region: batch 1, with every
  // projection (the head included) dense (fp32 or bf16), bitmask- or CSR-packed. bf16 models (bf16
  // embedding, weights and cache) run only this way.
  bool single_region() const;

 private:
  at::Tensor step_token_single_region(int64_t id, int64_t pos) const;
  template <typename C>  // C: the cache's element type (float or at::BFloat16)
  at::Tensor region_step(int64_t id, int64_t pos) const;

  int64_t heads_, kv_heads_, head_dim_;
  double scaling_;
  at::Tensor cos_, sin_, k_cache_, v_cache_;
  std::vector<DecodeBlock> blocks_;
  at::Tensor final_norm_, embedding_;
  double final_eps_ = 1e-6;
  std::optional<Projection> head_;
};

}  // namespace sparselm
