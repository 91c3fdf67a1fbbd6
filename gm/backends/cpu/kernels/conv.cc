// Stride-1 2-D convolution, forward and input gradient, fp32, through oneDNN: the copy MindSpore itself ships
// (mindspore/lib/libdnnl.so.3), driven with the layouts oneDNN picks (format "any": blocked or channels-last)
// instead of the plain NCHW that MindSpore's Conv2D and our im2col + BatchMatMul work in. On the UNet's 3x3
// convolutions this is faster than im2col + BatchMatMul (docs/performance.md, "Convolution kernel (oneDNN, Winograd)").
// The plain tensors are reordered into and out of oneDNN's layouts per call; the weight too (a frozen weight,
// in fp32 or as stored in fp16, which is converted first).
// Threads: oneDNN's threadpool interface over mindbooth::parallel_for (threads per call, none left spinning).
// The 3x3 padding-1 convolutions of large enough batches go to Winograd's F(4x4, 3x3) instead (winograd.cc), which
// oneDNN has only for AVX-512 machines: a quarter of the multiplications; the 1x1 ones to oneDNN's sgemm.
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_threadpool.h>
#include <oneapi/dnnl/dnnl_threadpool_iface.hpp>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#include "common.h"
#include "onednn_thread.h"
#include "winograd.h"

