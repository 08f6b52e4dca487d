// Whole-sequence recurrences (keras_fancyrnn.ops.native): every timestep of an LSTM, GRU or
// SimpleRNN layer in one op, and its gradient in another.
//
// Each forward op projects its inputs itself, x W a few steps ahead of the recurrence
// (StepInputs), and writes its [T, B, ...] outputs only where the graph reads them (StateSteps);
// the gradient of x is an op of its own (Project, below), as are the weight gradients
// sum_t x_t^T dz_t and sum_t h_{t-1}^T dz_t after the gradient ops (ProjectWeightGrad,
// RecurrentWeightGrad; outer_sum.h; the GRU with reset_after=False takes TensorFlow's matmul for
// its U_h). What is left is the part that must run step by step: h_{t-1} U (small_gemm.h), the
// gate equations (gate_math.h) and, backward, dz_t U^T. The input bias is an input here, not
// added to x W, so that the gradient kernels can sum its gradient over the steps while each
// step's rows are in cache (a separate sum re-reads all of dz from memory).
// Batch rows do not interact, so the batch is split into one shard per thread of TensorFlow's
// intra-op pool (run by shard_pool.h's workers) and each thread runs its rows through all
// timesteps without waiting for the others.
//
// Masks and the gradient monitor's probes run here too (see StateSteps and CarriedGrad below).
//
// Long (over 400 lines): eleven ops (the forward and the gradient of four recurrences, the
// projection of a gradient and the two weight gradients) and their registration, each written out for its
// cell; what they share is in the helpers above them and in kernel_util.h, gate_math.h,
// small_gemm.h and outer_sum.h.
//
// Layouts are time-major (but for the inputs x [B, T, D]): xp [T, B, k H], states [B, H],
// U [H, k H], sequences [T, B, H], mask [T, B].
#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gate_math.h"
#include "kernel_util.h"
#include "outer_sum.h"
#include "small_gemm.h"

namespace keras_fancyrnn {
namespace {

// A [w] vector as a row, to add to every row of a matrix (a bias).
template <typename T>
using RowIn = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;

// Row pointer: sequence `p` (row width w) at time t, batch row b.
template <typename T>
inline T* At(T* p, int64_t t, int64_t B, int64_t b, int64_t w) {
  return p + (t * B + b) * w;
}

// The column sums of every row a gradient kernel writes into one of its [T, B, w] outputs: the
// gradient of a bias added to every row (x W + b is one of them). Each shard sums its few rows
// of a step in T while they are still in cache, and adds that into its own double-precision sums
// (float32 has B·T rows to add: 6,400 at the benchmark's default point); Write then adds the
// shards in order, so that the result does not depend on which thread finished first.
template <typename T>
class ColumnSums {
 public:
  ColumnSums(OpKernelContext* ctx, int64_t B, int64_t width)
      : width_(width), sums_(NumShards(ctx, B) * width, 0.0) {}

  // Rows [lo, lo + n) of step t of `seq` (rows `width` apart), for shard s.
  void Add(int64_t s, const T* seq, int64_t t, int64_t B, int64_t lo, int64_t n) {
    Eigen::Map<Eigen::ArrayXd>(sums_.data() + s * width_, width_) +=
        MatIn<T>(At(seq, t, B, lo, width_), n, width_).colwise().sum().transpose().array()
            .template cast<double>();
  }

  // The sums into `out` [width] (nothing where `out` is null: an allocation that failed).
  void Write(T* out) const {
    if (out == nullptr) return;
    Eigen::ArrayXd total = Eigen::ArrayXd::Zero(width_);
    for (size_t k = 0; k < sums_.size(); k += width_) {
      total += Eigen::Map<const Eigen::ArrayXd>(sums_.data() + k, width_);
    }
    Out<T>(out, width_) = total.template cast<T>();
  }

 private:
  const int64_t width_;
  std::vector<double> sums_;
};

// The products this build can run, widest first, comma-separated.
std::string CompiledProducts() {
  std::string names;
  for (auto [product, name] : {std::pair{Product::kAvx512, "avx512"},
                               std::pair{Product::kAvx2, "avx2"},
                               std::pair{Product::kEigen, "eigen"}}) {
    if (Compiled(product)) absl::StrAppend(&names, names.empty() ? "" : ", ", name);
  }
  return names;
}

// The `product` attr of every sequence op: how RecurrentKernel multiplies ("auto": the widest
// block compiled in). A block this build lacks is an error naming the ones it has.
Product ParseProduct(OpKernelConstruction* ctx) {
  std::string name;
  auto status = ctx->GetAttr("product", &name);
  if (!status.ok()) {
    ctx->CtxFailure(status);
    return Product::kEigen;
  }
  const Product product = name == "avx512" ? Product::kAvx512
                          : name == "avx2" ? Product::kAvx2
                          : name == "eigen" ? Product::kEigen : kWidestProduct;
  if (!Compiled(product)) {
    ctx->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
        "recurrent_product='", name, "' needs a CPU with ", name == "avx512" ? "AVX-512F" :
        "AVX2 and FMA", "; this one runs: ", CompiledProducts())));
  }
  return product;
}

// A sequence op: an OpKernel that knows its recurrent product and whether its shards may run on
// the spinning workers (its `spin` attr).
class SequenceOp : public OpKernel {
 public:
  explicit SequenceOp(OpKernelConstruction* ctx) : OpKernel(ctx), product_(ParseProduct(ctx)) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spin", &spin_));
  }

 protected:
  // ForEachShard with this op's `spin`.
  template <typename F>
  void Shards(OpKernelContext* ctx, int64_t B, const F& fn) const {
    ForEachShard(ctx, B, fn, spin_);
  }

  // U (K x N), or U^T of a u [N, K] with transpose, rows ldu apart, for this op's products:
  // each a shard's rows of a batch of B.
  template <typename T>
  RecurrentKernel<T> Recurrent(OpKernelContext* ctx, int64_t B, const T* u, int64_t K, int64_t N,
                               bool transpose, int64_t ldu = -1) const {
    return RecurrentKernel<T>(u, K, N, transpose, ldu, product_, RowsPerShard(ctx, B));
  }

  const Product product_;
  bool spin_ = true;
};

// The state before step t: the initial state at t = 0, else the sequence's step t - 1.
template <typename T>
inline const T* Prev(const T* seq, const T* initial, int64_t t, int64_t B, int64_t b, int64_t w) {
  return t == 0 ? initial + b * w : At(seq, t - 1, B, b, w);
}

// Rows [lo, hi) of an optional [T, B, H] gradient at step t added to `carry` (rows lo.. of it).
template <typename T>
void AddStep(const T* grad, int64_t t, int64_t B, int64_t H, int64_t lo, int64_t hi, T* carry) {
  if (grad == nullptr) return;
  Out<T>(carry, (hi - lo) * H) += In<T>(At(grad, t, B, lo, H), (hi - lo) * H);
}

// Masks and probes. Every sequence op takes, after its own inputs, a mask [T, B] (bool) and a
// probe [T, B, H] of each state, each empty where there is none. At a masked step (false) a row
// keeps its states (Keras's masking; the layer makes the outputs from the states). A probe is
// added to its state after the step, before the mask, so that its gradient is the total
// ∂ℓ/∂s_t at unmasked steps and 0 at masked ones (keras_fancyrnn.engine.probes).

// One shard's rows [lo, hi) of a forward op's state sequence [T, B, H]: in the op's output
// `seq`, or, where `seq` is null (the graph reads no output but the final state), in a ring of
// the last two steps' rows, so that an inference call holds no [T, B, H] sequence (StepInputs
// says why that matters).
template <typename T>
class StateSteps {
 public:
  StateSteps(T* seq, const T* initial, int64_t B, int64_t H, int64_t lo, int64_t hi)
      : seq_(seq), initial_(initial), B_(B), H_(H), lo_(lo), n_(hi - lo) {
    if (seq == nullptr) ring_.Reset(2 * n_ * H);
  }

  // Row b of the state after step t.
  T* At(int64_t t, int64_t b) {
    return seq_ != nullptr ? keras_fancyrnn::At(seq_, t, B_, b, H_)
                           : ring_.get() + ((t & 1) * n_ + b - lo_) * H_;
  }

  // Row b of the state before step t (the initial state at t = 0); rows lo.. are contiguous.
  const T* Prev(int64_t t, int64_t b) { return t == 0 ? initial_ + b * H_ : At(t - 1, b); }

