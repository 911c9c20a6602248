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
void bitmask_rows_batch1(const float* x, const at::Tensor& mask, const at::Tensor& offsets, const at::Tensor& values,
                         float* y, int64_t K, int64_t N, int64_t r0, int64_t r1);

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

// y[r] = <W[r], x> for rows [r0, r1) of a dense fp32 W [N, K], four rows per pass so that
// each load of x serves four rows.
void gemv_rows(const float* x, const float* W, float* y, int64_t K, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if SPARSELM_AVX512
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = W + r * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 16) {
      const __mmask16 m = tail_mask(K - c);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + c);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + c), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + c), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + c), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + c), xv, a3);
    }
    y[r] = _mm512_reduce_add_ps(a0);
    y[r + 1] = _mm512_reduce_add_ps(a1);
    y[r + 2] = _mm512_reduce_add_ps(a2);
    y[r + 3] = _mm512_reduce_add_ps(a3);
  }
#endif
  for (; r < r1; ++r) {
    const float* w = W + r * K;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < K; ++c) acc += w[c] * x[c];
    y[r] = acc;
  }
}

bool dense_fp32(const Projection& p) {
  return p.kind == 0 && p.tensors[0].scalar_type() == at::kFloat && p.tensors[0].is_contiguous() &&
         (!p.bias.has_value() || p.bias->scalar_type() == at::kFloat);
}

// Projections a batch-1 step can run inside a shared parallel region: dense fp32 (own GEMV)
// and bitmask-packed (the bitmask kernel's row loop).
bool batch1_capable(const Projection& p) {
  return dense_fp32(p) || (p.kind == 2 && (!p.bias.has_value() || p.bias->scalar_type() == at::kFloat));
}

// Batch-1 products of one input with several projections in one parallel region: the threads
// split the projections' concatenated rows. At decode sizes (a few hundred rows) a region per
// product, with ATen's dispatch and allocation around it, costs as much as the arithmetic.
// outputs[i] is [1, out_features of projections[i]] (bias added).
void batch1_products(const float* x, const std::vector<const Projection*>& projections,
                     const std::vector<at::Tensor>& outputs) {
  const size_t n = projections.size();
  std::vector<int64_t> first(n + 1, 0);
  int64_t work = 0;
  for (size_t i = 0; i < n; ++i) {
    const Projection& p = *projections[i];
    first[i + 1] = first[i] + p.out_features;
    work += p.kind == 0 ? p.out_features * p.in_features : p.tensors[2].numel();
  }
  const int64_t total = first[n];
  const int threads = num_threads_for(work);
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t chunk = ((total + nt - 1) / nt + 3) / 4 * 4;
    const int64_t lo = std::min(total, id * chunk), hi = std::min(total, (id + 1) * chunk);
    for (size_t i = 0; i < n && lo < hi; ++i) {
      const int64_t a = std::max(lo, first[i]) - first[i], b = std::min(hi, first[i + 1]) - first[i];
      if (a >= b) continue;
      const Projection& p = *projections[i];
      float* y = outputs[i].data_ptr<float>();
      if (p.kind == 0) {
        gemv_rows(x, p.tensors[0].data_ptr<float>(), y, p.in_features, a, b);
      } else {
        bitmask_rows_batch1(x, p.tensors[0], p.tensors[1], p.tensors[2], y, p.in_features, p.out_features, a, b);
      }
    }
  }
  for (size_t i = 0; i < n; ++i)
    if (projections[i]->bias.has_value()) outputs[i].add_(*projections[i]->bias);
}

// x += y for fp32 [B, D] tensors (the residual adds: a plain loop, no ATen dispatch).
void add_rows(at::Tensor& x, const at::Tensor& y) {
  const at::Tensor yc = y.contiguous();
  float* xp = x.data_ptr<float>();
  const float* yp = yc.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
}

}  // namespace

// The projections of one input: at batch 1 the dense and bitmask ones share one parallel
// region, the rest run one by one.
std::vector<at::Tensor> project_all(const at::Tensor& x, const std::vector<const Projection*>& projections) {
  std::vector<at::Tensor> out(projections.size());
  std::vector<const Projection*> batched;
  std::vector<at::Tensor> batched_out;
  for (size_t i = 0; i < projections.size(); ++i) {
    if (x.size(0) == 1 && batch1_capable(*projections[i])) {
      out[i] = at::empty({1, projections[i]->out_features}, x.options());
      batched.push_back(projections[i]);
      batched_out.push_back(out[i]);
    } else {
      out[i] = (*projections[i])(x).contiguous();
    }
  }
  if (!batched.empty()) batch1_products(x.data_ptr<float>(), batched, batched_out);
  return out;
}

