// Fused element-wise passes of MoE training and inference (sparselm/moe/): the SwiGLU
// activation and its backward, and the weighted sum of each token's K expert rows with its
// backward. Each replaces several PyTorch ops, every one a full pass through memory into a
// freshly allocated buffer, by one pass that reads its inputs once and writes its outputs
// once; on the dispatch shapes (8192 rows x 2816) the PyTorch versions took 15-30% of
// a forward + backward step (fp32-bf16, benchmarks/bench_moe_dispatch.py).
//
// Math is in fp32 whatever the storage dtype (fp32 or bf16); bf16 results are rounded once,
// to nearest even. Rows are split across OpenMP threads.
#include "kernel_common.h"

#include <ATen/ThreadLocalState.h>

#include <cmath>
#include <tuple>

namespace sparselm {
namespace {

inline at::BFloat16 to_bf16(float v) {
  return at::BFloat16(v);  // c10's conversion rounds to nearest even and keeps NaN a NaN
}
inline void store(float* p, float v) { *p = v; }
inline void store(at::BFloat16* p, float v) { *p = to_bf16(v); }

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

#if SPARSELM_AVX512
inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(at::BFloat16* p, __m512 v, __mmask16 k) {
  // Round to nearest even on the upper 16 bits; NaNs become the quiet NaN 0x7fc0.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(rounded));
}

// gate_sigmoid8's 16-lane twin (below): 0 where e^-g overflows fp32, as PyTorch's sigmoid.
inline __m512 gate_sigmoid16(__m512 g) {
  const __mmask16 finite_exp = _mm512_cmp_ps_mask(g, _mm512_set1_ps(-88.7f), _CMP_GE_OQ);  // false for NaN
  return _mm512_maskz_mov_ps(finite_exp, sigmoid16(g));
}
#endif

#if SPARSELM_AVX2
// sigmoid(g) on 8 lanes, 0 where e^-g overflows fp32 (g below about -88.7). exp8 saturates
// there instead, which would make silu(-inf) = -inf * tiny = -inf; with 0 it is -inf * 0 = NaN,
// and very negative finite gates give silu = -0, as PyTorch's fp32 ops and the scalar path do.
inline __m256 gate_sigmoid8(__m256 g) {
  const __m256 finite_exp = _mm256_cmp_ps(g, _mm256_set1_ps(-88.7f), _CMP_GE_OQ);  // false for NaN
  return _mm256_and_ps(sigmoid8(g), finite_exp);  // a NaN gate stays NaN through g * s
}
#endif

inline void check_float_or_bf16(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), what, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, ": ", name,
              " must be fp32 or bf16, got ", t.scalar_type());
}

// act = silu(h[:, :F]) * h[:, F:] over the flat range [lo, hi) of act's rows x F elements
// (a range, not whole rows, so that a single long row still splits across threads).
template <typename T>
void swiglu_range(const T* h, T* act, int64_t F, int64_t lo, int64_t hi) {
  for (int64_t i = lo / F; i * F < hi; ++i) {
    const T* g = h + i * 2 * F;
    const T* u = g + F;
    T* a = act + i * F;
    const int64_t end = std::min(F, hi - i * F);
    int64_t j = std::max<int64_t>(0, lo - i * F);
#if SPARSELM_AVX512
    for (; j < end; j += 16) {
      const int count = (int)std::min<int64_t>(16, end - j);
      const __m512 gv = load_values(g + j, count);
      const __m512 uv = load_values(u + j, count);
      store16(a + j, _mm512_mul_ps(_mm512_mul_ps(gv, gate_sigmoid16(gv)), uv), tail_mask(end - j));
    }
#elif SPARSELM_AVX2
    for (; j < end; j += 8) {
      const int64_t count = std::min<int64_t>(8, end - j);
      const __m256 gv = load8(g + j, count);
      const __m256 uv = load8(u + j, count);
      store8(a + j, _mm256_mul_ps(_mm256_mul_ps(gv, gate_sigmoid8(gv)), uv), count);
    }
#endif
    for (; j < end; ++j) {
      const float gv = to_float(g[j]);
      store(a + j, gv * sigmoid(gv) * to_float(u[j]));
    }
  }
}

