// Index-driven formats: CSR (int16 or int32 columns) and N:M compressed (values + in-group indices).
// Legend: B = batch rows, K = in_features, N = out_features, S = stored slots per N:M row.
#include "kernel_common.h"

namespace sparselm {
namespace {

// ---------------------------------------------------------------------------------------
// Index-driven formats (CSR, N:M): row r owns slots [start(r), end(r)); slot s holds a value
// and a column. For B = 1 the columns are gathered from x 8 at a time (8-wide gathers beat
// 16-wide here); for B > 1 x is transposed to [K, B] so a slot reads B contiguous inputs.
// ---------------------------------------------------------------------------------------
template <typename T, typename ColFn>
inline float gather_dot(const float* x, const T* vals, ColFn cols8, int64_t count) {
#if SPARSELM_AVX512
  // cols8(j, k) returns the columns of slots j..j+7; lanes outside mask k are never read.
  __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    prefetch_ahead(vals + j, kPrefetchBytes);
    const __m256 xa = _mm256_i32gather_ps(x, cols8(j, (__mmask8)0xFF), 4);
    const __m256 xb = _mm256_i32gather_ps(x, cols8(j + 8, (__mmask8)0xFF), 4);
    acc_a = _mm256_fmadd_ps(load8(vals + j, 0xFF), xa, acc_a);
    acc_b = _mm256_fmadd_ps(load8(vals + j + 8, 0xFF), xb, acc_b);
  }
  for (; j < count; j += 8) {
    const int64_t left = count - j;
    const __mmask8 k = left >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << left) - 1u);
    const __m256 xa = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), k, cols8(j, k), x, 4);
    acc_a = _mm256_fmadd_ps(load8(vals + j, k), xa, acc_a);
  }
  const __m256 s = _mm256_add_ps(acc_a, acc_b);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#elif SPARSELM_AVX2
  // cols8(j, n) returns the columns of slots j..j+n-1 (n <= 8) in the low lanes; the gather
  // reads only the lanes below n.
  __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    prefetch_ahead(vals + j, kPrefetchBytes);
    const __m256 xa = _mm256_i32gather_ps(x, cols8(j, 8), 4);
    const __m256 xb = _mm256_i32gather_ps(x, cols8(j + 8, 8), 4);
    acc_a = _mm256_fmadd_ps(load8(vals + j, 8), xa, acc_a);
    acc_b = _mm256_fmadd_ps(load8(vals + j + 8, 8), xb, acc_b);
  }
  for (; j < count; j += 8) {
    const int64_t left = std::min<int64_t>(8, count - j);
    const __m256 lanes = _mm256_castsi256_ps(prefix_mask8(left));
    const __m256 xa = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, cols8(j, left), lanes, 4);
    acc_a = _mm256_fmadd_ps(load8(vals + j, left), xa, acc_a);
  }
  return hsum8(_mm256_add_ps(acc_a, acc_b));
#else
  (void)x; (void)vals; (void)cols8; (void)count;
  return 0.f;
#endif
}

// One output row for every batch column: yrow[b] = sum_s val(s) * xt[col(s), b], with x
// transposed to [K, B] so each slot reads B contiguous inputs. Batch tiles of up to 64 (four
// zmm accumulators) keep the number of passes over the row's slots at ceil(B / 64).
template <typename T, typename ColAt>
inline void slots_times_xt(const float* xtp, int64_t B, const T* vals, ColAt col_at, int64_t count,
                           float* yrow) {
  for (int64_t b0 = 0; b0 < B; b0 += 64) {
    const int64_t bn = std::min<int64_t>(64, B - b0);
#if SPARSELM_AVX512
    __mmask16 k[4];
    for (int v = 0; v < 4; ++v) {
      const int64_t left = bn - 16 * v;
      k[v] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
    }
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (bn > 32) {
      for (int64_t s = 0; s < count; ++s) {
        const __m512 v = _mm512_set1_ps(to_float(vals[s]));
        const float* xr = xtp + (int64_t)col_at(s) * B + b0;
        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[0], xr), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[1], xr + 16), a1);
        a2 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[2], xr + 32), a2);
        a3 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[3], xr + 48), a3);
      }
    } else if (bn > 16) {
      for (int64_t s = 0; s < count; ++s) {
        const __m512 v = _mm512_set1_ps(to_float(vals[s]));
        const float* xr = xtp + (int64_t)col_at(s) * B + b0;
        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[0], xr), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(k[1], xr + 16), a1);
      }
    } else {
      for (int64_t s = 0; s < count; ++s)
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(to_float(vals[s])),
                             _mm512_maskz_loadu_ps(k[0], xtp + (int64_t)col_at(s) * B + b0), a0);
    }
    _mm512_mask_storeu_ps(yrow + b0, k[0], a0);
    _mm512_mask_storeu_ps(yrow + b0 + 16, k[1], a1);
    _mm512_mask_storeu_ps(yrow + b0 + 32, k[2], a2);
    _mm512_mask_storeu_ps(yrow + b0 + 48, k[3], a3);
