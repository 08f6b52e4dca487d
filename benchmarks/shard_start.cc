// An op for benchmarks/shard_start.py: two shards of busy work, through TensorFlow's intra-op
// pool or through the sequence kernels' spinning workers (keras_fancyrnn/ops/kernels/
// shard_pool.h), returning when each shard started and ended, in us after the op began.
#include <chrono>

#include "shard_pool.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;

REGISTER_OP("ShardStart")
    .Input("x: float")
    .Output("times: float")
    .Attr("us: int")
    .Attr("spinning: bool")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(4));
      return absl::OkStatus();
    });

class ShardStart : public OpKernel {
 public:
  explicit ShardStart(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("us", &us_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spinning", &spinning_));
  }

  void Compute(OpKernelContext* ctx) override {
    using Clock = std::chrono::steady_clock;
    const auto begin = Clock::now();
    const auto since = [&](Clock::time_point t) {
      return static_cast<float>(std::chrono::duration<double, std::micro>(t - begin).count());
    };
    float times[4] = {0, 0, 0, 0};  // start 0, start 1, end 0, end 1
    const auto shard = [&](int64_t s) {
      const auto start = Clock::now();
      times[s] = since(start);
      while (Clock::now() - start < std::chrono::microseconds(us_)) {
      }
      times[2 + s] = since(Clock::now());
    };
    if (!spinning_ || !keras_fancyrnn::ShardPool::Get().Run(2, shard)) {
      ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
          2, int64_t{1} << 40, [&](int64_t first, int64_t last) {
            for (int64_t s = first; s < last; ++s) shard(s);
          });
    }
    ::tensorflow::Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ::tensorflow::TensorShape({4}), &out));
    for (int i = 0; i < 4; ++i) out->flat<float>()(i) = times[i];
  }

 private:
  int us_ = 0;
  bool spinning_ = false;
};

REGISTER_KERNEL_BUILDER(Name("ShardStart").Device(::tensorflow::DEVICE_CPU), ShardStart);

}  // namespace
