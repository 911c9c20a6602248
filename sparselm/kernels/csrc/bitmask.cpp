// Bitmask + packed values: x [B, K] @ W.T for W stored as one bit per weight and its
// non-zero values in row order. Legend: B = batch rows, K = in_features, N = out_features,
// G = 16-column groups per row.
#include "kernel_common.h"

#include <type_traits>

namespace sparselm {
namespace {

// ---------------------------------------------------------------------------------------
// Bitmask: mask bytes [N, row_bytes] (bit t of byte j = column 8j + t; row_bytes a multiple
// of 8 so a 64-column word is one aligned little-endian uint64), values packed row by row,
// row r's values starting at offsets[r].
//
// The value pointer advances by popcounts, a loop-carried chain; reading the mask 64 columns
// at a time computes the four 16-column offsets inside a word independently and advances the
// pointer once per word, so the chain is 4x shorter. No branch skips empty groups: at 90%
// sparsity 18% of groups are empty at random, and the mispredictions cost more than the FMAs.
// ---------------------------------------------------------------------------------------
// Prefetching for the vector loops (AVX-512 and AVX2 alike; prefetches never fault). Sparse rows
// (under ~1.5 cache lines of values per 64-column word): one line per word, kPrefetchBytes ahead
// in the value stream, and the mask 2 KB ahead every 8 words. Denser rows (e.g. 50% fp32: two
// lines per word) would leave every other line to the hardware, and a fixed distance lets the
// second row of a pair start cold; there each row prefetches two lines per word at the same
// position `ahead` rows further on (>= kPrefetchBytes), and both rows' masks likewise: 5-12%
// faster on 4096-11008-wide layers at 50% in a one-off A/B in one process on AVX-512, unchanged
// at 70%; on AVX2 4096x11008 at 50% went 0.95x -> 1.50x of dense (benchmarks/bench_kernels.py
// tracks these layers against dense; RESULTS.md has the runs).
template <typename T>
struct RowPairPrefetch {
  const uint8_t* mask;
  const int64_t* offsets;
  int64_t N, row_bytes, ahead = 2;
  bool dense_rows = false;
  int64_t d0 = 0, d1 = 0, dm = 0;  // value distance of each row (in values), mask distance (bytes)
  const uint8_t *m0 = nullptr, *m1 = nullptr;

