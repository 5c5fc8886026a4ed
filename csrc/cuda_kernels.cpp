// Fused CUDA ops for the element-wise chains of an ST-GCN block: training batch norm (+ ReLU) and
// the block tail relu(dropout_p(bn(y)) + r), as custom autograd functions whose kernels
// (csrc/fused_kernels.cuh) are compiled at run time with NVRTC and launched with the CUDA driver
// API on libtorch's current stream (so they are captured by CUDA graphs like any ATen kernel).
// See src/model/stgcn/fused_cuda.rs for the Rust side and the why.
//
// libnvrtc and libcuda are opened with dlopen on first use: the binary links neither, runs on
// machines without a GPU, and the NVRTC compile can be tested without a GPU
// (crossclr_fk_nvrtc_compile). libnvrtc is looked up next to the loaded libtorch_cuda first
// (the PyPI wheel's nvidia/cu13/lib), then on the default search path.
//
// The op orchestration (buffer sizes, kernel order, autograd) is written once over a backend:
// CudaBackend launches the kernels; HostBackend runs the same per-thread bodies on the CPU over an
// emulated grid. The host backend serves the tests only (crossclr_fk_* with CPU tensors): it
// checks the kernels' indexing and arithmetic where no GPU is available.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "ffi_util.h"
#include "fused_kernels.cuh"

#ifdef CROSSCLR_SHIM_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <dirent.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <array>
#include <memory>

// Exported by libtorch_cuda (ATen/cuda/detail/UnpackRaw.cuh, a CUDA header): launches a kernel on
// `stream` that writes the resolved (seed, offset) of a generator state, graph capture included.
namespace at::cuda::philox {
void unpack_cudnn_wrapper(at::PhiloxCudaState arg, int64_t *seed_ptr, int64_t *offset_ptr, cudaStream_t stream);
}
// Declared in ATen/cuda/CUDAContextLight.h (exported by libtorch_cuda).
namespace at::cuda {
cudaDeviceProp *getDeviceProperties(c10::DeviceIndex device);
}
#endif

namespace {

// The kernel source, embedded by build.rs as a raw string literal.
const char *const kKernelSource =
#include "fused_kernels_src.inc"
    ;

using crossclr::guarded;

// ---------------------------------------------------------------------------------------------
// Shapes and launch geometry.

struct Dims {
  u32 c, l, count, numel;  // x viewed as (N, C, L); count = N * L elements per channel
  u32 blocks;              // statistics blocks per channel (B)
  FkLayout lay;            // (C, L) with their dividers, as the kernels take them
  int vec4;                // the four-wide kernels may be used (enabled and L % 4 == 0)
};

// Whether the four-wide kernels are enabled: on unless a test turned them off with
// crossclr_fk_set_vec4 (measured on an H100 (2026-11-27), -3 % to -6 % per step, docs/gpu.md).
std::atomic<int> g_vec4{1};

bool vec4_enabled() { return g_vec4.load() == 1; }

// True when every non-null pointer is 16-byte aligned (the four-wide loads and stores need it).
template <typename... P>
bool aligned16(const P *...ptrs) {
  return ((ptrs == nullptr || reinterpret_cast<std::uintptr_t>(ptrs) % 16 == 0) && ...);
}

// Elements each statistics thread should at least cover (fewer blocks, fewer partials to add).
constexpr int64_t kElementsPerThread = 16;
// Upper bound of statistics blocks per channel (the finalisation adds them in one thread).
constexpr int64_t kMaxBlocksPerChannel = 256;

Dims dims_of(const at::Tensor &x) {
  TORCH_CHECK(x.dim() >= 2, "fused CUDA op: input of rank ", x.dim(), ", expected (N, C, ...)");
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t numel = x.numel();
  TORCH_CHECK(numel < (int64_t{1} << 31), "fused CUDA op: ", numel, " elements, at most 2^31 - 1 supported");
  TORCH_CHECK(c >= 1 && c <= 65535, "fused CUDA op: ", c, " channels, 1 to 65535 supported");
  const int64_t l = c > 0 && n > 0 ? numel / (n * c) : 0;
  const int64_t count = n * l;
  TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
  const int64_t per_block = int64_t{FK_THREADS} * kElementsPerThread;
  const int64_t blocks = std::clamp<int64_t>((count + per_block - 1) / per_block, 1, kMaxBlocksPerChannel);
  const auto c32 = static_cast<u32>(c), l32 = static_cast<u32>(l);
  return Dims{c32, l32, static_cast<u32>(count), static_cast<u32>(numel), static_cast<u32>(blocks),
              FkLayout{c32, l32, fk_make_div(c32), fk_make_div(l32)}, vec4_enabled() && l % 4 == 0 ? 1 : 0};
}

// 1 when a kernel over `d` reading / writing `ptrs` runs its four-wide bodies.
template <typename... P>
int four(const Dims &d, const P *...ptrs) {
  return d.vec4 && aligned16(ptrs...) ? 1 : 0;
}

// The dropout mask parameters (the same rule as csrc/fused_bn.cpp's DropMask).
struct Drop {
  int on = 0;
  int lanes16 = 0;
  u64 threshold = 0;
  float scale = 1.0f;
};

Drop drop_of(double p) {
  Drop d;
  d.on = p > 0.0 ? 1 : 0;
  if (!d.on) return d;
  const double keep = 1.0 - p;
  const double t16 = keep * 65536.0;
  d.lanes16 = t16 == std::floor(t16) ? 1 : 0;
  d.threshold = d.lanes16 ? static_cast<u64>(t16) : static_cast<u64>(keep * 4294967296.0);
  d.scale = static_cast<float>(1.0 / keep);
  return d;
}

const float *f32(const at::Tensor &t) { return t.defined() && t.numel() > 0 ? t.const_data_ptr<float>() : nullptr; }
float *f32m(const at::Tensor &t) { return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<float>() : nullptr; }

// ---------------------------------------------------------------------------------------------
// Host backend: the kernels' per-thread bodies over an emulated grid (tests only).

struct HostBackend {
  // Emulates one statistics kernel: for each (channel, block), the FK_THREADS thread results are
  // added in thread order (the GPU adds them in a tree; both are deterministic).
  template <typename Accum>
  static void partials_grid(const Dims &d, float *partials, Accum accum) {
    for (u32 c = 0; c < d.c; ++c) {
      for (u32 b = 0; b < d.blocks; ++b) {
        float s = 0.0f, q = 0.0f;
        for (u32 t = 0; t < FK_THREADS; ++t) {
          float a, e;
          accum(c, b * FK_THREADS + t, d.blocks * FK_THREADS, &a, &e);
          s += a;
          q += e;
        }
        partials[(c * d.blocks + b) * 2] = s;
        partials[(c * d.blocks + b) * 2 + 1] = q;
      }
    }
  }

