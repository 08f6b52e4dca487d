// Whole-sequence recurrences (keras_fancyrnn.native): every timestep of an LSTM, GRU or
// SimpleRNN layer in one op, and its gradient in another.
//
// The input projection x W + b is not here: the caller computes it for all timesteps as one
// large TensorFlow matmul (oneDNN), and likewise the recurrent kernel's gradient
// sum_t h_{t-1}^T dz_t. What is left is the part that must run step by step: h_{t-1} U (Eigen's
// matrix product), the gate equations (gate_math.h) and, backward, dz_t U^T. Batch rows do not
// interact, so the batch is split into one shard per thread of TensorFlow's intra-op pool and
// each thread runs its rows through all timesteps without waiting for the others.
//
// Layouts are time-major: xp [T, B, k H], states [B, H], U [H, k H], sequences [T, B, H].
#include <algorithm>
#include <string>
#include <vector>

#include "gate_math.h"
#include "small_gemm.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace keras_fancyrnn {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

// Fewer rows than this per shard cost more in scheduling than they gain.
constexpr int64_t kMinRowsPerShard = 4;

// Runs fn(lo, hi) over row ranges of [0, B), one per thread of the intra-op pool.
template <typename F>
void ForEachShard(OpKernelContext* ctx, int64_t B, const F& fn) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t shards =
      std::max<int64_t>(1, std::min<int64_t>(pool->NumThreads(), B / kMinRowsPerShard));
  if (shards == 1) {
    fn(0, B);
    return;
  }
  // A cost per unit this large makes ParallelFor give every shard its own thread.
  pool->ParallelFor(shards, int64_t{1} << 40, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) fn(B * s / shards, B * (s + 1) / shards);
  });
}

// The shape checks every kernel starts with. Dimension -1 matches anything.
class Shapes {
 public:
  Shapes(OpKernelContext* ctx, std::vector<const char*> names) : ctx_(ctx), names_(names) {}

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
      ctx_->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
          ctx_->op_kernel().type_string(), ": input ", names_[i], " must have shape [", want,
          "], got ",
          t.shape().DebugString())));
    }
    return ok;
  }

  // An optional gradient input: empty (absent) or of the given shape.
  bool CheckOptional(int i, std::initializer_list<int64_t> dims) {
    return ctx_->input(i).NumElements() == 0 || Check(i, dims);
  }

 private:
  OpKernelContext* ctx_;
  std::vector<const char*> names_;
};

template <typename T>
const T* Ptr(OpKernelContext* ctx, int i) {
  return ctx->input(i).template flat<T>().data();
}

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

// Row pointer: sequence `p` (row width w) at time t, batch row b.
template <typename T>
inline T* At(T* p, int64_t t, int64_t B, int64_t b, int64_t w) {
  return p + (t * B + b) * w;
}

// The state before step t: the initial state at t = 0, else the sequence's step t - 1.
template <typename T>
inline const T* Prev(const T* seq, const T* initial, int64_t t, int64_t B, int64_t b, int64_t w) {
  return t == 0 ? initial + b * w : At(seq, t - 1, B, b, w);
}

// Rows [lo, hi) of the state after the last step (the initial state if there is no step) into
// `last` [B, H].
template <typename T>
void CopyLast(const T* seq, const T* initial, int64_t S, int64_t B, int64_t H, int64_t lo,
              int64_t hi, T* last) {
  std::copy_n(Prev<T>(seq, initial, S, B, lo, H), (hi - lo) * H, last + lo * H);
}

// Rows [lo, hi) of an optional [T, B, H] gradient at step t added to `carry` (rows lo.. of it).
template <typename T>
void AddStep(const T* grad, int64_t t, int64_t B, int64_t H, int64_t lo, int64_t hi, T* carry) {
  if (grad == nullptr) return;
  Out<T>(carry, (hi - lo) * H) += In<T>(At(grad, t, B, lo, H), (hi - lo) * H);
}

// ---------------------------------------------------------------------------------------------
// LSTM. Inputs xp [T, B, 4H], h0, c0 [B, H], u [H, 4H]. Outputs z = xp + h_{t-1} U [T, B, 4H]
// (in xp's buffer where TensorFlow allows), h, c [T, B, H], and the final h_T, c_T [B, H] (their
// own outputs, so that a layer that returns only them sends no [T, B, H] gradient back).