at::Tensor Projection::operator()(const at::Tensor& x) const {
  if (x.size(0) == 1 && x.is_contiguous() && x.scalar_type() == at::kFloat && batch1_capable(*this))
    return project_all(x, {this})[0];
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

void DecodeStack::set_head(at::Tensor norm, double eps, const ProjectionSpec& head) {
  Projection p;
  std::tie(p.kind, p.tensors, p.bias, p.in_features, p.out_features, p.n, p.m) = head;
  TORCH_CHECK(p.kind >= 0 && p.kind <= 3, "decode stack: unknown projection kind ", p.kind);
  TORCH_CHECK(norm.numel() == p.in_features, "decode stack: the final norm has ", norm.numel(),
              " weights, the head takes ", p.in_features, " features");
  final_norm_ = norm.to(at::kFloat).contiguous();
  final_eps_ = eps;
  head_ = std::move(p);
}

at::Tensor DecodeStack::step_logits(at::Tensor x, int64_t pos) const {
  TORCH_CHECK(head_.has_value(), "decode stack: set_head was not called");
  return (*head_)(rms_norm_rows(step(x, pos), final_norm_, final_eps_));
}

void DecodeStack::set_embedding(at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "decode stack: the embedding table must be a contiguous fp32 [vocab, hidden] tensor");
  TORCH_CHECK(blocks_.empty() || weight.size(1) == blocks_[0].norm1.numel(), "decode stack: embedding width ",
              weight.size(1), " differs from the hidden size ", blocks_[0].norm1.numel());
  embedding_ = weight;
}

at::Tensor DecodeStack::step_tokens(at::Tensor ids, int64_t pos) const {
  TORCH_CHECK(embedding_.defined(), "decode stack: set_embedding was not called");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.numel() == k_cache_.size(1),
              "decode stack: ids must be int64 [batch, 1] for batch ", k_cache_.size(1));
  ids = ids.reshape({-1}).contiguous();
  const int64_t vocab = embedding_.size(0);
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < vocab, "decode stack: token id ", p[i], " outside the vocabulary of ", vocab);
  return step_logits(at::index_select(embedding_, 0, ids), pos);
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
  for (int64_t l = 0; l < num_blocks(); ++l) {
    const DecodeBlock& blk = blocks_[l];
    const at::Tensor h = rms_norm_rows(x, blk.norm1, blk.eps1);
    const std::vector<at::Tensor> qkv = project_all(h, {&blk.q, &blk.k, &blk.v});
    at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
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
    // Heads are independent: the threads take whole heads once the cache is long enough.
    auto attn = at::empty({B, heads_ * hd}, x.options());
    const float* qp = q.data_ptr<float>();
    float* ap = attn.data_ptr<float>();
    const int threads = std::min<int64_t>(num_threads_for(B * heads_ * S * hd * 2), B * heads_);
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> scores(S);
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * heads_; ++bh) {
        const int64_t b = bh / heads_, h = bh % heads_;
        const float* qh = qp + bh * hd;
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
        int64_t s = 0;
#if SPARSELM_AVX512
        __m512 sum16 = _mm512_setzero_ps();
        const __m512 top16 = _mm512_set1_ps(top);
        for (; s < S; s += 16) {
          const __mmask16 m = tail_mask(S - s);
          const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores.data() + s), top16)));
          _mm512_mask_storeu_ps(scores.data() + s, m, e);
          sum16 = _mm512_add_ps(sum16, e);
        }
        total = _mm512_reduce_add_ps(sum16);
#endif
        for (; s < S; ++s) {
          scores[s] = std::exp(scores[s] - top);
          total += scores[s];
        }
        float* out = ap + bh * hd;
        std::fill(out, out + hd, 0.f);
        const float inv = 1.f / total;
        for (int64_t s2 = 0; s2 < S; ++s2) {
          const float p = scores[s2] * inv;
          const float* vs = vals + s2 * hd;
#pragma omp simd
          for (int64_t i = 0; i < hd; ++i) out[i] += p * vs[i];
        }
      }
    }
    add_rows(x, blk.o(attn));
    const at::Tensor h2 = rms_norm_rows(x, blk.norm2, blk.eps2);
    const std::vector<at::Tensor> gate_up = project_all(h2, {&blk.gate, &blk.up});
    at::Tensor gate = gate_up[0];
    const at::Tensor up = gate_up[1];
    float* gp = gate.data_ptr<float>();
    const float* up_p = up.data_ptr<float>();
    const int64_t n = gate.numel();
    int64_t i = 0;
#if SPARSELM_AVX512
    for (; i + 16 <= n; i += 16) {  // silu(gate) * up, 16 at a time
      const __m512 g = _mm512_loadu_ps(gp + i);
      _mm512_storeu_ps(gp + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), _mm512_loadu_ps(up_p + i)));
    }
#endif
    for (; i < n; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up_p[i];  // silu(gate) * up
    add_rows(x, blk.down(gate));
  }
  return x;
}

}  // namespace sparselm
