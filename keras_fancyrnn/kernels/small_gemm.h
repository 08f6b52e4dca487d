// C = A B or C += A B for the recurrent products of the sequence kernels (sequence.cc): A is a
// few batch rows of a state or gradient (n x K), B is the recurrent kernel U or its transpose,
// the same for every timestep. B is packed once per op into column panels, and for float on a
// CPU with AVX2 and FMA but without AVX-512 a register-blocked kernel (6 rows x 16 columns per
// block, the shape of BLIS's Haswell kernel) multiplies; elsewhere, and for double, Eigen's
// product does. The rule is measured on one core: on an AVX2 machine the block ran 56-70
// GFLOP/s against Eigen's 40-50 (which repacks U at every call); on an AVX-512 machine (n = 8 to
// 128 rows, K = 128 to 256, N = 128 to 1024) Eigen's AVX-512 product, compiled with
// -march=native, ran 1.2-2x the block (benchmarks/small_gemm.py), and the sequence kernels
// trained 1.1-1.4x faster with it (benchmarks/sequence_kernels.py; README "Speed").
#ifndef KERAS_FANCYRNN_SMALL_GEMM_H_
#define KERAS_FANCYRNN_SMALL_GEMM_H_

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <vector>

// KERAS_FANCYRNN_BLOCK: 1 for the register block, 0 for Eigen (benchmarks/small_gemm.py sets
// it to compare the two); by default the rule above.
#ifndef KERAS_FANCYRNN_BLOCK
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define KERAS_FANCYRNN_BLOCK 1
#else
#define KERAS_FANCYRNN_BLOCK 0
#endif
#endif
#if KERAS_FANCYRNN_BLOCK
#include <immintrin.h>
#define KERAS_FANCYRNN_AVX2 1
#endif

namespace keras_fancyrnn {

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using MatIn = Eigen::Map<const RowMat<T>>;
template <typename T>
using MatOut = Eigen::Map<RowMat<T>>;

// B (K x N) for repeated products: U (transpose = false) or U^T (transpose = true) of a
// row-major u of shape [K, N] or [N, K], whose rows are ldu apart (by default N or K: a whole
// matrix; more for a block of columns of a wider one, such as the GRU's U_h in [U_z U_r U_h]).
// For Eigen's product U^T is copied once, row-major: Eigen packs B at every product anyway, and
// packs a row-major B faster (at 8 rows x 1024 x 256, the LSTM gradient's dz U^T at B=16,
// H=256 on two threads, 108 against 52 GFLOP/s on one AVX-512 core; benchmarks/small_gemm.py).
template <typename T>
class RecurrentKernel {
 public:
  RecurrentKernel(const T* u, int64_t K, int64_t N, bool transpose, int64_t ldu = -1)
      : u_(u), K_(K), N_(N), transpose_(transpose), ldu_(ldu >= 0 ? ldu : transpose ? K : N) {
    if (!UsesBlock() && transpose) {
      transposed_.resize(K * N);
      MatOut<T>(transposed_.data(), K, N) =
          Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>(u, N, K,
                                                              Eigen::OuterStride<>(ldu_))
              .transpose();
    }
#ifdef KERAS_FANCYRNN_AVX2
    if constexpr (std::is_same<T, float>::value) {
      const int64_t panels = (N + kCols - 1) / kCols;
      packed_.assign(panels * K * kCols, T(0));
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = p * kCols; j < std::min(N, (p + 1) * kCols); ++j) {
            packed_[(p * K + k) * kCols + j - p * kCols] =
                transpose ? u[j * ldu_ + k] : u[k * ldu_ + j];
          }
        }
      }
    }