template <typename T>
class LstmSequence : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(1);
    Shapes shapes(ctx, {"xp", "h0", "c0", "u"});
    if (!shapes.Check(1, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1);
    if (!shapes.Check(0, {-1, B, 4 * H}) || !shapes.Check(2, {B, H}) ||
        !shapes.Check(3, {H, 4 * H}))
      return;
    const Tensor& xp = ctx->input(0);
    const int64_t S = xp.dim_size(0);
    T* z = Output<T>(ctx, 0, xp.shape(), 0);
    T* h = Output<T>(ctx, 1, TensorShape({S, B, H}));
    T* c = Output<T>(ctx, 2, TensorShape({S, B, H}));
    T* h_last = Output<T>(ctx, 3, h0.shape());
    T* c_last = Output<T>(ctx, 4, h0.shape());
    if (!ctx->status().ok()) return;
    if (z != Ptr<T>(ctx, 0)) std::copy_n(Ptr<T>(ctx, 0), xp.NumElements(), z);
    const T *h_0 = Ptr<T>(ctx, 1), *c_0 = Ptr<T>(ctx, 2);
    const RecurrentKernel<T> u(Ptr<T>(ctx, 3), H, 4 * H, false);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      for (int64_t t = 0; t < S; ++t) {
        u.Multiply(Prev<T>(h, h_0, t, B, lo, H), hi - lo, At(z, t, B, lo, 4 * H), true);
        for (int64_t b = lo; b < hi; ++b) {
          LstmRow<T>(At(z, t, B, b, 4 * H), Prev<T>(c, c_0, t, B, b, H), nullptr,
                     At(h, t, B, b, H), At(c, t, B, b, H), H);
        }
      }
      CopyLast<T>(h, h_0, S, B, H, lo, hi, h_last);
      CopyLast<T>(c, c_0, S, B, H, lo, hi, c_last);
    });
  }
};

// Inputs dh, dc (gradients of the h and c sequences), dz_in (of the z output; each empty where
// there is none, else [T, B, H] or [T, B, 4H]), z, c, c0, u, dh_last, dc_last [B, H]. Outputs
// dz [T, B, 4H] (= d xp; in z's buffer where TensorFlow allows), dh0, dc0.
template <typename T>
class LstmSequenceGrad : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& c0 = ctx->input(5);
    Shapes shapes(ctx, {"dh", "dc", "dz_in", "z", "c", "c0", "u", "dh_last", "dc_last"});
    if (!shapes.Check(5, {-1, -1})) return;
    const int64_t B = c0.dim_size(0), H = c0.dim_size(1), S = ctx->input(3).dim_size(0);
    if (!shapes.Check(3, {-1, B, 4 * H}) || !shapes.CheckOptional(0, {S, B, H}) ||
        !shapes.CheckOptional(1, {S, B, H}) || !shapes.CheckOptional(2, {S, B, 4 * H}) ||
        !shapes.Check(4, {S, B, H}) || !shapes.Check(6, {H, 4 * H}) ||
        !shapes.Check(7, {B, H}) || !shapes.Check(8, {B, H}))
      return;
    const T *z = Ptr<T>(ctx, 3), *dz_in = OptionalPtr<T>(ctx, 2);
    T* dz = Output<T>(ctx, 0, ctx->input(3).shape(), 3);
    T* dh0 = Output<T>(ctx, 1, c0.shape());
    T* dc0 = Output<T>(ctx, 2, c0.shape());
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *dc = OptionalPtr<T>(ctx, 1), *c = Ptr<T>(ctx, 4),
            *c_0 = Ptr<T>(ctx, 5), *dh_last = Ptr<T>(ctx, 7), *dc_last = Ptr<T>(ctx, 8);
    const RecurrentKernel<T> u_t(Ptr<T>(ctx, 6), 4 * H, H, true);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo;
      // dh_carry = dz_{t+1} U^T and dc_carry = ∂ℓ/∂c_t through c_{t+1}, for this shard's rows.
      T *dh_carry = dh0 + lo * H, *dc_carry = dc0 + lo * H;
      std::copy_n(dh_last + lo * H, n * H, dh_carry);
      std::copy_n(dc_last + lo * H, n * H, dc_carry);
      LstmScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        AddStep(dh, t, B, H, lo, hi, dh_carry);  // now the total ∂ℓ/∂h_t
        AddStep(dc, t, B, H, lo, hi, dc_carry);
        for (int64_t b = lo; b < hi; ++b) {
          T* dcb = dc_carry + (b - lo) * H;
          T* dzb = At(dz, t, B, b, 4 * H);
          LstmRowGrad<T>(dh_carry + (b - lo) * H, dcb, At(z, t, B, b, 4 * H),
                         Prev<T>(c, c_0, t, B, b, H), nullptr, dzb, dcb, nullptr, H, scratch);
          if (dz_in != nullptr) Out<T>(dzb, 4 * H) += In<T>(At(dz_in, t, B, b, 4 * H), 4 * H);
        }
        u_t.Multiply(At(dz, t, B, lo, 4 * H), n, dh_carry, false);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// GRU (reset_after=True). Inputs xp [T, B, 3H] (x W + b_in), h0 [B, H], u [H, 3H], b_rec [3H].