  at::Tensor rng_state(const at::Tensor &like, int64_t seed) {
    return at::tensor({seed, int64_t{0}}, at::TensorOptions().dtype(at::kLong));
  }

  void stats_partials(const Dims &d, const float *x, float *partials) {
    const bool v4 = four(d, x);
    partials_grid(d, partials, [&](u32 c, u32 start, u32 stride, float *s, float *q) {
      const float shift = x[fk_chan_offset(c, 0, d.lay)];
      if (v4) {
        fk_stats_accum4(x, d.lay, d.count, c, start, stride, shift, s, q);
      } else {
        fk_stats_accum(x, d.lay, d.count, c, start, stride, shift, s, q);
      }
    });
  }
  void bn_finalize(const Dims &d, const float *x, const float *partials, double eps, double momentum,
                   const float *w, const float *b, float *rm, float *rv, double *stats, float *coef) {
    for (u32 c = 0; c < d.c; ++c)
      fk_bn_finalize(c, x, partials, d.blocks, d.lay, d.count, eps, momentum, w, b, rm, rv, stats, coef);
  }
  void bn_apply(const Dims &d, const float *x, float *y, const float *coef, int relu) {
    if (four(d, x, y)) {
      for (u32 q = 0; q < d.numel / 4; ++q) fk_bn_apply4_at(q, x, y, coef, d.lay, relu);
      return;
    }
    for (u32 i = 0; i < d.numel; ++i) fk_bn_apply_at(i, x, y, coef, d.lay, relu);
  }
  void bn_bwd_partials(const Dims &d, const float *x, const float *coef, const float *g, const double *stats,
                       int relu, float *partials) {
    const bool v4 = four(d, x, g);
    partials_grid(d, partials, [&](u32 c, u32 start, u32 stride, float *s, float *q) {
      const float mean = static_cast<float>(stats[c]);
      if (v4) {
        fk_bn_bwd_accum4(x, coef, g, d.lay, d.count, c, start, stride, mean, relu, s, q);
      } else {
        fk_bn_bwd_accum(x, coef, g, d.lay, d.count, c, start, stride, mean, relu, s, q);
      }
    });
  }
  void bn_bwd_finalize(const Dims &d, const float *partials, const double *stats, const float *w, float *dw,
                       float *db, float *bcoef) {
    for (u32 c = 0; c < d.c; ++c) fk_bn_bwd_finalize(c, partials, d.blocks, d.c, d.count, stats, w, dw, db, bcoef);
  }
  void bn_bwd_apply(const Dims &d, const float *x, const float *coef, const float *g, float *dx,
                    const float *bcoef, int relu) {
    if (four(d, x, g, dx)) {
      for (u32 q = 0; q < d.numel / 4; ++q) fk_bn_bwd_apply4_at(q, x, coef, g, dx, bcoef, d.lay, relu);
      return;
    }
    for (u32 i = 0; i < d.numel; ++i) fk_bn_bwd_apply_at(i, x, coef, g, dx, bcoef, d.lay, relu);
  }
  void tail_apply(const Dims &d, const float *y, const float *r, float *out, const float *coef, const Drop &dr,
                  const at::Tensor &rng) {
    const u64 seed = dr.on ? fk_mask_seed(reinterpret_cast<const u64 *>(rng.const_data_ptr<int64_t>())) : 0;
    if (four(d, y, r, out)) {
      for (u32 q = 0; q < d.numel / 4; ++q)
        fk_tail_apply4_at(q, y, r, out, coef, d.lay, dr.on, seed, dr.lanes16, dr.threshold, dr.scale);
      return;
    }
    for (u32 i = 0; i < d.numel; ++i)
      fk_tail_apply_at(i, y, r, out, coef, d.lay, dr.on, seed, dr.lanes16, dr.threshold, dr.scale);
  }
  void tail_bwd_partials(const Dims &d, const float *y, const float *out, const float *g, const double *stats,
                         const Drop &dr, const at::Tensor &rng, float *partials) {
    const u64 seed = dr.on ? fk_mask_seed(reinterpret_cast<const u64 *>(rng.const_data_ptr<int64_t>())) : 0;
    const bool v4 = four(d, y, out, g);
    partials_grid(d, partials, [&](u32 c, u32 start, u32 stride, float *s, float *q) {
      const float mean = static_cast<float>(stats[c]);
      if (v4) {
        fk_tail_bwd_accum4(y, out, g, d.lay, d.count, c, start, stride, mean, dr.on, seed, dr.lanes16, dr.threshold,
                           dr.scale, s, q);
      } else {
        fk_tail_bwd_accum(y, out, g, d.lay, d.count, c, start, stride, mean, dr.on, seed, dr.lanes16, dr.threshold,
                          dr.scale, s, q);
      }
    });
  }
  void tail_bwd_apply(const Dims &d, const float *y, const float *out, const float *g, float *dy, float *dres,
                      const float *bcoef, const Drop &dr, const at::Tensor &rng) {
    const u64 seed = dr.on ? fk_mask_seed(reinterpret_cast<const u64 *>(rng.const_data_ptr<int64_t>())) : 0;
    if (four(d, y, out, g, dy, dres)) {
      for (u32 q = 0; q < d.numel / 4; ++q)
        fk_tail_bwd_apply4_at(q, y, out, g, dy, dres, bcoef, d.lay, dr.on, seed, dr.lanes16, dr.threshold,
                              dr.scale);
      return;
    }
    for (u32 i = 0; i < d.numel; ++i)
      fk_tail_bwd_apply_at(i, y, out, g, dy, dres, bcoef, d.lay, dr.on, seed, dr.lanes16, dr.threshold,
                           dr.scale);
  }
};

// ---------------------------------------------------------------------------------------------
// NVRTC and the driver API, opened at run time.

#ifdef CROSSCLR_SHIM_CUDA

// Kernels of the module, in this order.
constexpr std::array<const char *, 9> kKernelNames = {
    "fk_stats_partials",  "fk_bn_finalize_kernel", "fk_bn_apply",
    "fk_bn_bwd_partials", "fk_bn_bwd_finalize_kernel", "fk_bn_bwd_apply",
    "fk_tail_apply",      "fk_tail_bwd_partials",  "fk_tail_bwd_apply"};
enum Kernel { kStats, kBnFinalize, kBnApply, kBnBwdPartials, kBnBwdFinalize, kBnBwdApply, kTailApply,
              kTailBwdPartials, kTailBwdApply };

// A library opened with dlopen on first use, with its function table bound.
struct LazyLib {
  void *lib = nullptr;
  std::string failure;  // why it is unusable, when lib is null
};

// Binds `fn` to the symbol `name` of `lib` (throws when it is missing).
template <typename F>
void bind(F &fn, void *lib, const char *name) {
  void *p = dlsym(lib, name);
  TORCH_CHECK(p != nullptr, "fused CUDA op: no symbol ", name, " in the loaded library");
  fn = reinterpret_cast<F>(p);
}

// Opens the first of `candidates` that loads (`before(candidate)` runs before each try), then
// runs `bind_all(lib)`; any failure is kept in `l.failure` with `l.lib` null.
template <typename Before, typename BindAll>
void open_lib(LazyLib &l, const std::vector<std::string> &candidates, const std::string &not_found, Before before,
              BindAll bind_all) {
  for (const auto &c : candidates) {
    before(c);
    l.lib = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (l.lib != nullptr) break;
  }
  if (l.lib == nullptr) {
    l.failure = not_found;
    return;
  }
  try {
    bind_all(l.lib);
  } catch (const c10::Error &e) {
    l.failure = e.what_without_backtrace();
    l.lib = nullptr;
  }
}

// The folder of the loaded libtorch_cuda.so (where the wheel's nvidia/ libraries are relative to).
std::string torch_cuda_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&at::cuda::getDeviceProperties), &info) == 0 || info.dli_fname == nullptr)
    return "";
  std::string path(info.dli_fname);
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