  RowPairPrefetch(const uint8_t* mask_, const int64_t* offsets_, int64_t N_, int64_t K, int64_t row_bytes_)
      : mask(mask_), offsets(offsets_), N(N_), row_bytes(row_bytes_) {
    const int64_t row_value_bytes =
        N > 0 ? std::max<int64_t>(1, (offsets[N] - offsets[0]) * (int64_t)sizeof(T) / N) : 1;
    dense_rows = row_value_bytes * 64 > 96 * K;
    ahead = std::max<int64_t>(
        2, std::min<int64_t>(64, (kPrefetchBytes + row_value_bytes - 1) / row_value_bytes + 1) / 2 * 2);
  }
  // Start the rows r and r_b (r_b == r for a lone last row).
  __attribute__((always_inline)) inline void rows(int64_t r, int64_t r_b) {
    m0 = mask + r * row_bytes;
    m1 = mask + r_b * row_bytes;
    d0 = d1 = kPrefetchBytes / (int64_t)sizeof(T);
    dm = 0;
    if (dense_rows) {
      d0 = offsets[std::min(N - 1, r + ahead)] - offsets[r];
      d1 = offsets[std::min(N - 1, r_b + ahead)] - offsets[r_b];
      dm = ahead * row_bytes;
    }
  }
  // Before 64-column word w, with the rows' value pointers where that word's values start.
  // Always inlined: as a call, every accumulator (ymm/zmm registers are caller-saved) would be
  // spilled around it once per word: 2x slower on AVX2 (measured A/B, 4096x11008, one thread).
  __attribute__((always_inline)) inline void word(const T* p0, const T* p1, int64_t w) const {
    prefetch_ahead(p0 + d0);
    prefetch_ahead(p1 + d1);
    if (dense_rows) {
      prefetch_ahead(p0 + d0, 64);
      prefetch_ahead(p1 + d1, 64);
      if ((w & 7) == 0) {
        prefetch_ahead(m0 + 8 * w + dm);
        prefetch_ahead(m1 + 8 * w + dm);
      }
    } else if ((w & 7) == 0) {
      prefetch_ahead(m0 + 8 * w, 2048);
    }
  }
};

#if SPARSELM_AVX512
template <typename T, int BT>
inline void bitmask_word(const float* x, int64_t ldx, int64_t col, const uint64_t* wa, const uint64_t* wb,
                         const T* p0, const T* p1, __m512* acc0, __m512* acc1) {
  const uint64_t a = *wa, b = *wb;
  const uint16_t* ma = reinterpret_cast<const uint16_t*>(wa);
  const uint16_t* mb = reinterpret_cast<const uint16_t*>(wb);
  const int oa1 = __builtin_popcountll(a & 0xFFFFull), ob1 = __builtin_popcountll(b & 0xFFFFull);
  const int oa2 = __builtin_popcountll(a & 0xFFFFFFFFull), ob2 = __builtin_popcountll(b & 0xFFFFFFFFull);
  const int oa3 = __builtin_popcountll(a & 0xFFFFFFFFFFFFull), ob3 = __builtin_popcountll(b & 0xFFFFFFFFFFFFull);
  const int offa[4] = {0, oa1, oa2, oa3}, offb[4] = {0, ob1, ob2, ob3};
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = expand_values(p0 + offa[j], ma + j);  // little-endian: 16-bit slot j
    const __m512 v1 = expand_values(p1 + offb[j], mb + j);
    for (int bb = 0; bb < BT; ++bb) {
      const __m512 xv = _mm512_loadu_ps(x + bb * ldx + col + 16 * j);
      acc0[bb] = _mm512_fmadd_ps(v0, xv, acc0[bb]);
      acc1[bb] = _mm512_fmadd_ps(v1, xv, acc1[bb]);
    }
  }
}
#endif

#if SPARSELM_AVX2
// AVX2 has no expand: 8 columns at a time, the mask byte m selects a lane permutation from a
// table, lane i of kExpand8[m] being the rank of column i among m's set columns (7 for an
// unset column). The chunk's popcount(m) values are loaded into the low lanes, zero above
// (vmaskmov, which reads nothing past them), so an unset column picks lane 7: zero unless all
// 8 are set, and then no column is unset. 16 KB of tables, in L1 beside the streams.
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t lanes[256][8];  // all ones in m's set columns (bf16 clears the others)
};
constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int m = 0; m < 256; ++m) {
    int rank = 0;
    for (int lane = 0; lane < 8; ++lane) {
      const bool set = (m >> lane) & 1;
      t.idx[m][lane] = set ? rank++ : 7;
      t.lanes[m][lane] = set ? -1 : 0;
    }
  }
  return t;
}
inline constexpr ExpandTable kExpand8 = make_expand_table();

inline __m256i expand_index8(unsigned m) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand8.idx[m]));
}
// Columns of m set: lanes all ones; for zeroing lanes that a full 8-value load filled.
inline __m256 lanes_of8(unsigned m) {
  return _mm256_load_ps(reinterpret_cast<const float*>(kExpand8.lanes[m]));
}
// The popcount(m) packed values at p placed in m's lanes, zero elsewhere.
inline __m256 expand8(const float* p, unsigned m) {
  const __m256 v = _mm256_maskload_ps(p, prefix_mask8(__builtin_popcount(m)));
  return _mm256_permutevar8x32_ps(v, expand_index8(m));
}
// bf16: a full 16-byte load (the caller guarantees 8 readable values at p), widened, permuted,
// and the lanes of unset columns cleared (they may hold the next chunk's values).
inline __m256 expand8(const at::BFloat16* p, unsigned m) {
  const __m256 v = widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(v, expand_index8(m)), lanes_of8(m));
}
// Values that `expand8` may read past a row's last value (bf16 reads 8 whatever the count).
template <typename T>
constexpr int64_t kExpandOverread = std::is_same_v<T, float> ? 0 : 8;

