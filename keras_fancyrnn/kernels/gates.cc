// Fused gate arithmetic of one LSTM / GRU step, forward and backward (keras_fancyrnn.native).
//
// The recurrent matmul h_{t-1} U stays a TensorFlow MatMul (oneDNN); these kernels replace the
// ten to twenty small element-wise ops that follow it in every step, whose cost on a CPU is
// per-op overhead rather than arithmetic. The activations are Eigen's logistic and tanh, the
// functors TensorFlow's own Sigmoid and Tanh ops use. Equations: gate_math.h, from
// keras_fancyrnn/lstm.py and keras_fancyrnn/gru.py (LSTMCell.step, GRUCell.step with
// reset_after=True).
#include <vector>

#include "gate_math.h"

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_fancyrnn {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::shape_inference::InferenceContext;

// Output k of an op gets the shape of input i.
absl::Status SameShapes(InferenceContext* ctx, std::initializer_list<std::pair<int, int>> pairs) {
  for (const auto& p : pairs) ctx->set_output(p.first, ctx->input(p.second));
  return absl::OkStatus();
}

template <typename T>
const T* Ptr(OpKernelContext* ctx, int i) {
  return ctx->input(i).template flat<T>().data();
}

template <typename T>
T* NewOutput(OpKernelContext* ctx, int i, const tensorflow::TensorShape& shape) {
  Tensor* out = nullptr;
  auto status = ctx->allocate_output(i, shape, &out);
  if (!status.ok()) {
    ctx->SetStatus(status);
    return nullptr;
  }
  return out->template flat<T>().data();
}

// What the four kernels share: input `state` ([batch, units], named `state_name`) fixes B and H,
// the inputs in `widths` must be [B, k H]; then Run computes.
template <typename T>
class GateKernel : public OpKernel {
 public:
  GateKernel(OpKernelConstruction* ctx, int state, const char* state_name,
             std::initializer_list<std::pair<int, int>> widths)
      : OpKernel(ctx), state_(state), state_name_(state_name), widths_(widths) {}

  void Compute(OpKernelContext* ctx) final {
    const Tensor& s = ctx->input(state_);
    OP_REQUIRES(ctx, s.dims() == 2,
                absl::InvalidArgumentError(
                    absl::StrCat(state_name_, " must be a [batch, units] matrix")));
    const int64_t B = s.dim_size(0), H = s.dim_size(1);
    for (const auto& w : widths_) {
      const Tensor& t = ctx->input(w.first);
      OP_REQUIRES(ctx, t.dims() == 2 && t.dim_size(0) == B && t.dim_size(1) == w.second * H,
                  absl::InvalidArgumentError(absl::StrCat(
                      "input ", w.first, " must have shape [", B, ", ", w.second * H, "], got ",
                      t.shape().DebugString())));
    }
    Run(ctx, B, H);
  }

 protected:
  virtual void Run(OpKernelContext* ctx, int64_t B, int64_t H) = 0;

 private:
  const int state_;
  const char* state_name_;
  const std::vector<std::pair<int, int>> widths_;
};

// ---------------------------------------------------------------------------------------------
// LSTM, gates i, f, c, o of z = x W + b + h_{t-1} U:
//   c = σ(z_f) c_prev + σ(z_i) tanh(z_c) [+ p],   h = σ(z_o) tanh(c).
// kProbed: input 2 is the diagnostics probe p of c_t, added before c_t feeds h_t (its gradient is
// then the total ∂ℓ/∂c_t; keras_fancyrnn/engine.py).

using Widths = std::initializer_list<std::pair<int, int>>;

template <typename T, bool kProbed>
class LstmGates : public GateKernel<T> {
 public:
  explicit LstmGates(OpKernelConstruction* ctx)
      : GateKernel<T>(ctx, 1, "c_prev", kProbed ? Widths{{0, 4}, {2, 1}} : Widths{{0, 4}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& c_prev = ctx->input(1);
    T* h = NewOutput<T>(ctx, 0, c_prev.shape());
    T* c = NewOutput<T>(ctx, 1, c_prev.shape());
    if (h == nullptr || c == nullptr) return;
    const T *z = Ptr<T>(ctx, 0), *cp = Ptr<T>(ctx, 1), *p = kProbed ? Ptr<T>(ctx, 2) : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      LstmRow(z + b * 4 * H, cp + b * H, kProbed ? p + b * H : nullptr, h + b * H, c + b * H, H);
    }
  }
};

// Inputs dh, dc (the gradients of h and c), z, c_prev [, p]. Outputs dz, dc_prev [, dp]. The
// gates and c are recomputed from z and c_prev (cheaper than keeping them for every step).
template <typename T, bool kProbed>
class LstmGatesGrad : public GateKernel<T> {
 public:
  explicit LstmGatesGrad(OpKernelConstruction* ctx)
      : GateKernel<T>(ctx, 3, "c_prev",
                      kProbed ? Widths{{0, 1}, {1, 1}, {2, 4}, {4, 1}}
                              : Widths{{0, 1}, {1, 1}, {2, 4}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& c_prev = ctx->input(3);
    T* dz = NewOutput<T>(ctx, 0, ctx->input(2).shape());
    T* dcp = NewOutput<T>(ctx, 1, c_prev.shape());
    T* dp = kProbed ? NewOutput<T>(ctx, 2, c_prev.shape()) : nullptr;
    if (dz == nullptr || dcp == nullptr || (kProbed && dp == nullptr)) return;
    const T *dh = Ptr<T>(ctx, 0), *dc = Ptr<T>(ctx, 1), *z = Ptr<T>(ctx, 2), *cp = Ptr<T>(ctx, 3);
    const T* p = kProbed ? Ptr<T>(ctx, 4) : nullptr;
    LstmScratch<T> scratch(H);
    for (int64_t b = 0; b < B; ++b) {
      LstmRowGrad(dh + b * H, dc + b * H, z + b * 4 * H, cp + b * H, kProbed ? p + b * H : nullptr,
                  dz + b * 4 * H, dcp + b * H, kProbed ? dp + b * H : nullptr, H, scratch);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// GRU, reset_after=True (Keras's default), blocks z, r, h of xp = x W + b_in and
// rec = h_{t-1} U + b_rec:
//   z = σ(xp_z + rec_z),  r = σ(xp_r + rec_r),  ĥ = tanh(xp_h + r rec_h),  h = z h_prev + (1 - z) ĥ.

template <typename T>
class GruGates : public GateKernel<T> {
 public:
  explicit GruGates(OpKernelConstruction* ctx)
      : GateKernel<T>(ctx, 2, "h_prev", {{0, 3}, {1, 3}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& h_prev = ctx->input(2);
    T* h = NewOutput<T>(ctx, 0, h_prev.shape());
    if (h == nullptr) return;
    const T *xp = Ptr<T>(ctx, 0), *rec = Ptr<T>(ctx, 1), *hp = Ptr<T>(ctx, 2);
    GruScratch<T> scratch(H);
    for (int64_t b = 0; b < B; ++b) {
      GruRow(xp + b * 3 * H, rec + b * 3 * H, hp + b * H, h + b * H, H, scratch);
    }
  }
};

// Inputs dh, xp, rec, h_prev. Outputs d xp, d rec and the direct part of d h_prev (z dh; the part
// through rec is the caller's matmul). The gates are recomputed from xp and rec.
template <typename T>
class GruGatesGrad : public GateKernel<T> {
 public:
  explicit GruGatesGrad(OpKernelConstruction* ctx)
      : GateKernel<T>(ctx, 3, "h_prev", {{0, 1}, {1, 3}, {2, 3}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& h_prev = ctx->input(3);
    T* dxp = NewOutput<T>(ctx, 0, ctx->input(1).shape());
    T* drec = NewOutput<T>(ctx, 1, ctx->input(2).shape());
    T* dhp = NewOutput<T>(ctx, 2, h_prev.shape());
    if (dxp == nullptr || drec == nullptr || dhp == nullptr) return;
    const T *dh = Ptr<T>(ctx, 0), *xp = Ptr<T>(ctx, 1), *rec = Ptr<T>(ctx, 2), *hp = Ptr<T>(ctx, 3);
    GruScratch<T> scratch(H);
    for (int64_t b = 0; b < B; ++b) {
      GruRowGrad(dh + b * H, xp + b * 3 * H, rec + b * 3 * H, hp + b * H, dxp + b * 3 * H,
                 drec + b * 3 * H, dhp + b * H, H, scratch);
    }
  }
};

}  // namespace

#define KFR_SHAPES(...) [](InferenceContext* ctx) { return SameShapes(ctx, {__VA_ARGS__}); }

REGISTER_OP("KerasFancyrnnLstmGates")
    .Input("z: T").Input("c_prev: T")
    .Output("h: T").Output("c: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 1}, {1, 1}));

REGISTER_OP("KerasFancyrnnLstmGatesGrad")
    .Input("dh: T").Input("dc: T").Input("z: T").Input("c_prev: T")
    .Output("dz: T").Output("dc_prev: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 2}, {1, 3}));

REGISTER_OP("KerasFancyrnnLstmGatesProbed")
    .Input("z: T").Input("c_prev: T").Input("probe: T")
    .Output("h: T").Output("c: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 1}, {1, 1}));

REGISTER_OP("KerasFancyrnnLstmGatesProbedGrad")
    .Input("dh: T").Input("dc: T").Input("z: T").Input("c_prev: T").Input("probe: T")
    .Output("dz: T").Output("dc_prev: T").Output("dprobe: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 2}, {1, 3}, {2, 3}));

REGISTER_OP("KerasFancyrnnGruGates")
    .Input("xp: T").Input("rec: T").Input("h_prev: T")
    .Output("h: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 2}));

REGISTER_OP("KerasFancyrnnGruGatesGrad")
    .Input("dh: T").Input("xp: T").Input("rec: T").Input("h_prev: T")
    .Output("dxp: T").Output("drec: T").Output("dh_prev: T")
    .Attr("T: {float, double}")
    .SetShapeFn(KFR_SHAPES({0, 1}, {1, 2}, {2, 3}));

#define KFR_KERNEL(NAME, T, ...) \
  REGISTER_KERNEL_BUILDER(         \
      Name(NAME).Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), __VA_ARGS__);
#define KFR_KERNELS(T)                                                        \
  KFR_KERNEL("KerasFancyrnnLstmGates", T, LstmGates<T, false>)                \
  KFR_KERNEL("KerasFancyrnnLstmGatesGrad", T, LstmGatesGrad<T, false>)        \
  KFR_KERNEL("KerasFancyrnnLstmGatesProbed", T, LstmGates<T, true>)           \
  KFR_KERNEL("KerasFancyrnnLstmGatesProbedGrad", T, LstmGatesGrad<T, true>)   \
  KFR_KERNEL("KerasFancyrnnGruGates", T, GruGates<T>)                         \
  KFR_KERNEL("KerasFancyrnnGruGatesGrad", T, GruGatesGrad<T>)

KFR_KERNELS(float)
KFR_KERNELS(double)

}  // namespace keras_fancyrnn