  // The end of step t: the probe added (where not null) and, at masked rows, the state before
  // the step put back.
  void EndStep(const bool* mask, const T* probe, int64_t t) {
    if (probe != nullptr) {
      Out<T>(At(t, lo_), n_ * H_) += In<T>(keras_fancyrnn::At(probe, t, B_, lo_, H_), n_ * H_);
    }
    if (mask == nullptr) return;
    for (int64_t b = lo_; b < lo_ + n_; ++b) {
      if (!mask[t * B_ + b]) std::copy_n(Prev(t, b), H_, At(t, b));
    }
  }

  // The rows of the state after the last of S steps into `last` [B, H].
  void CopyLast(int64_t S, T* last) { std::copy_n(Prev(S, lo_), n_ * H_, last + lo_ * H_); }

 private:
  T* const seq_;
  const T* const initial_;
  const int64_t B_, H_, lo_, n_;
  AlignedArray<T> ring_;
};

// One shard's rows [lo, hi) of x W for every step of a forward op, computed kChunk steps at a
// time as the recurrence reaches them (x [B, S, D]; step t reads x[:, t], or x[:, S - 1 - t]
// with `reverse`): into the op's output `seq` [S, B, N] where the graph reads it (a gradient
// does), else into a scratch of kChunk steps. An inference call then never holds the projected
// sequence: the caches its [S, B, N] values took (with the [S, B, H] states, 2 MB at B=16, T=50,
// D=128, H=64) slowed the Python and TensorFlow work of the rest of the call, which then found
// its own data evicted (benchmarks/results/2026-12-06_projection_inside.md).
template <typename T>
class StepInputs {
 public:
  // (4 to 16 steps measured alike at B = 16 and 64, one step a little slower at B = 64,
  // H = 256; more steps hold more of the sequence)
  static constexpr int64_t kChunk = 8;

  StepInputs(const RecurrentKernel<T>& w, const T* x, int64_t S, int64_t D, bool reverse, T* seq,
             int64_t B, int64_t N, int64_t lo, int64_t hi)
      : w_(w), x_(x), S_(S), D_(D), reverse_(reverse), seq_(seq), B_(B), N_(N), lo_(lo),
        n_(hi - lo) {
    if (seq == nullptr) scratch_.Reset(kChunk * n_ * N);
  }

  // Rows lo.. of step t (contiguous, N apart). The steps must be asked for in order.
  T* Step(int64_t t) {
    if (t % kChunk == 0) {
      // each step's n rows of x are S D apart: one product of n rows per step
      for (int64_t k = t; k < std::min(S_, t + kChunk); ++k) {
        const T* rows = x_ + (lo_ * S_ + (reverse_ ? S_ - 1 - k : k)) * D_;
        w_.Multiply(rows, n_, Rows(k), false, S_ * D_, N_);
      }
    }
    return Rows(t);
  }

 private:
  T* Rows(int64_t t) {
    return seq_ != nullptr ? At(seq_, t, B_, lo_, N_) : scratch_.get() + (t % kChunk) * n_ * N_;
  }

  const RecurrentKernel<T>& w_;
  const T* const x_;
  const int64_t S_, D_;
  const bool reverse_;
  T* const seq_;
  const int64_t B_, N_, lo_, n_;
  AlignedArray<T> scratch_;
};

// One shard's gradient with respect to a state (rows [lo, hi)), carried back through time in
// `carry`, which starts as the gradient of the final state. Begin(t) makes it the total ∂ℓ/∂s_t
// (adding the gradient of the state sequence output at t), copies it to the probe's gradient,
// and takes the masked rows out: their state was carried over, so their gradient passes to
// s_{t-1} unchanged, and the step's backward sees zeros there. After the step's backward has
// written ∂ℓ/∂s_{t-1} of the other rows into `carry`, End() adds the masked rows back.
template <typename T>
class CarriedGrad {
 public:
  CarriedGrad(T* carry, const T* last, const T* seq_grad, const bool* mask, T* dprobe, int64_t B,
              int64_t H, int64_t lo, int64_t hi)
      : carry_(carry + lo * H), seq_grad_(seq_grad), mask_(mask), dprobe_(dprobe), B_(B), H_(H),
        lo_(lo), hi_(hi), pass_(mask == nullptr ? 0 : (hi - lo) * H) {
    std::copy_n(last + lo * H, (hi - lo) * H, carry_);
  }

  T* data() { return carry_; }
  T* row(int64_t b) { return carry_ + (b - lo_) * H_; }

  void Begin(int64_t t) {
    AddStep(seq_grad_, t, B_, H_, lo_, hi_, carry_);
    if (dprobe_ != nullptr) std::copy_n(carry_, (hi_ - lo_) * H_, At(dprobe_, t, B_, lo_, H_));
    if (mask_ == nullptr) return;
    for (int64_t b = lo_; b < hi_; ++b) {
      T* pass = pass_.data() + (b - lo_) * H_;
      if (mask_[t * B_ + b]) {
        std::fill_n(pass, H_, T(0));
        continue;
      }
      std::copy_n(row(b), H_, pass);
      std::fill_n(row(b), H_, T(0));
      if (dprobe_ != nullptr) std::fill_n(At(dprobe_, t, B_, b, H_), H_, T(0));
    }
  }

  void End() {
    if (mask_ != nullptr) Out<T>(carry_, (hi_ - lo_) * H_) += In<T>(pass_.data(), pass_.size());
  }

 private:
  T* const carry_;
  const T* const seq_grad_;
  const bool* const mask_;
  T* const dprobe_;
  const int64_t B_, H_, lo_, hi_;
  std::vector<T> pass_;
};

// The sizes of a sequence op: S steps (input `seq`'s first dimension) and the state's B and H
// (input `state`, [B, H]); and its mask and probes, optional inputs checked against them.
struct Dims {
  int64_t S = 0, B = 0, H = 0, D = 0;  // D: the input width of an op that projects its inputs
};

inline bool ReadDims(Shapes& shapes, OpKernelContext* ctx, int state, int seq, Dims* d) {
  if (!shapes.Check(state, {-1, -1}) || !shapes.Check(seq, {-1, -1, -1})) return false;
  d->B = ctx->input(state).dim_size(0);
  d->H = ctx->input(state).dim_size(1);
  d->S = ctx->input(seq).dim_size(0);
  return true;
}

// What an input of a sequence op is, in units of its S steps, B rows and H units (k: gates per
// unit): a sequence [S, B, kH], a state [B, H], a recurrent kernel [H, kH], a bias [kH], the mask
// [S, B]; optional ones (a gradient that may be absent, the mask, a probe [S, B, H]) may be empty.
enum class Is { kSequence, kOptionalSequence, kState, kKernel, kBias, kMask, kProbe };

struct Input {
  int index;
  Is is;
  int64_t k = 1;
};

inline bool CheckInputs(Shapes& shapes, const Dims& d, std::initializer_list<Input> inputs) {
  for (const Input& in : inputs) {
    const int64_t S = d.S, B = d.B, H = d.H, kH = in.k * d.H;
    bool ok = true;
    switch (in.is) {
      case Is::kSequence: ok = shapes.Check(in.index, {S, B, kH}); break;
      case Is::kOptionalSequence: ok = shapes.CheckOptional(in.index, {S, B, kH}); break;
      case Is::kState: ok = shapes.Check(in.index, {B, H}); break;
      case Is::kKernel: ok = shapes.Check(in.index, {H, kH}); break;
      case Is::kBias: ok = shapes.Check(in.index, {kH}); break;
      case Is::kMask: ok = shapes.CheckOptional(in.index, {S, B}); break;
      case Is::kProbe: ok = shapes.CheckOptional(in.index, {S, B, H}); break;
    }
    if (!ok) return false;
  }
  return true;
}

// The start of every sequence op: its sizes (ReadDims) and its inputs checked (CheckInputs);
// false where a check failed, which the op's status then says.
inline bool Prepare(OpKernelContext* ctx, int state, int seq, std::initializer_list<Input> inputs,
                    Dims* d) {
  Shapes shapes(ctx);
  return ReadDims(shapes, ctx, state, seq, d) && CheckInputs(shapes, *d, inputs);
}

// The gradient of an optional probe input: [T, B, H] where the probe is given, else empty.
template <typename T>
T* ProbeGrad(OpKernelContext* ctx, int output, int probe) {
  T* out = Output<T>(ctx, output, ctx->input(probe).shape());
  return ctx->input(probe).NumElements() == 0 ? nullptr : out;
}

// A row pointer into an optional sequence: null where the sequence is.
template <typename T>
inline T* OptionalAt(T* p, int64_t t, int64_t B, int64_t b, int64_t w) {
  return p == nullptr ? nullptr : At(p, t, B, b, w);
}