// Outputs h [T, B, H], rec = h_{t-1} U + b_rec [T, B, 3H] (kept for the gradient), h_T [B, H].

template <typename T>
class GruSequence : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(1);
    Shapes shapes(ctx, {"xp", "h0", "u", "b_rec"});
    if (!shapes.Check(1, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1);
    if (!shapes.Check(0, {-1, B, 3 * H}) || !shapes.Check(2, {H, 3 * H}) ||
        !shapes.Check(3, {3 * H}))
      return;
    const int64_t S = ctx->input(0).dim_size(0);
    T* h = Output<T>(ctx, 0, TensorShape({S, B, H}));
    T* rec = Output<T>(ctx, 1, ctx->input(0).shape());
    T* h_last = Output<T>(ctx, 2, h0.shape());
    if (!ctx->status().ok()) return;
    const T *xp = Ptr<T>(ctx, 0), *h_0 = Ptr<T>(ctx, 1);
    const RecurrentKernel<T> u(Ptr<T>(ctx, 2), H, 3 * H, false);
    Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> b_rec(Ptr<T>(ctx, 3), 3 * H);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      GruScratch<T> scratch(H);
      for (int64_t t = 0; t < S; ++t) {
        MatOut<T> rec_t(At(rec, t, B, lo, 3 * H), hi - lo, 3 * H);
        u.Multiply(Prev<T>(h, h_0, t, B, lo, H), hi - lo, rec_t.data(), false);
        rec_t.rowwise() += b_rec;
        for (int64_t b = lo; b < hi; ++b) {
          GruRow<T>(At(xp, t, B, b, 3 * H), At(rec, t, B, b, 3 * H), Prev<T>(h, h_0, t, B, b, H),
                    At(h, t, B, b, H), H, scratch);
        }
      }
      CopyLast<T>(h, h_0, S, B, H, lo, hi, h_last);
    });
  }
};

