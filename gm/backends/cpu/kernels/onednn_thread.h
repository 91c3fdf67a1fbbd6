// oneDNN's sgemm held to the calling thread for a scope: the kernels split their work over the threads themselves
// (mindbooth::parallel_for), one product per thread. The setting is per thread, and chunk 0 of parallel_for runs on
// MindSpore's calling thread, so it is put back: left at 1 there, the convolution kernel ran on one core afterwards.
#pragma once
#include <oneapi/dnnl/dnnl_threadpool.h>

namespace mindbooth {

class SgemmOnThisThread {
 public:
  SgemmOnThisThread() : restore_(dnnl_threadpool_interop_get_max_concurrency(&previous_) == dnnl_success) {
    dnnl_threadpool_interop_set_max_concurrency(1);
  }
  ~SgemmOnThisThread() {
    if (restore_) dnnl_threadpool_interop_set_max_concurrency(previous_);
  }
  SgemmOnThisThread(const SgemmOnThisThread&) = delete;
  SgemmOnThisThread& operator=(const SgemmOnThisThread&) = delete;

 private:
  int previous_ = 0;  // declared first: set by the query in restore_'s initialiser
  bool restore_;
};

}  // namespace mindbooth