// libnvrtc opens its builtins library (libnvrtc-builtins.so.<version>) by name at compile time and
// has no RUNPATH: when libnvrtc is given by path, load the builtins from the same folder first so
// that the by-name lookup finds them already loaded.
void preload_builtins(const std::string &nvrtc_path) {
  const size_t slash = nvrtc_path.rfind('/');
  if (slash == std::string::npos) return;
  const std::string dir = nvrtc_path.substr(0, slash);
  DIR *d = opendir(dir.c_str());
  if (d == nullptr) return;
  const std::string prefix = "libnvrtc-builtins.so.";
  while (const dirent *e = readdir(d)) {
    const std::string name = e->d_name;
    if (name.compare(0, prefix.size(), prefix) == 0 && name.find(".alt") == std::string::npos) {
      dlopen((dir + "/" + name).c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
  }
  closedir(d);
}

struct Nvrtc : LazyLib {
  decltype(&::nvrtcCreateProgram) create = nullptr;
  decltype(&::nvrtcCompileProgram) compile = nullptr;
  decltype(&::nvrtcGetProgramLogSize) log_size = nullptr;
  decltype(&::nvrtcGetProgramLog) log = nullptr;
  decltype(&::nvrtcGetCUBINSize) cubin_size = nullptr;
  decltype(&::nvrtcGetCUBIN) cubin = nullptr;
  decltype(&::nvrtcDestroyProgram) destroy = nullptr;
  decltype(&::nvrtcGetErrorString) error_string = nullptr;
  decltype(&::nvrtcVersion) version = nullptr;
};

const Nvrtc &nvrtc() {
  static std::once_flag once;
  static Nvrtc n;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    const std::string dir = torch_cuda_dir();
    if (!dir.empty()) {
      candidates.push_back(dir + "/../../nvidia/cu13/lib/libnvrtc.so.13");
      candidates.push_back(dir + "/../../nvidia/cu12/lib/libnvrtc.so.12");
      candidates.push_back(dir + "/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    }
    for (const char *name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"}) candidates.emplace_back(name);
    open_lib(n, candidates, "libnvrtc not found (looked next to libtorch_cuda and on the library path)",
             preload_builtins, [](void *lib) {
               bind(n.create, lib, "nvrtcCreateProgram");
               bind(n.compile, lib, "nvrtcCompileProgram");
               bind(n.log_size, lib, "nvrtcGetProgramLogSize");
               bind(n.log, lib, "nvrtcGetProgramLog");
               bind(n.cubin_size, lib, "nvrtcGetCUBINSize");
               bind(n.cubin, lib, "nvrtcGetCUBIN");
               bind(n.destroy, lib, "nvrtcDestroyProgram");
               bind(n.error_string, lib, "nvrtcGetErrorString");
               bind(n.version, lib, "nvrtcVersion");
             });
  });
  TORCH_CHECK(n.lib != nullptr, "fused CUDA op: ", n.failure);
  return n;
}

// Compiles the kernel source for `arch` ("sm_90") and returns the CUBIN; the compile log goes into
// the error message on failure.
std::string compile_cubin(const std::string &arch) {
  const Nvrtc &n = nvrtc();
  nvrtcProgram prog = nullptr;
  nvrtcResult r = n.create(&prog, kKernelSource, "crossclr_fused_kernels.cu", 0, nullptr, nullptr);
  TORCH_CHECK(r == NVRTC_SUCCESS, "fused CUDA op: nvrtcCreateProgram: ", n.error_string(r));
  const std::string arch_opt = "--gpu-architecture=" + arch;
  const char *opts[] = {arch_opt.c_str(), "--std=c++17", "-default-device"};
  r = n.compile(prog, 3, opts);
  if (r != NVRTC_SUCCESS) {
    size_t size = 0;
    n.log_size(prog, &size);
    std::string log(size, '\0');
    if (size > 0) n.log(prog, log.data());
    n.destroy(&prog);
    TORCH_CHECK(false, "fused CUDA op: NVRTC failed to compile the kernels for ", arch, ": ", n.error_string(r),
                "\n", log);
  }
  size_t size = 0;
  n.cubin_size(prog, &size);
  std::string cubin(size, '\0');
  if (size > 0) n.cubin(prog, cubin.data());
  n.destroy(&prog);
  TORCH_CHECK(size > 0, "fused CUDA op: NVRTC produced an empty CUBIN for ", arch);
  return cubin;
}

struct Driver : LazyLib {
  PFN_cuModuleLoadData_v2000 module_load = nullptr;
  PFN_cuModuleGetFunction_v2000 get_function = nullptr;
  PFN_cuLaunchKernel_v4000 launch = nullptr;
  PFN_cuGetErrorString_v6000 error_string = nullptr;
  PFN_cuCtxGetCurrent_v4000 ctx_get = nullptr;
  PFN_cuCtxSetCurrent_v4000 ctx_set = nullptr;
  PFN_cuDeviceGet_v2000 device_get = nullptr;
  PFN_cuDevicePrimaryCtxRetain_v7000 primary_retain = nullptr;
  PFN_cuStreamIsCapturing_v10000 is_capturing = nullptr;
};

const Driver &driver() {
  static std::once_flag once;
  static Driver d;
  std::call_once(once, [] {
    open_lib(d, {"libcuda.so.1"}, "libcuda.so.1 (the NVIDIA driver) not found", [](const std::string &) {},
             [](void *lib) {
               bind(d.module_load, lib, "cuModuleLoadData");
               bind(d.get_function, lib, "cuModuleGetFunction");
               bind(d.launch, lib, "cuLaunchKernel");
               bind(d.error_string, lib, "cuGetErrorString");
               bind(d.ctx_get, lib, "cuCtxGetCurrent");
               bind(d.ctx_set, lib, "cuCtxSetCurrent");
               bind(d.device_get, lib, "cuDeviceGet");
               bind(d.primary_retain, lib, "cuDevicePrimaryCtxRetain");
               bind(d.is_capturing, lib, "cuStreamIsCapturing");
             });
  });
  TORCH_CHECK(d.lib != nullptr, "fused CUDA op: ", d.failure);
  return d;
}

void check_cu(CUresult r, const char *what) {
  if (r == CUDA_SUCCESS) return;
  const char *msg = nullptr;
  driver().error_string(r, &msg);
  TORCH_CHECK(false, "fused CUDA op: ", what, " failed: ", msg != nullptr ? msg : "unknown CUDA error");
}

// Makes the device's primary context (the one the CUDA runtime and libtorch use) current on this
// thread; the runtime has usually done so already.
void ensure_context(c10::DeviceIndex device) {
  const Driver &d = driver();
  CUcontext ctx = nullptr;
  check_cu(d.ctx_get(&ctx), "cuCtxGetCurrent");
  if (ctx != nullptr) return;
  CUdevice dev = 0;
  check_cu(d.device_get(&dev, device), "cuDeviceGet");
  check_cu(d.primary_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check_cu(d.ctx_set(ctx), "cuCtxSetCurrent");
}

// The kernels loaded on one device (compiled once per process and device).
struct Module {
  std::array<CUfunction, kKernelNames.size()> fn{};
};

const Module &module_for(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<std::unique_ptr<Module>, 64> modules;
  TORCH_CHECK(device >= 0 && device < 64, "fused CUDA op: device index ", int(device), " out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (!modules[device]) {
    const cudaDeviceProp *prop = at::cuda::getDeviceProperties(device);
    const std::string arch = "sm_" + std::to_string(prop->major) + std::to_string(prop->minor);
    const std::string cubin = compile_cubin(arch);
    ensure_context(device);
    CUmodule mod = nullptr;
    check_cu(driver().module_load(&mod, cubin.data()), "cuModuleLoadData");
    auto m = std::make_unique<Module>();
    for (size_t k = 0; k < kKernelNames.size(); ++k)
      check_cu(driver().get_function(&m->fn[k], mod, kKernelNames[k]), kKernelNames[k]);
    modules[device] = std::move(m);
  }
  return *modules[device];
}

// Elementwise grid: each thread covers about 4 work items (elements, or four-element groups when
// `four`) of the grid-stride loop.
u32 elementwise_blocks(u32 numel, int four) {
  if (four) numel /= 4;
  const u64 per_block = u64{FK_THREADS} * 4;
  return static_cast<u32>(std::clamp<u64>((u64{numel} + per_block - 1) / per_block, 1, u64{1} << 20));
}

struct CudaBackend {
  c10::DeviceIndex device;
  const Module &mod;
  CUstream stream;

  explicit CudaBackend(const at::Tensor &x)
      : device(x.device().index()), mod(module_for(x.device().index())),
        stream(reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream())) {
    ensure_context(device);
  }

  // Launches kernel k on grid (gx, gy) with FK_THREADS threads; `args` must have exactly the
  // kernel's parameter types.
  template <typename... A>
  void launch(Kernel k, u32 gx, u32 gy, A... args) {
    void *params[] = {static_cast<void *>(&args)...};
    check_cu(driver().launch(mod.fn[k], gx, gy, 1, FK_THREADS, 1, 1, 0, stream, params, nullptr),
             kKernelNames[k]);
  }

  at::Tensor rng_state(const at::Tensor &like, int64_t /*seed: the CUDA generator decides*/) {
    at::Tensor rng = at::empty({2}, like.options().dtype(at::kLong));
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(device);
    at::PhiloxCudaState state;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      // Each call takes 4 fresh offsets; inside a CUDA graph the state follows the replays.
      state = at::check_generator<at::CUDAGeneratorImpl>(gen)->philox_cuda_state(4);
    }
    int64_t *p = rng.mutable_data_ptr<int64_t>();
    at::cuda::philox::unpack_cudnn_wrapper(state, p, p + 1, reinterpret_cast<cudaStream_t>(stream));
    return rng;
  }

  static const u64 *rng_ptr(const at::Tensor &rng) {
    return reinterpret_cast<const u64 *>(rng.const_data_ptr<int64_t>());
  }

  void stats_partials(const Dims &d, const float *x, float *partials) {
    launch(kStats, d.blocks, d.c, x, d.lay, d.count, partials, four(d, x));
  }
  void bn_finalize(const Dims &d, const float *x, const float *partials, double eps, double momentum,
                   const float *w, const float *b, float *rm, float *rv, double *stats, float *coef) {
    launch(kBnFinalize, (d.c + FK_THREADS - 1) / FK_THREADS, 1, x, partials, d.blocks, d.lay, d.count, eps,
           momentum, w, b, rm, rv, stats, coef);
  }
  void bn_apply(const Dims &d, const float *x, float *y, const float *coef, int relu) {
    const int v4 = four(d, x, y);
    launch(kBnApply, elementwise_blocks(d.numel, v4), 1, x, y, coef, d.lay, d.numel, relu, v4);
  }
  void bn_bwd_partials(const Dims &d, const float *x, const float *coef, const float *g, const double *stats,
                       int relu, float *partials) {
    launch(kBnBwdPartials, d.blocks, d.c, x, coef, g, stats, d.lay, d.count, relu, partials, four(d, x, g));
  }
  void bn_bwd_finalize(const Dims &d, const float *partials, const double *stats, const float *w, float *dw,
                       float *db, float *bcoef) {
    launch(kBnBwdFinalize, (d.c + FK_THREADS - 1) / FK_THREADS, 1, partials, d.blocks, d.c, d.count, stats, w, dw,
           db, bcoef);
  }
  void bn_bwd_apply(const Dims &d, const float *x, const float *coef, const float *g, float *dx,
                    const float *bcoef, int relu) {
    const int v4 = four(d, x, g, dx);
    launch(kBnBwdApply, elementwise_blocks(d.numel, v4), 1, x, coef, g, dx, bcoef, d.lay, d.numel, relu, v4);
  }
  void tail_apply(const Dims &d, const float *y, const float *r, float *out, const float *coef, const Drop &dr,
                  const at::Tensor &rng) {
    const int v4 = four(d, y, r, out);
    launch(kTailApply, elementwise_blocks(d.numel, v4), 1, y, r, out, coef, d.lay, d.numel, dr.on, rng_ptr(rng),
           dr.lanes16, dr.threshold, dr.scale, v4);
  }
  void tail_bwd_partials(const Dims &d, const float *y, const float *out, const float *g, const double *stats,
                         const Drop &dr, const at::Tensor &rng, float *partials) {
    launch(kTailBwdPartials, d.blocks, d.c, y, out, g, stats, d.lay, d.count, dr.on, rng_ptr(rng), dr.lanes16,
           dr.threshold, dr.scale, partials, four(d, y, out, g));
  }
  void tail_bwd_apply(const Dims &d, const float *y, const float *out, const float *g, float *dy, float *dres,
                      const float *bcoef, const Drop &dr, const at::Tensor &rng) {
    const int v4 = four(d, y, out, g, dy, dres);
    launch(kTailBwdApply, elementwise_blocks(d.numel, v4), 1, y, out, g, dy, dres, bcoef, d.lay, d.numel, dr.on,
           rng_ptr(rng), dr.lanes16, dr.threshold, dr.scale, v4);
  }
};

#endif  // CROSSCLR_SHIM_CUDA

// ---------------------------------------------------------------------------------------------
// The ops, over a backend.

// Forward statistics of x: partial sums, then per-channel statistics, affine coefficients and
// running-statistics update. Returns (stats (2C) double: mean, invstd; coef (2C) float: scale, shift).
template <typename Backend>
std::pair<at::Tensor, at::Tensor> forward_stats(Backend &bk, const Dims &d, const at::Tensor &x,
                                                const at::Tensor &w, const at::Tensor &b, const at::Tensor &rm,
                                                const at::Tensor &rv, double momentum, double eps) {
  at::Tensor partials = at::empty({int64_t{d.c} * d.blocks * 2}, x.options());
  at::Tensor stats = at::empty({2 * int64_t{d.c}}, x.options().dtype(at::kDouble));
  at::Tensor coef = at::empty({2 * int64_t{d.c}}, x.options());
  bk.stats_partials(d, f32(x), f32m(partials));
  bk.bn_finalize(d, f32(x), f32(partials), eps, momentum, f32(w), f32(b), f32m(rm), f32m(rv),
                 stats.template mutable_data_ptr<double>(), f32m(coef));
  crossclr::bump_versions(rm, rv);
  return {stats, coef};
}

template <typename Backend>
Backend make_backend(const at::Tensor &x);

template <>
HostBackend make_backend<HostBackend>(const at::Tensor &) {
  return HostBackend{};
}
#ifdef CROSSCLR_SHIM_CUDA
template <>
CudaBackend make_backend<CudaBackend>(const at::Tensor &x) {
  return CudaBackend(x);
}
#endif

// The backward pass's common part: the incoming gradient (checked against the output's shape)
// and the per-channel results of the reduction (partials, dgamma, dbeta, the dx coefficients).
struct BwdBuffers {
  at::Tensor g, partials, dw, db, bcoef;

  BwdBuffers(const at::Tensor &grad, const at::Tensor &out_like, const Dims &d, const char *op)
      : g(crossclr::checked_grad(grad, out_like, op)) {
    const auto o = out_like.options();
    partials = at::empty({int64_t{d.c} * d.blocks * 2}, o);
    dw = at::empty({int64_t{d.c}}, o);
    db = at::empty({int64_t{d.c}}, o);
    bcoef = at::empty({4 * int64_t{d.c}}, o);
  }
};

template <typename Backend>
class FusedBnFn : public torch::autograd::Function<FusedBnFn<Backend>> {
 public:
  // x (N, C, ...), w / b / running_mean / running_var (C,). Returns y of x's shape.
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &b, const at::Tensor &rm, const at::Tensor &rv, double momentum,
                            double eps, bool relu) {
    const Dims d = dims_of(x);
    Backend bk = make_backend<Backend>(x);
    auto [stats, coef] = forward_stats(bk, d, x, w, b, rm, rv, momentum, eps);
    at::Tensor y = at::empty_like(x);
    bk.bn_apply(d, f32(x), f32m(y), f32(coef), relu ? 1 : 0);
    // The ReLU mask is recomputed in backward from x and the affine coefficients (y is not read).
    ctx->save_for_backward({x, w});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["coef"] = coef;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const at::Tensor stats = ctx->saved_data["stats"].toTensor();
    const at::Tensor coef = ctx->saved_data["coef"].toTensor();
    const int relu = ctx->saved_data["relu"].toBool() ? 1 : 0;
    const Dims d = dims_of(x);
    Backend bk = make_backend<Backend>(x);
    const BwdBuffers buf(grad_outputs[0], x, d, "fused batch norm");
    const at::Tensor &g = buf.g;
    const double *sp = stats.template const_data_ptr<double>();
    bk.bn_bwd_partials(d, f32(x), f32(coef), f32(g), sp, relu, f32m(buf.partials));
    bk.bn_bwd_finalize(d, f32(buf.partials), sp, f32(w), f32m(buf.dw), f32m(buf.db), f32m(buf.bcoef));
    at::Tensor dx;
    if (ctx->needs_input_grad(0)) {
      dx = at::empty_like(x);
      bk.bn_bwd_apply(d, f32(x), f32(coef), f32(g), f32m(dx), f32(buf.bcoef), relu);
    }
    // One entry per forward argument: x, w, b, running_mean, running_var, momentum, eps, relu.
    return {dx,
            ctx->needs_input_grad(1) ? buf.dw : at::Tensor(),
            ctx->needs_input_grad(2) ? buf.db : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

template <typename Backend>
class FusedTailFn : public torch::autograd::Function<FusedTailFn<Backend>> {
 public:
  // y (N, C, ...), r of y's shape (or empty: no residual), parameters (C,), p the dropout
  // probability, seed the host backend's mask seed (the CUDA backend draws from libtorch's CUDA
  // generator). Returns relu(dropout_p(bn(y)) + r).
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &y, const at::Tensor &r,
                            const at::Tensor &w, const at::Tensor &b, const at::Tensor &rm, const at::Tensor &rv,
                            bool has_r, double momentum, double eps, double p, int64_t seed) {
    const Dims d = dims_of(y);
    Backend bk = make_backend<Backend>(y);
    auto [stats, coef] = forward_stats(bk, d, y, w, b, rm, rv, momentum, eps);
    const Drop dr = drop_of(p);
    at::Tensor rng = dr.on ? bk.rng_state(y, seed) : at::empty({2}, y.options().dtype(at::kLong));
    at::Tensor out = at::empty_like(y);
    bk.tail_apply(d, f32(y), has_r ? f32(r) : nullptr, f32m(out), f32(coef), dr, rng);
    ctx->save_for_backward({y, out, w});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["rng"] = rng;
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_r"] = has_r;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &y = saved[0], &out = saved[1], &w = saved[2];
    const at::Tensor stats = ctx->saved_data["stats"].toTensor();
    const at::Tensor rng = ctx->saved_data["rng"].toTensor();
    const Drop dr = drop_of(ctx->saved_data["p"].toDouble());
    const bool has_r = ctx->saved_data["has_r"].toBool();
    const Dims d = dims_of(y);
    Backend bk = make_backend<Backend>(y);
    const BwdBuffers buf(grad_outputs[0], y, d, "fused block tail");
    const at::Tensor &g = buf.g;
    const double *sp = stats.template const_data_ptr<double>();
    bk.tail_bwd_partials(d, f32(y), f32(out), f32(g), sp, dr, rng, f32m(buf.partials));
    bk.bn_bwd_finalize(d, f32(buf.partials), sp, f32(w), f32m(buf.dw), f32m(buf.db), f32m(buf.bcoef));
    at::Tensor dy = at::empty_like(y);
    at::Tensor dres = has_r && ctx->needs_input_grad(1) ? at::empty_like(y) : at::Tensor();
    bk.tail_bwd_apply(d, f32(y), f32(out), f32(g), f32m(dy), dres.defined() ? f32m(dres) : nullptr, f32(buf.bcoef), dr,
                      rng);
    // One entry per forward argument: y, r, w, b, rm, rv, has_r, momentum, eps, p, seed.
    return {ctx->needs_input_grad(0) ? dy : at::Tensor(),
            dres,
            ctx->needs_input_grad(2) ? buf.dw : at::Tensor(),
            ctx->needs_input_grad(3) ? buf.db : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// Whether the op runs on the host emulation (CPU tensors, tests) or on CUDA; anything else throws.
bool use_host(const at::Tensor &x) {
  if (x.device().is_cpu()) return true;
#ifdef CROSSCLR_SHIM_CUDA
  if (x.device().is_cuda()) return false;
#endif
  TORCH_CHECK(false, "fused CUDA op: tensors on ", x.device(), " are not supported (built ",
#ifdef CROSSCLR_SHIM_CUDA
              "with CUDA"
#else
              "without CUDA"
#endif
              ")");
  return true;
}

}  // namespace

extern "C" {

// The four-wide kernels: on (1) or off (0) from now on (for tests comparing them with the scalar ones).
void crossclr_fk_set_vec4(int on) { g_vec4.store(on != 0 ? 1 : 0); }

// 1 when the four-wide kernels are enabled.
int crossclr_fk_vec4() { return vec4_enabled() ? 1 : 0; }

// Test hook: compares the kernels' division by a constant (fk_div) with `/` for every divisor in
// min_d..=max_d and dividends 0..4095, every 977th up to 2^20, and the largest below 2^31. Returns the
// number of mismatches.
int64_t crossclr_fk_div_mismatches(uint32_t min_d, uint32_t max_d) {
  int64_t bad = 0;
  for (u32 d = std::max<u32>(min_d, 1); d <= max_d; ++d) {
    const FkDiv v = fk_make_div(d);
    auto check = [&](u32 n) { bad += fk_div(n, v) != n / d ? 1 : 0; };
    for (u32 n = 0; n < 4096; ++n) check(n);
    for (u32 n = 4096; n < (1u << 20); n += 977) check(n);
    for (u32 n = (1u << 31) - 64; n < (1u << 31); ++n) check(n);
  }
  return bad;
}

// Compiles the kernel source with NVRTC for `arch` (e.g. "sm_90"), without a GPU; `*cubin_bytes`
// receives the CUBIN size and `*nvrtc_version` major * 1000 + minor * 10. Status/err as the shim.
int crossclr_fk_nvrtc_compile(const char *arch, size_t *cubin_bytes, int *nvrtc_version, char **err) {
  return guarded(err, [&] {
#ifdef CROSSCLR_SHIM_CUDA
    TORCH_CHECK(arch != nullptr, "fused CUDA op: null architecture");
    const std::string cubin = compile_cubin(arch);
    if (cubin_bytes != nullptr) *cubin_bytes = cubin.size();
    int major = 0, minor = 0;
    nvrtc().version(&major, &minor);
    if (nvrtc_version != nullptr) *nvrtc_version = major * 1000 + minor * 10;
#else
    (void)arch;
    (void)cubin_bytes;
    (void)nvrtc_version;
    TORCH_CHECK(false, "fused CUDA op: the shim was built without CUDA support");
#endif
  });
}

// 1 when the current stream of `device` is capturing a CUDA graph, 0 when not (status/err as the
// shim; a CUDA-less build always says 0).
int crossclr_fk_capturing(int device, int *capturing, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(capturing != nullptr, "fused CUDA op: null output");
    *capturing = 0;
#ifdef CROSSCLR_SHIM_CUDA
    const auto index = static_cast<c10::DeviceIndex>(device);
    ensure_context(index);
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    check_cu(driver().is_capturing(reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(index).stream()),
                                   &status),
             "cuStreamIsCapturing");
    *capturing = status != CU_STREAM_CAPTURE_STATUS_NONE ? 1 : 0;
#else
    (void)device;
#endif
  });
}

// Training batch norm (+ ReLU when relu != 0) over dim 1 of `x` (contiguous float32, rank >= 2)
// with the fused kernels: on CUDA tensors the NVRTC kernels, on CPU tensors the host emulation
// (tests). Parameters and running statistics: contiguous float32 (C,) on x's device; the running
// statistics are updated in place. `*out` receives a new at::Tensor* owned by the caller.
int crossclr_fk_bn_train(void *x, void *w, void *b, void *running_mean, void *running_var, double momentum,
                         double eps, int relu, void **out, char **err) {
  return guarded(err, [&] {
    TORCH_CHECK(out != nullptr, "fused CUDA batch norm: null output pointer");
    const auto a = crossclr::borrow_bn_args("fused CUDA batch norm", x, w, b, running_mean, running_var);
    at::Tensor y;
    if (use_host(a.x)) {
      y = FusedBnFn<HostBackend>::apply(a.x, a.w, a.b, a.running_mean, a.running_var, momentum, eps, relu != 0);
    } else {
#ifdef CROSSCLR_SHIM_CUDA
      const c10::DeviceGuard guard(a.x.device());
      y = FusedBnFn<CudaBackend>::apply(a.x, a.w, a.b, a.running_mean, a.running_var, momentum, eps, relu != 0);
#endif
    }
    *out = new at::Tensor(std::move(y));
  });
}

// The block tail relu(dropout_p(bn(y)) + r) with the fused kernels (r null: no residual; else of
// y's shape), 0 <= p < 1. `seed` is the mask seed of the host emulation; on CUDA the mask is drawn
// from libtorch's CUDA generator (so it follows manual_seed and changes on every graph replay).
int crossclr_fk_tail_train(void *y, void *r, void *w, void *b, void *running_mean, void *running_var,
                           double momentum, double eps, double p, int64_t seed, void **out, char **err) {
  return guarded(err, [&] {
    const char *op = "fused CUDA block tail";
    TORCH_CHECK(out != nullptr, op, ": null output pointer");
    const auto a = crossclr::borrow_bn_args(op, y, w, b, running_mean, running_var);
    const at::Tensor rt = crossclr::borrow_tail_residual(op, r, a.x, p);
    at::Tensor o;
    if (use_host(a.x)) {
      o = FusedTailFn<HostBackend>::apply(a.x, rt, a.w, a.b, a.running_mean, a.running_var, r != nullptr, momentum,
                                          eps, p, seed);
    } else {
#ifdef CROSSCLR_SHIM_CUDA
      const c10::DeviceGuard guard(a.x.device());
      o = FusedTailFn<CudaBackend>::apply(a.x, rt, a.w, a.b, a.running_mean, a.running_var, r != nullptr, momentum,
                                          eps, p, seed);
#endif
    }
    *out = new at::Tensor(std::move(o));
  });
}

}  // extern "C"
