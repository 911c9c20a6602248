// Dense-weight vector kernels for decode (batch 1): the activation-sparse GEMV, which reads
// only the weight rows of non-zero inputs, and a plain dense GEMV with the same threads that
// serves as the benchmarks' same-thread-count baseline.
#include "kernel_common.h"

namespace sparselm {
namespace {

// ---------------------------------------------------------------------------------------
// Activation-sparse decode: y = x @ w_t with w_t [K, N] contiguous, reading only the rows of
// w_t whose input is non-zero. Each thread owns a column range and keeps its slice of y in
// L1 while it streams the selected rows (contiguous segments the hardware prefetcher follows).
// ---------------------------------------------------------------------------------------
template <typename T>
at::Tensor act_sparse_gemv_t(const at::Tensor& x, const at::Tensor& w_t) {
  const int64_t K = w_t.size(0), N = w_t.size(1);
  const float* xp = x.data_ptr<float>();
  const T* wp = w_t.data_ptr<T>();
  std::vector<int64_t> nz;
  nz.reserve(K);
  for (int64_t i = 0; i < K; ++i)
    if (xp[i] != 0.f) nz.push_back(i);
  auto y = at::zeros({N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t nnz = (int64_t)nz.size();
  const int64_t* nzp = nz.data();
  constexpr int64_t kChunk = 2048;  // 8 KB of y per chunk stays in L1
  constexpr int64_t kAhead = 2;     // rows of prefetch distance
  const int nt = (N >= 64) ? num_threads_for(nnz * N) : 1;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), TT = omp_get_num_threads();
    const int64_t blocks = (N + 15) / 16;
    const int64_t c0 = std::min(N, 16 * (blocks * t / TT));
    const int64_t c1 = std::min(N, 16 * (blocks * (t + 1) / TT));
    for (int64_t cs = c0; cs < c1; cs += kChunk) {
      const int64_t ce = std::min(c1, cs + kChunk);
      float* yc = yp + cs;
      for (int64_t k = 0; k < nnz; ++k) {
        const int64_t i = nzp[k];
        const float a = xp[i];
        const T* wr = wp + i * N;
        // The selected rows start at unpredictable addresses: while this row's segment is
        // streamed, the same segment of the row kAhead selections later is prefetched line by
        // line, so the hardware prefetcher never has to ramp up at a row start.
        const T* ahead = k + kAhead < nnz ? wp + nzp[k + kAhead] * N : wr;
#if SPARSELM_AVX512
        const __m512 av = _mm512_set1_ps(a);
        int64_t c = cs;
        for (; c + 16 <= ce; c += 16) {
          prefetch_ahead(ahead + c);
          const __m512 w = load_values(wr + c, 16);
          _mm512_storeu_ps(yp + c, _mm512_fmadd_ps(av, w, _mm512_loadu_ps(yp + c)));
        }
        if (c < ce) {
          const __mmask16 km = (__mmask16)((1u << (ce - c)) - 1u);
          const __m512 w = load_values(wr + c, (int)(ce - c));
          _mm512_mask_storeu_ps(yp + c, km, _mm512_fmadd_ps(av, w, _mm512_maskz_loadu_ps(km, yp + c)));
        }
#elif SPARSELM_AVX2
        const __m256 av = _mm256_set1_ps(a);
        int64_t c = cs;
        // 16 columns per step, so one prefetch per step covers a 64-byte line of fp32 weights
        // (half a line of bf16, as in the AVX-512 loop).
        for (; c + 16 <= ce; c += 16) {
          prefetch_ahead(ahead + c);
          const __m256 w0 = load8(wr + c, 8), w1 = load8(wr + c + 8, 8);
          _mm256_storeu_ps(yp + c, _mm256_fmadd_ps(av, w0, _mm256_loadu_ps(yp + c)));
          _mm256_storeu_ps(yp + c + 8, _mm256_fmadd_ps(av, w1, _mm256_loadu_ps(yp + c + 8)));
        }
        for (; c < ce; c += 8) {
          const int64_t count = std::min<int64_t>(8, ce - c);
          store8(yp + c, _mm256_fmadd_ps(av, load8(wr + c, count), load8(yp + c, count)), count);
        }
#else
        (void)ahead;
        for (int64_t c = cs; c < ce; ++c) yp[c] += a * to_float(wr[c]);
#endif
      }
      (void)yc;
    }
  }
  return y;
}

#if SPARSELM_AVX2
// AVX2 dense GEMV, 4 rows per pass: each load of x serves 4 rows (with 8 lanes a row costs
// twice the loads it does with AVX-512, and loads, not FMAs, limit a GEMV whose weights are in
// cache), and two accumulators per row cover the FMA latency. 4 rows x 2 accumulators and
// 2 x vectors fit the 16 ymm registers.
template <typename T>
inline void dense_rows_avx2_4(const T* wr, int64_t K, const float* xp, float* yp) {
  const T* w0 = wr;
  const T* w1 = wr + K;
  const T* w2 = wr + 2 * K;
  const T* w3 = wr + 3 * K;
  __m256 a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= K; c += 16) {
    const __m256 xa = _mm256_loadu_ps(xp + c), xb = _mm256_loadu_ps(xp + c + 8);
    a0 = _mm256_fmadd_ps(load8(w0 + c, 8), xa, a0);
    b0 = _mm256_fmadd_ps(load8(w0 + c + 8, 8), xb, b0);
    a1 = _mm256_fmadd_ps(load8(w1 + c, 8), xa, a1);
    b1 = _mm256_fmadd_ps(load8(w1 + c + 8, 8), xb, b1);
    a2 = _mm256_fmadd_ps(load8(w2 + c, 8), xa, a2);
    b2 = _mm256_fmadd_ps(load8(w2 + c + 8, 8), xb, b2);
    a3 = _mm256_fmadd_ps(load8(w3 + c, 8), xa, a3);
    b3 = _mm256_fmadd_ps(load8(w3 + c + 8, 8), xb, b3);
  }
  for (; c < K; c += 8) {  // the last 1-15 columns, masked (nothing read past a row)
    const int64_t count = std::min<int64_t>(8, K - c);
    const __m256 xa = load8(xp + c, count);
    a0 = _mm256_fmadd_ps(load8(w0 + c, count), xa, a0);
    a1 = _mm256_fmadd_ps(load8(w1 + c, count), xa, a1);
    a2 = _mm256_fmadd_ps(load8(w2 + c, count), xa, a2);
    a3 = _mm256_fmadd_ps(load8(w3 + c, count), xa, a3);
  }
  yp[0] = hsum8(_mm256_add_ps(a0, b0));
  yp[1] = hsum8(_mm256_add_ps(a1, b1));
  yp[2] = hsum8(_mm256_add_ps(a2, b2));
  yp[3] = hsum8(_mm256_add_ps(a3, b3));
}

template <typename T>
inline float dense_row_avx2(const T* wr, int64_t K, const float* xp) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= K; c += 16) {
    a = _mm256_fmadd_ps(load8(wr + c, 8), _mm256_loadu_ps(xp + c), a);
    b = _mm256_fmadd_ps(load8(wr + c + 8, 8), _mm256_loadu_ps(xp + c + 8), b);
  }
  for (; c < K; c += 8) {
    const int64_t count = std::min<int64_t>(8, K - c);
    a = _mm256_fmadd_ps(load8(wr + c, count), load8(xp + c, count), a);
  }
  return hsum8(_mm256_add_ps(a, b));
}
#endif