template <typename T, int BT>
void bitmask_rows_avx2(const float* x, int64_t ldx, const uint8_t* mask, int64_t row_bytes,
                       const int64_t* offsets, const T* values, float* y, int64_t N, int64_t K, int64_t r0,
                       int64_t r1) {
  const int64_t full_words = K / 64, chunks = (K + 7) / 8;
  const int64_t total = offsets[N];
  RowPairPrefetch<T> prefetch(mask, offsets, N, K, row_bytes);
  std::vector<T> tail_values;  // the last rows' values, padded, where a full load would overrun
  for (int64_t r = r0; r < r1; r += 2) {  // two output rows share every load of x
    const bool pair = r + 1 < r1;
    const int64_t r_b = pair ? r + 1 : r;
    const uint8_t* m0 = mask + r * row_bytes;
    const uint8_t* m1 = mask + r_b * row_bytes;
    const T* p0 = values + offsets[r];
    const T* p1 = values + offsets[r_b];
    if (kExpandOverread<T> > 0 && offsets[r_b + 1] + kExpandOverread<T> > total) {
      const int64_t n0 = offsets[r + 1] - offsets[r], n1 = offsets[r_b + 1] - offsets[r_b];
      tail_values.assign(n0 + n1 + 2 * kExpandOverread<T>, T(0));
      std::copy(p0, p0 + n0, tail_values.begin());
      std::copy(p1, p1 + n1, tail_values.begin() + n0 + kExpandOverread<T>);
      p0 = tail_values.data();
      p1 = tail_values.data() + n0 + kExpandOverread<T>;
    }
    __m256 acc0[BT], acc1[BT];
    for (int b = 0; b < BT; ++b) { acc0[b] = _mm256_setzero_ps(); acc1[b] = _mm256_setzero_ps(); }
    prefetch.rows(r, r_b);
    for (int64_t w = 0; w < full_words; ++w) {
      prefetch.word(p0, p1, w);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const unsigned a = m0[8 * w + j], c = m1[8 * w + j];
        const __m256 v0 = expand8(p0, a);
        const __m256 v1 = expand8(p1, c);
        p0 += __builtin_popcount(a);
        p1 += __builtin_popcount(c);
        for (int bb = 0; bb < BT; ++bb) {
          const __m256 xv = _mm256_loadu_ps(x + bb * ldx + 64 * w + 8 * j);
          acc0[bb] = _mm256_fmadd_ps(v0, xv, acc0[bb]);
          acc1[bb] = _mm256_fmadd_ps(v1, xv, acc1[bb]);
        }
      }
    }
    for (int64_t g = 8 * full_words; g < chunks; ++g) {  // the last partial word, 8 columns at a time
      const unsigned a = m0[g], c = m1[g];
      const __m256 v0 = expand8(p0, a);
      const __m256 v1 = expand8(p1, c);
      p0 += __builtin_popcount(a);
      p1 += __builtin_popcount(c);
      for (int b = 0; b < BT; ++b) {
        const __m256 xv = load8(x + b * ldx + 8 * g, K - 8 * g);
        acc0[b] = _mm256_fmadd_ps(v0, xv, acc0[b]);
        acc1[b] = _mm256_fmadd_ps(v1, xv, acc1[b]);
      }
    }
    for (int b = 0; b < BT; ++b) {
      y[b * N + r] = hsum8(acc0[b]);
      if (pair) y[b * N + r + 1] = hsum8(acc1[b]);
    }
  }
}
#endif