// The SwiGLU backward over the flat range [lo, hi) of grad_act, s = sigmoid(g):
//   d up = d act * g * s,   d gate = d act * u * s * (1 + g (1 - s)).
template <typename T>
void swiglu_backward_range(const T* h, const T* grad_act, T* grad_h, int64_t F, int64_t lo, int64_t hi) {
  for (int64_t i = lo / F; i * F < hi; ++i) {
    const T* g = h + i * 2 * F;
    const T* u = g + F;
    const T* da = grad_act + i * F;
    T* dg = grad_h + i * 2 * F;
    T* du = dg + F;
    const int64_t end = std::min(F, hi - i * F);
    int64_t j = std::max<int64_t>(0, lo - i * F);
#if SPARSELM_AVX512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; j < end; j += 16) {
      const int count = (int)std::min<int64_t>(16, end - j);
      const __mmask16 k = tail_mask(end - j);
      const __m512 gv = load_values(g + j, count);
      const __m512 uv = load_values(u + j, count);
      const __m512 dav = load_values(da + j, count);
      const __m512 s = gate_sigmoid16(gv);
      const __m512 gs = _mm512_mul_ps(gv, s);
      store16(du + j, _mm512_mul_ps(dav, gs), k);
      const __m512 dsilu = _mm512_fmadd_ps(gs, _mm512_sub_ps(one, s), s);  // s + g s (1 - s)
      store16(dg + j, _mm512_mul_ps(_mm512_mul_ps(dav, uv), dsilu), k);
    }
#elif SPARSELM_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j < end; j += 8) {
      const int64_t count = std::min<int64_t>(8, end - j);
      const __m256 gv = load8(g + j, count);
      const __m256 uv = load8(u + j, count);
      const __m256 dav = load8(da + j, count);
      const __m256 s = gate_sigmoid8(gv);
      const __m256 gs = _mm256_mul_ps(gv, s);
      store8(du + j, _mm256_mul_ps(dav, gs), count);
      const __m256 dsilu = _mm256_fmadd_ps(gs, _mm256_sub_ps(one, s), s);  // s + g s (1 - s)
      store8(dg + j, _mm256_mul_ps(_mm256_mul_ps(dav, uv), dsilu), count);
    }
#endif
    for (; j < end; ++j) {
      const float gv = to_float(g[j]), uv = to_float(u[j]), dav = to_float(da[j]);
      const float s = sigmoid(gv);
      store(du + j, dav * gv * s);
      store(dg + j, dav * uv * s * (1.0f + gv * (1.0f - s)));
    }
  }
}

// Splits [0, total) into one contiguous range per thread (multiples of 16 elements).
template <typename Fn>
void split_flat(int64_t total, int64_t work, Fn fn) {
  const int threads = num_threads_for(work);
#pragma omp parallel num_threads(threads)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t chunk = ((total + n - 1) / n + 15) / 16 * 16;
    const int64_t lo = std::min(total, id * chunk), hi = std::min(total, (id + 1) * chunk);
    if (lo < hi) fn(lo, hi);
  }
}

inline void check_rows(const at::Tensor& rows, int64_t num_src, const char* what) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kLong, what,
              ": rows must be an int64 [tokens, K] tensor");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < num_src, what, ": row index ", r[i], " out of range [0, ", num_src, ")");
  }
}

// out[t] = sum_k w[t, k] * src[rows[t, k]] (w = 1 without weights), fp32 accumulation.
template <typename T>
void rows_sum_impl(const T* src, const int64_t* rows, const float* w, T* out, int64_t tokens, int64_t K,
                   int64_t D) {
  const int threads = num_threads_for(tokens * K * D);
#if SPARSELM_AVX2
  // 8 columns at a time through all K rows, the sum in a register: no fp32 row buffer to
  // write and reread per row, one rounding at the store. The sum is the AVX-512 path's
  // (k = 0 .. K-1, each a fused multiply-add onto the running sum from +0).
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t* r = rows + t * K;
    T* o = out + t * D;
    for (int64_t d = 0; d < D; d += 8) {
      const int64_t count = std::min<int64_t>(8, D - d);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; ++k) {
        const __m256 wv = _mm256_set1_ps(w ? w[t * K + k] : 1.0f);
        acc = _mm256_fmadd_ps(wv, load8(src + r[k] * D + d, count), acc);
      }
      store8(o + d, acc, count);
    }
  }