#else
    float acc[64] = {0};
    for (int64_t s = 0; s < count; ++s) {
      const float v = to_float(vals[s]);
      const float* xr = xtp + (int64_t)col_at(s) * B + b0;
      for (int64_t b = 0; b < bn; ++b) acc[b] += v * xr[b];
    }
    for (int64_t b = 0; b < bn; ++b) yrow[b0 + b] = acc[b];
#endif
  }
}

// Eight CSR column indices widened to int32 lanes (lanes outside k are zero and never read).
#if SPARSELM_AVX512
inline __m256i load_cols8(const int32_t* c, __mmask8 k) { return _mm256_maskz_loadu_epi32(k, c); }
inline __m256i load_cols8(const int16_t* c, __mmask8 k) {
  return _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(k, c));  // columns < 32768: zero-extend
}
#elif SPARSELM_AVX2
// The first n (<= 8) columns, read without touching memory past them.
inline __m256i load_cols8(const int32_t* c, int64_t n) {
  return n >= 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)) : _mm256_maskload_epi32(c, prefix_mask8(n));
}
inline __m256i load_cols8(const int16_t* c, int64_t n) {
  if (n >= 8) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  alignas(16) int16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, c, n * sizeof(int16_t));
  return _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
#endif

// CSR: crow int64 [N + 1], col int16 (in_features <= 32768) or int32 [nnz], values [nnz].
// int16 columns cut the bytes per stored weight from 8 to 6 (fp32) or 6 to 4 (bf16).
// y[r] for rows [r0, r1) of one input row x (batch 1).
template <typename T, typename I>
void csr_rows_b1(const float* xp, const int64_t* rp, const I* cp, const T* vp, float* yp, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s0 = rp[r], count = rp[r + 1] - s0;
#if SPARSELM_AVX512
    const I* c = cp + s0;
    auto cols8 = [c](int64_t j, __mmask8 k) {
      prefetch_ahead(c + j, kPrefetchBytes);
      return load_cols8(c + j, k);
    };
    yp[r] = gather_dot(xp, vp + s0, cols8, count);
#elif SPARSELM_AVX2
    const I* c = cp + s0;
    auto cols8 = [c](int64_t j, int64_t n) {
      prefetch_ahead(c + j, kPrefetchBytes);
      return load_cols8(c + j, n);
    };
    yp[r] = gather_dot(xp, vp + s0, cols8, count);
#else
    float acc = 0.f;
    for (int64_t j = 0; j < count; ++j) acc += to_float(vp[s0 + j]) * xp[cp[s0 + j]];
    yp[r] = acc;
#endif
  }
}

