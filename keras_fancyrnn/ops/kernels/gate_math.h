// The gate equations of one row (one batch element) of an LSTM / GRU / SimpleRNN step, forward
// and backward, shared by the per-step kernels (gates.cc) and the whole-sequence kernels
// (sequence.cc). Equations: keras_fancyrnn/layers/lstm.py, gru.py, simple_rnn.py (the cells' `step`).
// The activations are Eigen's logistic and tanh, the functors TensorFlow's Sigmoid and Tanh use.
#ifndef KERAS_FANCYRNN_GATE_MATH_H_
#define KERAS_FANCYRNN_GATE_MATH_H_

#include <Eigen/Core>

namespace keras_fancyrnn {

template <typename T>
using Vec = Eigen::Array<T, Eigen::Dynamic, 1>;
template <typename T>
using In = Eigen::Map<const Vec<T>>;
template <typename T>
using Out = Eigen::Map<Vec<T>>;

// LSTM, gates i, f, c, o of z = x W + b + h_{t-1} U (z: 4H values, the others H):
//   c = σ(z_f) c_prev + σ(z_i) tanh(z_c) [+ p],   h = σ(z_o) tanh(c).
// p (may be null) is the diagnostics probe of c_t, added before c_t feeds h_t. As Eigen array
// expressions (LstmRow below runs this for double).
template <typename T>
inline void LstmRowExpressions(const T* z, const T* c_prev, const T* p, T* h, T* c, int64_t H) {
  Out<T> c_b(c, H);
  c_b = In<T>(z + H, H).logistic() * In<T>(c_prev, H) +
        In<T>(z, H).logistic() * In<T>(z + 2 * H, H).tanh();
  if (p != nullptr) c_b += In<T>(p, H);
  Out<T>(h, H) = In<T>(z + 3 * H, H).logistic() * c_b.tanh();
}

template <typename T>
inline void LstmRow(const T* z, const T* c_prev, const T* p, T* h, T* c, int64_t H) {
  LstmRowExpressions(z, c_prev, p, h, c, H);
}

// The float rows' packets: Eigen's packet of floats for this build's widest vectors.
namespace packets {
namespace ei = Eigen::internal;
using Packet = ei::packet_traits<float>::type;
constexpr int64_t kWidth = ei::unpacket_traits<Packet>::size;

// The activated gates i, f, g, o of units [j, j + kWidth) from z (4H values).
struct LstmGatePackets {
  LstmGatePackets(const float* z, int64_t H, int64_t j) {
    const ei::scalar_logistic_op<float> sigmoid;
    const ei::scalar_tanh_op<float> tanh;
    i = sigmoid.packetOp(ei::ploadu<Packet>(z + j));
    f = sigmoid.packetOp(ei::ploadu<Packet>(z + H + j));
    g = tanh.packetOp(ei::ploadu<Packet>(z + 2 * H + j));
    o = sigmoid.packetOp(ei::ploadu<Packet>(z + 3 * H + j));
  }
  Packet i, f, g, o;
};
}  // namespace packets

// The same for float, one packet of units at a time: every gate of a packet from its z, then c
// and h, with Eigen's packet logistic and tanh (the functions of the expressions above), in place
// of the expressions' separate passes (benchmarks/gate_rows.py times both). The units past
// the last whole packet go through the scalar functors.
template <>
inline void LstmRow<float>(const float* z, const float* c_prev, const float* p, float* h, float* c,
                           int64_t H) {
  using namespace packets;  // NOLINT: Packet, kWidth, ei
  const ei::scalar_logistic_op<float> sigmoid;
  const ei::scalar_tanh_op<float> tanh;
  int64_t j = 0;
  for (; j + kWidth <= H; j += kWidth) {
    const auto [i, f, g, o] = LstmGatePackets(z, H, j);
    Packet c_j = ei::padd(ei::pmul(f, ei::ploadu<Packet>(c_prev + j)), ei::pmul(i, g));
    if (p != nullptr) c_j = ei::padd(c_j, ei::ploadu<Packet>(p + j));
    ei::pstoreu(c + j, c_j);
    ei::pstoreu(h + j, ei::pmul(o, tanh.packetOp(c_j)));
  }
  for (; j < H; ++j) {
    c[j] = sigmoid(z[H + j]) * c_prev[j] + sigmoid(z[j]) * tanh(z[2 * H + j]);
    if (p != nullptr) c[j] += p[j];
    h[j] = sigmoid(z[3 * H + j]) * tanh(c[j]);
  }
}

// Scratch vectors of the LSTM's backward row (allocated once per thread, not per row).
template <typename T>
struct LstmScratch {
  explicit LstmScratch(int64_t H) : i(H), f(H), g(H), o(H), tc(H), dct(H) {}
  Vec<T> i, f, g, o, tc, dct;
};

// Gradients dh, dc of h and c to dz (4H), dc_prev and, with a probe, dp. The gates and c are
// recomputed from z and c_prev. dz may be z and dc_prev may be dc (each is read in full before
// it is written). As Eigen array expressions over n units whose gate blocks in z and dz are
// `stride` apart (n = stride = H for a whole row; LstmRowGrad below runs this for double).
template <typename T>
inline void LstmRowGradExpressions(const T* dh, const T* dc, const T* z, const T* c_prev,
                                   const T* p, T* dz, T* dc_prev, T* dp, int64_t n,
                                   int64_t stride, LstmScratch<T>& s) {
  const int64_t H = stride;
  auto i = s.i.head(n), f = s.f.head(n), g = s.g.head(n), o = s.o.head(n), tc = s.tc.head(n),
       dct = s.dct.head(n);
  In<T> dh_b(dh, n), cp_b(c_prev, n);
  i = In<T>(z, n).logistic();
  f = In<T>(z + H, n).logistic();
  g = In<T>(z + 2 * H, n).tanh();
  o = In<T>(z + 3 * H, n).logistic();
  tc = f * cp_b + i * g;
  if (p != nullptr) tc += In<T>(p, n);
  tc = tc.tanh();
  dct = In<T>(dc, n) + dh_b * o * (T(1) - tc * tc);  // total ∂ℓ/∂c_t
  Out<T>(dz, n) = dct * g * i * (T(1) - i);
  Out<T>(dz + H, n) = dct * cp_b * f * (T(1) - f);
  Out<T>(dz + 2 * H, n) = dct * i * (T(1) - g * g);
  Out<T>(dz + 3 * H, n) = dh_b * tc * o * (T(1) - o);
  Out<T>(dc_prev, n) = dct * f;
  if (dp != nullptr) Out<T>(dp, n) = dct;
}

template <typename T>
inline void LstmRowGrad(const T* dh, const T* dc, const T* z, const T* c_prev, const T* p, T* dz,
                        T* dc_prev, T* dp, int64_t H, LstmScratch<T>& s) {
  LstmRowGradExpressions(dh, dc, z, c_prev, p, dz, dc_prev, dp, H, H, s);
}

// The same for float, one packet of units at a time, as LstmRow<float> (the products in the
// expressions' order). A packet's z, dc are read before its dz, dc_prev are written, so the
// same aliasing holds. The units past the last whole packet take the expressions above.
template <>
inline void LstmRowGrad<float>(const float* dh, const float* dc, const float* z,
                               const float* c_prev, const float* p, float* dz, float* dc_prev,
                               float* dp, int64_t H, LstmScratch<float>& s) {
  using namespace packets;  // NOLINT: Packet, kWidth, ei
  const ei::scalar_tanh_op<float> tanh;
  const Packet one = ei::pset1<Packet>(1.0f);
  int64_t j = 0;
  for (; j + kWidth <= H; j += kWidth) {
    const auto [i, f, g, o] = LstmGatePackets(z, H, j);
    const Packet cp = ei::ploadu<Packet>(c_prev + j);
    const Packet dh_j = ei::ploadu<Packet>(dh + j);
    Packet tc = ei::padd(ei::pmul(f, cp), ei::pmul(i, g));
    if (p != nullptr) tc = ei::padd(tc, ei::ploadu<Packet>(p + j));
    tc = tanh.packetOp(tc);
    const Packet dct = ei::padd(ei::ploadu<Packet>(dc + j),
                                ei::pmul(ei::pmul(dh_j, o), ei::psub(one, ei::pmul(tc, tc))));
    ei::pstoreu(dz + j, ei::pmul(ei::pmul(ei::pmul(dct, g), i), ei::psub(one, i)));
    ei::pstoreu(dz + H + j, ei::pmul(ei::pmul(ei::pmul(dct, cp), f), ei::psub(one, f)));
    ei::pstoreu(dz + 2 * H + j, ei::pmul(ei::pmul(dct, i), ei::psub(one, ei::pmul(g, g))));
    ei::pstoreu(dz + 3 * H + j, ei::pmul(ei::pmul(ei::pmul(dh_j, tc), o), ei::psub(one, o)));
    ei::pstoreu(dc_prev + j, ei::pmul(dct, f));
    if (dp != nullptr) ei::pstoreu(dp + j, dct);
  }
  if (j == H) return;
  auto at = [j](auto* v) { return v == nullptr ? nullptr : v + j; };  // the rest of the units
  LstmRowGradExpressions<float>(dh + j, dc + j, z + j, c_prev + j, at(p), dz + j, dc_prev + j,
                                at(dp), H - j, H, s);
}

// GRU, reset_after=True (Keras's default), blocks z, r, h of xp = x W + b_in and
// rec = h_{t-1} U + b_rec (3H each):
//   z = σ(xp_z + rec_z),  r = σ(xp_r + rec_r),  ĥ = tanh(xp_h + r rec_h),  h = z h_prev + (1 - z) ĥ.
template <typename T>
struct GruScratch {
  explicit GruScratch(int64_t H) : z(H), r(H), hh(H), da(H) {}
  Vec<T> z, r, hh, da;
};

template <typename T>
inline void GruRow(const T* xp, const T* rec, const T* h_prev, T* h, int64_t H,
                   GruScratch<T>& s) {
  s.z = (In<T>(xp, H) + In<T>(rec, H)).logistic();
  s.hh = (In<T>(xp + 2 * H, H) +
          (In<T>(xp + H, H) + In<T>(rec + H, H)).logistic() * In<T>(rec + 2 * H, H)).tanh();
  Out<T>(h, H) = s.z * In<T>(h_prev, H) + (T(1) - s.z) * s.hh;
}

// Gradient dh of h to d xp, d rec (3H each) and the direct part of d h_prev (z dh; the part
// through rec is the caller's matmul). The gates are recomputed from xp and rec. dxp may be xp
// and drec may be rec: each value is read before the same place is written.
template <typename T>
inline void GruRowGrad(const T* dh, const T* xp, const T* rec, const T* h_prev, T* dxp, T* drec,
                       T* dh_prev, int64_t H, GruScratch<T>& s) {
  In<T> rec_h(rec + 2 * H, H), dh_b(dh, H), hp_b(h_prev, H);
  s.z = (In<T>(xp, H) + In<T>(rec, H)).logistic();
  s.r = (In<T>(xp + H, H) + In<T>(rec + H, H)).logistic();
  s.hh = (In<T>(xp + 2 * H, H) + s.r * rec_h).tanh();
  s.da = dh_b * (T(1) - s.z) * (T(1) - s.hh * s.hh);  // ∂ℓ/∂(xp_h + r rec_h)
  Out<T> dz(dxp, H), dr(dxp + H, H);
  dz = dh_b * (hp_b - s.hh) * s.z * (T(1) - s.z);
  dr = s.da * rec_h * s.r * (T(1) - s.r);
  Out<T>(dxp + 2 * H, H) = s.da;
  Out<T>(drec, H) = dz;
  Out<T>(drec + H, H) = dr;
  Out<T>(drec + 2 * H, H) = s.da * s.r;
  Out<T>(dh_prev, H) = dh_b * s.z;
}

// GRU, reset_after=False (the reset gate before the product), blocks z, r, h of xp = x W + b and
// rec = [h_{t-1} U_z, h_{t-1} U_r, (r h_{t-1}) U_h] (3H each):
//   z = σ(xp_z + rec_z),  r = σ(xp_r + rec_r),  ĥ = tanh(xp_h + rec_h),  h = z h_prev + (1 - z) ĥ.
// A row runs in two halves around the product (r h_{t-1}) U_h. The first: z and rh = r h_prev.
template <typename T>
inline void GruBeforeGates(const T* xp, const T* rec, const T* h_prev, T* z, T* rh, int64_t H) {
  Out<T>(z, H) = (In<T>(xp, H) + In<T>(rec, H)).logistic();
  Out<T>(rh, H) = (In<T>(xp + H, H) + In<T>(rec + H, H)).logistic() * In<T>(h_prev, H);
}

// The second: h from z and rec_h.
template <typename T>
inline void GruBeforeRow(const T* xp, const T* rec, const T* h_prev, const T* z, T* h, int64_t H,
                         GruScratch<T>& s) {
  s.hh = (In<T>(xp + 2 * H, H) + In<T>(rec + 2 * H, H)).tanh();
  In<T> z_b(z, H);
  Out<T>(h, H) = z_b * In<T>(h_prev, H) + (T(1) - z_b) * s.hh;
}

// Its gradient, also in two halves around d(rh) = d rec_h U_h^T (the caller's product), to
// d xp and d rec (3H each; d rec = d xp here, plus `drec_in`, a gradient of the rec output, where
// not null) and the direct parts of d h_prev. The first half: the z and h blocks, and z dh into
// `direct`. dxp may be xp and drec may be rec (each read before it is written).
template <typename T>
inline void GruBeforeRowGrad(const T* dh, const T* xp, const T* rec, const T* h_prev,
                             const T* drec_in, T* dxp, T* drec, T* direct, int64_t H,
                             GruScratch<T>& s) {
  In<T> dh_b(dh, H);
  s.z = (In<T>(xp, H) + In<T>(rec, H)).logistic();
  s.hh = (In<T>(xp + 2 * H, H) + In<T>(rec + 2 * H, H)).tanh();
  s.da = dh_b * (T(1) - s.z) * (T(1) - s.hh * s.hh);  // ∂ℓ/∂(xp_h + rec_h)
  Out<T>(direct, H) = dh_b * s.z;
  Out<T>(dxp, H) = dh_b * (In<T>(h_prev, H) - s.hh) * s.z * (T(1) - s.z);  // ∂ℓ/∂(xp_z + rec_z)
  Out<T>(dxp + 2 * H, H) = s.da;
  Out<T>(drec, H) = In<T>(dxp, H);
  Out<T>(drec + 2 * H, H) = s.da;
  if (drec_in != nullptr) {
    Out<T>(drec, H) += In<T>(drec_in, H);
    Out<T>(drec + 2 * H, H) += In<T>(drec_in + 2 * H, H);
  }
}

// The second half, given d_rh = ∂ℓ/∂(r h_prev): the r block, and r d_rh added to `direct`.
template <typename T>
inline void GruBeforeRowGradReset(const T* d_rh, const T* xp, const T* rec, const T* h_prev,
                                  const T* drec_in, T* dxp, T* drec, T* direct, int64_t H,
                                  GruScratch<T>& s) {
  In<T> drh_b(d_rh, H);
  s.r = (In<T>(xp + H, H) + In<T>(rec + H, H)).logistic();
  s.da = drh_b * In<T>(h_prev, H) * s.r * (T(1) - s.r);  // ∂ℓ/∂(xp_r + rec_r)
  Out<T>(direct, H) += drh_b * s.r;
  Out<T>(dxp + H, H) = s.da;
  Out<T>(drec + H, H) = s.da;
  if (drec_in != nullptr) Out<T>(drec + H, H) += In<T>(drec_in + H, H);
}

}  // namespace keras_fancyrnn

#endif  // KERAS_FANCYRNN_GATE_MATH_H_