#else
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const T* row = src + rows[t * K + k] * D;
        const float wk = w ? w[t * K + k] : 1.0f;
        int64_t d = 0;
#if SPARSELM_AVX512
        const __m512 wv = _mm512_set1_ps(wk);
        for (; d + 16 <= D; d += 16) {
          _mm512_storeu_ps(acc.data() + d, _mm512_fmadd_ps(wv, load_values(row + d, 16),
                                                           _mm512_loadu_ps(acc.data() + d)));
        }
#endif
        for (; d < D; ++d) acc[d] += wk * to_float(row[d]);
      }
      T* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) store(o + d, acc[d]);
    }
  }
#endif
}

// Backward of rows_sum when no source row is used twice:
//   grad_src[rows[t, k]] = w[t, k] * grad_out[t]  (zero for unused rows),
//   grad_w[t, k] = <src[rows[t, k]], grad_out[t]>.
template <typename T>
void rows_sum_backward_impl(const T* src, const int64_t* rows, const float* w, const T* grad_out, T* grad_src,
                            float* grad_w, int64_t tokens, int64_t K, int64_t D) {
  const int threads = num_threads_for(tokens * K * D);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* go = grad_out + t * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = rows[t * K + k];
      const float wk = w ? w[t * K + k] : 1.0f;
      T* gs = grad_src + r * D;
      const T* s = src + r * D;
      float dot = 0.0f;
      int64_t d = 0;
#if SPARSELM_AVX512
      const __m512 wv = _mm512_set1_ps(wk);
      __m512 dotv = _mm512_setzero_ps();
      for (; d + 16 <= D; d += 16) {
        const __m512 gv = load_values(go + d, 16);
        store16(gs + d, _mm512_mul_ps(wv, gv), (__mmask16)0xffff);
        if (grad_w) dotv = _mm512_fmadd_ps(load_values(s + d, 16), gv, dotv);
      }
      dot = _mm512_reduce_add_ps(dotv);
#elif SPARSELM_AVX2
      // Tails included (masked loads and stores), two dot accumulators for the FMA latency.
      const __m256 wv = _mm256_set1_ps(wk);
      __m256 dot0 = _mm256_setzero_ps(), dot1 = _mm256_setzero_ps();
      for (; d + 16 <= D; d += 16) {
        const __m256 g0 = load8(go + d, 8), g1 = load8(go + d + 8, 8);
        store8(gs + d, _mm256_mul_ps(wv, g0), 8);
        store8(gs + d + 8, _mm256_mul_ps(wv, g1), 8);
        if (grad_w) {
          dot0 = _mm256_fmadd_ps(load8(s + d, 8), g0, dot0);
          dot1 = _mm256_fmadd_ps(load8(s + d + 8, 8), g1, dot1);
        }
      }
      for (; d < D; d += 8) {
        const int64_t count = std::min<int64_t>(8, D - d);
        const __m256 gv = load8(go + d, count);
        store8(gs + d, _mm256_mul_ps(wv, gv), count);
        if (grad_w) dot0 = _mm256_fmadd_ps(load8(s + d, count), gv, dot0);
      }
      dot = hsum8(_mm256_add_ps(dot0, dot1));
#endif
      for (; d < D; ++d) {
        const float gv = to_float(go[d]);
        store(gs + d, wk * gv);
        if (grad_w) dot += to_float(s[d]) * gv;
      }
      if (grad_w) grad_w[t * K + k] = dot;
    }
  }
}

}  // namespace