// Inputs dh, drec_in (gradients of the h and rec outputs: each empty where there is none, else
// [T, B, H] or [T, B, 3H]), xp, rec, h, h0, u, dh_last [B, H]. Outputs d xp, d rec [T, B, 3H]
// (in the buffers of xp and rec where TensorFlow allows) and dh0.
template <typename T>
class GruSequenceGrad : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(5);
    Shapes shapes(ctx, {"dh", "drec_in", "xp", "rec", "h", "h0", "u", "dh_last"});
    if (!shapes.Check(5, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1), S = ctx->input(2).dim_size(0);
    if (!shapes.Check(2, {-1, B, 3 * H}) || !shapes.CheckOptional(0, {S, B, H}) ||
        !shapes.CheckOptional(1, {S, B, 3 * H}) || !shapes.Check(3, {S, B, 3 * H}) ||
        !shapes.Check(4, {S, B, H}) || !shapes.Check(6, {H, 3 * H}) || !shapes.Check(7, {B, H}))
      return;
    // d xp and d rec in the buffers of xp and rec where TensorFlow allows (GruRowGrad reads a
    // row of each before it writes the same row of the gradients).
    T* dxp = Output<T>(ctx, 0, ctx->input(2).shape(), 2);
    T* drec = Output<T>(ctx, 1, ctx->input(3).shape(), 3);
    T* dh0 = Output<T>(ctx, 2, h0.shape());
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *drec_in = OptionalPtr<T>(ctx, 1), *xp = Ptr<T>(ctx, 2),
            *rec = Ptr<T>(ctx, 3), *h = Ptr<T>(ctx, 4), *h_0 = Ptr<T>(ctx, 5),
            *dh_last = Ptr<T>(ctx, 7);
    const RecurrentKernel<T> u_t(Ptr<T>(ctx, 6), 3 * H, H, true);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo;
      MatOut<T> dh_carry(dh0 + lo * H, n, H);  // ∂ℓ/∂h_t through step t + 1
      std::copy_n(dh_last + lo * H, n * H, dh_carry.data());
      RowMat<T> direct(n, H);  // the part of ∂ℓ/∂h_{t-1} that does not pass through rec
      GruScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        AddStep(dh, t, B, H, lo, hi, dh_carry.data());  // now the total ∂ℓ/∂h_t
        for (int64_t b = lo; b < hi; ++b) {
          T* drb = At(drec, t, B, b, 3 * H);
          GruRowGrad<T>(dh_carry.data() + (b - lo) * H, At(xp, t, B, b, 3 * H),
                        At(rec, t, B, b, 3 * H),
                        Prev<T>(h, h_0, t, B, b, H), At(dxp, t, B, b, 3 * H), drb,
                        direct.data() + (b - lo) * H, H, scratch);
          if (drec_in != nullptr) Out<T>(drb, 3 * H) += In<T>(At(drec_in, t, B, b, 3 * H), 3 * H);
        }
        u_t.Multiply(At(drec, t, B, lo, 3 * H), n, dh_carry.data(), false);
        dh_carry += direct;
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// GRU (reset_after=False: the reset gate before the product). Inputs xp [T, B, 3H] (x W + b),
// h0 [B, H], u [H, 3H]. Outputs h [T, B, H]; rec [T, B, 3H] = [h_{t-1} U_z, h_{t-1} U_r,
// (r h_{t-1}) U_h] and rh = r h_{t-1} [T, B, H] (kept for the gradient); h_T [B, H]. Two
// dependent products a step: [U_z U_r] and U_h, blocks of u (rows 3H apart).

template <typename T>
class GruBeforeSequence : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(1);
    Shapes shapes(ctx, {"xp", "h0", "u"});
    if (!shapes.Check(1, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1);
    if (!shapes.Check(0, {-1, B, 3 * H}) || !shapes.Check(2, {H, 3 * H})) return;
    const int64_t S = ctx->input(0).dim_size(0);
    T* h = Output<T>(ctx, 0, TensorShape({S, B, H}));
    T* rec = Output<T>(ctx, 1, ctx->input(0).shape());
    T* rh = Output<T>(ctx, 2, TensorShape({S, B, H}));
    T* h_last = Output<T>(ctx, 3, h0.shape());
    if (!ctx->status().ok()) return;
    const T *xp = Ptr<T>(ctx, 0), *h_0 = Ptr<T>(ctx, 1), *u = Ptr<T>(ctx, 2);
    const RecurrentKernel<T> u_zr(u, H, 2 * H, false, 3 * H), u_h(u + 2 * H, H, H, false, 3 * H);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo;
      GruScratch<T> scratch(H);
      std::vector<T> z(n * H);
      for (int64_t t = 0; t < S; ++t) {
        T* rec_t = At(rec, t, B, lo, 3 * H);
        u_zr.Multiply(Prev<T>(h, h_0, t, B, lo, H), n, rec_t, false, H, 3 * H);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeGates<T>(At(xp, t, B, b, 3 * H), At(rec, t, B, b, 3 * H),
                            Prev<T>(h, h_0, t, B, b, H), z.data() + (b - lo) * H,
                            At(rh, t, B, b, H), H);
        }
        u_h.Multiply(At(rh, t, B, lo, H), n, rec_t + 2 * H, false, H, 3 * H);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRow<T>(At(xp, t, B, b, 3 * H), At(rec, t, B, b, 3 * H),
                          Prev<T>(h, h_0, t, B, b, H), z.data() + (b - lo) * H,
                          At(h, t, B, b, H), H, scratch);
        }
      }
      CopyLast<T>(h, h_0, S, B, H, lo, hi, h_last);
    });
  }
};

