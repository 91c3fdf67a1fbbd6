// MindSpore "aot" custom-op kernels for the CPU: the signature every kernel here has, and shared helpers.
// Each kernel: params = inputs then outputs, shapes[i][0..ndims[i]), dtypes[i] like "float32"; returns 0 on success.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define MINDBOOTH_KERNEL(name) \
  extern "C" int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream, void* extra)

namespace mindbooth {

inline int64_t element_count(int ndim, const int64_t* shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// params[index] as an fp32 input or output
inline const float* input(void** params, int index) { return static_cast<const float*>(params[index]); }
inline float* output(void** params, int index) { return static_cast<float*>(params[index]); }

inline bool is_float32(const char* dtype) {
  return std::strcmp(dtype, "float32") == 0 || std::strcmp(dtype, "float") == 0;
}

inline bool is_float16(const char* dtype) { return std::strcmp(dtype, "float16") == 0; }

inline bool all_float32(int nparam, const char** dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (!is_float32(dtypes[i])) return false;
  return true;
}

// 8 floats; unaligned loads and stores, and allowed to alias float arrays (winograd.cc, attention.cc)
typedef float Lanes __attribute__((vector_size(32), aligned(4), may_alias));

// The bytes of `count` floats rounded up to whole 64-byte cache lines, as std::aligned_alloc(64, ...) requires
inline size_t aligned_bytes(int64_t count) { return (static_cast<size_t>(count) * sizeof(float) + 63) / 64 * 64; }

// `count` floats, 64-byte aligned (cache lines), uninitialised; empty if the allocation fails
using AlignedFloats = std::unique_ptr<float[], decltype(&std::free)>;
inline AlignedFloats aligned_floats(int64_t count) {
  return AlignedFloats(static_cast<float*>(std::aligned_alloc(64, aligned_bytes(count))), &std::free);
}

// `count` floats, 64-byte aligned, uninitialised, for one kernel call, from buffers kept between calls (scratch.cc):
// large buffers returned to the allocator come back as fresh pages, and faulting them in cost more than the work
// on them (a 2560 -> 1280 Winograd convolution's 470 MB of transformed filters: 0.5 s instead of 0.05 s). Empty if
// the allocation fails. Safe to use from several threads.
class ScratchFloats {
 public:
  explicit ScratchFloats(int64_t count);
  ~ScratchFloats();
  ScratchFloats(const ScratchFloats&) = delete;
  ScratchFloats& operator=(const ScratchFloats&) = delete;
  float* get() const { return data_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  float* data_ = nullptr;
  size_t bytes_ = 0;
};

// Threads for `count` items of work: one per hardware thread, at most one per item.
inline int thread_count(int64_t count) {
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::max<int64_t>(1, std::min(hardware, count)));
}

// body(begin, end, chunk) over [0, count) in `thread_count(count)` contiguous chunks, chunk 0 on the calling
// thread. Threads start per call and are joined before it returns, so none is left spinning while MindSpore's
// next kernel runs: with OpenMP's idle workers spinning, the train step's MatMuls ran 45 % slower.
template <typename Body>
void parallel_for(int64_t count, Body body) {
  const int threads = thread_count(count);
  const int64_t chunk = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(count, begin + chunk);
    if (begin < end) workers.emplace_back(body, begin, end, t);
  }
  body(0, std::min(count, chunk), 0);
  for (auto& worker : workers) worker.join();
}

// y[0, count) = the fp16 values x[0, count) in fp32, with F16C, over the threads (cast.cc, conv.cc, winograd.cc)
void float16_to_float32(const uint16_t* x, int64_t count, float* y);
// the same on the calling thread only (inside a kernel's own threads: dense.cc)
void float16_to_float32_serial(const uint16_t* x, int64_t count, float* y);

}  // namespace mindbooth