template <typename T, typename I>
at::Tensor csr_matmul_t(const at::Tensor& x, const at::Tensor& crow,
                           const at::Tensor& col, const at::Tensor& values, int64_t N) {
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t* rp = crow.data_ptr<int64_t>();
  const I* cp = col.data_ptr<I>();
  const T* vp = values.data_ptr<T>();
  const int nt = num_threads_for(values.numel() * B);
  if (B == 1) {
    auto y = at::empty({1, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
#pragma omp parallel num_threads(nt)
    {
      const int id = omp_get_thread_num(), team = omp_get_num_threads();
      csr_rows_b1(xp, rp, cp, vp, yp, N * id / team, N * (id + 1) / team);
    }
    return y;
  }
  auto xt = x.t().contiguous();  // [K, B]
  auto yt = at::empty({N, B}, x.options());  // [N, B], transposed back by the caller
  const float* xtp = xt.data_ptr<float>();
  float* ytp = yt.data_ptr<float>();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const I* c = cp + rp[r];
    slots_times_xt(xtp, B, vp + rp[r], [c](int64_t j) { return c[j]; }, rp[r + 1] - rp[r], ytp + r * B);
  }
  return yt.t().contiguous();
}

// N:M compressed: values [N, S], in-group indices uint8 [N, S]; slot s of a row belongs to
// group s / n, so its column is (s / n) * m + index.
template <typename T>
at::Tensor nm_matmul_t(const at::Tensor& x, const at::Tensor& idx,
                          const at::Tensor& values, int64_t n, int64_t m) {
  const int64_t B = x.size(0), K = x.size(1), N = values.size(0), S = values.size(1);
  const uint8_t* ip = idx.data_ptr<uint8_t>();
  const T* vp = values.data_ptr<T>();
  std::vector<int32_t> slot_base(S + 16, 0);  // group start column of each slot (L1 resident)
  for (int64_t s = 0; s < S; ++s) slot_base[s] = (int32_t)((s / n) * m);
  const int32_t* sb = slot_base.data();
  const int nt = num_threads_for(values.numel() * B);
  (void)K;
  if (B == 1) {
    auto y = at::empty({1, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const uint8_t* ir = ip + r * S;
#if SPARSELM_AVX512
      auto cols8 = [ir, sb](int64_t j, __mmask8 k) {
        const __m256i base = _mm256_maskz_loadu_epi32(k, sb + j);
        const __m128i i8 = _mm_maskz_loadu_epi8((__mmask16)k, ir + j);
        return _mm256_add_epi32(base, _mm256_cvtepu8_epi32(i8));
      };
      yp[r] = gather_dot(xp, vp + r * S, cols8, S);
#elif SPARSELM_AVX2
      auto cols8 = [ir, sb](int64_t j, int64_t n) {
        const __m256i base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + j));  // sb holds S + 16
        alignas(16) uint8_t tmp[16] = {0};
        std::memcpy(tmp, ir + j, std::min<int64_t>(8, n));
        return _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp))));
      };
      yp[r] = gather_dot(xp, vp + r * S, cols8, S);
#else
      float acc = 0.f;
      for (int64_t s = 0; s < S; ++s) acc += to_float(vp[r * S + s]) * xp[sb[s] + ir[s]];
      yp[r] = acc;
#endif
    }
    return y;
  }
  auto xt = x.t().contiguous();  // [K, B]
  auto yt = at::empty({N, B}, x.options());
  const float* xtp = xt.data_ptr<float>();
  float* ytp = yt.data_ptr<float>();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const uint8_t* ir = ip + r * S;
    slots_times_xt(xtp, B, vp + r * S, [ir, sb](int64_t j) { return sb[j] + ir[j]; }, S, ytp + r * B);
  }
  return yt.t().contiguous();
}

template <typename T, typename I>
void csr_to_dense_t(const int64_t* rp, const I* cp, const T* vp, T* dp, int64_t N, int64_t K) {
  const int nt = num_threads_for(N * K);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r)
    for (int64_t s = rp[r]; s < rp[r + 1]; ++s) dp[r * K + cp[s]] = vp[s];
}

template <typename T>
void nm_to_dense_t(const uint8_t* ip, const T* vp, T* dp, int64_t N, int64_t S, int64_t n, int64_t m, int64_t K) {
  const int nt = num_threads_for(N * K);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r)
    for (int64_t s = 0; s < S; ++s)  // padding slots hold 0 and must not overwrite a value
      if (to_float(vp[r * S + s]) != 0.f) dp[r * K + (s / n) * m + ip[r * S + s]] = vp[r * S + s];
}

}  // namespace

// Decode to the dense [N, K] weight (for prefill-sized batches): a scatter per row.
at::Tensor csr_to_dense(at::Tensor crow, at::Tensor col, at::Tensor values, int64_t in_features,
                        int64_t out_features) {
  TORCH_CHECK(crow.scalar_type() == at::kLong && crow.numel() == out_features + 1 &&
                  (col.scalar_type() == at::kInt || (col.scalar_type() == at::kShort && in_features <= 32768)) &&
                  col.is_contiguous() && values.is_contiguous() && values.numel() == col.numel(),
              "csr_to_dense: malformed packed tensors");
  auto dense = at::zeros({out_features, in_features}, values.options());
  const int64_t* rp = crow.data_ptr<int64_t>();
  SPARSELM_DISPATCH_VALUES(values, "csr_to_dense", [&] {
    if (col.scalar_type() == at::kShort)
      csr_to_dense_t(rp, col.data_ptr<int16_t>(), values.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(),
                     out_features, in_features);
    else
      csr_to_dense_t(rp, col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(),
                     out_features, in_features);
    return 0;
  });
  return dense;
}

