// The Euclidean norm of every row of a matrix, in one op (keras_fancyrnn.ops.native.row_norms):
// the monitor's per-step ‖∂ℓ/∂h_t‖ of every example, from a [B T, H] gradient. In TensorFlow's
// ops the same norm, scaled so that tiny gradients do not underflow when squared, is eight
// element-wise ops and reductions over the whole gradient, each a pass through memory; here each
// row is read while it is in cache.
//
// float rows: the squares are summed in double, where no float's square underflows or overflows
// (the smallest float squared is 2e-90, the largest 1.2e77). double rows: scaled by the row's
// largest magnitude before squaring, as the Python fallback does.
#include <Eigen/Core>
#include <cmath>

#include "kernel_util.h"

namespace keras_fancyrnn {
namespace {

// (Eigen's reductions keep several partial sums in vector registers: one running sum would wait
// for each addition's result.)
inline double RowNorm(const float* row, int64_t n) {
  return std::sqrt(Eigen::Map<const Eigen::ArrayXf>(row, n).cast<double>().square().sum());
}

inline double RowNorm(const double* row, int64_t n) {
  if (n == 0) return 0.0;
  const Eigen::Map<const Eigen::ArrayXd> x(row, n);
  const double scale = x.abs().maxCoeff();
  // 0 for a zero row; inf or nan where the plain sum gives them
  if (!(scale > 0.0) || !std::isfinite(scale)) return std::sqrt(x.square().sum());
  return scale * std::sqrt((x / scale).square().sum());
}

// Input x [R, W]; output [R]: ‖x[r, :]‖₂ (0 for W = 0). A nan or inf in a row gives nan or inf.
template <typename T>
class RowNorms : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    Shapes shapes(ctx);
    if (!shapes.Check(0, {-1, -1})) return;
    const int64_t R = ctx->input(0).dim_size(0), W = ctx->input(0).dim_size(1);
    T* out = Output<T>(ctx, 0, TensorShape({R}));
    if (!ctx->status().ok() || R == 0) return;
    const T* x = Ptr<T>(ctx, 0);
    // TensorFlow's pool: a pass over memory, not a chain of kernels waiting on shard starts
    ForEachShard(ctx, R, [&](int64_t lo, int64_t hi, int64_t) {
      for (int64_t r = lo; r < hi; ++r) out[r] = static_cast<T>(RowNorm(x + r * W, W));
    }, /*spin=*/false);
  }
};

}  // namespace

REGISTER_OP("KerasFancyrnnRowNorms")
    .Input("x: T")
    .Output("norms: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      c->set_output(0, c->Vector(c->Dim(x, 0)));
      return absl::OkStatus();
    });

KFR_REGISTER_KERNEL("KerasFancyrnnRowNorms", RowNorms)

}  // namespace keras_fancyrnn