// Dense GEMV with the same threads and style as the sparse kernels: the same-thread-count
// baseline of the benchmarks (PyTorch's own fp32 GEMV may run on one thread only).
template <typename T>
at::Tensor dense_gemv_t(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = at::empty({1, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  float* yp = y.data_ptr<float>();
  const int nt = num_threads_for(N * K);
#if SPARSELM_AVX2
  constexpr int64_t kRows = 4;  // dense_rows_avx2_4
  const int64_t groups = N / kRows;
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < groups; ++g) dense_rows_avx2_4(wp + g * kRows * K, K, xp, yp + g * kRows);
#pragma omp for schedule(static)
    for (int64_t r = groups * kRows; r < N; ++r) yp[r] = dense_row_avx2(wp + r * K, K, xp);
  }
#else
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const T* wr = wp + r * K;
#if SPARSELM_AVX512
    __m512 acc = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) acc = _mm512_fmadd_ps(load_values(wr + c, 16), _mm512_loadu_ps(xp + c), acc);
    if (c < K) acc = _mm512_fmadd_ps(load_values(wr + c, (int)(K - c)), load_x16(xp, c, K), acc);
    yp[r] = _mm512_reduce_add_ps(acc);
#else
    float acc = 0.f;
    for (int64_t c = 0; c < K; ++c) acc += to_float(wr[c]) * xp[c];
    yp[r] = acc;
#endif
  }
#endif
  return y;
}

}  // namespace

at::Tensor act_sparse_gemv(at::Tensor x, at::Tensor w_t) {
  TORCH_CHECK(x.dim() == 1, "act_sparse_gemv: x must be [in_features]");
  TORCH_CHECK(w_t.dim() == 2 && w_t.is_contiguous() && w_t.size(0) == x.size(0),
              "act_sparse_gemv: w_t must be contiguous [in_features, out_features]");
  auto xf = as_fp32_matrix(x.unsqueeze(0), x.size(0), "act_sparse_gemv").squeeze(0);
  auto y = SPARSELM_DISPATCH_VALUES(w_t, "act_sparse_gemv", [&] {
    return act_sparse_gemv_t<scalar_t>(xf, w_t);
  });
  return finish(y, c10::nullopt, x.scalar_type());
}

at::Tensor dense_gemv(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "dense_gemv: w must be contiguous [out, in]");
  auto xf = as_fp32_matrix(x, w.size(1), "dense_gemv");
  TORCH_CHECK(xf.size(0) == 1, "dense_gemv: batch 1 only");
  auto y = SPARSELM_DISPATCH_VALUES(w, "dense_gemv", [&] { return dense_gemv_t<scalar_t>(xf, w); });
  return finish(y, c10::nullopt, x.scalar_type());
}

}  // namespace sparselm