// ---------------------------------------------------------------------------------------------
// LSTM. Inputs x [B, T, D] (batch-major), w [D, 4H], h0, c0 [B, H], u [H, 4H], b [4H], mask,
// probe_h, probe_c; attr `reverse`: the steps in reverse order (go_backwards). Outputs
// z = x_t w + b + h_{t-1} U [T, B, 4H], h, c [T, B, H], and the final h_T, c_T [B, H] (their own
// outputs, so that a layer that returns only them sends no [T, B, H] gradient back). z, h and c
// are written only where the graph reads them (OpKernelContext::output_required: a gradient
// does; a graph that runs only inference does not), else they are empty and the op keeps only
// a few steps of them (StepInputs, StateSteps). The bias is added here, not to x W, so that the
// gradient kernel can sum its gradient while each step's dz is in cache. The probe of c is
// added before c_t feeds h_t.

// Output i of a forward op: of `shape` where the graph reads it, else empty (null).
template <typename T>
T* SequenceOutput(OpKernelContext* ctx, int i, const TensorShape& shape) {
  const bool required = ctx->output_required(i);
  T* out = Output<T>(ctx, i, required ? shape : TensorShape({0}));
  return required ? out : nullptr;
}

// A forward op that projects its inputs itself: inputs x [B, T, D] (0), w [D, k H] (1), h0
// [B, H] (2), then its own; attr `reverse`, the steps in reverse order (go_backwards).
class ProjectingOp : public SequenceOp {
 public:
  explicit ProjectingOp(OpKernelConstruction* ctx) : SequenceOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
  }

 protected:
  // Reads the sizes (S and D from x, B and H from h0) and checks x, w for k gates and `inputs`;
  // false where a check failed, which the op's status then says.
  static bool Prepare(OpKernelContext* ctx, int64_t k, std::initializer_list<Input> inputs,
                      Dims* d) {
    Shapes shapes(ctx);
    if (!shapes.Check(2, {-1, -1}) || !shapes.Check(0, {ctx->input(2).dim_size(0), -1, -1})) {
      return false;
    }
    d->B = ctx->input(2).dim_size(0);
    d->H = ctx->input(2).dim_size(1);
    d->S = ctx->input(0).dim_size(1);
    d->D = ctx->input(0).dim_size(2);
    return shapes.Check(1, {d->D, k * d->H}) && CheckInputs(shapes, *d, inputs);
  }

  // w as the register block's operand, for this op's shards.
  template <typename T>
  RecurrentKernel<T> InputKernel(OpKernelContext* ctx, const Dims& d, int64_t k) const {
    return Recurrent(ctx, d.B, Ptr<T>(ctx, 1), d.D, k * d.H, false);
  }

  // One shard's x w, steps in this op's order (StepInputs).
  template <typename T>
  StepInputs<T> Steps(const RecurrentKernel<T>& w, OpKernelContext* ctx, const Dims& d,
                      int64_t k, T* seq, int64_t lo, int64_t hi) const {
    return StepInputs<T>(w, Ptr<T>(ctx, 0), d.S, d.D, reverse_, seq, d.B, k * d.H, lo, hi);
  }

  bool reverse_ = false;
};

template <typename T>
class LstmSequence : public ProjectingOp {
 public:
  using ProjectingOp::ProjectingOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 4, {{3, Is::kState}, {4, Is::kKernel, 4}, {5, Is::kBias, 4},
                          {6, Is::kMask}, {7, Is::kProbe}, {8, Is::kProbe}}, &d)) {
      return;
    }
    const int64_t S = d.S, B = d.B, H = d.H;
    T* z = SequenceOutput<T>(ctx, 0, TensorShape({S, B, 4 * H}));
    T* h = SequenceOutput<T>(ctx, 1, TensorShape({S, B, H}));
    T* c = SequenceOutput<T>(ctx, 2, TensorShape({S, B, H}));
    T* h_last = Output<T>(ctx, 3, ctx->input(2).shape());
    T* c_last = Output<T>(ctx, 4, ctx->input(2).shape());
    if (!ctx->status().ok()) return;
    const T *h_0 = Ptr<T>(ctx, 2), *c_0 = Ptr<T>(ctx, 3), *probe_h = OptionalPtr<T>(ctx, 7),
            *probe_c = OptionalPtr<T>(ctx, 8);
    const bool* mask = OptionalPtr<bool>(ctx, 6);
    const auto w = InputKernel<T>(ctx, d, 4);
    const auto u = Recurrent(ctx, B, Ptr<T>(ctx, 4), H, 4 * H, false);
    const T* bias = Ptr<T>(ctx, 5);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t) {
      StepInputs<T> zs = Steps(w, ctx, d, 4, z, lo, hi);
      StateSteps<T> hs(h, h_0, B, H, lo, hi), cs(c, c_0, B, H, lo, hi);
      for (int64_t t = 0; t < S; ++t) {
        T* z_t = zs.Step(t);  // x_t w, rows lo..
        u.Multiply(hs.Prev(t, lo), hi - lo, z_t, true, RecurrentKernel<T>::kDense,
                   RecurrentKernel<T>::kDense, bias);
        for (int64_t b = lo; b < hi; ++b) {
          LstmRow<T>(z_t + (b - lo) * 4 * H, cs.Prev(t, b), OptionalAt(probe_c, t, B, b, H),
                     hs.At(t, b), cs.At(t, b), H);
        }
        hs.EndStep(mask, probe_h, t);
        cs.EndStep(mask, nullptr, t);
      }
      hs.CopyLast(S, h_last);
      cs.CopyLast(S, c_last);
    });
  }
};

// Inputs dh, dc (gradients of the h and c sequences), dz_in (of the z output; each empty where
// there is none, else [T, B, H] or [T, B, 4H]), z, c, c0, u, dh_last, dc_last [B, H], mask,
// probe_h, probe_c. Outputs dz [T, B, 4H] (= d(x W); in z's buffer where TensorFlow allows), dh0,
// dc0, db [4H] (the sum of dz over T and B), and the probes' gradients (empty where absent).
template <typename T>
class LstmSequenceGrad : public SequenceOp {
 public:
  using SequenceOp::SequenceOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 5, 3, {{0, Is::kOptionalSequence}, {1, Is::kOptionalSequence},
                 {2, Is::kOptionalSequence, 4}, {3, Is::kSequence, 4}, {4, Is::kSequence},
                 {6, Is::kKernel, 4}, {7, Is::kState}, {8, Is::kState}, {9, Is::kMask},
                 {10, Is::kProbe}, {11, Is::kProbe}}, &d)) return;
    const int64_t S = d.S, B = d.B, H = d.H;
    const T *z = Ptr<T>(ctx, 3), *dz_in = OptionalPtr<T>(ctx, 2);
    T* dz = Output<T>(ctx, 0, ctx->input(3).shape(), 3);
    T* dh0 = Output<T>(ctx, 1, ctx->input(5).shape());
    T* dc0 = Output<T>(ctx, 2, ctx->input(5).shape());
    T* db = Output<T>(ctx, 3, TensorShape({4 * H}));
    T* dprobe_h = ProbeGrad<T>(ctx, 4, 10);
    T* dprobe_c = ProbeGrad<T>(ctx, 5, 11);
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *dc = OptionalPtr<T>(ctx, 1), *c = Ptr<T>(ctx, 4),
            *c_0 = Ptr<T>(ctx, 5), *dh_last = Ptr<T>(ctx, 7), *dc_last = Ptr<T>(ctx, 8),
            *probe_c = OptionalPtr<T>(ctx, 11);
    const bool* mask = OptionalPtr<bool>(ctx, 9);
    const auto u_t = Recurrent(ctx, B, Ptr<T>(ctx, 6), 4 * H, H, true);
    ColumnSums<T> db_sums(ctx, B, 4 * H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t s) {
      // ∂ℓ/∂h_t through dz_{t+1} U^T, and ∂ℓ/∂c_t through c_{t+1}, for this shard's rows.
      CarriedGrad<T> dh_carry(dh0, dh_last, dh, mask, dprobe_h, B, H, lo, hi);
      CarriedGrad<T> dc_carry(dc0, dc_last, dc, mask, nullptr, B, H, lo, hi);
      LstmScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        dh_carry.Begin(t);
        dc_carry.Begin(t);
        for (int64_t b = lo; b < hi; ++b) {
          T* dzb = At(dz, t, B, b, 4 * H);
          LstmRowGrad<T>(dh_carry.row(b), dc_carry.row(b), At(z, t, B, b, 4 * H),
                         Prev<T>(c, c_0, t, B, b, H), OptionalAt(probe_c, t, B, b, H), dzb,
                         dc_carry.row(b), OptionalAt(dprobe_c, t, B, b, H), H, scratch);
          if (dz_in != nullptr) Out<T>(dzb, 4 * H) += In<T>(At(dz_in, t, B, b, 4 * H), 4 * H);
        }
        db_sums.Add(s, dz, t, B, lo, hi - lo);
        u_t.Multiply(At(dz, t, B, lo, 4 * H), hi - lo, dh_carry.data(), false);
        dh_carry.End();
        dc_carry.End();
      }
    });
    db_sums.Write(db);
  }
};

