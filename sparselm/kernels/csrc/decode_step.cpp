// One decode position through a stack of Llama-style blocks (see decode_step.h).
// Legend: B = batch, D = hidden size, H / Hkv = query / key-value heads, hd = head dim,
// S = positions in the cache so far (pos + 1).
#include "decode_step.h"

#include <atomic>
#include <cmath>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // _mm_pause, also in builds without AVX-512
#endif

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
void csr_rows_batch1(const float* x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     float* y, int64_t r0, int64_t r1);

namespace {

// y = x / sqrt(mean(x^2) + eps) * w for one row of D values, in fp32 (as Llama's RMSNorm).
void rms_norm_row(const float* x, const float* w, float* y, int64_t D, double eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (x[i] * inv);
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t B = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  for (int64_t b = 0; b < B; ++b)
    rms_norm_row(x.data_ptr<float>() + b * D, w.data_ptr<float>(), y.data_ptr<float>() + b * D, D, eps);
  return y;
}

// In place: one head's vector v [hd] becomes v * cos + rotate_half(v) * sin.
void rotate_head(float* v, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// In place, every head of `x` [B, heads * hd].
void apply_rotary(at::Tensor& x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  float* p = x.data_ptr<float>();
  for (int64_t r = 0; r < x.size(0) * heads; ++r) rotate_head(p + r * hd, hd, cos, sin);
}

// out [hd] = softmax(q . keys[s] * scale over s < S) weighted sum of vals[s]; keys and vals
// [S, hd] rows of the cache (fp32, or bf16 for bf16 models); scores: scratch of at least S floats.
template <typename C>
void attend_head(const float* q, const C* keys, const C* vals, int64_t S, int64_t hd, float scale, float* scores,
                 float* out) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const C* ks = keys + s * hd;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * to_float(ks[i]);
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
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), top16)));
    _mm512_mask_storeu_ps(scores + s, m, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  total = _mm512_reduce_add_ps(sum16);
#elif SPARSELM_AVX2
  __m256 sum8 = _mm256_setzero_ps();
  const __m256 top8 = _mm256_set1_ps(top);
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top8));
    _mm256_storeu_ps(scores + s, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  total = hsum8(sum8);
#endif
  for (; s < S; ++s) {
    scores[s] = std::exp(scores[s] - top);
    total += scores[s];
  }
  std::fill(out, out + hd, 0.f);
  const float inv = 1.f / total;
  for (int64_t s2 = 0; s2 < S; ++s2) {
    const float p = scores[s2] * inv;
    const C* vs = vals + s2 * hd;
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += p * to_float(vs[i]);
  }
}

// dst[i] = src[i] for one head, rounded to the cache's type (to nearest even for bf16).
inline void store_head(const float* src, float* dst, int64_t hd) { std::copy(src, src + hd, dst); }
inline void store_head(const float* src, at::BFloat16* dst, int64_t hd) {
  for (int64_t i = 0; i < hd; ++i) dst[i] = at::BFloat16(src[i]);
}

// In place: g[i] = silu(g[i]) * u[i] for n values.
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if SPARSELM_AVX512
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_loadu_ps(g + i);
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_mul_ps(a, sigmoid16(a)), _mm512_loadu_ps(u + i)));
  }
#elif SPARSELM_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(a, sigmoid8(a)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
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
#elif SPARSELM_AVX2
  for (; r + 4 <= r1; r += 4) {  // four rows per pass, two accumulators each (8 FMA chains)
    const float* w0 = W + r * K;
    __m256 a[4][2];
    for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
      for (int i = 0; i < 4; ++i) {
        a[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i * K + c), x0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i * K + c + 8), x1, a[i][1]);
      }
    }
    for (; c < K; c += 8) {
      const __m256 xv = load8(x + c, K - c);
      for (int i = 0; i < 4; ++i) a[i][0] = _mm256_fmadd_ps(load8(w0 + i * K + c, K - c), xv, a[i][0]);
    }
    for (int i = 0; i < 4; ++i) y[r + i] = hsum8(_mm256_add_ps(a[i][0], a[i][1]));
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

