// Shared pieces of the sparse CPU kernels (CSR, bitmask + packed values, N:M compressed,
// activation-sparse GEMV): SIMD loads that widen bf16 to fp32, prefetching, the thread-count
// policy, and the dtype handling every entry point applies.
//
// Every kernel computes on an fp32 copy of x [B, K] (bf16 inputs are widened once), adds the
// bias in fp32 and rounds once to x's dtype, like PyTorch's dense CPU linear. Weight values
// stay in their own dtype and are widened to fp32 on load, so bf16 weights read half the bytes.
//
// Decode (B = 1) is memory bound: every kernel streams the packed weights once, shares each
// load of x between two output rows where the format allows it, and prefetches the value
// stream well ahead because its position depends on popcounts the hardware prefetcher cannot
// predict. Threads split the output rows into contiguous ranges (OpenMP, same runtime and
// thread count as PyTorch).
#pragma once

// ATen only: the C++ frontend and pybind11 (torch/extension.h) are needed by bindings.cpp
// alone, and keeping them out of the kernel files cuts the first-use build time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARSELM_AVX512 1
#else
#define SPARSELM_AVX512 0
#endif
// AVX2 + FMA without AVX-512 (AMD Zen 2/3, most Intel client CPUs): 8-lane versions of the
// hand-written kernels. AVX-512 builds take their own paths and never these.
#if !SPARSELM_AVX512 && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARSELM_AVX2 1
#else
#define SPARSELM_AVX2 0
#endif

namespace sparselm {

constexpr int64_t kPrefetchBytes = 16384;  // 16 KB ahead: measured sweet spot of 16-32 KB

template <typename P>
inline void prefetch_ahead(const P* p, int64_t bytes = 0) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + bytes, 0, 3);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Waking a sleeping thread costs several microseconds (far more when other processes share the
// cores), so with OMP_WAIT_POLICY=passive layers with less work than 2^18 multiply-adds run on
// one thread. Threads that spin between regions (OMP_WAIT_POLICY=active, or unset: GNU OpenMP
// spins a while before sleeping) join in about a microsecond, and there the limit is 2^14.
// The policy is read once, like OpenMP itself does.
constexpr int64_t kMinParallelWork = 1 << 18;
constexpr int64_t kMinParallelWorkSpinning = 1 << 14;

inline int64_t min_parallel_work() {
  static const int64_t v = [] {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    const bool passive = policy != nullptr && (policy[0] == 'p' || policy[0] == 'P');
    return passive ? kMinParallelWork : kMinParallelWorkSpinning;
  }();
  return v;
}

inline int num_threads_for(int64_t work) {
  if (work < min_parallel_work()) return 1;
  return at::get_num_threads();
}

#if SPARSELM_AVX512
// Load `count` (<= 16) consecutive values and widen them to fp32 in the low lanes.
inline __m512 load_values(const float* p, int count) {
  return _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), p);
}
inline __m512 load_values(const at::BFloat16* p, int count) {
  __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// 8 values widened to fp32 (for gathers, which are 8 wide).
inline __m256 load8(const float* p, __mmask8 k) { return _mm256_maskz_loadu_ps(k, p); }
inline __m256 load8(const at::BFloat16* p, __mmask8 k) {
  __m128i raw = _mm_maskz_loadu_epi16(k, p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
// Expand the popcount(mask) packed values at p into the lanes set in mask.
template <typename T>
inline __m512 expand_values(const T* p, uint16_t mask) {
  return _mm512_maskz_expand_ps((__mmask16)mask, load_values(p, __builtin_popcount(mask)));
}
template <>
inline __m512 expand_values<float>(const float* p, uint16_t mask) {
  return _mm512_maskz_expandloadu_ps((__mmask16)mask, p);
}
// The same with the mask read from memory: a mask register loaded from memory costs a load,
// while one moved from a general register (and each shift of it) costs an operation on the
// port the expands need (fp32 batch 1 on cached 256-wide layers: ~10% faster in a one-off A/B
// in one process; benchmarks/bench_kernels.py and bench_generation.py track the kernel
// against dense).
template <typename T>
inline __m512 expand_values(const T* p, const uint16_t* mask) {
  return expand_values(p, *mask);
}
template <>
inline __m512 expand_values<float>(const float* p, const uint16_t* mask) {
#if defined(__GNUC__) && !defined(__clang__)
  __mmask16 k;
  // kmovw from memory, spelled out: given _load_mask16, GCC still moves half of the masks
  // through general registers.
  asm("kmovw %1, %0" : "=Yk"(k) : "m"(*mask));
#else
  const __mmask16 k = _load_mask16(const_cast<__mmask16*>(reinterpret_cast<const __mmask16*>(mask)));
#endif
  return _mm512_maskz_expandloadu_ps(k, p);
}
// exp on 16 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7 on that interval), times 2^n by scalef (which saturates to inf / 0).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// sigmoid on 16 lanes: 1 / (1 + e^-x), with exp16.
inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}
inline __m512 load_x16(const float* p, int64_t col, int64_t K) {
  int64_t left = K - col;
  if (left >= 16) return _mm512_loadu_ps(p + col);
  return _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), p + col);
}