template <typename T, int BT>
void bitmask_rows(const float* x, int64_t ldx, const uint8_t* mask, int64_t row_bytes,
                  const int64_t* offsets, const T* values, float* y, int64_t N, int64_t K,
                  int64_t r0, int64_t r1) {
  const int64_t G = (K + 15) / 16;
#if SPARSELM_AVX512
  const int64_t full_words = K / 64;  // words whose 64 columns all exist
  RowPairPrefetch<T> prefetch(mask, offsets, N, K, row_bytes);
  int64_t r = r0;
  for (; r < r1; r += 2) {  // two output rows share every load of x
    const bool pair = r + 1 < r1;
    const int64_t r_b = pair ? r + 1 : r;  // a lone last row is computed twice, stored once
    const uint64_t* w0 = reinterpret_cast<const uint64_t*>(mask + r * row_bytes);
    const uint64_t* w1 = reinterpret_cast<const uint64_t*>(mask + r_b * row_bytes);
    const T* p0 = values + offsets[r];
    const T* p1 = values + offsets[r_b];
    __m512 acc0[BT], acc1[BT];
    for (int b = 0; b < BT; ++b) { acc0[b] = _mm512_setzero_ps(); acc1[b] = _mm512_setzero_ps(); }
    prefetch.rows(r, r_b);
    for (int64_t w = 0; w < full_words; ++w) {
      prefetch.word(p0, p1, w);
      bitmask_word<T, BT>(x, ldx, 64 * w, w0 + w, w1 + w, p0, p1, acc0, acc1);
      p0 += __builtin_popcountll(w0[w]);
      p1 += __builtin_popcountll(w1[w]);
    }
    const uint16_t* m0 = reinterpret_cast<const uint16_t*>(w0);
    const uint16_t* m1 = reinterpret_cast<const uint16_t*>(w1);
    for (int64_t g = 4 * full_words; g < G; ++g) {  // the last partial word, 16 columns at a time
      const uint16_t k0 = m0[g], k1 = m1[g];
      const __m512 v0 = expand_values(p0, k0);
      const __m512 v1 = expand_values(p1, k1);
      p0 += __builtin_popcount(k0);
      p1 += __builtin_popcount(k1);
      for (int b = 0; b < BT; ++b) {
        const __m512 xv = load_x16(x + b * ldx, g * 16, K);
        acc0[b] = _mm512_fmadd_ps(v0, xv, acc0[b]);
        acc1[b] = _mm512_fmadd_ps(v1, xv, acc1[b]);
      }
    }
    for (int b = 0; b < BT; ++b) {
      y[b * N + r] = _mm512_reduce_add_ps(acc0[b]);
      if (pair) y[b * N + r + 1] = _mm512_reduce_add_ps(acc1[b]);
    }
  }
#elif SPARSELM_AVX2
  bitmask_rows_avx2<T, BT>(x, ldx, mask, row_bytes, offsets, values, y, N, K, r0, r1);
  (void)G;
#else
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * row_bytes;
    const T* p = values + offsets[r];
    float acc[BT] = {0};
    for (int64_t c = 0; c < K; ++c) {
      if (!((m[c >> 3] >> (c & 7)) & 1)) continue;
      const float v = to_float(*p++);
      for (int b = 0; b < BT; ++b) acc[b] += v * x[b * ldx + c];
    }
    for (int b = 0; b < BT; ++b) y[b * N + r] = acc[b];
  }
  (void)G;
#endif
}

#if SPARSELM_AVX512 && defined(__GNUC__) && !defined(__clang__)  // the asm mask loads are spelled for GCC
// ---------------------------------------------------------------------------------------
// Batch 1 with bf16 values, 32 columns per expand: VBMI2's word expand places the packed bf16
// values of a 32-column half word into the 16-bit lanes of one register; a bf16 value is the
// top half of its fp32, so the even columns become fp32 by a shift and the odd ones by a mask,
// both ordinary ALU operations, against x split once into even and odd columns
// (`split_even_odd`, kernel_common.h). One expand
// (and one mask-register load) per 32 columns, where the general path above spends one per 16
// plus a widening shuffle: the expands' port was what bounded it.
// ---------------------------------------------------------------------------------------
bool has_vbmi2() {
  static const bool v = __builtin_cpu_supports("avx512vbmi2");
  return v;
}

