// Gradient buffers for the backward kernels: large, written once, and on a 2-core VM more
// expensive to obtain than to fill.
//
// A fresh [N, V] gradient from malloc is memory the kernel has never mapped: every 4 KiB page
// faults on first write and is zeroed by the kernel, and is unmapped again on free. At N=4096,
// V=128256 fp32 (2 GB) that is about 0.8 s of faults and 0.25 s of munmap on this machine, more
// than the backward kernel itself. Two remedies, both confined to these buffers:
//   - transparent huge pages (madvise MADV_HUGEPAGE where the system allows it): 512 times fewer
//     faults, a cheap unmap; the pages are zeroed all the same.
//   - reuse: the buffer of a gradient that has been freed is kept (one, the latest) and handed
//     to the next gradient of at most its size and at least half of it. A training step frees
//     its logits' gradient before the next step needs one, so from the second step on the
//     backward writes into memory that is already mapped. The cost is that memory: between
//     steps the process holds one gradient's bytes, which the step's own peak (logits and their
//     gradient alive together) already included. fastalign.empty_cache() gives it back;
//     FASTALIGN_NATIVE_GRAD_CACHE=0 turns reuse off.
// Smaller buffers come from at::empty: glibc recycles those itself.
#include "kernels.h"

#include <cstdlib>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastalign {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinSpecialBytes = size_t{32} << 20;

class GradientBuffers {
 public:
  // Leaked on purpose: gradients freed during interpreter shutdown still find it.
  static GradientBuffers& instance() {
    static GradientBuffers* buffers = new GradientBuffers();
    return *buffers;
  }

  // A block of at least `bytes` (rounded up to whole huge pages); its capacity in `capacity`.
  void* take(size_t bytes, bool reuse, size_t& capacity) {
    capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (reuse) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (kept_ != nullptr && kept_bytes_ >= capacity && kept_bytes_ / 2 <= capacity) {
        capacity = kept_bytes_;
        return std::exchange(kept_, nullptr);
      }
    }
    void* block = std::aligned_alloc(kHugePage, capacity);
    TORCH_CHECK(block != nullptr, "fastalign: could not allocate a ", capacity,
                "-byte gradient buffer (out of memory)");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(block, capacity, MADV_HUGEPAGE);  // advice only: where THP is off it changes nothing
#endif
    return block;
  }

  // Called by the tensor's deleter: keeps the block (replacing an older one) or frees it.
  void give_back(void* block, size_t capacity, bool reuse) {
    if (!reuse) {
      std::free(block);
      return;
    }
    void* older = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      older = std::exchange(kept_, block);
      kept_bytes_ = capacity;
    }
    std::free(older);  // free(nullptr) is a no-op
  }

  // Frees the kept block; returns its size.
  int64_t release() {
    void* block = nullptr;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      block = std::exchange(kept_, nullptr);
      bytes = block != nullptr ? kept_bytes_ : 0;
    }
    std::free(block);
    return static_cast<int64_t>(bytes);
  }

  int64_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_ != nullptr ? static_cast<int64_t>(kept_bytes_) : 0;
  }

 private:
  std::mutex mutex_;
  void* kept_ = nullptr;
  size_t kept_bytes_ = 0;
};

}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype, bool reuse) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t numel = c10::multiply_integers(sizes);
  TORCH_CHECK(numel >= 0, "empty_gradient: negative size in ", sizes);
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  if (bytes < kMinSpecialBytes) {
    return at::empty(sizes, options);
  }
  size_t capacity = 0;
  void* block = GradientBuffers::instance().take(bytes, reuse, capacity);
  return at::from_blob(
      block, sizes,
      [capacity, reuse](void* data) { GradientBuffers::instance().give_back(data, capacity, reuse); },
      options);
}

int64_t release_gradient_buffers() { return GradientBuffers::instance().release(); }

int64_t kept_gradient_bytes() { return GradientBuffers::instance().kept_bytes(); }

}  // namespace fastalign