namespace {

thread_local bool inside_parallel_region = false;

class CallThreads final : public dnnl::threadpool_interop::threadpool_iface {
 public:
  int get_num_threads() const override { return mindbooth::thread_count(std::numeric_limits<int>::max()); }
  bool get_in_parallel() const override { return inside_parallel_region; }
  uint64_t get_flags() const override { return 0; }  // synchronous: parallel_for returns when all tasks are done
  void wait() override {}
  void parallel_for(int tasks, const std::function<void(int, int)>& fn) override {
    mindbooth::parallel_for(tasks, [&](int64_t begin, int64_t end, int) {
      const bool outer = inside_parallel_region;
      inside_parallel_region = true;
      for (int64_t task = begin; task < end; ++task) fn(static_cast<int>(task), tasks);
      inside_parallel_region = outer;
    });
  }
};

struct Failure {
  const char* what;
  dnnl_status_t status;
};

void check(dnnl_status_t status, const char* what) {
  if (status != dnnl_success) throw Failure{what, status};
}

template <typename T, dnnl_status_t (*destroy)(T)>
struct Deleter {
  void operator()(T handle) const { destroy(handle); }
};
template <typename T, dnnl_status_t (*destroy)(T)>
using Handle = std::unique_ptr<std::remove_pointer_t<T>, Deleter<T, destroy>>;
using MemoryDesc = Handle<dnnl_memory_desc_t, dnnl_memory_desc_destroy>;
using Memory = Handle<dnnl_memory_t, dnnl_memory_destroy>;
using PrimitiveDesc = Handle<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy>;
using Primitive = Handle<dnnl_primitive_t, dnnl_primitive_destroy>;
using Attributes = Handle<dnnl_primitive_attr_t, dnnl_primitive_attr_destroy>;

dnnl_engine_t engine() {
  static dnnl_engine_t cpu = [] {
    dnnl_engine_t created = nullptr;
    check(dnnl_engine_create(&created, dnnl_cpu, 0), "engine");
    return created;
  }();
  return cpu;
}

dnnl_stream_t stream() {  // one per calling thread, each with its own thread pool object
  thread_local CallThreads threads;
  thread_local dnnl_stream_t created = [] {
    dnnl_stream_t s = nullptr;
    check(dnnl_threadpool_interop_stream_create(&s, engine(), &threads), "stream");
    return s;
  }();
  return created;
}

MemoryDesc plain_desc(const int64_t* shape, dnnl_format_tag_t tag) {
  dnnl_memory_desc_t desc = nullptr;
  dnnl_dims_t dims = {shape[0], shape[1], shape[2], shape[3]};
  check(dnnl_memory_desc_create_with_tag(&desc, 4, dims, dnnl_f32, tag), "memory descriptor");
  return MemoryDesc(desc);
}

void execute(dnnl_primitive_t primitive, std::initializer_list<dnnl_exec_arg_t> args) {
  check(dnnl_primitive_execute(primitive, stream(), static_cast<int>(args.size()), args.begin()), "execute");
}

void reorder(dnnl_memory_t from, dnnl_memory_t to) {
  const_dnnl_memory_desc_t from_desc, to_desc;
  check(dnnl_memory_get_memory_desc(from, &from_desc), "reorder source");
  check(dnnl_memory_get_memory_desc(to, &to_desc), "reorder target");
  dnnl_primitive_desc_t desc = nullptr;
  check(dnnl_reorder_primitive_desc_create(&desc, from_desc, engine(), to_desc, engine(), nullptr), "reorder");
  PrimitiveDesc owned_desc(desc);
  dnnl_primitive_t primitive = nullptr;
  check(dnnl_primitive_create(&primitive, desc), "reorder primitive");
  Primitive owned(primitive);
  execute(primitive, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
}

Memory wrap(const_dnnl_memory_desc_t desc, void* data) {  // data == DNNL_MEMORY_ALLOCATE: oneDNN allocates
  dnnl_memory_t memory = nullptr;
  check(dnnl_memory_create(&memory, desc, engine(), data), "memory");
  return Memory(memory);
}

// The user's plain tensor as the primitive wants it: the tensor itself, or a reordered copy.
struct Operand {
  Memory plain, chosen;
  Operand(const_dnnl_memory_desc_t plain_desc, void* data, const_dnnl_memory_desc_t chosen_desc, bool is_input)
      : plain(wrap(plain_desc, data)) {
    if (dnnl_memory_desc_equal(plain_desc, chosen_desc)) return;
    chosen = wrap(chosen_desc, DNNL_MEMORY_ALLOCATE);
    if (is_input) reorder(plain.get(), chosen.get());
  }
  dnnl_memory_t get() const { return chosen ? chosen.get() : plain.get(); }
  void write_back() const {
    if (chosen) reorder(chosen.get(), plain.get());
  }
};

Attributes user_scratchpad() {  // the scratchpad lives for one call, not for the primitive cache's lifetime
  dnnl_primitive_attr_t attr = nullptr;
  check(dnnl_primitive_attr_create(&attr), "attributes");
  Attributes owned(attr);
  check(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "scratchpad mode");
  return owned;
}

struct Convolution {
  MemoryDesc src, weights, dst, any_src, any_weights, any_dst;
  dnnl_dims_t strides = {1, 1}, dilation = {0, 0}, padding;
  Attributes attributes = user_scratchpad();

  Convolution(const int64_t* src_shape, const int64_t* weights_shape, const int64_t* dst_shape, int64_t pad)
      : src(plain_desc(src_shape, dnnl_abcd)),
        weights(plain_desc(weights_shape, dnnl_abcd)),
        dst(plain_desc(dst_shape, dnnl_abcd)),
        any_src(plain_desc(src_shape, dnnl_format_tag_any)),
        any_weights(plain_desc(weights_shape, dnnl_format_tag_any)),
        any_dst(plain_desc(dst_shape, dnnl_format_tag_any)),
        padding{pad, pad} {}

  PrimitiveDesc forward(dnnl_prop_kind_t kind) {
    dnnl_primitive_desc_t desc = nullptr;
    check(dnnl_convolution_forward_primitive_desc_create(&desc, engine(), kind, dnnl_convolution_direct,
                                                          any_src.get(), any_weights.get(), nullptr, any_dst.get(),
                                                          strides, dilation, padding, padding, attributes.get()),
          "convolution");
    return PrimitiveDesc(desc);
  }

  PrimitiveDesc backward_data() {
    PrimitiveDesc hint = forward(dnnl_forward_training);
    dnnl_primitive_desc_t desc = nullptr;
    check(dnnl_convolution_backward_data_primitive_desc_create(
              &desc, engine(), dnnl_convolution_direct, any_src.get(), any_weights.get(), any_dst.get(), strides,
              dilation, padding, padding, hint.get(), attributes.get()),
          "convolution backward");
    return PrimitiveDesc(desc);
  }
};

const_dnnl_memory_desc_t query(const PrimitiveDesc& desc, dnnl_query_t what) {
  return dnnl_primitive_desc_query_md(desc.get(), what, 0);
}

void run(const PrimitiveDesc& desc, std::initializer_list<dnnl_exec_arg_t> args) {
  dnnl_primitive_t primitive = nullptr;
  check(dnnl_primitive_create(&primitive, desc.get()), "primitive");  // oneDNN's primitive cache makes this cheap
  Primitive owned(primitive);
  Memory scratchpad = wrap(query(desc, dnnl_query_scratchpad_md), DNNL_MEMORY_ALLOCATE);
  std::vector<dnnl_exec_arg_t> all(args);
  all.push_back({DNNL_ARG_SCRATCHPAD, scratchpad.get()});
  check(dnnl_primitive_execute(primitive, stream(), static_cast<int>(all.size()), all.data()), "execute");
}

using mindbooth::is_float16;
using mindbooth::is_float32;

// x, config and y in fp32; the weight in fp32 or fp16 (a frozen weight as stored: no fp32 copy made before)
bool valid(int nparam, int* ndims, const char** dtypes) {
  return nparam == 4 && ndims[0] == 4 && ndims[1] == 4 && ndims[3] == 4 && is_float32(dtypes[0]) &&
         (is_float32(dtypes[1]) || is_float16(dtypes[1])) && is_float32(dtypes[2]) &&
         is_float32(dtypes[3]);
}

// The weight in fp32 for oneDNN: itself, or its fp16 values converted into `storage`
const float* weight_float32(void** params, const char** dtypes, int64_t** shapes,
                            std::optional<mindbooth::ScratchFloats>& storage) {
  if (is_float32(dtypes[1])) return mindbooth::input(params, 1);
  const int64_t count = mindbooth::element_count(4, shapes[1]);
  storage.emplace(count);  // every value written below: no zero-filling first
  if (!*storage) throw Failure{"weight buffer", dnnl_out_of_memory};
  mindbooth::float16_to_float32(static_cast<const uint16_t*>(params[1]), count, storage->get());
  return storage->get();
}

// config = [padding, algorithm]: 0 Winograd where it applies and pays, 1 oneDNN's direct convolution, 2 Winograd
// wherever it applies. Winograd pays where the batch has enough 4x4 output tiles: with fewer than kWinogradMinTiles
// its GEMMs are small and transforming the filters (4x the weight's size) costs more than it saves (1280 channels
// at 8x8, batch 2: 1.1-1.4x the direct convolution's time; at 16x16: 0.7-0.8x).
constexpr int64_t kWinogradMinTiles = 32;

bool use_winograd(int64_t batch, int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t height,
                  int64_t width, const float* config, int64_t config_size) {
  const int64_t padding = static_cast<int64_t>(config[0]);
  const int algorithm = config_size > 1 ? static_cast<int>(config[1]) : 0;
  if (algorithm == 1 || !mindbooth::winograd_applies(in_channels, out_channels, kernel, padding)) return false;
  return algorithm == 2 || batch * ((height + 3) / 4) * ((width + 3) / 4) >= kWinogradMinTiles;
}

// Both kernels' Winograd path, where use_winograd picks it: the kernel's result (0, or 1 on failure), or -1 where the
// direct convolution computes it. `transposed`: the input gradient (params[0] is the output's gradient, and the
// weight's first axis is its channels).
int try_winograd(void** params, const char** dtypes, int64_t** shapes, bool transposed) {
  const int64_t *x_shape = shapes[0], *w_shape = shapes[1];
  const int64_t in_channels = w_shape[transposed ? 0 : 1], out_channels = w_shape[transposed ? 1 : 0];
  if (!use_winograd(x_shape[0], in_channels, out_channels, w_shape[2], x_shape[2], x_shape[3],
                    mindbooth::input(params, 2), shapes[2][0]))
    return -1;
  const bool done = mindbooth::winograd_conv3x3(mindbooth::input(params, 0), params[1], !is_float32(dtypes[1]),
                                                transposed, x_shape[0], in_channels, out_channels, x_shape[2],
                                                x_shape[3], mindbooth::output(params, 3));
  return done ? 0 : 1;
}

int report(const Failure& failure, const char* kernel) {
  std::fprintf(stderr, "MindBooth %s: oneDNN %s failed (status %d)\n", kernel, failure.what, failure.status);
  return 1;
}

// The 1x1 convolution is a GEMM per image in NCHW itself: y[n] (O, HW) = W (O, C) x[n] (C, HW), and the input
// gradient dx[n] (C, HW) = W^T dy[n] (O, HW). oneDNN's direct convolution reorders both activations into and out
// of its blocked layout per call, which made the UNet's skip connections run at a third of the sgemm's rate. The
// images, and where there are fewer images than threads their output rows, go over the threads, each product on
// one thread (oneDNN's sgemm held to it, as in winograd.cc). `transposed`: the input gradient.
bool pointwise(const float* x, const float* weight, int64_t batch, int64_t in_channels, int64_t out_channels,
               int64_t pixels, bool transposed, float* y) {
  // the product's rows are the output's channels: O for the convolution, C for its input gradient
  const int64_t rows = transposed ? in_channels : out_channels, depth = transposed ? out_channels : in_channels;
  const int64_t parts = std::max<int64_t>(1, mindbooth::thread_count(std::numeric_limits<int>::max()) / batch);
  const int64_t part_rows = (rows + parts - 1) / parts;
  std::atomic<bool> failed{false};
  mindbooth::parallel_for(batch * parts, [&](int64_t begin, int64_t end, int) {
    const mindbooth::SgemmOnThisThread one_thread;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / parts, row0 = (task % parts) * part_rows;
      const int64_t count = std::min(rows, row0 + part_rows) - row0;
      if (count <= 0) continue;
      // row-major: W is (O, C); the input gradient's rows row0.. of W^T are W's columns row0..
      const float* a = transposed ? weight + row0 : weight + row0 * in_channels;
      if (dnnl_sgemm(transposed ? 'T' : 'N', 'N', count, pixels, depth, 1.0f, a, in_channels,
                     x + image * depth * pixels, pixels, 0.0f, y + (image * rows + row0) * pixels, pixels) != dnnl_success)
        failed = true;
    }
  });
  return !failed;
}

// Both kernels' 1x1 path: the kernel's result (0, or 1 on failure), or -1 where the kernel is not 1x1 unpadded
int try_pointwise(void** params, const char** dtypes, int64_t** shapes, bool transposed) {
  const int64_t *x_shape = shapes[0], *w_shape = shapes[1];
  if (w_shape[2] != 1 || w_shape[3] != 1 || static_cast<int64_t>(mindbooth::input(params, 2)[0]) != 0) return -1;
  try {
    std::optional<mindbooth::ScratchFloats> converted;
    const float* weight = weight_float32(params, dtypes, shapes, converted);
    return pointwise(mindbooth::input(params, 0), weight, x_shape[0], w_shape[1], w_shape[0], x_shape[2] * x_shape[3],
                     transposed, mindbooth::output(params, 3))
               ? 0
               : 1;
  } catch (const Failure& failure) {
    return report(failure, transposed ? "Conv2dBackwardData" : "Conv2dForward");
  }
}

}  // namespace