// ---------------------------------------------------------------------------------------------
// GRU (reset_after=True). Inputs x [B, T, D], w [D, 3H], h0 [B, H], u [H, 3H], b_rec [3H],
// b_in [3H] (the input bias: the gates see xp = x w plus b_in), mask, probe_h; attr `reverse`.
// Outputs h [T, B, H], rec = h_{t-1} U + b_rec [T, B, 3H] (kept for the gradient), h_T [B, H],
// xp [T, B, 3H] (for the gradient); h, rec and xp only where the graph reads them (LSTM
// below).

// Rows [lo, lo + n) of step t of xp [T, B, w] plus the bias b, into `out` [n, w].
template <typename T>
void AddBias(const T* xp, const RowIn<T>& b, int64_t t, int64_t B, int64_t lo, RowMat<T>& out) {
  out = MatIn<T>(At(xp, t, B, lo, b.size()), out.rows(), b.size()).rowwise() + b;
}

template <typename T>
class GruSequence : public ProjectingOp {
 public:
  using ProjectingOp::ProjectingOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 3, {{3, Is::kKernel, 3}, {4, Is::kBias, 3}, {5, Is::kBias, 3},
                          {6, Is::kMask}, {7, Is::kProbe}}, &d)) {
      return;
    }
    const int64_t S = d.S, B = d.B, H = d.H;
    T* h = SequenceOutput<T>(ctx, 0, TensorShape({S, B, H}));
    T* rec = SequenceOutput<T>(ctx, 1, TensorShape({S, B, 3 * H}));
    T* h_last = Output<T>(ctx, 2, ctx->input(2).shape());
    T* xp = SequenceOutput<T>(ctx, 3, TensorShape({S, B, 3 * H}));
    if (!ctx->status().ok()) return;
    const T *h_0 = Ptr<T>(ctx, 2), *probe_h = OptionalPtr<T>(ctx, 7);
    const bool* mask = OptionalPtr<bool>(ctx, 6);
    const auto w = InputKernel<T>(ctx, d, 3);
    const auto u = Recurrent(ctx, B, Ptr<T>(ctx, 3), H, 3 * H, false);
    const T* b_rec = Ptr<T>(ctx, 4);
    const RowIn<T> b_in(Ptr<T>(ctx, 5), 3 * H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t) {
      GruScratch<T> scratch(H);
      RowMat<T> xb(hi - lo, 3 * H);  // xp + b_in, this step's rows
      StepInputs<T> xs = Steps(w, ctx, d, 3, xp, lo, hi);
      StateSteps<T> hs(h, h_0, B, H, lo, hi), recs(rec, nullptr, B, 3 * H, lo, hi);
      for (int64_t t = 0; t < S; ++t) {
        u.Multiply(hs.Prev(t, lo), hi - lo, recs.At(t, lo), false, RecurrentKernel<T>::kDense,
                   RecurrentKernel<T>::kDense, b_rec);
        xb = MatIn<T>(xs.Step(t), hi - lo, 3 * H).rowwise() + b_in;
        for (int64_t b = lo; b < hi; ++b) {
          GruRow<T>(xb.row(b - lo).data(), recs.At(t, b), hs.Prev(t, b), hs.At(t, b), H, scratch);
        }
        hs.EndStep(mask, probe_h, t);
      }
      hs.CopyLast(S, h_last);
    });
  }
};

// Inputs dh, drec_in (gradients of the h and rec outputs: each empty where there is none, else
// [T, B, H] or [T, B, 3H]), xp, rec, h, h0, u, dh_last [B, H], b_in [3H], mask, probe_h. Outputs
// d xp, d rec [T, B, 3H] (in the buffers of xp and rec where TensorFlow allows), dh0, the bias
// gradients db_in, db_rec [3H] (the sums of d xp and d rec over T and B), and the probe's.
template <typename T>
class GruSequenceGrad : public SequenceOp {
 public:
  using SequenceOp::SequenceOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 5, 2, {{0, Is::kOptionalSequence}, {1, Is::kOptionalSequence, 3},
                 {2, Is::kSequence, 3}, {3, Is::kSequence, 3}, {4, Is::kSequence},
                 {6, Is::kKernel, 3}, {7, Is::kState}, {8, Is::kBias, 3}, {9, Is::kMask},
                 {10, Is::kProbe}}, &d)) return;
    const int64_t S = d.S, B = d.B, H = d.H;
    // d xp and d rec in the buffers of xp and rec where TensorFlow allows (a step's rows of xp
    // are copied before they are written; GruRowGrad reads a row of rec before it writes it).
    T* dxp = Output<T>(ctx, 0, ctx->input(2).shape(), 2);
    T* drec = Output<T>(ctx, 1, ctx->input(3).shape(), 3);
    T* dh0 = Output<T>(ctx, 2, ctx->input(5).shape());
    T* db_in = Output<T>(ctx, 3, TensorShape({3 * H}));
    T* db_rec = Output<T>(ctx, 4, TensorShape({3 * H}));
    T* dprobe_h = ProbeGrad<T>(ctx, 5, 10);
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *drec_in = OptionalPtr<T>(ctx, 1), *xp = Ptr<T>(ctx, 2),
            *rec = Ptr<T>(ctx, 3), *h = Ptr<T>(ctx, 4), *h_0 = Ptr<T>(ctx, 5),
            *dh_last = Ptr<T>(ctx, 7);
    const bool* mask = OptionalPtr<bool>(ctx, 9);
    const auto u_t = Recurrent(ctx, B, Ptr<T>(ctx, 6), 3 * H, H, true);
    const RowIn<T> b_in(Ptr<T>(ctx, 8), 3 * H);
    ColumnSums<T> dxp_sums(ctx, B, 3 * H), drec_sums(ctx, B, 3 * H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t s) {
      const int64_t n = hi - lo;
      CarriedGrad<T> dh_carry(dh0, dh_last, dh, mask, dprobe_h, B, H, lo, hi);
      RowMat<T> direct(n, H);  // the part of ∂ℓ/∂h_{t-1} that does not pass through rec
      RowMat<T> xb(n, 3 * H);  // xp + b_in, this step's rows
      GruScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        dh_carry.Begin(t);
        AddBias(xp, b_in, t, B, lo, xb);
        for (int64_t b = lo; b < hi; ++b) {
          T* drb = At(drec, t, B, b, 3 * H);
          GruRowGrad<T>(dh_carry.row(b), xb.row(b - lo).data(), At(rec, t, B, b, 3 * H),
                        Prev<T>(h, h_0, t, B, b, H), At(dxp, t, B, b, 3 * H), drb,
                        direct.data() + (b - lo) * H, H, scratch);
          if (drec_in != nullptr) Out<T>(drb, 3 * H) += In<T>(At(drec_in, t, B, b, 3 * H), 3 * H);
        }
        dxp_sums.Add(s, dxp, t, B, lo, n);
        drec_sums.Add(s, drec, t, B, lo, n);
        u_t.Multiply(At(drec, t, B, lo, 3 * H), n, dh_carry.data(), false);
        MatOut<T>(dh_carry.data(), n, H) += direct;
        dh_carry.End();
      }
    });
    dxp_sums.Write(db_in);
    drec_sums.Write(db_rec);
  }
};

// ---------------------------------------------------------------------------------------------
// GRU (reset_after=False: the reset gate before the product). Inputs x [B, T, D], w [D, 3H],
// h0 [B, H], u [H, 3H], b [3H] (the gates see xp = x w plus b), mask, probe_h; attr `reverse`.
// Outputs h [T, B, H]; rec [T, B, 3H] = [h_{t-1} U_z, h_{t-1} U_r, (r h_{t-1}) U_h] and
// rh = r h_{t-1} [T, B, H] (kept for the gradient); h_T [B, H]; xp [T, B, 3H] (for the
// gradient); all but h_T only where the graph reads them (LSTM above). Two dependent products a step: [U_z U_r] and U_h, blocks of u (rows
// 3H apart).