// Inputs dh, drec_in, drh_in (gradients of the h, rec and rh outputs: each empty where there is
// none, else [T, B, H], [T, B, 3H], [T, B, H]), xp, rec, h, h0, u, dh_last [B, H]. Outputs d xp,
// d rec [T, B, 3H] (in the buffers of xp and rec where TensorFlow allows) and dh0.
template <typename T>
class GruBeforeSequenceGrad : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(6);
    Shapes shapes(ctx, {"dh", "drec_in", "drh_in", "xp", "rec", "h", "h0", "u", "dh_last"});
    if (!shapes.Check(6, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1), S = ctx->input(3).dim_size(0);
    if (!shapes.Check(3, {-1, B, 3 * H}) || !shapes.CheckOptional(0, {S, B, H}) ||
        !shapes.CheckOptional(1, {S, B, 3 * H}) || !shapes.CheckOptional(2, {S, B, H}) ||
        !shapes.Check(4, {S, B, 3 * H}) || !shapes.Check(5, {S, B, H}) ||
        !shapes.Check(7, {H, 3 * H}) || !shapes.Check(8, {B, H}))
      return;
    T* dxp = Output<T>(ctx, 0, ctx->input(3).shape(), 3);
    T* drec = Output<T>(ctx, 1, ctx->input(4).shape(), 4);
    T* dh0 = Output<T>(ctx, 2, h0.shape());
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *drec_in = OptionalPtr<T>(ctx, 1),
            *drh_in = OptionalPtr<T>(ctx, 2), *xp = Ptr<T>(ctx, 3), *rec = Ptr<T>(ctx, 4),
            *h = Ptr<T>(ctx, 5), *h_0 = Ptr<T>(ctx, 6), *u = Ptr<T>(ctx, 7),
            *dh_last = Ptr<T>(ctx, 8);
    // U_h^T and [U_z U_r]^T
    const RecurrentKernel<T> u_h_t(u + 2 * H, H, H, true, 3 * H), u_zr_t(u, 2 * H, H, true, 3 * H);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo;
      T* dh_carry = dh0 + lo * H;  // ∂ℓ/∂h_t through step t + 1
      std::copy_n(dh_last + lo * H, n * H, dh_carry);
      RowMat<T> direct(n, H), d_rh(n, H);
      GruScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        AddStep(dh, t, B, H, lo, hi, dh_carry);  // now the total ∂ℓ/∂h_t
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRowGrad<T>(dh_carry + (b - lo) * H, At(xp, t, B, b, 3 * H),
                              At(rec, t, B, b, 3 * H), Prev<T>(h, h_0, t, B, b, H),
                              drec_in == nullptr ? nullptr : At(drec_in, t, B, b, 3 * H),
                              At(dxp, t, B, b, 3 * H), At(drec, t, B, b, 3 * H),
                              direct.data() + (b - lo) * H, H, scratch);
        }
        u_h_t.Multiply(At(drec, t, B, lo, 3 * H) + 2 * H, n, d_rh.data(), false, 3 * H, H);
        if (drh_in != nullptr) d_rh += MatIn<T>(At(drh_in, t, B, lo, H), n, H);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRowGradReset<T>(d_rh.data() + (b - lo) * H, At(xp, t, B, b, 3 * H),
                                   At(rec, t, B, b, 3 * H), Prev<T>(h, h_0, t, B, b, H),
                                   drec_in == nullptr ? nullptr : At(drec_in, t, B, b, 3 * H),
                                   At(dxp, t, B, b, 3 * H), At(drec, t, B, b, 3 * H),
                                   direct.data() + (b - lo) * H, H, scratch);
        }
        u_zr_t.Multiply(At(drec, t, B, lo, 3 * H), n, dh_carry, false, 3 * H, H);
        MatOut<T>(dh_carry, n, H) += direct;
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// SimpleRNN: h_t = σ(xp_t + h_{t-1} U), σ = tanh or ReLU (attr `activation`; ReLU for the IRNN
// of Le, Jaitly & Hinton 2015). Inputs xp [T, B, H], h0 [B, H], u [H, H]. Outputs h [T, B, H]
// (in xp's buffer where TensorFlow allows) and h_T [B, H].

// Whether the op's `activation` attr says ReLU (else tanh, the only other value it allows).
bool IsRelu(OpKernelConstruction* ctx) {
  std::string activation;
  auto status = ctx->GetAttr("activation", &activation);
  if (!status.ok()) ctx->CtxFailure(status);
  return activation == "relu";
}