// x (N, C, H, W), weight (O, C, k, k) in fp32 or fp16, config = [padding, algorithm] -> y (N, O, H + 2p - k + 1, W + 2p - k + 1)
MINDBOOTH_KERNEL(Conv2dForward) {
  if (!valid(nparam, ndims, dtypes)) return 1;
  if (const int result = try_winograd(params, dtypes, shapes, false); result >= 0) return result;
  if (const int result = try_pointwise(params, dtypes, shapes, false); result >= 0) return result;
  try {
    Convolution conv(shapes[0], shapes[1], shapes[3], static_cast<int64_t>(mindbooth::input(params, 2)[0]));
    PrimitiveDesc desc = conv.forward(dnnl_forward_inference);
    Operand x(conv.src.get(), params[0], query(desc, dnnl_query_src_md), true);
    std::optional<mindbooth::ScratchFloats> converted;
    Operand weight(conv.weights.get(), const_cast<float*>(weight_float32(params, dtypes, shapes, converted)),
                   query(desc, dnnl_query_weights_md), true);
    Operand y(conv.dst.get(), params[3], query(desc, dnnl_query_dst_md), false);
    run(desc, {{DNNL_ARG_SRC, x.get()}, {DNNL_ARG_WEIGHTS, weight.get()}, {DNNL_ARG_DST, y.get()}});
    y.write_back();
  } catch (const Failure& failure) {
    return report(failure, "Conv2dForward");
  }
  return 0;
}

