// SparseGPT's column loop inside one block of columns, row by row.
//
// Within a block of b columns, with U the upper Cholesky factor of the block of H^-1 and d its
// diagonal, pruning column i of a row sets w_i to zero and subtracts (w_i / d_i) * U[i, j]
// from every later column j of the same row. Rows never read each other: the recurrence is
// per row, so the loop the reference code runs column by column over whole columns (many
// small tensor ops, each a Python call) runs here row by row, rows split across threads, and
// touches only the pruned entries. For N:M, the group starting at column i is chosen from
// the row's current (already updated) weights, again per row, exactly as in the column order.
#include "kernel_common.h"

namespace sparselm {

// W [R, b] float32: in, the block's current weights; out, the pruned and updated weights.
// U [b, b] float32: upper triangular factor for the block (only i <= j is read).
// prune [R, b] bool: in, entries already removed (dead inputs; for unstructured, the block
// mask); out, the final mask of removed entries (N:M groups added).
// err [R, b] float32: out, w_i / d_i at removed entries and 0 elsewhere (for the lazy update
// of the columns after the block).
// n, m: N:M pattern (keep n of every m), or m = 0 when the mask is given.
void obs_prune_block(at::Tensor W, at::Tensor U, at::Tensor prune, at::Tensor err, int64_t n, int64_t m) {
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous(), "W: contiguous float32 [R, b]");
  const int64_t R = W.size(0), b = W.size(1);
  TORCH_CHECK(U.scalar_type() == at::kFloat && U.is_contiguous() && U.size(0) == b && U.size(1) == b,
              "U: contiguous float32 [b, b]");
  TORCH_CHECK(prune.scalar_type() == at::kBool && prune.is_contiguous() && prune.size(0) == R && prune.size(1) == b,
              "prune: contiguous bool [R, b]");
  TORCH_CHECK(err.scalar_type() == at::kFloat && err.is_contiguous() && err.size(0) == R && err.size(1) == b,
              "err: contiguous float32 [R, b]");
  TORCH_CHECK(m == 0 || (n >= 0 && n < m), "N:M needs 0 <= n < m");
  float* wp = W.data_ptr<float>();
  const float* up = U.data_ptr<float>();
  bool* pp = prune.data_ptr<bool>();
  float* ep = err.data_ptr<float>();
  std::vector<float> inv_d2(b), inv_d(b);
  for (int64_t i = 0; i < b; ++i) {
    const float d = up[i * b + i];
    inv_d[i] = 1.f / d;
    inv_d2[i] = 1.f / (d * d);
  }
  const int nt = num_threads_for(R * b * b / 4);
  at::parallel_for(0, R, nt > 1 ? (R + nt - 1) / nt : R, [&](int64_t r0, int64_t r1) {
    std::vector<float> score(m > 0 ? m : 1);
    std::vector<int64_t> order(m > 0 ? m : 1);
    for (int64_t r = r0; r < r1; ++r) {
      float* w = wp + r * b;
      bool* p = pp + r * b;
      float* e = ep + r * b;
      for (int64_t i = 0; i < b; ++i) {
        if (m > 0 && i % m == 0) {
          // Remove the m - n lowest w^2 / d^2 of this group (ties: lower column first).
          const int64_t g = std::min(m, b - i);
          for (int64_t j = 0; j < g; ++j) {
            score[j] = w[i + j] * w[i + j] * inv_d2[i + j];
            order[j] = j;
          }
          const int64_t drop = std::min(m - n, g);
          std::partial_sort(order.begin(), order.begin() + drop, order.begin() + g, [&](int64_t a, int64_t c) {
            return score[a] < score[c] || (score[a] == score[c] && a < c);
          });
          for (int64_t j = 0; j < drop; ++j) p[i + order[j]] = true;
        }
        if (!p[i]) {
          e[i] = 0.f;
          continue;
        }
        const float ei = w[i] * inv_d[i];
        e[i] = ei;
        const float* ui = up + i * b;
        for (int64_t j = i + 1; j < b; ++j) w[j] -= ei * ui[j];
        w[i] = 0.f;
      }
    }
  });
}

}  // namespace sparselm