__attribute__((target("avx512f,avx512bw,avx512vbmi2"))) void bitmask_rows_bf16_b1(
    const float* x, int64_t K, const uint8_t* mask, int64_t row_bytes, const int64_t* offsets,
    const at::BFloat16* values, float* y, int64_t r0, int64_t r1) {
  const int64_t words = row_bytes / 8;
  std::vector<float> xs_buf(words * 64 + 16);
  float* xs = xs_buf.data();
  split_even_odd(x, K, 2 * words, xs);
  const int64_t ahead = kPrefetchBytes / 2;  // in values
  for (int64_t r = r0; r < r1; r += 2) {
    const bool pair = r + 1 < r1;
    const int64_t r_b = pair ? r + 1 : r;
    const uint64_t* w0 = reinterpret_cast<const uint64_t*>(mask + r * row_bytes);
    const uint64_t* w1 = reinterpret_cast<const uint64_t*>(mask + r_b * row_bytes);
    const uint16_t* p0 = reinterpret_cast<const uint16_t*>(values + offsets[r]);
    const uint16_t* p1 = reinterpret_cast<const uint16_t*>(values + offsets[r_b]);
    __m512 e0 = _mm512_setzero_ps(), o0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      prefetch_ahead(p0 + ahead);
      prefetch_ahead(p1 + ahead);
      if ((w & 7) == 0) prefetch_ahead(w0 + w, 2048);
      const uint64_t a = w0[w], b = w1[w];
      const int oa = __builtin_popcountll(a & 0xFFFFFFFFull), ob = __builtin_popcountll(b & 0xFFFFFFFFull);
      const uint32_t* ma = reinterpret_cast<const uint32_t*>(w0 + w);
      const uint32_t* mb = reinterpret_cast<const uint32_t*>(w1 + w);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __mmask32 ka, kb;
        asm("kmovd %1, %0" : "=Yk"(ka) : "m"(ma[h]));  // straight from memory (see expand_values)
        asm("kmovd %1, %0" : "=Yk"(kb) : "m"(mb[h]));
        const __m512i va = _mm512_maskz_expandloadu_epi16(ka, p0 + (h ? oa : 0));
        const __m512i vb = _mm512_maskz_expandloadu_epi16(kb, p1 + (h ? ob : 0));
        const __m512 xe = _mm512_loadu_ps(xs + 64 * w + 32 * h), xo = _mm512_loadu_ps(xs + 64 * w + 32 * h + 16);
        e0 = _mm512_fmadd_ps(bf16_even(va), xe, e0);
        o0 = _mm512_fmadd_ps(bf16_odd(va), xo, o0);
        e1 = _mm512_fmadd_ps(bf16_even(vb), xe, e1);
        o1 = _mm512_fmadd_ps(bf16_odd(vb), xo, o1);
      }
      p0 += __builtin_popcountll(a);
      p1 += __builtin_popcountll(b);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(e0, o0));
    if (pair) y[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(e1, o1));
  }
}
#define SPARSELM_BF16_WORDS 1
#else
#define SPARSELM_BF16_WORDS 0
#endif

// Rows [r0, r1) at batch 1: the 32-column bf16 kernel where it runs, else bitmask_rows.
template <typename T>
void bitmask_rows_b1(const float* x, int64_t K, const uint8_t* mask, int64_t row_bytes, const int64_t* offsets,
                     const T* values, float* y, int64_t N, int64_t r0, int64_t r1) {
#if SPARSELM_BF16_WORDS
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (has_vbmi2()) return bitmask_rows_bf16_b1(x, K, mask, row_bytes, offsets, values, y, r0, r1);
  }
#endif
  bitmask_rows<T, 1>(x, K, mask, row_bytes, offsets, values, y, N, K, r0, r1);
}

// Runs a row-range kernel over every batch tile: tiles of 8 rows of x, then 4, 2, 1 for the rest.
template <typename RowFn8, typename RowFn4, typename RowFn2, typename RowFn1>
void for_batch_tiles(int64_t B, int64_t N, int64_t work, RowFn8 f8, RowFn4 f4, RowFn2 f2, RowFn1 f1) {
  const int nt = num_threads_for(work);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    // Even row boundaries keep row pairs together.
    const int64_t pairs = (N + 1) / 2;
    const int64_t r0 = std::min(N, 2 * (pairs * t / T));
    const int64_t r1 = std::min(N, 2 * (pairs * (t + 1) / T));
    int64_t b = 0;
    for (; b + 8 <= B; b += 8) f8(b, r0, r1);
    for (; b + 4 <= B; b += 4) f4(b, r0, r1);
    for (; b + 2 <= B; b += 2) f2(b, r0, r1);
    for (; b < B; ++b) f1(b, r0, r1);
  }
}