// dy (N, O, Ho, Wo), weight (O, C, k, k) in fp32 or fp16, config = [padding, algorithm] -> dx (N, C, H, W): the input gradient
MINDBOOTH_KERNEL(Conv2dBackwardData) {
  if (!valid(nparam, ndims, dtypes)) return 1;
  if (const int result = try_winograd(params, dtypes, shapes, true); result >= 0) return result;
  if (const int result = try_pointwise(params, dtypes, shapes, true); result >= 0) return result;
  try {
    Convolution conv(shapes[3], shapes[1], shapes[0], static_cast<int64_t>(mindbooth::input(params, 2)[0]));
    PrimitiveDesc desc = conv.backward_data();
    Operand dy(conv.dst.get(), params[0], query(desc, dnnl_query_diff_dst_md), true);
    std::optional<mindbooth::ScratchFloats> converted;
    Operand weight(conv.weights.get(), const_cast<float*>(weight_float32(params, dtypes, shapes, converted)),
                   query(desc, dnnl_query_weights_md), true);
    Operand dx(conv.src.get(), params[3], query(desc, dnnl_query_diff_src_md), false);
    run(desc, {{DNNL_ARG_DIFF_DST, dy.get()}, {DNNL_ARG_WEIGHTS, weight.get()}, {DNNL_ARG_DIFF_SRC, dx.get()}});
    dx.write_back();
  } catch (const Failure& failure) {
    return report(failure, "Conv2dBackwardData");
  }
  return 0;
}