// The same for bf16 W: with AVX-512 four rows at a time, 32 columns per step against x split
// into even and odd columns (`split_even_odd`): no widening shuffle per 16 weights.
void gemv_rows(const float* x, const at::BFloat16* W, float* y, int64_t K, int64_t r0, int64_t r1) {
  int64_t r = r0;
#if SPARSELM_AVX512
  const int64_t blocks = (K + 31) / 32;
  std::vector<float> xs_buf(blocks * 32);
  float* xs = xs_buf.data();
  split_even_odd(x, K, blocks, xs);
  const __mmask32 tail = K % 32 ? (__mmask32)((1ull << (K % 32)) - 1) : (__mmask32)0xFFFFFFFFu;
  for (; r + 4 <= r1; r += 4) {  // four rows per pass, as the fp32 loop: more streams in flight
    const uint16_t* w0 = reinterpret_cast<const uint16_t*>(W + r * K);
    __m512 e[4], o[4];
    for (int i = 0; i < 4; ++i) e[i] = o[i] = _mm512_setzero_ps();
    for (int64_t h = 0; h < blocks; ++h) {
      const __m512 xe = _mm512_loadu_ps(xs + 32 * h), xo = _mm512_loadu_ps(xs + 32 * h + 16);
      for (int i = 0; i < 4; ++i) {
        const uint16_t* p = w0 + i * K + 32 * h;
        const __m512i a = h + 1 < blocks ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(tail, p);
        e[i] = _mm512_fmadd_ps(bf16_even(a), xe, e[i]);
        o[i] = _mm512_fmadd_ps(bf16_odd(a), xo, o[i]);
      }
    }
    for (int i = 0; i < 4; ++i) y[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(e[i], o[i]));
  }
#elif SPARSELM_AVX2
  for (; r + 4 <= r1; r += 4) {  // four rows per pass, 8 columns per step
    const at::BFloat16* w0 = W + r * K;
    __m256 a[4];
    for (int i = 0; i < 4; ++i) a[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= K; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + c);
      for (int i = 0; i < 4; ++i)
        a[i] = _mm256_fmadd_ps(widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + i * K + c))), xv,
                               a[i]);
    }
    if (c < K) {
      const __m256 xv = load8(x + c, K - c);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(load8(w0 + i * K + c, K - c), xv, a[i]);
    }
    for (int i = 0; i < 4; ++i) y[r + i] = hsum8(a[i]);
  }
#endif
  for (; r < r1; ++r) {
    const at::BFloat16* w = W + r * K;
    float acc = 0.f;
    for (int64_t c = 0; c < K; ++c) acc += to_float(w[c]) * x[c];
    y[r] = acc;
  }
}

bool fp32_bias(const Projection& p) {
  return !p.bias.has_value() || (p.bias->scalar_type() == at::kFloat && p.bias->is_contiguous());
}

bool dense_fp32(const Projection& p) {
  return p.kind == 0 && p.tensors[0].scalar_type() == at::kFloat && p.tensors[0].is_contiguous() && fp32_bias(p);
}

bool dense_bf16(const Projection& p) {
  return p.kind == 0 && p.tensors[0].scalar_type() == at::kBFloat16 && p.tensors[0].is_contiguous() && fp32_bias(p);
}

// Projections a batch-1 step can run inside a shared parallel region: dense fp32 (own GEMV),
// bitmask-packed and CSR-packed (their kernels' row loops).
bool batch1_capable(const Projection& p) {
  return dense_fp32(p) || ((p.kind == 2 || p.kind == 1) && fp32_bias(p));
}

// What the single-region step also takes: dense bf16 weights (widened to fp32 as they are read).
bool region_capable(const Projection& p) { return batch1_capable(p) || dense_bf16(p); }