template <typename T>
class GruBeforeSequence : public ProjectingOp {
 public:
  using ProjectingOp::ProjectingOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 3, {{3, Is::kKernel, 3}, {4, Is::kBias, 3}, {5, Is::kMask},
                          {6, Is::kProbe}}, &d)) {
      return;
    }
    const int64_t S = d.S, B = d.B, H = d.H;
    T* h = SequenceOutput<T>(ctx, 0, TensorShape({S, B, H}));
    T* rec = SequenceOutput<T>(ctx, 1, TensorShape({S, B, 3 * H}));
    T* rh = SequenceOutput<T>(ctx, 2, TensorShape({S, B, H}));
    T* h_last = Output<T>(ctx, 3, ctx->input(2).shape());
    T* xp = SequenceOutput<T>(ctx, 4, TensorShape({S, B, 3 * H}));
    if (!ctx->status().ok()) return;
    const T *h_0 = Ptr<T>(ctx, 2), *u = Ptr<T>(ctx, 3), *probe_h = OptionalPtr<T>(ctx, 6);
    const bool* mask = OptionalPtr<bool>(ctx, 5);
    const auto w = InputKernel<T>(ctx, d, 3);
    const auto u_zr = Recurrent(ctx, B, u, H, 2 * H, false, 3 * H);
    const auto u_h = Recurrent(ctx, B, u + 2 * H, H, H, false, 3 * H);
    const RowIn<T> bias(Ptr<T>(ctx, 4), 3 * H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t) {
      const int64_t n = hi - lo;
      GruScratch<T> scratch(H);
      std::vector<T> z(n * H);
      RowMat<T> xb(n, 3 * H);  // xp + b, this step's rows
      StepInputs<T> xs = Steps(w, ctx, d, 3, xp, lo, hi);
      StateSteps<T> hs(h, h_0, B, H, lo, hi), recs(rec, nullptr, B, 3 * H, lo, hi),
          rhs(rh, nullptr, B, H, lo, hi);
      for (int64_t t = 0; t < S; ++t) {
        T* rec_t = recs.At(t, lo);
        u_zr.Multiply(hs.Prev(t, lo), n, rec_t, false, H, 3 * H);
        xb = MatIn<T>(xs.Step(t), n, 3 * H).rowwise() + bias;
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeGates<T>(xb.row(b - lo).data(), recs.At(t, b), hs.Prev(t, b),
                            z.data() + (b - lo) * H, rhs.At(t, b), H);
        }
        u_h.Multiply(rhs.At(t, lo), n, rec_t + 2 * H, false, H, 3 * H);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRow<T>(xb.row(b - lo).data(), recs.At(t, b), hs.Prev(t, b),
                          z.data() + (b - lo) * H, hs.At(t, b), H, scratch);
        }
        hs.EndStep(mask, probe_h, t);
      }
      hs.CopyLast(S, h_last);
    });
  }
};

// Inputs dh, drec_in, drh_in (gradients of the h, rec and rh outputs: each empty where there is
// none, else [T, B, H], [T, B, 3H], [T, B, H]), xp, rec, h, h0, u, dh_last [B, H], b [3H], mask,
// probe_h. Outputs d xp, d rec [T, B, 3H] (in the buffers of xp and rec where TensorFlow allows),
// dh0, db [3H] (the sum of d xp over T and B), and the probe's gradient.
template <typename T>
class GruBeforeSequenceGrad : public SequenceOp {
 public:
  using SequenceOp::SequenceOp;

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 6, 3, {{0, Is::kOptionalSequence}, {1, Is::kOptionalSequence, 3},
                 {2, Is::kOptionalSequence}, {3, Is::kSequence, 3}, {4, Is::kSequence, 3},
                 {5, Is::kSequence}, {7, Is::kKernel, 3}, {8, Is::kState}, {9, Is::kBias, 3},
                 {10, Is::kMask}, {11, Is::kProbe}}, &d)) return;
    const int64_t S = d.S, B = d.B, H = d.H;
    T* dxp = Output<T>(ctx, 0, ctx->input(3).shape(), 3);
    T* drec = Output<T>(ctx, 1, ctx->input(4).shape(), 4);
    T* dh0 = Output<T>(ctx, 2, ctx->input(6).shape());
    T* db = Output<T>(ctx, 3, TensorShape({3 * H}));
    T* dprobe_h = ProbeGrad<T>(ctx, 4, 11);
    if (!ctx->status().ok()) return;
    const T *dh = OptionalPtr<T>(ctx, 0), *drec_in = OptionalPtr<T>(ctx, 1),
            *drh_in = OptionalPtr<T>(ctx, 2), *xp = Ptr<T>(ctx, 3), *rec = Ptr<T>(ctx, 4),
            *h = Ptr<T>(ctx, 5), *h_0 = Ptr<T>(ctx, 6), *u = Ptr<T>(ctx, 7),
            *dh_last = Ptr<T>(ctx, 8);
    const bool* mask = OptionalPtr<bool>(ctx, 10);
    // U_h^T and [U_z U_r]^T
    const auto u_h_t = Recurrent(ctx, B, u + 2 * H, H, H, true, 3 * H);
    const auto u_zr_t = Recurrent(ctx, B, u, 2 * H, H, true, 3 * H);
    const RowIn<T> bias(Ptr<T>(ctx, 9), 3 * H);
    ColumnSums<T> db_sums(ctx, B, 3 * H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t s) {
      const int64_t n = hi - lo;
      CarriedGrad<T> dh_carry(dh0, dh_last, dh, mask, dprobe_h, B, H, lo, hi);
      RowMat<T> direct(n, H), d_rh(n, H);
      RowMat<T> xb(n, 3 * H);  // xp + b, this step's rows (copied before d xp overwrites xp)
      GruScratch<T> scratch(H);
      for (int64_t t = S - 1; t >= 0; --t) {
        dh_carry.Begin(t);
        AddBias(xp, bias, t, B, lo, xb);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRowGrad<T>(dh_carry.row(b), xb.row(b - lo).data(), At(rec, t, B, b, 3 * H),
                              Prev<T>(h, h_0, t, B, b, H), OptionalAt(drec_in, t, B, b, 3 * H),
                              At(dxp, t, B, b, 3 * H), At(drec, t, B, b, 3 * H),
                              direct.data() + (b - lo) * H, H, scratch);
        }
        u_h_t.Multiply(At(drec, t, B, lo, 3 * H) + 2 * H, n, d_rh.data(), false, 3 * H, H);
        if (drh_in != nullptr) d_rh += MatIn<T>(At(drh_in, t, B, lo, H), n, H);
        for (int64_t b = lo; b < hi; ++b) {
          GruBeforeRowGradReset<T>(d_rh.data() + (b - lo) * H, xb.row(b - lo).data(),
                                   At(rec, t, B, b, 3 * H), Prev<T>(h, h_0, t, B, b, H),
                                   OptionalAt(drec_in, t, B, b, 3 * H), At(dxp, t, B, b, 3 * H),
                                   At(drec, t, B, b, 3 * H), direct.data() + (b - lo) * H, H,
                                   scratch);
        }
        db_sums.Add(s, dxp, t, B, lo, n);
        u_zr_t.Multiply(At(drec, t, B, lo, 3 * H), n, dh_carry.data(), false, 3 * H, H);
        MatOut<T>(dh_carry.data(), n, H) += direct;
        dh_carry.End();
      }
    });
    db_sums.Write(db);
  }
};

// ---------------------------------------------------------------------------------------------
// SimpleRNN: h_t = σ(x_t w + h_{t-1} U), σ = tanh or ReLU (attr `activation`; ReLU for the
// IRNN of Le, Jaitly & Hinton 2015). Inputs x [B, T, D], w [D, H], h0 [B, H], u [H, H], b [H],
// mask, probe_h; attr `reverse`. Outputs h [T, B, H] (only where the graph reads it: LSTM
// above), h_T [B, H] and, for
// ReLU with a probe, act = σ(z_t) [T, B, H] before the probe is added (else empty): the gradient
// reads σ'(z_t) off it, where h_t - probe_t could round a small activation to 0 (for tanh,
// h_t - probe_t is what the gradient reads, and it stays differentiable for second derivatives).

// Whether the op's `activation` attr says ReLU (else tanh, the only other value it allows).
bool IsRelu(OpKernelConstruction* ctx) {
  std::string activation;
  auto status = ctx->GetAttr("activation", &activation);
  if (!status.ok()) ctx->CtxFailure(status);
  return activation == "relu";
}