// `out` when given (checked: contiguous, on the CPU, of h's dtype and the result's shape), else a
// new tensor. Callers pass reused buffers: a fresh large CPU tensor is paged in again every call.
static at::Tensor output_like(const c10::optional<at::Tensor>& out, const at::Tensor& h, at::IntArrayRef sizes,
                       const char* what) {
  if (!out.has_value()) return at::empty(sizes, h.options());
  TORCH_CHECK(out->sizes() == sizes && out->scalar_type() == h.scalar_type() && out->is_contiguous() &&
                  out->device().is_cpu(),
              what, ": out must be a contiguous CPU ", h.scalar_type(), " tensor of shape ", sizes, ", got ",
              out->scalar_type(), " ", out->sizes());
  return *out;
}

at::Tensor swiglu_forward(at::Tensor h, c10::optional<at::Tensor> out) {
  check_float_or_bf16(h, "swiglu_forward", "h");
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu_forward: h must be [rows, 2F], got ", h.sizes());
  h = h.contiguous();
  const int64_t rows = h.size(0), F = h.size(1) / 2;
  at::Tensor act = output_like(out, h, {rows, F}, "swiglu_forward");
  SPARSELM_DISPATCH_VALUES(h, "swiglu_forward", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* ap = act.data_ptr<scalar_t>();
    split_flat(rows * F, rows * F * 8, [&](int64_t lo, int64_t hi) { swiglu_range(hp, ap, F, lo, hi); });
  });
  return act;
}

at::Tensor swiglu_backward(at::Tensor h, at::Tensor grad_act, c10::optional<at::Tensor> out) {
  check_float_or_bf16(h, "swiglu_backward", "h");
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu_backward: h must be [rows, 2F], got ", h.sizes());
  TORCH_CHECK(grad_act.dim() == 2 && grad_act.size(0) == h.size(0) && grad_act.size(1) * 2 == h.size(1),
              "swiglu_backward: grad_act must be [rows, F] for h of shape ", h.sizes(), ", got ", grad_act.sizes());
  h = h.contiguous();
  grad_act = grad_act.to(h.scalar_type()).contiguous();
  const int64_t rows = h.size(0), F = h.size(1) / 2;
  at::Tensor grad_h = output_like(out, h, h.sizes(), "swiglu_backward");
  SPARSELM_DISPATCH_VALUES(h, "swiglu_backward", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dap = grad_act.data_ptr<scalar_t>();
    scalar_t* dhp = grad_h.data_ptr<scalar_t>();
    split_flat(rows * F, rows * F * 12,
               [&](int64_t lo, int64_t hi) { swiglu_backward_range(hp, dap, dhp, F, lo, hi); });
  });
  return grad_h;
}

at::Tensor rows_sum(at::Tensor src, at::Tensor rows, c10::optional<at::Tensor> weights) {
  check_float_or_bf16(src, "rows_sum", "src");
  TORCH_CHECK(src.dim() == 2, "rows_sum: src must be [rows, D], got ", src.sizes());
  src = src.contiguous();
  rows = rows.contiguous();
  check_rows(rows, src.size(0), "rows_sum");
  const int64_t tokens = rows.size(0), K = rows.size(1), D = src.size(1);
  at::Tensor w;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->sizes() == rows.sizes(), "rows_sum: weights must have the shape of rows ", rows.sizes());
    w = weights->to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({tokens, D}, src.options());
  SPARSELM_DISPATCH_VALUES(src, "rows_sum", [&] {
    rows_sum_impl(src.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), w.defined() ? w.data_ptr<float>() : nullptr,
                  out.data_ptr<scalar_t>(), tokens, K, D);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rows_sum_backward(at::Tensor src, at::Tensor rows, c10::optional<at::Tensor> weights,
                                                     at::Tensor grad_out, bool need_weight_grad) {
  check_float_or_bf16(src, "rows_sum_backward", "src");
  src = src.contiguous();
  rows = rows.contiguous();
  check_rows(rows, src.size(0), "rows_sum_backward");
  const int64_t tokens = rows.size(0), K = rows.size(1), D = src.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == tokens && grad_out.size(1) == D,
              "rows_sum_backward: grad_out must be [", tokens, ", ", D, "], got ", grad_out.sizes());
  grad_out = grad_out.to(src.scalar_type()).contiguous();
  // Each source row may be used at most once: its gradient is then written, not accumulated.
  std::vector<uint8_t> used(src.size(0), 0);
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(!used[r[i]], "rows_sum_backward: source row ", r[i], " is used twice; this kernel needs "
                "distinct rows (use index_add for repeated rows)");
    used[r[i]] = 1;
  }
  at::Tensor w;
  if (weights.has_value() && weights->defined()) w = weights->to(at::kFloat).contiguous();
  at::Tensor grad_src = rows.numel() == src.size(0) ? at::empty_like(src) : at::zeros_like(src);
  at::Tensor grad_w = need_weight_grad ? at::empty({tokens, K}, src.options().dtype(at::kFloat)) : at::Tensor();
  SPARSELM_DISPATCH_VALUES(src, "rows_sum_backward", [&] {
    rows_sum_backward_impl(src.data_ptr<scalar_t>(), r, w.defined() ? w.data_ptr<float>() : nullptr,
                           grad_out.data_ptr<scalar_t>(), grad_src.data_ptr<scalar_t>(),
                           need_weight_grad ? grad_w.data_ptr<float>() : nullptr, tokens, K, D);
  });
  return {grad_src, grad_w};
}

