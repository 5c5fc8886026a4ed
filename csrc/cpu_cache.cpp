// A caching allocator for libtorch's CPU tensors (see src/cpu_cache.rs for the why and the numbers).
//
// libtorch's default CPU allocator is posix_memalign/free. glibc serves every block above its mmap
// threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so each large activation of
// every training step is page-faulted in and zeroed by the kernel again: at batch 128 an ST-GCN
// step faults ~1.3 million 4 KiB pages (about a fifth of the step on this CPU). This allocator keeps
// freed blocks of at least `min_bytes` in size-keyed free lists and hands them out again (best fit
// within 1/8 of the request), maps new ones 2 MiB-aligned with MADV_HUGEPAGE (transparent huge
// pages in "madvise" mode, the common default, then fault 512x less often), and frees (munmaps)
// instead of caching once the cached bytes would exceed `max_cached_bytes`. Smaller requests go to
// the allocator it replaces. Thread-safe (one mutex; large allocations are rare events per op).
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include "ffi_util.h"

#include <malloc.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator(c10::Allocator *fallback, size_t min_bytes, size_t max_cached, bool huge)
      : fallback_(fallback), min_bytes_(min_bytes), max_cached_(max_cached), huge_(huge) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) {
      return fallback_->allocate(n);
    }
    void *p = take(n);
    // ctx == data pointer, as the default allocator does (is_simple_data_ptr stays true).
    return {p, p, &CachingCpuAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCpuAllocator::deleter; }

  void copy_data(void *dest, const void *src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void deleter(void *p) { instance->give_back(p); }

  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto &kv : free_) {
      unmap(kv.second, kv.first);
    }
    free_.clear();
    cached_ = 0;
  }

  void stats(int64_t *cached, int64_t *in_use, int64_t *hits, int64_t *misses) {
    std::lock_guard<std::mutex> lock(mu_);
    *cached = static_cast<int64_t>(cached_);
    *in_use = static_cast<int64_t>(in_use_);
    *hits = hits_;
    *misses = misses_;
  }

  static CachingCpuAllocator *instance;

 private:
  void *take(size_t n) {
    const size_t want = round_up(n, huge_ ? kHugePage : size_t{4096});
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 8) {
        void *p = it->second;
        const size_t size = it->first;
        free_.erase(it);
        cached_ -= size;
        in_use_ += size;
        sizes_[p] = size;
        ++hits_;
        return p;
      }
    }
    void *p = map(want);
    if (p == nullptr) {
      // Out of address space or memory: give the cache back to the system and try once more.
      release();
      p = map(want);
    }
    if (p == nullptr) {
      TORCH_CHECK(false, "crossclr CPU allocator: cannot map ", want, " bytes (out of memory)");
    }
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += want;
    sizes_[p] = want;
    ++misses_;
    return p;
  }

  void give_back(void *p) {
    if (p == nullptr) {
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sizes_.find(p);
    if (it == sizes_.end()) {
      // Not ours: a small block from the fallback allocator shares this deleter only via
      // raw_deleter(); libtorch's default allocator frees with free().
      std::free(p);
      return;
    }
    const size_t size = it->second;
    sizes_.erase(it);
    in_use_ -= size;
    if (cached_ + size > max_cached_) {
      unmap(p, size);
      return;
    }
    free_.emplace(size, p);
    cached_ += size;
  }

  // `size` bytes, 2 MiB-aligned when huge pages are asked for (THP needs aligned 2 MiB ranges).
  void *map(size_t size) const {
    const size_t align = huge_ ? kHugePage : size_t{4096};
    const size_t span = size + align;
    void *raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      return nullptr;
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = round_up(start, align);
    if (aligned > start) {
      munmap(raw, aligned - start);
    }
    const uintptr_t end = start + span;
    if (end > aligned + size) {
      munmap(reinterpret_cast<void *>(aligned + size), end - (aligned + size));
    }
    void *p = reinterpret_cast<void *>(aligned);
    if (huge_) {
      madvise(p, size, MADV_HUGEPAGE);  // advisory: ignored where THP is off
    }
    return p;
  }

  static void unmap(void *p, size_t size) { munmap(p, size); }

  c10::Allocator *fallback_;
  size_t min_bytes_;
  size_t max_cached_;
  bool huge_;
  std::mutex mu_;
  std::multimap<size_t, void *> free_;
  std::unordered_map<void *, size_t> sizes_;
  size_t cached_ = 0;
  size_t in_use_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

CachingCpuAllocator *CachingCpuAllocator::instance = nullptr;


}  // namespace

extern "C" {

// Installs the caching allocator as libtorch's CPU allocator (once; later calls return 0 and change
// nothing). Also raises glibc's trim threshold and fixes its mmap threshold at the maximum (32 MiB),
// so that the smaller blocks left to malloc (oneDNN scratch pads, small tensors) are reused from the
// heap instead of being unmapped and faulted in again. Returns 0, or 1 with a message in *err.
int crossclr_cpu_cache_install(size_t min_bytes, size_t max_cached_bytes, int huge_pages, char **err) {
  try {
    static std::mutex install_mu;
    std::lock_guard<std::mutex> lock(install_mu);
    if (CachingCpuAllocator::instance != nullptr) {
      return 0;
    }
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    // Leaked on purpose: it must outlive every tensor, including those freed by static destructors.
    auto *a = new CachingCpuAllocator(c10::GetCPUAllocator(), min_bytes, max_cached_bytes,
                                      huge_pages != 0);
    CachingCpuAllocator::instance = a;
    c10::SetCPUAllocator(a, /*priority=*/1);
    return 0;
  } catch (const std::exception &e) {
    if (err != nullptr) *err = crossclr::dup_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = crossclr::dup_message("unknown C++ exception");
  }
  return 1;
}

// 1 when the caching allocator is libtorch's current CPU allocator.
int crossclr_cpu_cache_active(void) {
  return CachingCpuAllocator::instance != nullptr &&
         c10::GetCPUAllocator() == CachingCpuAllocator::instance;
}

// Cached (free) bytes, bytes in use by live tensors, cache hits and misses (maps) so far.
void crossclr_cpu_cache_stats(int64_t *cached, int64_t *in_use, int64_t *hits, int64_t *misses) {
  *cached = 0;
  *in_use = 0;
  *hits = 0;
  *misses = 0;
  if (CachingCpuAllocator::instance != nullptr) {
    CachingCpuAllocator::instance->stats(cached, in_use, hits, misses);
  }
}

// Returns every cached free block to the system.
void crossclr_cpu_cache_release(void) {
  if (CachingCpuAllocator::instance != nullptr) {
    CachingCpuAllocator::instance->release();
  }
}

}  // extern "C"