template <typename T>
class RnnSequence : public ProjectingOp {
 public:
  explicit RnnSequence(OpKernelConstruction* ctx) : ProjectingOp(ctx), relu_(IsRelu(ctx)) {}

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 1, {{3, Is::kKernel}, {4, Is::kBias}, {5, Is::kMask}, {6, Is::kProbe}},
                 &d)) {
      return;
    }
    const int64_t S = d.S, B = d.B, H = d.H;
    T* h = SequenceOutput<T>(ctx, 0, TensorShape({S, B, H}));
    T* h_last = Output<T>(ctx, 1, ctx->input(2).shape());
    const bool keep_act = relu_ && ctx->input(6).dims() == 3;  // as the shape function says
    T* act = Output<T>(ctx, 2, keep_act ? TensorShape({S, B, H}) : TensorShape({0}));
    if (!keep_act) act = nullptr;
    if (!ctx->status().ok()) return;
    const T *h_0 = Ptr<T>(ctx, 2), *probe_h = OptionalPtr<T>(ctx, 6);
    const bool* mask = OptionalPtr<bool>(ctx, 5);
    const auto w = InputKernel<T>(ctx, d, 1);
    const auto u = Recurrent(ctx, B, Ptr<T>(ctx, 3), H, H, false);
    const T* bias = Ptr<T>(ctx, 4);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t) {
      // where h is read, x_t w goes into its rows and becomes h_t there
      StepInputs<T> zs = Steps(w, ctx, d, 1, h, lo, hi);
      StateSteps<T> hs(h, h_0, B, H, lo, hi);
      for (int64_t t = 0; t < S; ++t) {
        MatOut<T> h_t(zs.Step(t), hi - lo, H);
        u.Multiply(hs.Prev(t, lo), hi - lo, h_t.data(), true, RecurrentKernel<T>::kDense,
                   RecurrentKernel<T>::kDense, bias);
        if (relu_) {
          h_t = h_t.cwiseMax(T(0));
        } else {
          h_t = h_t.array().tanh().matrix();
        }
        if (act != nullptr) std::copy_n(h_t.data(), h_t.size(), At(act, t, B, lo, H));
        if (h_t.data() != hs.At(t, lo)) std::copy_n(h_t.data(), h_t.size(), hs.At(t, lo));
        hs.EndStep(mask, probe_h, t);
      }
      hs.CopyLast(S, h_last);
    });
  }

 private:
  const bool relu_;
};

// Inputs dh (gradient of the h sequence: empty where there is none, else [T, B, H]), h, h0, u,
// dh_last [B, H], mask, probe_h, act (the forward's). Outputs dz [T, B, H] (= d(x W); in dh's
// buffer where TensorFlow allows), dh0, db [H] (the sum of dz over T and B), and the probe's
// gradient. σ'(z_t) is read off σ(z_t): act where given, else h - probe_h (h without a probe).
template <typename T>
class RnnSequenceGrad : public SequenceOp {
 public:
  explicit RnnSequenceGrad(OpKernelConstruction* ctx)
      : SequenceOp(ctx), relu_(IsRelu(ctx)) {}

  void Compute(OpKernelContext* ctx) override {
    Dims d;
    if (!Prepare(ctx, 2, 1, {{0, Is::kOptionalSequence}, {1, Is::kSequence}, {3, Is::kKernel},
                 {4, Is::kState}, {5, Is::kMask}, {6, Is::kProbe}, {7, Is::kProbe}}, &d))
      return;
    const int64_t S = d.S, B = d.B, H = d.H;
    const T *dh = OptionalPtr<T>(ctx, 0), *h = Ptr<T>(ctx, 1), *dh_last = Ptr<T>(ctx, 4),
            *probe_h = OptionalPtr<T>(ctx, 6), *act = OptionalPtr<T>(ctx, 7);
    T* dz = Output<T>(ctx, 0, ctx->input(1).shape(), dh == nullptr ? -1 : 0);
    T* dh0 = Output<T>(ctx, 1, ctx->input(2).shape());
    T* db = Output<T>(ctx, 2, TensorShape({H}));
    T* dprobe_h = ProbeGrad<T>(ctx, 3, 6);
    if (!ctx->status().ok()) return;
    const bool* mask = OptionalPtr<bool>(ctx, 5);
    const auto u_t = Recurrent(ctx, B, Ptr<T>(ctx, 3), H, H, true);
    ColumnSums<T> db_sums(ctx, B, H);
    Shards(ctx, B, [&](int64_t lo, int64_t hi, int64_t s) {
      const int64_t n = hi - lo;
      CarriedGrad<T> dh_carry(dh0, dh_last, dh, mask, dprobe_h, B, H, lo, hi);
      Vec<T> sigma(n * H);  // σ(z_t)
      for (int64_t t = S - 1; t >= 0; --t) {
        dh_carry.Begin(t);  // now the total ∂ℓ/∂h_t (0 at masked rows)
        sigma = In<T>(At(act == nullptr ? h : act, t, B, lo, H), n * H);
        if (act == nullptr && probe_h != nullptr) sigma -= In<T>(At(probe_h, t, B, lo, H), n * H);
        In<T> carry(dh_carry.data(), n * H);
        Out<T> dz_t(At(dz, t, B, lo, H), n * H);
        if (relu_) {  // σ'(z) = 1 where z > 0, that is where σ(z) > 0 (TensorFlow's ReluGrad too)
          dz_t = (sigma > T(0)).select(carry, T(0));
        } else {
          dz_t = carry * (T(1) - sigma * sigma);
        }
        db_sums.Add(s, dz, t, B, lo, n);
        u_t.Multiply(At(dz, t, B, lo, H), n, dh_carry.data(), false);
        dh_carry.End();
      }
    });
    db_sums.Write(db);
  }

 private:
  const bool relu_;
};

// ---------------------------------------------------------------------------------------------
// The projection with the swap of the first two axes between a layer's batch-major x and the
// time-major sequences above: x [P, Q, K] and w [K, N] (transpose_w: w [N, K], times w^T) give
// y [Q, P, N], y[q, p] = x[p', q'] w, where p' = P - 1 - p if reverse_0 (else p) and
// q' = Q - 1 - q if reverse_1 (else q). The gradient of a sequence op's x [B, T, D] is this op
// on dxp [T, B, kH] with w transposed and reverse_0 for go_backwards. One op in place of a
// transpose and a matmul, whose fixed costs are much of a call at small batches. Each thread
// takes its shard of [0, P) and for each p multiplies its Q rows (contiguous in x) with w's
// packed panels. Where P is too small to split, each thread takes a range of q and multiplies
// its P rows.
template <typename T>
class Project : public SequenceOp {
 public:
  explicit Project(OpKernelConstruction* ctx) : SequenceOp(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse_0", &reverse_0_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse_1", &reverse_1_));
  }

  void Compute(OpKernelContext* ctx) override {
    Shapes shapes(ctx);
    if (!shapes.Check(0, {-1, -1, -1}) || !shapes.Check(1, {-1, -1})) return;
    const Tensor& x = ctx->input(0);
    const int64_t P = x.dim_size(0), Q = x.dim_size(1), K = x.dim_size(2);
    const int64_t N = ctx->input(1).dim_size(transpose_w_ ? 0 : 1);
    if (!shapes.Check(1, transpose_w_ ? std::initializer_list<int64_t>{N, K}
                                       : std::initializer_list<int64_t>{K, N})) {
      return;
    }
    T* y = Output<T>(ctx, 0, TensorShape({Q, P, N}));
    if (!ctx->status().ok() || P * Q * N == 0) return;
    if (K == 0) {
      std::fill_n(y, P * Q * N, T(0));
      return;
    }
    // shards of p, each product Q rows; or, too few p to split, shards of q, each P rows
    const bool shard_p = NumShards(ctx, P) > 1;
    const RecurrentKernel<T> w(Ptr<T>(ctx, 1), K, N, transpose_w_, -1, product_,
                               shard_p ? Q : P);
    const T* in = Ptr<T>(ctx, 0);
    // x[p', q'] for p = 0 or q = 0, and the strides from one p or q to the next
    const int64_t p_step = (reverse_0_ ? -1 : 1) * Q * K, q_step = (reverse_1_ ? -1 : 1) * K;
    const T* first = in + ((reverse_0_ ? P - 1 : 0) * Q + (reverse_1_ ? Q - 1 : 0)) * K;
    if (shard_p) {
      // each p: its Q rows (contiguous in x, or in reverse) into rows P N apart of y
      Shards(ctx, P, [&](int64_t lo, int64_t hi, int64_t) {
        for (int64_t p = lo; p < hi; ++p) {
          w.Multiply(first + p * p_step, Q, y + p * N, false, q_step, P * N);
        }
      });
    } else {  // too few rows p to split: each q, its P rows
      Shards(ctx, Q, [&](int64_t lo, int64_t hi, int64_t) {
        for (int64_t q = lo; q < hi; ++q) {
          w.Multiply(first + q * q_step, P, y + q * P * N, false, p_step, N);
        }
      });
    }
  }

 private:
  bool transpose_w_ = false, reverse_0_ = false, reverse_1_ = false;
};

