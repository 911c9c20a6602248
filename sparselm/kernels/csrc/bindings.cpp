// Python bindings of the sparse CPU kernels (built by sparselm/kernels/extension.py).
#include <torch/python.h>  // pybind11 and the Tensor type casters, without the C++ frontend

#include <pybind11/stl.h>

#include "decode_step.h"
#include "kernel_common.h"

namespace sparselm {
at::Tensor bitmask_linear(at::Tensor x, at::Tensor mask, at::Tensor offsets, at::Tensor values,
                             c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features);
at::Tensor csr_linear(at::Tensor x, at::Tensor crow, at::Tensor col, at::Tensor values,
                         c10::optional<at::Tensor> bias, int64_t in_features, int64_t out_features);
at::Tensor nm_linear(at::Tensor x, at::Tensor idx, at::Tensor values,
                        c10::optional<at::Tensor> bias, int64_t n, int64_t m, int64_t in_features);
at::Tensor act_sparse_gemv(at::Tensor x, at::Tensor w_t);
at::Tensor bitmask_to_dense(at::Tensor mask, at::Tensor offsets, at::Tensor values, int64_t in_features,
                            int64_t out_features);
at::Tensor csr_to_dense(at::Tensor crow, at::Tensor col, at::Tensor values, int64_t in_features,
                        int64_t out_features);
at::Tensor nm_to_dense(at::Tensor idx, at::Tensor values, int64_t n, int64_t m, int64_t in_features);
at::Tensor dense_gemv(at::Tensor x, at::Tensor w);
at::Tensor swiglu_forward(at::Tensor h, c10::optional<at::Tensor> out);
at::Tensor swiglu_backward(at::Tensor h, at::Tensor grad_act, c10::optional<at::Tensor> out);
at::Tensor rows_sum(at::Tensor src, at::Tensor rows, c10::optional<at::Tensor> weights);
std::tuple<at::Tensor, at::Tensor> rows_sum_backward(at::Tensor src, at::Tensor rows, c10::optional<at::Tensor> weights,
                                                     at::Tensor grad_out, bool need_weight_grad);
void moe_expert_rows(at::Tensor x, at::Tensor token_index, std::vector<int64_t> counts,
                     std::vector<int64_t> run_rows, at::Tensor gate_up, at::Tensor down, at::Tensor y,
                     at::Tensor x_buf, at::Tensor h_buf, int64_t threads);
std::vector<at::Tensor> route_top_k(at::Tensor scores, int64_t K);
int64_t moe_parallel_experts(std::vector<int64_t> counts, int64_t D, int64_t F);
void mm_many(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> out, int64_t threads);
void obs_prune_block(at::Tensor W, at::Tensor U, at::Tensor prune, at::Tensor err, int64_t n, int64_t m);
// The vector paths compiled in: "avx512", "avx2" (8-lane versions) or "portable" (plain C++).
std::string compiled_simd() { return SPARSELM_AVX512 ? "avx512" : (SPARSELM_AVX2 ? "avx2" : "portable"); }
}  // namespace sparselm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_linear", &sparselm::bitmask_linear, "x[B,K] @ W.T + b for a bitmask-packed W");
  m.def("csr_linear", &sparselm::csr_linear, "x[B,K] @ W.T + b for a CSR W with int32 columns");
  m.def("nm_linear", &sparselm::nm_linear, "x[B,K] @ W.T + b for an N:M-compressed W");
  m.def("bitmask_to_dense", &sparselm::bitmask_to_dense, "decode a bitmask-packed weight to dense [N, K]");
  m.def("csr_to_dense", &sparselm::csr_to_dense, "decode a CSR weight to dense [N, K]");
  m.def("nm_to_dense", &sparselm::nm_to_dense, "decode an N:M-compressed weight to dense [N, K]");
  m.def("act_sparse_gemv", &sparselm::act_sparse_gemv, "x[K] @ w_t[K,N], reading only rows with x != 0");
  m.def("dense_gemv", &sparselm::dense_gemv, "x[1,K] @ W.T, dense, same threads as the sparse kernels");
  m.def("obs_prune_block", &sparselm::obs_prune_block,
        "SparseGPT's column loop over one block, row-parallel, in place (W, prune, err)");
  m.def("swiglu_forward", &sparselm::swiglu_forward, "silu(h[:, :F]) * h[:, F:] for h [rows, 2F], one pass (into out if given)",
        pybind11::arg("h"), pybind11::arg("out") = pybind11::none());
  m.def("swiglu_backward", &sparselm::swiglu_backward, "gradient of swiglu_forward w.r.t. h, one pass (into out if given)",
        pybind11::arg("h"), pybind11::arg("grad_act"), pybind11::arg("out") = pybind11::none());
  m.def("rows_sum", &sparselm::rows_sum, "out[t] = sum_k w[t, k] * src[rows[t, k]] (fp32 accumulation)");
  m.def("rows_sum_backward", &sparselm::rows_sum_backward,
        "gradients of rows_sum w.r.t. src (rows used at most once) and, if asked, w");
  m.def("moe_expert_rows", &sparselm::moe_expert_rows,
        "the no-grad MoE expert loop: gather, gate/up matmul, fused SwiGLU, down matmul per expert "
        "(each on run_rows[e] >= counts[e] rows, zero-padded)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("route_top_k", &sparselm::route_top_k,
        "top-k experts per token (ties: lower index) and the assignments grouped by expert: "
        "(choice [T, K], rows [T, K], tokens [T*K], counts [E])");
  m.def("mm_many", &sparselm::mm_many,
        "out[i] = a[i] @ b[i] for every i, the products spread over threads (each on one thread)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("moe_parallel_experts", &sparselm::moe_parallel_experts,
        "threads moe_expert_rows should use (whole experts per thread), 1 for splitting each matmul");
  pybind11::class_<sparselm::DecodeStack>(m, "DecodeStack",
                                          "one decode position through Llama-style blocks in one call")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("add_block", &sparselm::DecodeStack::add_block)
      .def("set_head", &sparselm::DecodeStack::set_head)
      .def("step", &sparselm::DecodeStack::step, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("set_embedding", &sparselm::DecodeStack::set_embedding)
      .def("step_tokens", &sparselm::DecodeStack::step_tokens, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("generate", &sparselm::DecodeStack::generate, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("num_blocks", &sparselm::DecodeStack::num_blocks)
      .def_property_readonly("single_region", &sparselm::DecodeStack::single_region,
                             "whether a token step runs in one parallel region (batch 1, dense fp32 or bitmask)");
  m.def("compiled_simd", &sparselm::compiled_simd, "the vector paths compiled in: avx512, avx2 or portable");
}