template <typename T>
at::Tensor bitmask_matmul_t(const at::Tensor& x, const at::Tensor& mask,
                               const at::Tensor& offsets, const at::Tensor& values,
                               int64_t N) {
  const int64_t B = x.size(0), K = x.size(1), row_bytes = mask.size(1);
  auto y = at::empty({B, N}, x.options());  // every entry is written
  const float* xp = x.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const T* vp = values.data_ptr<T>();
  float* yp = y.data_ptr<float>();
  auto tile = [&](auto bt) {
    constexpr int BT = decltype(bt)::value;
    return [&, xp, mp, op, vp, yp](int64_t b, int64_t r0, int64_t r1) {
      if constexpr (BT == 1)
        bitmask_rows_b1<T>(xp + b * K, K, mp, row_bytes, op, vp, yp + b * N, N, r0, r1);
      else
        bitmask_rows<T, BT>(xp + b * K, K, mp, row_bytes, op, vp, yp + b * N, N, K, r0, r1);
    };
  };
  for_batch_tiles(B, N, values.numel() * B, tile(std::integral_constant<int, 8>{}), tile(std::integral_constant<int, 4>{}),
                  tile(std::integral_constant<int, 2>{}), tile(std::integral_constant<int, 1>{}));
  return y;
}

template <typename T>
void bitmask_to_dense_t(const uint8_t* mp, int64_t row_bytes, const int64_t* op, const T* vp, T* dp,
                        int64_t N, int64_t K) {
  const int nt = num_threads_for(N * K);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const uint8_t* m = mp + r * row_bytes;
    const T* p = vp + op[r];
    T* d = dp + r * K;
    for (int64_t c = 0; c < K; ++c)  // scalar loop: a decode runs once per prefill call
      if ((m[c >> 3] >> (c & 7)) & 1) d[c] = *p++;
  }
}

}  // namespace

// Rows [r0, r1) of y = W x for one fp32 input row x [K] (batch 1), inside a caller's parallel
// region (the decode step runs several projections of the same input in one region).
void bitmask_rows_batch1(const float* x, const at::Tensor& mask, const at::Tensor& offsets, const at::Tensor& values,
                         float* y, int64_t K, int64_t N, int64_t r0, int64_t r1) {
  SPARSELM_DISPATCH_VALUES(values, "bitmask", [&] {
    bitmask_rows_b1<scalar_t>(x, K, mask.data_ptr<uint8_t>(), mask.size(1), offsets.data_ptr<int64_t>(),
                              values.data_ptr<scalar_t>(), y, N, r0, r1);
    return 0;
  });
}

// Decode to the dense [N, K] weight in the values' dtype (for prefill-sized batches, where a
// dense GEMM beats every sparse kernel): one expand per 16 columns, rows in parallel.
at::Tensor bitmask_to_dense(at::Tensor mask, at::Tensor offsets, at::Tensor values, int64_t in_features,
                            int64_t out_features) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == out_features &&
                  mask.size(1) * 8 >= in_features && mask.is_contiguous() && offsets.is_contiguous() &&
                  values.is_contiguous(), "bitmask_to_dense: malformed packed tensors");
  auto dense = at::zeros({out_features, in_features}, values.options());
  const int64_t K = in_features, row_bytes = mask.size(1);
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  SPARSELM_DISPATCH_VALUES(values, "bitmask_to_dense", [&] {
    bitmask_to_dense_t(mp, row_bytes, op, values.data_ptr<scalar_t>(), dense.data_ptr<scalar_t>(), out_features, K);
    return 0;
  });
  return dense;
}

at::Tensor bitmask_linear(at::Tensor x, at::Tensor mask, at::Tensor offsets,
                             at::Tensor values, c10::optional<at::Tensor> bias,
                             int64_t in_features, int64_t out_features) {
  auto xf = as_fp32_rows(x, in_features, "bitmask");  // [rows, K]
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == out_features &&
                  mask.size(1) % 8 == 0 && mask.size(1) * 8 >= in_features && mask.is_contiguous(),
              "bitmask: mask must be contiguous uint8 [out_features, 8 * ceil(in_features / 64)]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == out_features + 1 &&
                  offsets.is_contiguous(), "bitmask: row_offsets must be int64 [out_features + 1]");
  TORCH_CHECK(values.is_contiguous(), "bitmask: values must be contiguous");
  auto y = SPARSELM_DISPATCH_VALUES(values, "bitmask", [&] {
    return bitmask_matmul_t<scalar_t>(xf, mask, offsets, values, out_features);
  });
  return with_leading_dims(finish(y, bias, x.scalar_type()), x);
}

}  // namespace sparselm