// ---------------------------------------------------------------------------------------------
// The weight gradients, sums of outer products of row pairs (outer_sum.h), each thread taking
// its share of C's columns or of the pairs. ProjectWeightGrad: the projection's,
// dw = sum_{q,p} x[p', q']^T dy[q, p] for x [P, Q, K], dy [Q, P, N] and Project's attrs ([K, N],
// or its transpose [N, K] with transpose_w). RecurrentWeightGrad: a recurrence's,
// du = sum_t h_{t-1}^T dz_t for h0 [B, H], h [T, B, H] (h_{-1} = h0) and dz [T, B, N]: [H, N].
// In place of the transpose of x and the matmuls (oneDNN's, on TensorFlow's threads) they
// replace.
template <typename T>
class WeightGrad : public SequenceOp {
 protected:
  using SequenceOp::SequenceOp;

  // out [K, N] = sum_m a[m]^T b[m]: the pairs' rows. Where the threads split the pairs, the
  // first sums its own into `out`, each other into a C of its own (each writes all of it),
  // added to `out` in order.
  void Sum(OpKernelContext* ctx, int64_t K, int64_t N, const std::vector<const T*>& a,
           const std::vector<const T*>& b, T* out) const {
    const OuterSum<T> sum(product_, static_cast<int64_t>(a.size()), K, N, a.data(), b.data(),
                          out, NumShards(ctx, std::numeric_limits<int64_t>::max()));
    const int64_t shards = NumShards(ctx, sum.Items());
    const int64_t parts = sum.SplitPairs() ? shards - 1 : 0;
    std::unique_ptr<T[]> partial(new T[parts * K * N]);
    Shards(ctx, sum.Items(), [&](int64_t lo, int64_t hi, int64_t s) {
      sum.Run(lo, hi, s == 0 || parts == 0 ? out : partial.get() + (s - 1) * K * N);
    });
    for (int64_t p = 0; p < parts; ++p) {
      Out<T>(out, K * N) += In<T>(partial.get() + p * K * N, K * N);
    }
  }
};

template <typename T>
class ProjectWeightGrad : public WeightGrad<T> {
 public:
  explicit ProjectWeightGrad(OpKernelConstruction* ctx) : WeightGrad<T>(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse_0", &reverse_0_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse_1", &reverse_1_));
  }

  void Compute(OpKernelContext* ctx) override {
    Shapes shapes(ctx);
    if (!shapes.Check(0, {-1, -1, -1})) return;
    const Tensor& x = ctx->input(0);
    const int64_t P = x.dim_size(0), Q = x.dim_size(1), K = x.dim_size(2);
    if (!shapes.Check(1, {Q, P, -1})) return;
    const int64_t N = ctx->input(1).dim_size(2);
    T* dw = Output<T>(ctx, 0, transpose_w_ ? TensorShape({N, K}) : TensorShape({K, N}));
    if (!ctx->status().ok()) return;
    std::vector<const T*> rows_x(P * Q), rows_dy(P * Q);
    const T* in = Ptr<T>(ctx, 0);
    const T* dy = Ptr<T>(ctx, 1);
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t q_in = reverse_1_ ? Q - 1 - q : q;
      for (int64_t p = 0; p < P; ++p) {
        rows_x[q * P + p] = in + ((reverse_0_ ? P - 1 - p : p) * Q + q_in) * K;
        rows_dy[q * P + p] = dy + (q * P + p) * N;
      }
    }
    if (transpose_w_) {
      this->Sum(ctx, N, K, rows_dy, rows_x, dw);
    } else {
      this->Sum(ctx, K, N, rows_x, rows_dy, dw);
    }
  }

 private:
  bool transpose_w_ = false, reverse_0_ = false, reverse_1_ = false;
};

template <typename T>
class RecurrentWeightGrad : public WeightGrad<T> {
 public:
  using WeightGrad<T>::WeightGrad;

  void Compute(OpKernelContext* ctx) override {
    Shapes shapes(ctx);
    if (!shapes.Check(0, {-1, -1})) return;
    const int64_t B = ctx->input(0).dim_size(0), H = ctx->input(0).dim_size(1);
    if (!shapes.Check(1, {-1, B, H})) return;
    const int64_t S = ctx->input(1).dim_size(0);
    if (!shapes.Check(2, {S, B, -1})) return;
    const int64_t N = ctx->input(2).dim_size(2);
    T* du = Output<T>(ctx, 0, TensorShape({H, N}));
    if (!ctx->status().ok()) return;
    const T *h0 = Ptr<T>(ctx, 0), *h = Ptr<T>(ctx, 1), *dz = Ptr<T>(ctx, 2);
    std::vector<const T*> rows_h(S * B), rows_dz(S * B);
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        rows_h[t * B + b] = Prev<T>(h, h0, t, B, b, H);
        rows_dz[t * B + b] = At(dz, t, B, b, N);
      }
    }
    this->Sum(ctx, H, N, rows_h, rows_dz, du);
  }
};

// Output shapes: [T, B, H] (T from input `sequence`, B and H from input `state`) for the outputs
// `same_as_sequence`; input i's shape for each pair (output, i) of `same_as_input`; and for each
// pair (output, i) of `column_sums` a vector as long as input i's rows ([T, B, w] -> [w]).
absl::Status SequenceShapes(InferenceContext* ctx, int sequence, int state,
                            std::initializer_list<int> same_as_sequence,
                            std::initializer_list<std::pair<int, int>> same_as_input,
                            std::initializer_list<std::pair<int, int>> column_sums = {}) {
  auto seq = ctx->input(sequence);
  auto st = ctx->input(state);
  auto per_unit = ctx->MakeShape({ctx->Dim(seq, 0), ctx->Dim(st, 0), ctx->Dim(st, 1)});
  if (!ctx->RankKnown(seq) || !ctx->RankKnown(st)) per_unit = ctx->UnknownShape();
  for (int k : same_as_sequence) ctx->set_output(k, per_unit);
  for (const auto& p : same_as_input) ctx->set_output(p.first, ctx->input(p.second));
  for (const auto& p : column_sums) {
    auto rows = ctx->input(p.second);
    ctx->set_output(p.first, ctx->RankKnown(rows) && ctx->Rank(rows) == 3
                                 ? ctx->Vector(ctx->Dim(rows, 2))
                                 : ctx->UnknownShapeOfRank(1));  // (the kernel checks ranks)
  }
  return absl::OkStatus();
}

// The shapes of a forward op that projects its inputs (ProjectingOp: x [B, T, D], w [D, k H],
// h0 [B, H]): outputs `per_unit` [T, B, H], `per_gate` [T, B, k H] and `per_state` h0's shape.
// (Some of the sequences are empty where the graph does not read them: see LstmSequence.)
absl::Status ProjectingShapes(InferenceContext* c, std::initializer_list<int> per_unit,
                              std::initializer_list<int> per_gate,
                              std::initializer_list<int> per_state) {
  ::tensorflow::shape_inference::ShapeHandle x, w, state;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &state));
  const auto steps = c->Dim(x, 1), batch = c->Dim(state, 0);
  for (int k : per_unit) c->set_output(k, c->MakeShape({steps, batch, c->Dim(state, 1)}));
  for (int k : per_gate) c->set_output(k, c->MakeShape({steps, batch, c->Dim(w, 1)}));
  for (int k : per_state) c->set_output(k, state);
  return absl::OkStatus();
}

}  // namespace

// The attrs of the forward ops that project their inputs.
#define KFR_PROJECTING_ATTRS                                     \
  .Attr("T: {float, double}")                                    \
  .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'") \
  .Attr("spin: bool = true")                                     \
  .Attr("reverse: bool = false")