// Runs task(i, slot) for every i in `order` (largest task first, as the caller sorted them) on
// up to `threads` threads, one task per thread at a time; slot = the running thread's index, for
// per-thread buffers. The caller's thread-local state (grad / inference mode, dispatch keys)
// goes with the tasks, and the first exception a task throws is rethrown here.
template <typename Task>
void run_whole_tasks(const std::vector<int64_t>& order, int64_t threads, Task task) {
  const at::ThreadLocalState caller_state;
  std::exception_ptr error = nullptr;
#pragma omp parallel num_threads((int)std::max<int64_t>(1, std::min<int64_t>(threads, (int64_t)order.size())))
  {
    const int64_t slot = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (size_t j = 0; j < order.size(); ++j) {
      try {
        at::ThreadLocalStateGuard state_guard(caller_state);
        task(order[j], slot);
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// The no-grad expert loop of `dispatch_inference` (sparselm/moe/dispatch.py) in one call:
// for each expert e with counts[e] > 0 rows, starting at row a of the grouped order,
//   x_buf[:n]  = x[token_index[a:a+n]]                       (gather)
//   h^T [2F,n] = gate_up[e] @ x_buf[:n]^T                    (gate rows, then up rows)
//   act^T      = silu(h^T[:F]) * h^T[F:]   in place           (fused, one pass)
//   y[a:a+n]   = act^T^T @ down[e]^T
// Each expert's matmuls run on run_rows[e] >= counts[e] rows (zero rows appended to the
// gather, their outputs dropped): the caller rounds the row counts so that matmul shapes
// repeat from call to call, because oneDNN's bf16 matmuls pay a one-off set-up per new shape
// (about as much as the product itself at these sizes; see `matmul_rows` in experts.py).
// Same ops as the Python loop it replaces, without ~10 Python-level calls per expert. When
// there are enough rows, the threads take whole experts (largest first), each running its
// matmuls on one thread: an expert's matmuls are small ([2F, D] x [D, n]) and split across
// threads they spend much of their time synchronising. Each thread then needs its own
// gather and hidden buffers: x_buf and h_buf hold `threads` slices of max(run_rows) rows.
int64_t moe_parallel_experts(std::vector<int64_t> counts, int64_t D, int64_t F) {
  int64_t total = 0, busy = 0;
  for (int64_t n : counts) {
    total += n;
    busy += n > 0;
  }
  const int threads = at::get_num_threads();
  // Per expert, per thread: at least ~2^20 multiply-adds each, and enough experts to share out.
  if (threads <= 1 || busy < 2 || total * 3 * D * F < (int64_t(1) << 21) * threads) return 1;
  return std::min<int64_t>(threads, busy);
}

void moe_expert_rows(at::Tensor x, at::Tensor token_index, std::vector<int64_t> counts,
                     std::vector<int64_t> run_rows, at::Tensor gate_up, at::Tensor down, at::Tensor y,
                     at::Tensor x_buf, at::Tensor h_buf, int64_t threads) {
  check_float_or_bf16(x, "moe_expert_rows", "x");
  const int64_t E = gate_up.size(0), F = down.size(2), D = x.size(1);
  TORCH_CHECK((int64_t)counts.size() == E && (int64_t)run_rows.size() == E, "moe_expert_rows: ", counts.size(),
              " counts and ", run_rows.size(), " run_rows for ", E, " experts");
  TORCH_CHECK(gate_up.size(1) == 2 * F && gate_up.size(2) == D && down.size(1) == D,
              "moe_expert_rows: gate_up [E, 2F, D] and down [E, D, F] do not match x [T, ", D, "]");
  TORCH_CHECK(y.is_contiguous() && x_buf.is_contiguous() && h_buf.is_contiguous(),
              "moe_expert_rows: buffers must be contiguous");
  TORCH_CHECK(threads >= 1, "moe_expert_rows: threads must be >= 1");
  std::vector<int64_t> starts(E + 1, 0);
  int64_t most = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0 && run_rows[e] >= counts[e], "moe_expert_rows: expert ", e, " has ", counts[e],
                " rows and run_rows ", run_rows[e], " (need 0 <= count <= run_rows)");
    starts[e + 1] = starts[e] + counts[e];
    most = std::max(most, run_rows[e]);
  }
  TORCH_CHECK(starts[E] == token_index.numel() && y.size(0) == starts[E] && y.size(1) == D,
              "moe_expert_rows: counts sum to ", starts[E], ", token_index has ", token_index.numel(),
              ", y is ", y.sizes());
  TORCH_CHECK(x_buf.numel() >= threads * most * D && h_buf.numel() >= threads * most * 2 * F,
              "moe_expert_rows: buffers too small for ", threads, " threads");
  x_buf = x_buf.view(-1);
  h_buf = h_buf.view(-1);
  auto run_expert = [&](int64_t e, int64_t slot) {
    const int64_t n = counts[e], m = run_rows[e];  // m >= n rows go through the matmuls
    at::Tensor x_mD = x_buf.narrow(0, slot * most * D, m * D).view({m, D});
    at::Tensor x_nD = x_mD.narrow(0, 0, n);
    at::index_select_out(x_nD, x, 0, token_index.narrow(0, starts[e], n));
    if (m > n) x_mD.narrow(0, n, m - n).zero_();
    at::Tensor h_2Fm = h_buf.narrow(0, slot * most * 2 * F, 2 * F * m).view({2 * F, m});
    at::mm_out(h_2Fm, gate_up[e], x_mD.t());
    SPARSELM_DISPATCH_VALUES(h_2Fm, "moe_expert_rows", [&] {
      scalar_t* hp = h_2Fm.data_ptr<scalar_t>();
      // As [F*m] gate values then [F*m] up values: act overwrites the gate half.
      split_flat(F * m, F * m * 8, [&](int64_t lo, int64_t hi) { swiglu_range(hp, hp, F * m, lo, hi); });
    });
    if (m == n) {
      at::Tensor out = y.narrow(0, starts[e], n);
      at::mm_out(out, h_2Fm.narrow(0, 0, F).t(), down[e].t());
    } else {  // the gather buffer is free again: the [m, D] product lands there, n rows are kept
      at::mm_out(x_mD, h_2Fm.narrow(0, 0, F).t(), down[e].t());
      y.narrow(0, starts[e], n).copy_(x_mD.narrow(0, 0, n));
    }
  };
  if (threads == 1) {
    for (int64_t e = 0; e < E; ++e)
      if (counts[e]) run_expert(e, 0);
    return;
  }
  std::vector<int64_t> order;
  for (int64_t e = 0; e < E; ++e)
    if (counts[e]) order.push_back(e);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return run_rows[a] > run_rows[b]; });
  run_whole_tasks(order, threads, run_expert);
}