// x [K] regrouped for bf16 weights read 32 at a time: for each block h of 32 columns, xs[32h ..
// 32h + 16) holds its 16 even columns and xs[32h + 16 .. 32h + 32) its 16 odd ones (zero past K).
// A bf16 value is the top half of its fp32, so 32 bf16 weights loaded as 16 32-bit lanes turn
// into the even columns' fp32 by a left shift and the odd columns' by masking the low half:
// two ordinary ALU operations instead of widening shuffles.
inline void split_even_odd(const float* x, int64_t K, int64_t blocks, float* xs) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t h = 0; h < blocks; ++h) {
    const int64_t c = 32 * h;
    const __m512 lo = c < K ? load_x16(x, c, K) : _mm512_setzero_ps();
    const __m512 hi = c + 16 < K ? load_x16(x, c + 16, K) : _mm512_setzero_ps();
    _mm512_storeu_ps(xs + c, _mm512_permutex2var_ps(lo, even, hi));
    _mm512_storeu_ps(xs + c + 16, _mm512_permutex2var_ps(lo, odd, hi));
  }
}
inline __m512 bf16_even(__m512i words) { return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)); }
inline __m512 bf16_odd(__m512i words) {
  return _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

#if SPARSELM_AVX2
// ---------------------------------------------------------------------------------------
// AVX2: 8 fp32 lanes, no mask registers. Partial vectors use vmaskmov (masked-off lanes are
// neither read nor written, so a tail never touches memory past its last element) with a lane
// mask taken from a sliding window over a constant table.
// ---------------------------------------------------------------------------------------
alignas(32) inline constexpr int32_t kLanePrefix[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
// Lanes [0, count) all ones, the rest zero (0 <= count <= 8).
inline __m256i prefix_mask8(int64_t count) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanePrefix + 8 - count));
}
// `count` (<= 8) consecutive values widened to fp32 in the low lanes, zero above.
inline __m256 load8(const float* p, int64_t count) {
  return count >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, prefix_mask8(count));
}
inline __m256 widen_bf16(__m128i raw) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const at::BFloat16* p, int64_t count) {
  if (count >= 8) return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, count * sizeof(uint16_t));
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
// Stores the low `count` (<= 8) lanes; bf16 rounds to nearest even, NaN stays a (quiet) NaN.
inline void store8(float* p, __m256 v, int64_t count) {
  if (count >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, prefix_mask8(count), v);
}
inline __m128i round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  // 8 x 32-bit (each < 2^16) -> 8 x 16-bit, in order.
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
inline void store8(at::BFloat16* p, __m256 v, int64_t count) {
  const __m128i packed = round_to_bf16(v);
  if (count >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), packed);
    std::memcpy(p, tmp, count * sizeof(uint16_t));
  }
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// exp on 8 lanes, as exp16 (AVX-512): x = n ln2 + r, e^r by its degree-6 Taylor polynomial, times
// 2^n built in the exponent bits, in two factors so that n = 128 (e^88.7 is still finite)
// and n = -126 stay representable. Below -87 it returns ~1e-38 rather than 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif

// Inputs may be fp32 or bf16 (any strides); they are widened to one contiguous fp32 copy.
inline at::Tensor as_fp32_matrix(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() == 2, what, ": x must be 2-D [batch, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == K, what, ": x has ", x.size(1), " features, the layer expects ", K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              what, ": x must be fp32 or bf16");
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

// x [..., K] (any number of leading dims, as F.linear takes) as an fp32 [rows, K] matrix: the
// reshape happens here, so a Python caller pays no ATen call of its own for it.
inline at::Tensor as_fp32_rows(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, what, ": x must be [..., ", K, "], got ", x.sizes());
  return as_fp32_matrix(x.dim() == 2 ? x : x.reshape({-1, K}), K, what);
}

// y [rows, N] given x's leading dims back: [..., N].
inline at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// Adds the bias in fp32 and rounds once to the input's dtype, as dense F.linear does.
inline at::Tensor finish(at::Tensor y, const c10::optional<at::Tensor>& bias, at::ScalarType out) {
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return out == at::kFloat ? y : y.to(out);
}

#define SPARSELM_DISPATCH_VALUES(values, NAME, ...)                               \
  [&] {                                                                          \
    if ((values).scalar_type() == at::kFloat) {                             \
      using scalar_t = float;                                                    \
      return __VA_ARGS__();                                                      \
    }                                                                            \
    TORCH_CHECK((values).scalar_type() == at::kBFloat16, NAME,                \
                ": values must be fp32 or bf16");                                \
    using scalar_t = at::BFloat16;                                               \
    return __VA_ARGS__();                                                        \
  }()

}  // namespace sparselm