// Rows [r0, r1) of y = W x for one fp32 input row x [K] (batch 1), inside a caller's parallel
// region (the decode step's one-region path), tensors as csr_linear checks them.
void csr_rows_batch1(const float* x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                     float* y, int64_t r0, int64_t r1) {
  SPARSELM_DISPATCH_VALUES(values, "csr", [&] {
    if (col.scalar_type() == at::kShort)
      csr_rows_b1(x, crow.data_ptr<int64_t>(), col.data_ptr<int16_t>(), values.data_ptr<scalar_t>(), y, r0, r1);
    else
      csr_rows_b1(x, crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), y, r0, r1);
    return 0;
  });
}

at::Tensor csr_linear(at::Tensor x, at::Tensor crow, at::Tensor col, at::Tensor values,
                         c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features) {
  auto xf = as_fp32_rows(x, in_features, "csr");  // [rows, K]
  TORCH_CHECK(crow.scalar_type() == at::kLong && crow.numel() == out_features + 1 &&
                  crow.is_contiguous(), "csr: crow_indices must be int64 [out_features + 1]");
  TORCH_CHECK((col.scalar_type() == at::kInt || (col.scalar_type() == at::kShort && in_features <= 32768)) &&
                  col.is_contiguous(),
              "csr: col_indices must be contiguous int32, or int16 when in_features <= 32768");
  TORCH_CHECK(values.is_contiguous() && values.numel() == col.numel(), "csr: values/col size mismatch");
  auto y = SPARSELM_DISPATCH_VALUES(values, "csr", [&] {
    if (col.scalar_type() == at::kShort) return csr_matmul_t<scalar_t, int16_t>(xf, crow, col, values, out_features);
    return csr_matmul_t<scalar_t, int32_t>(xf, crow, col, values, out_features);
  });
  return with_leading_dims(finish(y, bias, x.scalar_type()), x);
}

// Decode to the dense [N, K] weight; padding slots (value 0) add nothing.
at::Tensor nm_to_dense(at::Tensor idx, at::Tensor values, int64_t n, int64_t m, int64_t in_features) {
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.sizes() == values.sizes() && idx.is_contiguous() &&
                  values.is_contiguous() && values.dim() == 2 && n > 0 && m >= n,
              "nm_to_dense: malformed packed tensors");
  const int64_t N = values.size(0), S = values.size(1);
  auto dense = at::zeros({N, in_features}, values.options());
  const uint8_t* ip = idx.data_ptr<uint8_t>();
  SPARSELM_DISPATCH_VALUES(values, "nm_to_dense", [&] {
    nm_to_dense_t(ip, values.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(), N, S, n, m, in_features);
    return 0;
  });
  return dense;
}

at::Tensor nm_linear(at::Tensor x, at::Tensor idx, at::Tensor values,
                        c10::optional<at::Tensor> bias, int64_t n, int64_t m, int64_t in_features) {
  auto xf = as_fp32_rows(x, in_features, "nm");  // [rows, K]
  TORCH_CHECK(idx.scalar_type() == at::kByte && idx.sizes() == values.sizes() &&
                  idx.is_contiguous() && values.is_contiguous() && values.dim() == 2,
              "nm: indices must be contiguous uint8 with the shape of values [out_features, slots]");
  TORCH_CHECK(n > 0 && m >= n && values.size(1) == ((in_features + m - 1) / m) * n,
              "nm: values must have ceil(in_features / m) * n slots per row");
  auto y = SPARSELM_DISPATCH_VALUES(values, "nm", [&] {
    return nm_matmul_t<scalar_t>(xf, idx, values, n, m);
  });
  return with_leading_dims(finish(y, bias, x.scalar_type()), x);
}

}  // namespace sparselm