// out[i] = a[i] @ b[i] for every i (2-D tensors; views such as transposes and row slices
// are fine), the products spread over `threads` threads, each product on one thread, largest
// first. For the per-expert matmuls of MoE training: each is small next to the dense MLP's,
// and split across threads they spend much of their time synchronising (bf16 on 2 threads: the
// MoE step ran 1.33x the dense MLP's time with every product split, measured on the issue's
// dispatch shapes). Inside the parallel region ATen and oneDNN run each product single-threaded.
void mm_many(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> out, int64_t threads) {
  TORCH_CHECK(a.size() == b.size() && a.size() == out.size(), "mm_many: ", a.size(), " left, ", b.size(),
              " right and ", out.size(), " output matrices");
  TORCH_CHECK(threads >= 1, "mm_many: threads must be >= 1");
  std::vector<int64_t> order;
  std::vector<double> work(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].dim() == 2 && b[i].dim() == 2 && out[i].dim() == 2 && a[i].size(1) == b[i].size(0) &&
                    out[i].size(0) == a[i].size(0) && out[i].size(1) == b[i].size(1),
                "mm_many: product ", i, " has shapes ", a[i].sizes(), " @ ", b[i].sizes(), " -> ", out[i].sizes());
    work[i] = double(a[i].size(0)) * a[i].size(1) * b[i].size(1);
    if (work[i] > 0 || out[i].numel() > 0) order.push_back((int64_t)i);
  }
  if (threads == 1 || order.size() < 2) {
    for (int64_t i : order) at::mm_out(out[i], a[i], b[i]);
    return;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return work[x] > work[y]; });
  run_whole_tasks(order, threads, [&](int64_t i, int64_t) { at::mm_out(out[i], a[i], b[i]); });
}

