// What every op of keras_fancyrnn's kernels (gates.cc, sequence.cc) does around its arithmetic:
// check its input shapes, read inputs, allocate outputs, split the batch over threads, register
// float and double kernels.
#ifndef KERAS_FANCYRNN_KERNEL_UTIL_H_
#define KERAS_FANCYRNN_KERNEL_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

#include "shard_pool.h"

namespace keras_fancyrnn {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

// The shape checks an op starts with: input i must have the dims given, -1 matching anything.
// A mismatch fails the op with an InvalidArgument error that names the op, the input (as
// REGISTER_OP names it) and both shapes.
class Shapes {
 public:
  explicit Shapes(OpKernelContext* ctx) : ctx_(ctx) {}

  bool Check(int i, std::initializer_list<int64_t> dims) {
    const Tensor& t = ctx_->input(i);
    bool ok = t.dims() == static_cast<int>(dims.size());
    int k = 0;
    for (int64_t d : dims) {
      ok = ok && (d < 0 || t.dim_size(k) == d);
      ++k;
    }
    if (!ok) {
      std::string want;
      for (int64_t d : dims) {
        absl::StrAppend(&want, want.empty() ? "" : ", ", d < 0 ? "?" : absl::StrCat(d));
      }
      ctx_->CtxFailure(absl::InvalidArgumentError(
          absl::StrCat(ctx_->op_kernel().type_string(), ": input ", InputName(i),
                       " must have shape [", want, "], got ", t.shape().DebugString())));
    }
    return ok;
  }

  // An optional gradient input: empty (absent) or of the given shape.
  bool CheckOptional(int i, std::initializer_list<int64_t> dims) {
    return ctx_->input(i).NumElements() == 0 || Check(i, dims);
  }

 private:
  std::string InputName(int i) const {
    const ::tensorflow::OpDef* def = nullptr;
    if (::tensorflow::OpRegistry::Global()
            ->LookUpOpDef(ctx_->op_kernel().type_string(), &def)
            .ok() &&
        i < def->input_arg_size()) {
      return def->input_arg(i).name();
    }
    return absl::StrCat(i);
  }

  OpKernelContext* ctx_;
};

template <typename T>
const T* Ptr(OpKernelContext* ctx, int i) {
  return ctx->input(i).template flat<T>().data();
}

// An optional input: null where it is empty (absent).
template <typename T>
const T* OptionalPtr(OpKernelContext* ctx, int i) {
  return ctx->input(i).NumElements() == 0 ? nullptr : Ptr<T>(ctx, i);
}

// Output i (in input `reuse`'s buffer where TensorFlow allows). Null for an empty output, and
// where allocation failed, which ctx->status() then says.
template <typename T>
T* Output(OpKernelContext* ctx, int i, const TensorShape& shape, int reuse = -1) {
  Tensor* out = nullptr;
  auto status = reuse < 0 ? ctx->allocate_output(i, shape, &out)
                          : ctx->forward_input_or_allocate_output({reuse}, i, shape, &out);
  if (!status.ok()) {
    ctx->SetStatus(status);
    return nullptr;
  }
  return out->template flat<T>().data();
}

// Fewer rows than this per shard cost more in scheduling than they gain.
constexpr int64_t kMinRowsPerShard = 4;

// How many row shards ForEachShard splits a batch of B rows into: one per thread of the intra-op
// pool, with at least kMinRowsPerShard rows each.
inline int64_t NumShards(OpKernelContext* ctx, int64_t B) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return std::max<int64_t>(1, std::min<int64_t>(pool->NumThreads(), B / kMinRowsPerShard));
}

// The most rows one of those shards has.
inline int64_t RowsPerShard(OpKernelContext* ctx, int64_t B) {
  const int64_t shards = NumShards(ctx, B);
  return (B + shards - 1) / shards;
}

// Runs fn(lo, hi, s) for shard s = 0 .. NumShards - 1 with rows [lo, hi) of [0, B), one shard
// per thread: with `spin`, on the spinning workers of shard_pool.h unless another op holds them;
// else on TensorFlow's intra-op pool.
template <typename F>
void ForEachShard(OpKernelContext* ctx, int64_t B, const F& fn, bool spin = true) {
  const int64_t shards = NumShards(ctx, B);
  if (shards == 1) {
    fn(int64_t{0}, B, int64_t{0});
    return;
  }
  const auto shard = [&](int64_t s) { fn(B * s / shards, B * (s + 1) / shards, s); };
  if (spin && ShardPool::Get().Run(shards, shard)) return;
  // A cost per unit this large makes ParallelFor give every shard its own thread.
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      shards, int64_t{1} << 40, [&](int64_t first, int64_t last) {
        for (int64_t s = first; s < last; ++s) shard(s);
      });
}

// Output k of an op gets the shape of input i, for each pair (k, i).
inline absl::Status SameShapes(InferenceContext* ctx,
                               std::initializer_list<std::pair<int, int>> pairs) {
  for (const auto& p : pairs) ctx->set_output(p.first, ctx->input(p.second));
  return absl::OkStatus();
}

}  // namespace keras_fancyrnn

// The CPU kernel of op NAME for float and for double: KERNEL<float>, KERNEL<double>.
#define KFR_REGISTER_KERNEL(NAME, ...)                                              \
  REGISTER_KERNEL_BUILDER(                                                          \
      Name(NAME).Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),       \
      __VA_ARGS__<float>);                                                          \
  REGISTER_KERNEL_BUILDER(                                                          \
      Name(NAME).Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),      \
      __VA_ARGS__<double>);

#endif  // KERAS_FANCYRNN_KERNEL_UTIL_H_