// y[r] = <W[r], x> (+ bias[r]) for rows [r0, r1) of one batch-1-capable projection.
void project_rows(const Projection& p, const float* x, float* y, int64_t r0, int64_t r1) {
  if (r0 >= r1) return;
  if (p.kind == 0 && p.tensors[0].scalar_type() == at::kBFloat16)
    gemv_rows(x, p.tensors[0].data_ptr<at::BFloat16>(), y, p.in_features, r0, r1);
  else if (p.kind == 0)
    gemv_rows(x, p.tensors[0].data_ptr<float>(), y, p.in_features, r0, r1);
  else if (p.kind == 1)
    csr_rows_batch1(x, p.tensors[0], p.tensors[1], p.tensors[2], y, r0, r1);
  else
    bitmask_rows_batch1(x, p.tensors[0], p.tensors[1], p.tensors[2], y, p.in_features, p.out_features, r0, r1);
  if (p.bias.has_value()) {
    const float* b = p.bias->data_ptr<float>();
    for (int64_t r = r0; r < r1; ++r) y[r] += b[r];
  }
}

// Thread t's share [lo, hi) of n items split into T contiguous ranges whose inner boundaries
// are multiples of `align`.
std::pair<int64_t, int64_t> share(int64_t n, int t, int T, int64_t align) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * t / T * align), std::min(n, units * (t + 1) / T * align)};
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
    const auto [lo, hi] = share(total, omp_get_thread_num(), omp_get_num_threads(), 4);
    for (size_t i = 0; i < n && lo < hi; ++i) {
      const int64_t a = std::max(lo, first[i]) - first[i], b = std::min(hi, first[i + 1]) - first[i];
      project_rows(*projections[i], x, outputs[i].data_ptr<float>(), a, b);  // bias added per row
    }
  }
}

// A barrier for the threads of one parallel region (sense-reversing, on two atomics): threads
// spin briefly, then yield. OpenMP's own barrier follows OMP_WAIT_POLICY: with "passive" (what
// `sparselm bench` runs under, kind to shared cores) every barrier puts the waiting threads to
// sleep and wakes them through the kernel, tens of microseconds each, twenty times a token.
// Here a wait spins at most kSpins pauses (~0.1-0.2 ms) before it yields the core,
// so a decode step's short waits stay cheap under either policy and an oversubscribed machine
// still makes progress.
class RegionBarrier {
 public:
  // `sense` is the calling thread's own flag (false before its first wait); `team` the region's
  // thread count.
  void wait(int team, bool& sense) {
    sense = !sense;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      release_.store(sense, std::memory_order_release);  // publishes every write before the barrier
      return;
    }
    for (int spins = 0; release_.load(std::memory_order_acquire) != sense; ++spins) {
      if (spins < kSpins) {
#if defined(__x86_64__) || defined(_M_X64)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpins = 1 << 12;
  std::atomic<int> arrived_{0};
  std::atomic<bool> release_{false};
};

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
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == kv_heads && k_cache.size(4) == head_dim && k_cache.size(3) <= cos_.size(0),
              "decode stack: caches must be contiguous fp32 or bf16 [L, B, Hkv, max_len, head_dim]");
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
    if (p.bias.has_value()) p.bias = p.bias->to(at::kFloat).contiguous();  // bf16 models' biases too
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
  if (p.bias.has_value()) p.bias = p.bias->to(at::kFloat).contiguous();
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
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                  weight.is_contiguous(),
              "decode stack: the embedding table must be a contiguous fp32 or bf16 [vocab, hidden] tensor");
  TORCH_CHECK(blocks_.empty() || weight.size(1) == blocks_[0].norm1.numel(), "decode stack: embedding width ",
              weight.size(1), " differs from the hidden size ", blocks_[0].norm1.numel());
  embedding_ = weight;
}

bool DecodeStack::single_region() const {
  if (k_cache_.size(1) != 1 || !head_.has_value() || !embedding_.defined() || !region_capable(*head_)) return false;
  for (const DecodeBlock& blk : blocks_)
    for (const Projection* p : {&blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down})
      if (!region_capable(*p)) return false;
  return true;
}