REGISTER_OP("KerasFancyrnnLstmSequence")
    .Input("x: T").Input("w: T").Input("h0: T").Input("c0: T").Input("u: T").Input("b: T")
    .Input("mask: bool").Input("probe_h: T").Input("probe_c: T")
    .Output("z: T").Output("h: T").Output("c: T").Output("h_last: T").Output("c_last: T")
    KFR_PROJECTING_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ProjectingShapes(c, {1, 2}, {0}, {3, 4}); });

REGISTER_OP("KerasFancyrnnLstmSequenceGrad")
    .Input("dh: T").Input("dc: T").Input("dz_in: T").Input("z: T").Input("c: T").Input("c0: T")
    .Input("u: T").Input("dh_last: T").Input("dc_last: T")
    .Input("mask: bool").Input("probe_h: T").Input("probe_c: T")
    .Output("dz: T").Output("dh0: T").Output("dc0: T").Output("db: T")
    .Output("dprobe_h: T").Output("dprobe_c: T")
    .Attr("T: {float, double}")
    .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'")
    .Attr("spin: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 3, 5, {}, {{0, 3}, {1, 5}, {2, 5}, {4, 10}, {5, 11}}, {{3, 3}});
    });

REGISTER_OP("KerasFancyrnnGruSequence")
    .Input("x: T").Input("w: T").Input("h0: T").Input("u: T").Input("b_rec: T").Input("b_in: T")
    .Input("mask: bool").Input("probe_h: T")
    .Output("h: T").Output("rec: T").Output("h_last: T").Output("xp: T")
    KFR_PROJECTING_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ProjectingShapes(c, {0}, {1, 3}, {2}); });

REGISTER_OP("KerasFancyrnnGruSequenceGrad")
    .Input("dh: T").Input("drec_in: T").Input("xp: T").Input("rec: T").Input("h: T")
    .Input("h0: T").Input("u: T").Input("dh_last: T").Input("b_in: T")
    .Input("mask: bool").Input("probe_h: T")
    .Output("dxp: T").Output("drec: T").Output("dh0: T").Output("db_in: T").Output("db_rec: T")
    .Output("dprobe_h: T")
    .Attr("T: {float, double}")
    .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'")
    .Attr("spin: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 2, 5, {}, {{0, 2}, {1, 3}, {2, 5}, {5, 10}}, {{3, 2}, {4, 3}});
    });

REGISTER_OP("KerasFancyrnnGruBeforeSequence")
    .Input("x: T").Input("w: T").Input("h0: T").Input("u: T").Input("b: T")
    .Input("mask: bool").Input("probe_h: T")
    .Output("h: T").Output("rec: T").Output("rh: T").Output("h_last: T").Output("xp: T")
    KFR_PROJECTING_ATTRS
    .SetShapeFn([](InferenceContext* c) { return ProjectingShapes(c, {0, 2}, {1, 4}, {3}); });

REGISTER_OP("KerasFancyrnnGruBeforeSequenceGrad")
    .Input("dh: T").Input("drec_in: T").Input("drh_in: T").Input("xp: T").Input("rec: T")
    .Input("h: T").Input("h0: T").Input("u: T").Input("dh_last: T").Input("b: T")
    .Input("mask: bool").Input("probe_h: T")
    .Output("dxp: T").Output("drec: T").Output("dh0: T").Output("db: T").Output("dprobe_h: T")
    .Attr("T: {float, double}")
    .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'")
    .Attr("spin: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 3, 6, {}, {{0, 3}, {1, 4}, {2, 6}, {4, 11}}, {{3, 3}});
    });

REGISTER_OP("KerasFancyrnnRnnSequence")
    .Input("x: T").Input("w: T").Input("h0: T").Input("u: T").Input("b: T")
    .Input("mask: bool").Input("probe_h: T")
    .Output("h: T").Output("h_last: T").Output("act: T")
    KFR_PROJECTING_ATTRS
    .Attr("activation: {'tanh', 'relu'} = 'tanh'")
    .SetShapeFn([](InferenceContext* c) {
      std::string activation;
      TF_RETURN_IF_ERROR(c->GetAttr("activation", &activation));
      auto probe = c->input(6);  // act: as the probe for ReLU, else empty
      const bool probed = !c->RankKnown(probe) || c->Rank(probe) != 1;
      c->set_output(2, activation == "relu" && probed ? probe : c->Vector(0));
      return ProjectingShapes(c, {0}, {}, {1});
    });

REGISTER_OP("KerasFancyrnnRnnSequenceGrad")
    .Input("dh: T").Input("h: T").Input("h0: T").Input("u: T").Input("dh_last: T")
    .Input("mask: bool").Input("probe_h: T").Input("act: T")
    .Output("dz: T").Output("dh0: T").Output("db: T").Output("dprobe_h: T")
    .Attr("T: {float, double}")
    .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'")
    .Attr("spin: bool = true")
    .Attr("activation: {'tanh', 'relu'} = 'tanh'")
    .SetShapeFn([](InferenceContext* c) {
      return SequenceShapes(c, 1, 2, {}, {{0, 1}, {1, 2}, {3, 6}}, {{2, 1}});
    });

// The attrs of the projection and of the gradient of its w.
#define KFR_PROJECT_ATTRS                                       \
  .Attr("T: {float, double}")                                   \
  .Attr("transpose_w: bool = false")                            \
  .Attr("reverse_0: bool = false")                              \
  .Attr("reverse_1: bool = false")                              \
  .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'") \
  .Attr("spin: bool = true")

REGISTER_OP("KerasFancyrnnProject")
    .Input("x: T").Input("w: T")
    .Output("y: T")
    KFR_PROJECT_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      bool transpose_w = false;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
      ::tensorflow::shape_inference::ShapeHandle x, w;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
      c->set_output(0, c->MakeShape({c->Dim(x, 1), c->Dim(x, 0),
                                     c->Dim(w, transpose_w ? 0 : 1)}));
      return absl::OkStatus();
    });

REGISTER_OP("KerasFancyrnnProjectWeightGrad")
    .Input("x: T").Input("dy: T")
    .Output("dw: T")
    KFR_PROJECT_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      bool transpose_w = false;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
      ::tensorflow::shape_inference::ShapeHandle x, dy;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &dy));
      auto k = c->Dim(x, 2), n = c->Dim(dy, 2);
      c->set_output(0, transpose_w ? c->Matrix(n, k) : c->Matrix(k, n));
      return absl::OkStatus();
    });

REGISTER_OP("KerasFancyrnnRecurrentWeightGrad")
    .Input("h0: T").Input("h: T").Input("dz: T")
    .Output("du: T")
    .Attr("T: {float, double}")
    .Attr("product: {'auto', 'avx512', 'avx2', 'eigen'} = 'auto'")
    .Attr("spin: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle h0, dz;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &h0));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 3, &dz));
      c->set_output(0, c->Matrix(c->Dim(h0, 1), c->Dim(dz, 2)));
      return absl::OkStatus();
    });

// The recurrent products this build can run, widest first (keras_fancyrnn.ops.native.products).
REGISTER_OP("KerasFancyrnnProducts").Output("names: string").SetShapeFn([](InferenceContext* c) {
  c->set_output(0, c->Scalar());
  return absl::OkStatus();
});

class Products : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<::tensorflow::tstring>()() = CompiledProducts();
  }
};

REGISTER_KERNEL_BUILDER(Name("KerasFancyrnnProducts").Device(::tensorflow::DEVICE_CPU), Products);

KFR_REGISTER_KERNEL("KerasFancyrnnLstmSequence", LstmSequence)
KFR_REGISTER_KERNEL("KerasFancyrnnLstmSequenceGrad", LstmSequenceGrad)
KFR_REGISTER_KERNEL("KerasFancyrnnGruSequence", GruSequence)
KFR_REGISTER_KERNEL("KerasFancyrnnGruSequenceGrad", GruSequenceGrad)
KFR_REGISTER_KERNEL("KerasFancyrnnGruBeforeSequence", GruBeforeSequence)
KFR_REGISTER_KERNEL("KerasFancyrnnGruBeforeSequenceGrad", GruBeforeSequenceGrad)
KFR_REGISTER_KERNEL("KerasFancyrnnRnnSequence", RnnSequence)
KFR_REGISTER_KERNEL("KerasFancyrnnRnnSequenceGrad", RnnSequenceGrad)
KFR_REGISTER_KERNEL("KerasFancyrnnProject", Project)
KFR_REGISTER_KERNEL("KerasFancyrnnProjectWeightGrad", ProjectWeightGrad)
KFR_REGISTER_KERNEL("KerasFancyrnnRecurrentWeightGrad", RecurrentWeightGrad)

}  // namespace keras_fancyrnn
