// One decode position through a stack of Llama-style blocks (see decode_step.h).
// Legend: B = batch, D = hidden size, H / Hkv = query / key-value heads, hd = head dim,
// S = positions in the cache so far (pos + 1).
#include "decode_step.h"

#include <cmath>

#include "kernel_common.h"

namespace sparselm {

at::Tensor bitmask_linear(at::Tensor x, at::Tensor mask, at::Tensor offsets, at::Tensor values,
                          c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features);
at::Tensor csr_linear(at::Tensor x, at::Tensor crow, at::Tensor col, at::Tensor values,
                      c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features);
at::Tensor nm_linear(at::Tensor x, at::Tensor idx, at::Tensor values, c10::optional<at::Tensor> bias, int64_t n,
                     int64_t m, int64_t in_features);

namespace {

// y = x / sqrt(mean(x^2) + eps) * w, row by row, in fp32 (as Llama's RMSNorm computes it).
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t B = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = xp + b * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    float* yr = yp + b * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = wp[i] * (xr[i] * inv);
  }
  return y;
}

// In place: each head's vector v of `x` [B, heads * hd] becomes v * cos + rotate_half(v) * sin.
void apply_rotary(at::Tensor& x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t B = x.size(0), half = hd / 2;
  float* p = x.data_ptr<float>();
  for (int64_t r = 0; r < B * heads; ++r) {
    float* v = p + r * hd;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

}  // namespace

at::Tensor Projection::operator()(const at::Tensor& x) const {
  switch (kind) {
    case 0:
      return at::linear(x, tensors[0], bias);
    case 1:
      return csr_linear(x, tensors[0], tensors[1], tensors[2], bias, in_features, out_features);
    case 2:
      return bitmask_linear(x, tensors[0], tensors[1], tensors[2], bias, in_features, out_features);
    default:
      return nm_linear(x, tensors[0], tensors[1], bias, n, m, in_features);
  }
}

DecodeStack::DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling, at::Tensor cos,
                         at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache)
    : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scaling_(scaling), cos_(cos.contiguous()),
      sin_(sin.contiguous()), k_cache_(k_cache), v_cache_(v_cache) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "decode stack: ", heads,
              " query heads do not divide into ", kv_heads, " key-value groups");
  TORCH_CHECK(head_dim % 2 == 0, "decode stack: rotary embedding needs an even head dim, got ", head_dim);
  TORCH_CHECK(cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat && cos_.dim() == 2 &&
                  cos_.size(1) == head_dim && sin_.sizes() == cos_.sizes(),
              "decode stack: cos and sin must be fp32 [max_len, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kv_heads &&
                  k_cache.size(4) == head_dim && k_cache.size(3) <= cos_.size(0),
              "decode stack: caches must be contiguous fp32 [L, B, Hkv, max_len, head_dim]");
}

void DecodeStack::add_block(at::Tensor norm1, double eps1, at::Tensor norm2, double eps2,
                            const std::vector<ProjectionSpec>& projections) {
  TORCH_CHECK(projections.size() == 7, "decode stack: a block takes 7 projections (q k v o gate up down)");
  TORCH_CHECK(num_blocks() < k_cache_.size(0), "decode stack: more blocks than the cache has layers");
  DecodeBlock block;
  block.norm1 = norm1.to(at::kFloat).contiguous();
  block.norm2 = norm2.to(at::kFloat).contiguous();
  block.eps1 = eps1;
  block.eps2 = eps2;
  Projection* slots[7] = {&block.q, &block.k, &block.v, &block.o, &block.gate, &block.up, &block.down};
  for (int i = 0; i < 7; ++i) {
    Projection& p = *slots[i];
    std::tie(p.kind, p.tensors, p.bias, p.in_features, p.out_features, p.n, p.m) = projections[i];
    TORCH_CHECK(p.kind >= 0 && p.kind <= 3, "decode stack: unknown projection kind ", p.kind);
  }
  const int64_t D = block.norm1.numel();
  TORCH_CHECK(block.q.in_features == D && block.q.out_features == heads_ * head_dim_ &&
                  block.k.out_features == kv_heads_ * head_dim_ && block.v.out_features == kv_heads_ * head_dim_ &&
                  block.o.in_features == heads_ * head_dim_ && block.o.out_features == D &&
                  block.gate.out_features == block.up.out_features &&
                  block.down.in_features == block.gate.out_features && block.down.out_features == D,
              "decode stack: projection shapes do not fit one Llama block with ", heads_, " heads, ", kv_heads_,
              " key-value heads of dim ", head_dim_);
  blocks_.push_back(std::move(block));
}