// Batch 1, every projection dense, bitmask or CSR: the whole step in one parallel region.
// Each thread owns contiguous output rows of every projection; what needs a whole vector
// (the norms) every thread computes itself, so the threads meet only where a phase reads what
// other threads wrote: after q/k/v (+ rotary and cache writes), after attention, after each
// residual update and after gate/up + SwiGLU (five barriers a block). Against a region per
// projection group this removes the forks and the serial stretches between them, where one
// thread ran the norms, rotations, SwiGLU and residual adds and the others waited.
at::Tensor DecodeStack::step_token_single_region(int64_t id, int64_t pos) const {
  if (k_cache_.scalar_type() == at::kBFloat16) return region_step<at::BFloat16>(id, pos);
  return region_step<float>(id, pos);
}

template <typename C>
at::Tensor DecodeStack::region_step(int64_t id, int64_t pos) const {
  const int64_t D = embedding_.size(1), hd = head_dim_, H = heads_, Hkv = kv_heads_, group = H / Hkv;
  const int64_t S = pos + 1, max_len = k_cache_.size(3), V = head_->out_features;
  TORCH_CHECK(pos >= 0 && pos < max_len, "decode stack: position ", pos, " outside the cache of ", max_len);
  int64_t F = 0, work = head_->kind == 0 ? V * D : head_->tensors[2].numel();
  for (const DecodeBlock& blk : blocks_) {
    F = std::max(F, blk.gate.out_features);
    for (const Projection* p : {&blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down})
      work += p->kind == 0 ? p->out_features * p->in_features : p->tensors[2].numel();
  }
  auto logits = at::empty({1, V}, embedding_.options().dtype(at::kFloat));
  // Shared scratch: residual stream x [D], q [H, hd], attention output [H, hd], gate and up [F],
  // the o/down products [D] (each thread adds its own rows into x).
  std::vector<float> x(D);
  if (embedding_.scalar_type() == at::kBFloat16) {
    const at::BFloat16* row = embedding_.data_ptr<at::BFloat16>() + id * D;
    for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(row[i]);
  } else {
    std::copy(embedding_.data_ptr<float>() + id * D, embedding_.data_ptr<float>() + (id + 1) * D, x.begin());
  }
  std::vector<float> q(H * hd), attn(H * hd), gate(F), up(F), proj(D);
  const float* cos = cos_.data_ptr<float>() + pos * hd;
  const float* sin = sin_.data_ptr<float>() + pos * hd;
  const float scale = static_cast<float>(scaling_);
  C* kc0 = k_cache_.data_ptr<C>();
  C* vc0 = v_cache_.data_ptr<C>();
  float* out = logits.data_ptr<float>();
  const int threads = num_threads_for(work);
  RegionBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    bool sense = false;
    auto sync = [&] { barrier.wait(T, sense); };
    std::vector<float> h(D), scores(S), kv(Hkv * hd);  // kv: this thread's key or value heads
    // q, k and v rows in whole heads: H + 2 Hkv units of hd rows, so a thread rotates and caches
    // the heads it computed.
    const auto units = share(H + 2 * Hkv, t, T, 1);
    const auto rows_d = share(D, t, T, 4);
    const auto heads = share(H, t, T, 1);
    for (int64_t l = 0; l < num_blocks(); ++l) {
      const DecodeBlock& blk = blocks_[l];
      C* kc = kc0 + l * Hkv * max_len * hd;
      C* vc = vc0 + l * Hkv * max_len * hd;
      rms_norm_row(x.data(), blk.norm1.data_ptr<float>(), h.data(), D, blk.eps1);
      {
        const int64_t q0 = std::min(units.first, H), q1 = std::min(units.second, H);
        project_rows(blk.q, h.data(), q.data(), q0 * hd, q1 * hd);
        for (int64_t u = q0; u < q1; ++u) rotate_head(q.data() + u * hd, hd, cos, sin);
        for (int64_t u = std::max(units.first, H); u < units.second; ++u) {
          const bool is_key = u < H + Hkv;
          const int64_t g = is_key ? u - H : u - H - Hkv;
          float* head = kv.data() + g * hd;
          project_rows(is_key ? blk.k : blk.v, h.data(), kv.data(), g * hd, (g + 1) * hd);
          if (is_key) rotate_head(head, hd, cos, sin);
          store_head(head, (is_key ? kc : vc) + (g * max_len + pos) * hd, hd);
        }
      }
      sync();
      for (int64_t hh = heads.first; hh < heads.second; ++hh) {
        const int64_t base = (hh / group) * max_len * hd;
        attend_head(q.data() + hh * hd, kc + base, vc + base, S, hd, scale, scores.data(), attn.data() + hh * hd);
      }
      sync();
      project_rows(blk.o, attn.data(), proj.data(), rows_d.first, rows_d.second);
      for (int64_t r = rows_d.first; r < rows_d.second; ++r) x[r] += proj[r];
      sync();
      rms_norm_row(x.data(), blk.norm2.data_ptr<float>(), h.data(), D, blk.eps2);
      const auto neurons = share(blk.gate.out_features, t, T, 16);
      project_rows(blk.gate, h.data(), gate.data(), neurons.first, neurons.second);
      project_rows(blk.up, h.data(), up.data(), neurons.first, neurons.second);
      silu_mul(gate.data() + neurons.first, up.data() + neurons.first, neurons.second - neurons.first);
      sync();
      project_rows(blk.down, gate.data(), proj.data(), rows_d.first, rows_d.second);
      for (int64_t r = rows_d.first; r < rows_d.second; ++r) x[r] += proj[r];
      sync();
    }
    rms_norm_row(x.data(), final_norm_.data_ptr<float>(), h.data(), D, final_eps_);
    const auto vocab = share(V, t, T, 4);
    project_rows(*head_, h.data(), out, vocab.first, vocab.second);
  }
  return logits;
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
  if (single_region()) return step_token_single_region(p[0], pos);
  return step_logits(at::index_select(embedding_, 0, ids).to(at::kFloat), pos);
}