template <typename T>
class RnnSequence : public OpKernel {
 public:
  explicit RnnSequence(OpKernelConstruction* ctx) : OpKernel(ctx), relu_(IsRelu(ctx)) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(1);
    Shapes shapes(ctx, {"xp", "h0", "u"});
    if (!shapes.Check(1, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1);
    if (!shapes.Check(0, {-1, B, H}) || !shapes.Check(2, {H, H})) return;
    const Tensor& xp = ctx->input(0);
    const int64_t S = xp.dim_size(0);
    T* h = Output<T>(ctx, 0, xp.shape(), 0);
    T* h_last = Output<T>(ctx, 1, h0.shape());
    if (!ctx->status().ok()) return;
    if (h != Ptr<T>(ctx, 0)) std::copy_n(Ptr<T>(ctx, 0), xp.NumElements(), h);
    const T* h_0 = Ptr<T>(ctx, 1);
    const RecurrentKernel<T> u(Ptr<T>(ctx, 2), H, H, false);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      for (int64_t t = 0; t < S; ++t) {
        MatOut<T> h_t(At(h, t, B, lo, H), hi - lo, H);
        u.Multiply(Prev<T>(h, h_0, t, B, lo, H), hi - lo, h_t.data(), true);
        if (relu_) {
          h_t = h_t.cwiseMax(T(0));
        } else {
          h_t = h_t.array().tanh().matrix();
        }
      }
      CopyLast<T>(h, h_0, S, B, H, lo, hi, h_last);
    });
  }

 private:
  const bool relu_;
};

// Inputs dh (gradient of the h sequence: empty where there is none, else [T, B, H]), h, h0, u,
// dh_last [B, H]. Outputs dz [T, B, H] (= d xp; in dh's buffer where TensorFlow allows) and dh0.
template <typename T>
class RnnSequenceGrad : public OpKernel {
 public:
  explicit RnnSequenceGrad(OpKernelConstruction* ctx) : OpKernel(ctx), relu_(IsRelu(ctx)) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h0 = ctx->input(2);
    Shapes shapes(ctx, {"dh", "h", "h0", "u", "dh_last"});
    if (!shapes.Check(2, {-1, -1})) return;
    const int64_t B = h0.dim_size(0), H = h0.dim_size(1), S = ctx->input(1).dim_size(0);
    if (!shapes.Check(1, {-1, B, H}) || !shapes.CheckOptional(0, {S, B, H}) ||
        !shapes.Check(3, {H, H}) || !shapes.Check(4, {B, H}))
      return;
    const T *dh = OptionalPtr<T>(ctx, 0), *h = Ptr<T>(ctx, 1), *dh_last = Ptr<T>(ctx, 4);
    T* dz = Output<T>(ctx, 0, ctx->input(1).shape(), dh == nullptr ? -1 : 0);
    T* dh0 = Output<T>(ctx, 1, h0.shape());
    if (!ctx->status().ok()) return;
    const RecurrentKernel<T> u_t(Ptr<T>(ctx, 3), H, H, true);
    ForEachShard(ctx, B, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo;
      T* dh_carry = dh0 + lo * H;
      std::copy_n(dh_last + lo * H, n * H, dh_carry);
      for (int64_t t = S - 1; t >= 0; --t) {
        AddStep(dh, t, B, H, lo, hi, dh_carry);  // now the total ∂ℓ/∂h_t
        In<T> h_t(At(h, t, B, lo, H), n * H);
        Out<T> dz_t(At(dz, t, B, lo, H), n * H);
        if (relu_) {  // σ'(z) = 1 where z > 0, that is where h > 0 (TensorFlow's ReluGrad too)
          dz_t = (h_t > T(0)).select(In<T>(dh_carry, n * H), T(0));
        } else {
          dz_t = In<T>(dh_carry, n * H) * (T(1) - h_t * h_t);
        }
        u_t.Multiply(At(dz, t, B, lo, H), n, dh_carry, false);
      }
    });
  }

 private:
  const bool relu_;
};

