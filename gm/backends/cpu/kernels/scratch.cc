// The kernels' scratch buffers (common.h ScratchFloats), kept between calls in a process-wide cache.
//
// A released buffer is kept, up to kMaxCachedBytes in all; a request takes the smallest kept buffer that is large
// enough. A request larger than every kept buffer allocates a new one and frees the largest kept buffer it outgrew,
// so that growing sizes (a network's convolutions widen level by level) replace buffers instead of piling them up.
// What is kept stays resident: at most the largest call's scratch (in SDXL's UNet, the widest Winograd
// convolution's transformed filters and chunks).
#include <mutex>

#include "common.h"

namespace {

constexpr size_t kMaxCachedBytes = size_t{1} << 30;

struct Buffer {
  float* data;
  size_t bytes;
};

struct Cache {
  std::mutex lock;
  std::vector<Buffer> kept;  // released, free for the next request
  size_t kept_bytes = 0;
};

// Never destroyed: a kernel may still run while the process exits
Cache& cache() {
  static Cache* instance = new Cache;
  return *instance;
}

}  // namespace

mindbooth::ScratchFloats::ScratchFloats(int64_t count) {
  const size_t bytes = aligned_bytes(std::max<int64_t>(count, 1));
  Cache& c = cache();
  float* outgrown = nullptr;
  {
    std::lock_guard<std::mutex> guard(c.lock);
    auto best = c.kept.end(), largest_smaller = c.kept.end();
    for (auto it = c.kept.begin(); it != c.kept.end(); ++it) {
      if (it->bytes >= bytes && (best == c.kept.end() || it->bytes < best->bytes)) best = it;
      if (it->bytes < bytes && (largest_smaller == c.kept.end() || it->bytes > largest_smaller->bytes))
        largest_smaller = it;
    }
    if (best != c.kept.end()) {
      data_ = best->data;
      bytes_ = best->bytes;
      c.kept_bytes -= best->bytes;
      c.kept.erase(best);
      return;
    }
    if (largest_smaller != c.kept.end()) {
      outgrown = largest_smaller->data;
      c.kept_bytes -= largest_smaller->bytes;
      c.kept.erase(largest_smaller);
    }
  }
  std::free(outgrown);
  data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
  bytes_ = data_ ? bytes : 0;
}

mindbooth::ScratchFloats::~ScratchFloats() {
  if (!data_) return;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.lock);
    if (c.kept_bytes + bytes_ <= kMaxCachedBytes) {
      c.kept.push_back({data_, bytes_});
      c.kept_bytes += bytes_;
      return;
    }
  }
  std::free(data_);
}

// The bytes kept for reuse now (for the tests, through ctypes)
extern "C" int64_t MindBoothScratchKeptBytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> guard(c.lock);
  return static_cast<int64_t>(c.kept_bytes);
}
