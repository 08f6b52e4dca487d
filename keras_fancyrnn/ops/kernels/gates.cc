// Fused gate arithmetic of one LSTM / GRU step, forward and backward (keras_fancyrnn.ops.native).
//
// The recurrent matmul h_{t-1} U stays a TensorFlow MatMul (oneDNN); these kernels replace the
// ten to twenty small element-wise ops that follow it in every step, whose cost on a CPU is
// per-op overhead rather than arithmetic. The activations are Eigen's logistic and tanh, the
// functors TensorFlow's own Sigmoid and Tanh ops use. Equations: gate_math.h, from
// keras_fancyrnn/layers/lstm.py and keras_fancyrnn/layers/gru.py (LSTMCell.step, GRUCell.step with
// reset_after=True).
#include <vector>

#include "gate_math.h"
#include "kernel_util.h"

namespace keras_fancyrnn {
namespace {

// What the gate kernels share: input `state` ([batch, units]) fixes B and H, and each input i of
// `widths` (i, k) must be [B, k H]; then Run computes.
template <typename T>
class GateKernel : public OpKernel {
 public:
  GateKernel(OpKernelConstruction* ctx, int state,
             std::initializer_list<std::pair<int, int>> widths)
      : OpKernel(ctx), state_(state), widths_(widths) {}

  void Compute(OpKernelContext* ctx) final {
    Shapes shapes(ctx);
    if (!shapes.Check(state_, {-1, -1})) return;
    const int64_t B = ctx->input(state_).dim_size(0), H = ctx->input(state_).dim_size(1);
    for (const auto& w : widths_) {
      if (!shapes.Check(w.first, {B, w.second * H})) return;
    }
    Run(ctx, B, H);
  }

 protected:
  virtual void Run(OpKernelContext* ctx, int64_t B, int64_t H) = 0;

 private:
  const int state_;
  const std::vector<std::pair<int, int>> widths_;
};

// ---------------------------------------------------------------------------------------------
// LSTM, gates i, f, c, o of z = x W + b + h_{t-1} U:
//   c = σ(z_f) c_prev + σ(z_i) tanh(z_c) [+ p],   h = σ(z_o) tanh(c).
// kProbed: input 2 is the diagnostics probe p of c_t, added before c_t feeds h_t (its gradient is
// then the total ∂ℓ/∂c_t; keras_fancyrnn/engine/loop.py).

using Widths = std::initializer_list<std::pair<int, int>>;

template <typename T, bool kProbed>
class LstmGates : public GateKernel<T> {
 public:
  explicit LstmGates(OpKernelConstruction* ctx)
      : GateKernel<T>(ctx, 1, kProbed ? Widths{{0, 4}, {2, 1}} : Widths{{0, 4}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& c_prev = ctx->input(1);
    T* h = Output<T>(ctx, 0, c_prev.shape());
    T* c = Output<T>(ctx, 1, c_prev.shape());
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
      : GateKernel<T>(ctx, 3,
                      kProbed ? Widths{{0, 1}, {1, 1}, {2, 4}, {4, 1}}
                              : Widths{{0, 1}, {1, 1}, {2, 4}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& c_prev = ctx->input(3);
    T* dz = Output<T>(ctx, 0, ctx->input(2).shape());
    T* dcp = Output<T>(ctx, 1, c_prev.shape());
    T* dp = kProbed ? Output<T>(ctx, 2, c_prev.shape()) : nullptr;
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
      : GateKernel<T>(ctx, 2, {{0, 3}, {1, 3}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& h_prev = ctx->input(2);
    T* h = Output<T>(ctx, 0, h_prev.shape());
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
      : GateKernel<T>(ctx, 3, {{0, 1}, {1, 3}, {2, 3}}) {}

 protected:
  void Run(OpKernelContext* ctx, int64_t B, int64_t H) override {
    const Tensor& h_prev = ctx->input(3);
    T* dxp = Output<T>(ctx, 0, ctx->input(1).shape());
    T* drec = Output<T>(ctx, 1, ctx->input(2).shape());
    T* dhp = Output<T>(ctx, 2, h_prev.shape());
    if (dxp == nullptr || drec == nullptr || dhp == nullptr) return;
    const T *dh = Ptr<T>(ctx, 0), *xp = Ptr<T>(ctx, 1), *rec = Ptr<T>(ctx, 2), *hp = Ptr<T>(ctx, 3);
    GruScratch<T> scratch(H);
    for (int64_t b = 0; b < B; ++b) {
      GruRowGrad(dh + b * H, xp + b * 3 * H, rec + b * 3 * H, hp + b * H, dxp + b * 3 * H,
                 drec + b * 3 * H, dhp + b * H, H, scratch);
    }
  }
};

template <typename T>
using LstmGatesPlain = LstmGates<T, false>;
template <typename T>
using LstmGatesProbed = LstmGates<T, true>;
template <typename T>
using LstmGatesGradPlain = LstmGatesGrad<T, false>;
template <typename T>
using LstmGatesGradProbed = LstmGatesGrad<T, true>;

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

KFR_REGISTER_KERNEL("KerasFancyrnnLstmGates", LstmGatesPlain)
KFR_REGISTER_KERNEL("KerasFancyrnnLstmGatesGrad", LstmGatesGradPlain)
KFR_REGISTER_KERNEL("KerasFancyrnnLstmGatesProbed", LstmGatesProbed)
KFR_REGISTER_KERNEL("KerasFancyrnnLstmGatesProbedGrad", LstmGatesGradProbed)
KFR_REGISTER_KERNEL("KerasFancyrnnGruGates", GruGates)
KFR_REGISTER_KERNEL("KerasFancyrnnGruGatesGrad", GruGatesGrad)

}  // namespace keras_fancyrnn