at::Tensor DecodeStack::step(at::Tensor x, int64_t pos) const {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "decode stack: x must be fp32 [batch, hidden]");
  const int64_t B = x.size(0), S = pos + 1, max_len = k_cache_.size(3), hd = head_dim_;
  TORCH_CHECK(B == k_cache_.size(1), "decode stack: the cache was built for batch ", k_cache_.size(1), ", got ", B);
  TORCH_CHECK(pos >= 0 && pos < max_len, "decode stack: position ", pos, " outside the cache of ", max_len);
  const int64_t group = heads_ / kv_heads_;
  const float* cos = cos_.data_ptr<float>() + pos * hd;
  const float* sin = sin_.data_ptr<float>() + pos * hd;
  const float scale = static_cast<float>(scaling_);
  x = x.contiguous().clone();  // the residual stream, updated in place
  std::vector<float> scores(S);
  for (int64_t l = 0; l < num_blocks(); ++l) {
    const DecodeBlock& blk = blocks_[l];
    const at::Tensor h = rms_norm_rows(x, blk.norm1, blk.eps1);
    at::Tensor q = blk.q(h).contiguous(), k = blk.k(h).contiguous(), v = blk.v(h).contiguous();
    apply_rotary(q, heads_, hd, cos, sin);
    apply_rotary(k, kv_heads_, hd, cos, sin);
    // Cache layout [L, B, Hkv, max_len, hd]: write this position's keys and values.
    float* kc = k_cache_.data_ptr<float>() + l * B * kv_heads_ * max_len * hd;
    float* vc = v_cache_.data_ptr<float>() + l * B * kv_heads_ * max_len * hd;
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < kv_heads_; ++g) {
        const int64_t src = (b * kv_heads_ + g) * hd, dst = ((b * kv_heads_ + g) * max_len + pos) * hd;
        std::copy(kp + src, kp + src + hd, kc + dst);
        std::copy(vp + src, vp + src + hd, vc + dst);
      }
    // softmax(q K^T * scale) V for every (batch, head); head h reads key-value group h / group.
    auto attn = at::empty({B, heads_ * hd}, x.options());
    const float* qp = q.data_ptr<float>();
    float* ap = attn.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < heads_; ++h) {
        const float* qh = qp + (b * heads_ + h) * hd;
        const int64_t kv_base = (b * kv_heads_ + h / group) * max_len * hd;
        const float* keys = kc + kv_base;
        const float* vals = vc + kv_base;
        float top = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
          const float* ks = keys + s * hd;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < hd; ++i) dot += qh[i] * ks[i];
          scores[s] = dot * scale;
          top = std::max(top, scores[s]);
        }
        float total = 0.f;
        for (int64_t s = 0; s < S; ++s) {
          scores[s] = std::exp(scores[s] - top);
          total += scores[s];
        }
        float* out = ap + (b * heads_ + h) * hd;
        std::fill(out, out + hd, 0.f);
        const float inv = 1.f / total;
        for (int64_t s = 0; s < S; ++s) {
          const float p = scores[s] * inv;
          const float* vs = vals + s * hd;
#pragma omp simd
          for (int64_t i = 0; i < hd; ++i) out[i] += p * vs[i];
        }
      }
    x.add_(blk.o(attn));
    const at::Tensor h2 = rms_norm_rows(x, blk.norm2, blk.eps2);
    at::Tensor gate = blk.gate(h2).contiguous();
    const at::Tensor up = blk.up(h2).contiguous();
    float* gp = gate.data_ptr<float>();
    const float* up_p = up.data_ptr<float>();
    const int64_t n = gate.numel();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up_p[i];  // silu(gate) * up
    x.add_(blk.down(gate));
  }
  return x;
}

}  // namespace sparselm
