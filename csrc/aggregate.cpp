// Graph aggregation of the channel-major ST-GCN block ("aggregate first"), as a custom autograd
// op: z[k] = x @ g[k] for the K partitions, written straight into a (K, R, W) tensor. See
// src/model/stgcn/aggregate.rs for the Rust side and the why.
//
// x (R, V) holds one row of V joints per (channel, sequence, frame); g (K, V, W) = A ⊙ E. The
// plain formulation multiplies x by the concatenation [g_0 g_1 ...] (V, K·W) and then permutes
// (R, K, W) into (K, R, W) with a full copy; its backward copies the gradient back the other way.
// Here each partition is its own product into its slice of the output (x is read K times, but
// the K-fold larger output is written once and never copied):
//   forward   z[k]  = x @ g[k]                      (K products into slices of z)
//   backward  dx    = sum_k dz[k] @ g[k]^T           (one product, then K - 1 accumulating ones)
//             dg[k] = x^T @ dz[k]                    (K products; x^T is a transposed view)
// All products are libtorch's (BLAS on the CPU, cuBLAS on CUDA), so the op runs on either device
// and is CUDA-graph safe.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>

#include "ffi_util.h"

namespace {

class AggregateFirst : public torch::autograd::Function<AggregateFirst> {
 public:
  // x (R, V), g (K, V, W) -> z (K, R, W); with tail_rows > 0 the result is 2-D,
  // (K·R + (K + pad_blocks)·tail_rows, W): z's K·R rows, then for each partition k, tail_rows rows all
  // equal to colsum_k = sum_v g[k, v, :], then pad_blocks·tail_rows rows of zeros.
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, const at::Tensor &g,
                            int64_t tail_rows, int64_t pad_blocks) {
    const int64_t k = g.size(0), r = x.size(0), w = g.size(2);
    at::Tensor out = at::empty({k * r + (k + pad_blocks) * tail_rows, w}, x.options());
    at::Tensor z = out.narrow(0, 0, k * r).view({k, r, w});
    for (int64_t i = 0; i < k; ++i) {
      at::Tensor zi = z.select(0, i);
      at::mm_out(zi, x, g.select(0, i));
    }
    if (tail_rows > 0) {
      at::Tensor tail = out.narrow(0, k * r, k * tail_rows).view({k, tail_rows, w});
      tail.copy_(g.sum(1, /*keepdim=*/true).expand({k, tail_rows, w}));
      if (pad_blocks > 0) out.narrow(0, k * r + k * tail_rows, pad_blocks * tail_rows).zero_();
    }
    ctx->save_for_backward({x, g});
    ctx->saved_data["tail_rows"] = tail_rows;
    return tail_rows > 0 ? out : z;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &g = saved[1];
    const int64_t tail_rows = ctx->saved_data["tail_rows"].toInt();
    const int64_t k = g.size(0), r = x.size(0), w = g.size(2);
    const at::Tensor dout = grad_outputs[0].contiguous();
    const at::Tensor dz = dout.view({-1, w}).narrow(0, 0, k * r).view({k, r, w});
    at::Tensor dx, dg;
    if (ctx->needs_input_grad(0)) {
      dx = at::mm(dz.select(0, 0), g.select(0, 0).t());
      for (int64_t i = 1; i < k; ++i) dx.addmm_(dz.select(0, i), g.select(0, i).t());
    }
    if (ctx->needs_input_grad(1)) {
      dg = at::empty(g.sizes(), g.options());
      const at::Tensor xt = x.t();
      for (int64_t i = 0; i < k; ++i) {
        at::Tensor dgi = dg.select(0, i);
        at::mm_out(dgi, xt, dz.select(0, i));
      }
      if (tail_rows > 0) {
        // d colsum_k[w] = sum over the tail rows; every g[k, v, w] gets it.
        const at::Tensor dcol = dout.view({-1, w}).narrow(0, k * r, k * tail_rows).view({k, tail_rows, w}).sum(1);
        dg.add_(dcol.unsqueeze(1));
      }
    }
    return {dx, dg, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// z = AggregateFirst(x, g, tail_rows, pad_blocks): x a contiguous floating (R, V) tensor, g a (K, V, W)
// tensor of the same dtype and device. `*out` receives a new at::Tensor* owned by the caller: (K, R, W),
// or with tail_rows > 0, (K·R + (K + pad_blocks)·tail_rows, W) with the column sums of each g[k] and
// zero rows appended (see forward).
// Status/err as the rest of the shim.
int crossclr_aggregate_first(void *x, void *g, int64_t tail_rows, int64_t pad_blocks, void **out, char **err) {
  return crossclr::guarded(err, [&] {
    const char *op = "graph aggregation";
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const at::Tensor &xt = crossclr::borrow_tensor(x, op, "input");
    const at::Tensor &gt = crossclr::borrow_tensor(g, op, "graph");
    TORCH_CHECK(xt.dim() == 2 && xt.is_contiguous(), op, ": the input must be a contiguous (R, V) matrix, got ",
                xt.sizes());
    TORCH_CHECK(gt.dim() == 3 && gt.size(1) == xt.size(1), op, ": the graph must be (K, ", xt.size(1),
                ", W), got ", gt.sizes());
    TORCH_CHECK(gt.scalar_type() == xt.scalar_type() && gt.device() == xt.device(), op,
                ": input and graph differ in dtype or device (", xt.scalar_type(), " on ", xt.device(), " vs ",
                gt.scalar_type(), " on ", gt.device(), ")");
    TORCH_CHECK(gt.size(0) >= 1, op, ": the graph has no partition");
    TORCH_CHECK(tail_rows >= 0 && pad_blocks >= 0, op, ": negative column-sum row count ", tail_rows,
                " or padding ", pad_blocks);
    *out = new at::Tensor(AggregateFirst::apply(xt, gt, tail_rows, pad_blocks));
  });
}

}  // extern "C"