absl::Status SequenceShapes(InferenceContext* ctx, int sequence, int state,
                            std::initializer_list<int> same_as_sequence,
                            std::initializer_list<std::pair<int, int>> same_as_input) {
  auto seq = ctx->input(sequence);
  auto st = ctx->input(state);
  auto per_unit = ctx->MakeShape({ctx->Dim(seq, 0), ctx->Dim(st, 0), ctx->Dim(st, 1)});
  if (!ctx->RankKnown(seq) || !ctx->RankKnown(st)) per_unit = ctx->UnknownShape();
  for (int k : same_as_sequence) ctx->set_output(k, per_unit);
  for (const auto& p : same_as_input) ctx->set_output(p.first, ctx->input(p.second));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasFancyrnnLstmSequence")
    .Input("xp: T").Input("h0: T").Input("c0: T").Input("u: T")
    .Output("z: T").Output("h: T").Output("c: T").Output("h_last: T").Output("c_last: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 0, 1, {1, 2}, {{0, 0}, {3, 1}, {4, 1}});
    });

REGISTER_OP("KerasFancyrnnLstmSequenceGrad")
    .Input("dh: T").Input("dc: T").Input("dz_in: T").Input("z: T").Input("c: T").Input("c0: T")
    .Input("u: T").Input("dh_last: T").Input("dc_last: T")
    .Output("dz: T").Output("dh0: T").Output("dc0: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 3, 5, {}, {{0, 3}, {1, 5}, {2, 5}});
    });

REGISTER_OP("KerasFancyrnnGruSequence")
    .Input("xp: T").Input("h0: T").Input("u: T").Input("b_rec: T")
    .Output("h: T").Output("rec: T").Output("h_last: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 0, 1, {0}, {{1, 0}, {2, 1}});
    });

REGISTER_OP("KerasFancyrnnGruSequenceGrad")
    .Input("dh: T").Input("drec_in: T").Input("xp: T").Input("rec: T").Input("h: T")
    .Input("h0: T").Input("u: T").Input("dh_last: T")
    .Output("dxp: T").Output("drec: T").Output("dh0: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 2, 5, {}, {{0, 2}, {1, 3}, {2, 5}});
    });

REGISTER_OP("KerasFancyrnnGruBeforeSequence")
    .Input("xp: T").Input("h0: T").Input("u: T")
    .Output("h: T").Output("rec: T").Output("rh: T").Output("h_last: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 0, 1, {0, 2}, {{1, 0}, {3, 1}});
    });

REGISTER_OP("KerasFancyrnnGruBeforeSequenceGrad")
    .Input("dh: T").Input("drec_in: T").Input("drh_in: T").Input("xp: T").Input("rec: T")
    .Input("h: T").Input("h0: T").Input("u: T").Input("dh_last: T")
    .Output("dxp: T").Output("drec: T").Output("dh0: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 3, 6, {}, {{0, 3}, {1, 4}, {2, 6}});
    });

REGISTER_OP("KerasFancyrnnRnnSequence")
    .Input("xp: T").Input("h0: T").Input("u: T")
    .Output("h: T").Output("h_last: T")
    .Attr("T: {float, double}")
    .Attr("activation: {'tanh', 'relu'} = 'tanh'")
    .SetShapeFn([](InferenceContext* c) { return SequenceShapes(c, 0, 1, {}, {{0, 0}, {1, 1}}); });

REGISTER_OP("KerasFancyrnnRnnSequenceGrad")
    .Input("dh: T").Input("h: T").Input("h0: T").Input("u: T").Input("dh_last: T")
    .Output("dz: T").Output("dh0: T")
    .Attr("T: {float, double}")
    .Attr("activation: {'tanh', 'relu'} = 'tanh'")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 1, 2, {}, {{0, 1}, {1, 2}});
    });

#define KFR_SEQUENCE_KERNEL(NAME, T, ...) \
  REGISTER_KERNEL_BUILDER(                \
      Name(NAME).Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), __VA_ARGS__);
#define KFR_SEQUENCE_KERNELS(T)                                                 \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnLstmSequence", T, LstmSequence<T>)          \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnLstmSequenceGrad", T, LstmSequenceGrad<T>)  \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnGruSequence", T, GruSequence<T>)            \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnGruSequenceGrad", T, GruSequenceGrad<T>)    \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnGruBeforeSequence", T, GruBeforeSequence<T>) \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnGruBeforeSequenceGrad", T, GruBeforeSequenceGrad<T>) \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnRnnSequence", T, RnnSequence<T>)            \
  KFR_SEQUENCE_KERNEL("KerasFancyrnnRnnSequenceGrad", T, RnnSequenceGrad<T>)

KFR_SEQUENCE_KERNELS(float)
KFR_SEQUENCE_KERNELS(double)

}  // namespace keras_fancyrnn