#endif
  }

  // c (n x N, rows ldc apart) = a (n x K, rows lda apart) B, or += with accumulate; by default
  // the rows are contiguous.
  void Multiply(const T* a, int64_t n, T* c, bool accumulate, int64_t lda = -1,
                int64_t ldc = -1) const {
    if (lda < 0) lda = K_;
    if (ldc < 0) ldc = N_;
#ifdef KERAS_FANCYRNN_AVX2
    if constexpr (std::is_same<T, float>::value) {
      MultiplyPacked(reinterpret_cast<const float*>(a), lda, n, reinterpret_cast<float*>(c), ldc,
                     accumulate);
      return;
    }
#endif
    using Strided = Eigen::OuterStride<>;
    Eigen::Map<const RowMat<T>, 0, Strided> A(a, n, K_, Strided(lda));
    Eigen::Map<RowMat<T>, 0, Strided> C(c, n, N_, Strided(ldc));
    // B: U in place, or the row-major copy of U^T
    Eigen::Map<const RowMat<T>, 0, Strided> b(transpose_ ? transposed_.data() : u_, K_, N_,
                                              Strided(transpose_ ? N_ : ldu_));
    if (accumulate) C.noalias() += A * b; else C.noalias() = A * b;
  }

 private:
  // Whether Multiply runs the register block (float with KERAS_FANCYRNN_AVX2) rather than Eigen.
  static constexpr bool UsesBlock() {
#ifdef KERAS_FANCYRNN_AVX2
    return std::is_same<T, float>::value;
#else
    return false;
#endif
  }

  static constexpr int64_t kCols = 16;
  static constexpr int64_t kRows = 6;

#ifdef KERAS_FANCYRNN_AVX2
  void MultiplyPacked(const float* a, int64_t lda, int64_t n, float* c, int64_t ldc,
                      bool accumulate) const {
    const float* packed = reinterpret_cast<const float*>(packed_.data());
    const int64_t panels = (N_ + kCols - 1) / kCols;
    // The last rows, if fewer than kRows, go through a zero-padded copy (one kernel shape).
    std::vector<float> tail;
    const int64_t full = n - n % kRows;
    if (full < n) {
      tail.assign(kRows * K_, 0.0f);
      for (int64_t r = full; r < n; ++r) {
        std::copy_n(a + r * lda, K_, tail.data() + (r - full) * K_);
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * K_ * kCols;
      const int64_t cols = std::min(kCols, N_ - p * kCols);
      for (int64_t r = 0; r < n; r += kRows) {
        const bool in_tail = r >= full;
        Block(in_tail ? tail.data() : a + r * lda, in_tail ? K_ : lda, panel,
              c + r * ldc + p * kCols, ldc, std::min(kRows, n - r), cols, accumulate);
      }
    }
  }

  // Six rows of a (rows lda apart) times one 16-column panel, into `rows` rows and `cols`
  // columns of c (rows ldc apart). Twelve named accumulators, so that they stay in registers.
  void Block(const float* a, int64_t lda, const float* panel, float* c, int64_t ldc, int64_t rows,
             int64_t cols, bool accumulate) const {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int64_t K = K_;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda,
                *a5 = a + 5 * lda;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(panel + k * kCols);
      const __m256 b1 = _mm256_loadu_ps(panel + k * kCols + 8);
      __m256 x = _mm256_broadcast_ss(a0 + k);
      c00 = _mm256_fmadd_ps(x, b0, c00);
      c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a1 + k);
      c10 = _mm256_fmadd_ps(x, b0, c10);
      c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a2 + k);
      c20 = _mm256_fmadd_ps(x, b0, c20);
      c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a3 + k);
      c30 = _mm256_fmadd_ps(x, b0, c30);
      c31 = _mm256_fmadd_ps(x, b1, c31);
      x = _mm256_broadcast_ss(a4 + k);
      c40 = _mm256_fmadd_ps(x, b0, c40);
      c41 = _mm256_fmadd_ps(x, b1, c41);
      x = _mm256_broadcast_ss(a5 + k);
      c50 = _mm256_fmadd_ps(x, b0, c50);
      c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    const __m256 result[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                      {c30, c31}, {c40, c41}, {c50, c51}};
    for (int64_t r = 0; r < rows; ++r) {
      float* c_r = c + r * ldc;
      alignas(32) float row[kCols];
      _mm256_store_ps(row, result[r][0]);
      _mm256_store_ps(row + 8, result[r][1]);
      if (accumulate) {
        for (int64_t j = 0; j < cols; ++j) c_r[j] += row[j];
      } else {
        std::copy_n(row, cols, c_r);
      }
    }
  }
#endif

  const T* u_;
  const int64_t K_, N_;
  const bool transpose_;
  const int64_t ldu_;
  std::vector<T> packed_;      // the block's panels
  std::vector<T> transposed_;  // Eigen's U^T, row-major [K, N]
};

}  // namespace keras_fancyrnn

#endif  // KERAS_FANCYRNN_SMALL_GEMM_H_
