// C interface of the crossclr C++ shim (csrc/shim.cpp); bound in src/gpu/ffi.rs.
//
// Tensors are passed as tch's raw pointers (`tch::Tensor::as_ptr()`), which are `at::Tensor*`.
// Every function that can fail returns 0 on success and non-zero on failure, in which case `*err`
// receives a malloc'd, NUL-terminated message that the caller frees with crossclr_shim_free.
// No C++ exception ever crosses this boundary.
#ifndef CROSSCLR_SHIM_H
#define CROSSCLR_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void *crossclr_tensor;            // at::Tensor*
typedef struct CrossclrGraph CrossclrGraph;  // opaque
typedef struct CrossclrStream CrossclrStream;  // opaque: one c10::cuda::CUDAStream

void crossclr_shim_free(char *s);
// 1 when the shim was compiled with its CUDA half (graphs, memory statistics, device names).
int crossclr_shim_has_cuda(void);

// theta_k <- m * theta_k + (1 - m) * theta_q for each pair (no autograd), in two foreach kernels.
int crossclr_ema_(crossclr_tensor *keys, crossclr_tensor *queries, size_t n, double m, char **err);
// SGD, momentum `momentum`, dampening 0, no Nesterov, weight decay folded into the gradient:
// g <- grad + wd * p; buf <- momentum * buf + g; p <- p - lr * buf. Buffers must start at zero.
// `lr_tensor` (a 1-element tensor on the parameters' device) overrides `lr` when non-null.
int crossclr_fused_sgd_(crossclr_tensor *params, crossclr_tensor *grads, crossclr_tensor *bufs, size_t n,
                        double weight_decay, double momentum, double lr, crossclr_tensor lr_tensor,
                        char **err);

// Clears the gradients of `n` tensors: set_to_none != 0 drops them (the next backward allocates
// fresh ones, as PyTorch's zero_grad(set_to_none=True)); else zeroes the defined ones in place with
// one foreach kernel.
int crossclr_zero_grad_(crossclr_tensor *params, size_t n, int set_to_none, char **err);

// TF32 on cuBLAS matmuls and cuDNN convolutions (at::globalContext()).
int crossclr_set_tf32(int on, char **err);
int crossclr_get_tf32(int *cublas, int *cudnn, char **err);
// libtorch's warning when a parameter's AccumulateGrad node runs on another stream than the node
// that produced its gradient (at::globalContext()); 0 on success.
int crossclr_set_warn_on_accumulate_grad_stream_mismatch(int on);

int crossclr_cuda_device_name(int device, char *buf, size_t len, char **err);
// Caching-allocator statistics of `device` (bytes): peak and current allocated, peak reserved.
int crossclr_cuda_memory_stats(int device, int64_t *peak_allocated, int64_t *current_allocated,
                               int64_t *peak_reserved, char **err);
int crossclr_cuda_reset_peak(int device, char **err);
// Releases the caching allocator's unused cached blocks (torch.cuda.empty_cache()).
int crossclr_cuda_empty_cache(char **err);

// CUDA graphs (at::cuda::CUDAGraph with a private memory pool, captured on a side stream).
int crossclr_graph_new(int device, CrossclrGraph **out, char **err);
// Makes the graph's side stream current on its device (it first waits for the current stream).
int crossclr_graph_stream_enter(CrossclrGraph *g, char **err);
// Restores the stream that was current before enter (which then waits for the side stream).
int crossclr_graph_stream_exit(CrossclrGraph *g, char **err);
// mode: 0 global, 1 thread-local, 2 relaxed (cudaStreamCaptureMode). Enters the side stream if needed.
int crossclr_graph_capture_begin(CrossclrGraph *g, int mode, char **err);
// Ends the capture (instantiating the graph) and always restores the previous stream.
int crossclr_graph_capture_end(CrossclrGraph *g, char **err);
int crossclr_graph_replay(CrossclrGraph *g, char **err);

// CUDA streams for independent work inside a step (fork / join; capture-safe: the waits are
// event record / wait pairs, which a capture turns into graph edges).
// A stream from libtorch's pool on `device`.
int crossclr_stream_from_pool(int device, CrossclrStream **out, char **err);
// The current stream of `device`.
int crossclr_stream_current(int device, CrossclrStream **out, char **err);
// Makes `s` the current stream of its device.
int crossclr_stream_set_current(const CrossclrStream *s, char **err);
// `waiter` waits (on the device) for the work queued so far on `done`; no-op when they are equal.
int crossclr_stream_wait(const CrossclrStream *waiter, const CrossclrStream *done, char **err);
// 1 when `a` and `b` are the same stream.
int crossclr_stream_same(const CrossclrStream *a, const CrossclrStream *b);
// Tells the caching allocator that tensor `t`'s memory is used on stream `s` (record_stream), so
// that freeing it on its allocation stream cannot hand the block out while `s` may still use it.
int crossclr_record_stream(crossclr_tensor t, const CrossclrStream *s, char **err);
void crossclr_stream_free(CrossclrStream *s);
void crossclr_graph_free(CrossclrGraph *g);

#ifdef __cplusplus
}
#endif
#endif