// Top-k routing of T tokens over E experts (few: the loop is O(E K) per token), grouped by
// expert in one pass. scores [T, E] fp32. Returns
//   choice [T, K]: the K highest scores of each row, highest first; NaN counts as the
//                  highest (as in torch.topk); equal scores: the lower expert index first,
//   rows [T, K]:   the row of (t, choice[t, k]) when the T*K assignments are grouped by
//                  expert, tokens in order within a group (a permutation of 0..T*K-1),
//   tokens [T*K]:  the token of each grouped row,
//   counts [E]:    rows per expert.
std::vector<at::Tensor> route_top_k(at::Tensor scores, int64_t K) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(),
              "route_top_k: scores must be a [tokens, experts] fp32 CPU tensor");
  scores = scores.contiguous();
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK(K >= 1 && K <= E, "route_top_k: k must be in [1, ", E, "], got ", K);
  auto long_opts = scores.options().dtype(at::kLong);
  at::Tensor choice = at::empty({T, K}, long_opts), rows = at::empty({T, K}, long_opts);
  at::Tensor tokens = at::empty({T * K}, long_opts), counts = at::zeros({E}, long_opts);
  const float* sp = scores.data_ptr<float>();
  int64_t* cp = choice.data_ptr<int64_t>();
  int64_t* np = counts.data_ptr<int64_t>();
  // Each (score, expert) as one integer whose order is the choice order: the score's bits
  // mapped to an unsigned key that sorts like the float (NaN highest, -0 == +0) in the high
  // half, the complement of the expert index in the low half (lower index wins ties). Then
  // K branch-free max scans per token: random scores make an insertion sort's branches
  // mispredict (measured 6x slower).
  auto key = [](float v, int64_t e) -> uint64_t {
    v = v + 0.0f;  // -0 -> +0
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits ^= uint32_t(int32_t(bits) >> 31) | 0x80000000u;  // negatives: all bits flipped
    bits = std::isnan(v) ? 0xffffffffu : bits;
    return (uint64_t(bits) << 32) | (0xffffffffu - uint32_t(e));
  };
  std::vector<uint64_t> keys(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = sp + t * E;
    for (int64_t e = 0; e < E; ++e) keys[e] = key(row[e], e);
    int64_t* out = cp + t * K;
    for (int64_t k = 0; k < K; ++k) {
      uint64_t m = 0;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, keys[e]);
      const int64_t chosen = 0xffffffffu - uint32_t(m & 0xffffffffu);
      keys[chosen] = 0;  // below every key
      out[k] = chosen;
      ++np[chosen];
    }
  }
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + np[e - 1];
  int64_t* rp = rows.data_ptr<int64_t>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = next[cp[t * K + k]]++;
      rp[t * K + k] = r;
      tp[r] = t;
    }
  }
  return {choice, rows, tokens, counts};
}

}  // namespace sparselm