at::Tensor DecodeStack::generate(at::Tensor ids, int64_t pos, int64_t steps) const {
  TORCH_CHECK(steps >= 0, "decode stack: steps must be >= 0, got ", steps);
  TORCH_CHECK(pos + steps <= k_cache_.size(3), "decode stack: ", pos, " + ", steps, " positions exceed the cache of ",
              k_cache_.size(3));
  auto out = at::empty({ids.numel(), steps}, ids.options().dtype(at::kLong));
  at::Tensor next = ids.reshape({-1, 1}).to(at::kLong);
  for (int64_t i = 0; i < steps; ++i) {
    next = step_tokens(next, pos + i).argmax(-1, /*keepdim=*/true);  // [B, 1]
    out.select(1, i).copy_(next.select(1, 0));
  }
  return out;
}

at::Tensor DecodeStack::step(at::Tensor x, int64_t pos) const {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "decode stack: x must be fp32 [batch, hidden]");
  TORCH_CHECK(k_cache_.scalar_type() == at::kFloat, "decode stack: with a bf16 cache only the single-region step "
              "runs (batch 1, every projection dense, bitmask- or CSR-packed, embedding and head set)");
  for (const DecodeBlock& blk : blocks_)
    for (const Projection* p : {&blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down})
      TORCH_CHECK(!dense_bf16(*p), "decode stack: bf16 dense projections run only in the single-region step");
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
        const int64_t kv_base = (b * kv_heads_ + h / group) * max_len * hd;
        attend_head(qp + bh * hd, kc + kv_base, vc + kv_base, S, hd, scale, scores.data(), ap + bh * hd);
      }
    }
    add_rows(x, blk.o(attn));
    const at::Tensor h2 = rms_norm_rows(x, blk.norm2, blk.eps2);
    const std::vector<at::Tensor> gate_up = project_all(h2, {&blk.gate, &blk.up});
    at::Tensor gate = gate_up[0];
    const at::Tensor up = gate_up[1];
    silu_mul(gate.data_ptr<float>(), up.data_ptr<float>(), gate.numel());
    add_rows(x, blk.down(gate));
  }
  return x;
}

}  // namespace sparselm
