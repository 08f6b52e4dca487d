// C = A B or C += A B for the recurrent products of the sequence kernels (sequence.cc): A is a
// few batch rows of a state or gradient (n x K), B is the recurrent kernel U or its transpose,
// the same for every timestep. For float on a CPU with AVX2 and FMA, B is packed once per op
// into column panels for a register-blocked kernel: with AVX-512, 8 rows x 32 columns per
// block; without, 6 rows x 16 columns (the shape of BLIS's Haswell kernel). For double, and
// without AVX2/FMA, Eigen's product (compiled with -march=native), which repacks B at every
// call. Measured on one core (benchmarks/small_gemm.py): on an AVX2 machine the AVX2 block ran
// 56-70 GFLOP/s against Eigen's 40-50; on an AVX-512 machine (n = 8 to 128 rows, K = 128 to
// 1024, N = 128 to 1024; two runs) the AVX-512 block ran 154-257 GFLOP/s, 1.15-2.6x Eigen's
// AVX-512 product (84-208), which ran 1.1-2.1x the AVX2 block (README "Speed").
#ifndef KERAS_FANCYRNN_SMALL_GEMM_H_
#define KERAS_FANCYRNN_SMALL_GEMM_H_

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>
#include <vector>

// KERAS_FANCYRNN_BLOCK: 0 for Eigen's product; 1 for the AVX2/FMA register block (6 rows x 16
// columns); 2 for the AVX-512 one (8 rows x 32 columns). benchmarks/small_gemm.py compiles
// each to compare them; by default the rule above.
#ifndef KERAS_FANCYRNN_BLOCK
#if defined(__AVX512F__)
#define KERAS_FANCYRNN_BLOCK 2
#elif defined(__AVX2__) && defined(__FMA__)
#define KERAS_FANCYRNN_BLOCK 1
#else
#define KERAS_FANCYRNN_BLOCK 0
#endif
#endif
#if KERAS_FANCYRNN_BLOCK == 1
#include <immintrin.h>
#define KERAS_FANCYRNN_AVX2 1
#elif KERAS_FANCYRNN_BLOCK == 2
#include <immintrin.h>
#define KERAS_FANCYRNN_AVX512 1
#endif
#if defined(KERAS_FANCYRNN_AVX2) || defined(KERAS_FANCYRNN_AVX512)
#define KERAS_FANCYRNN_PACKED 1
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
    if (transpose && !kPacked) {  // for Eigen's product
      transposed_.resize(K * N);
      MatOut<T>(transposed_.data(), K, N) =
          Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>(u, N, K,
                                                              Eigen::OuterStride<>(ldu_))
              .transpose();
    }
#ifdef KERAS_FANCYRNN_PACKED
    if constexpr (std::is_same<T, float>::value) {  // B in panels of kCols columns, zero-padded
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
#ifdef KERAS_FANCYRNN_PACKED
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
#if defined(KERAS_FANCYRNN_AVX512)
  static constexpr int64_t kRows = 8, kCols = 32;
#else
  static constexpr int64_t kRows = 6, kCols = 16;
#endif
  // Whether Multiply runs a register block (float, with one compiled in) rather than Eigen.
#ifdef KERAS_FANCYRNN_PACKED
  static constexpr bool kPacked = std::is_same<T, float>::value;
#else
  static constexpr bool kPacked = false;
#endif

#ifdef KERAS_FANCYRNN_PACKED
  void MultiplyPacked(const float* a, int64_t lda, int64_t n, float* c, int64_t ldc,
                      bool accumulate) const {
    const float* packed = reinterpret_cast<const float*>(packed_.data());
    const int64_t panels = (N_ + kCols - 1) / kCols;
    for (int64_t r = 0; r < n; r += kRows) {
      // A block's rows; past the last row (a block of fewer than kRows), the last row again:
      // computed and not stored.
      const float* rows[kRows];
      for (int64_t i = 0; i < kRows; ++i) rows[i] = a + std::min(r + i, n - 1) * lda;
      for (int64_t p = 0; p < panels; ++p) {
        Block(rows, packed + p * K_ * kCols, c + r * ldc + p * kCols, ldc,
              std::min(kRows, n - r), std::min(kCols, N_ - p * kCols), accumulate);
      }
    }
  }
#endif

#ifdef KERAS_FANCYRNN_AVX2
  // Six rows of a times one 16-column panel, into `rows` rows and `cols` columns of c (rows ldc
  // apart). Twelve named accumulators, so that they stay in registers.
  void Block(const float* const* a, const float* panel, float* c, int64_t ldc, int64_t rows,
             int64_t cols, bool accumulate) const {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int64_t K = K_;
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
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

#ifdef KERAS_FANCYRNN_AVX512
  // Eight rows of a times one 32-column panel, into `rows` rows and `cols` columns of c (rows
  // ldc apart): sixteen accumulators (named, so that they stay in registers), two loads of the
  // panel and eight broadcasts per k; partial columns through masked loads and stores.
  void Block(const float* const* a, const float* panel, float* c, int64_t ldc, int64_t rows,
             int64_t cols, bool accumulate) const {
#define KFR_ACC(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = c##r##0;
    KFR_ACC(0) KFR_ACC(1) KFR_ACC(2) KFR_ACC(3) KFR_ACC(4) KFR_ACC(5) KFR_ACC(6) KFR_ACC(7)
#undef KFR_ACC
    const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5],
                *a6 = a[6], *a7 = a[7];
    const int64_t K = K_;
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b0 = _mm512_loadu_ps(panel + k * kCols);
      const __m512 b1 = _mm512_loadu_ps(panel + k * kCols + 16);
#define KFR_FMA(r)                                   \
  {                                                  \
    const __m512 x = _mm512_set1_ps(a##r[k]);        \
    c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);       \
    c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1);       \
  }
      KFR_FMA(0) KFR_FMA(1) KFR_FMA(2) KFR_FMA(3) KFR_FMA(4) KFR_FMA(5) KFR_FMA(6) KFR_FMA(7)
#undef KFR_FMA
    }
    const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF)
                         : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0);
#define KFR_STORE(r)                                                            \
  if (r < rows) {                                                               \
    float* c_r = c + r * ldc;                                                   \
    __m512 v0 = c##r##0, v1 = c##r##1;                                          \
    if (accumulate) {                                                           \
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c_r));                   \
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c_r + 16));              \
    }                                                                           \
    _mm512_mask_storeu_ps(c_r, m0, v0);                                         \
    _mm512_mask_storeu_ps(c_r + 16, m1, v1);                                    \
  }
    KFR_STORE(0) KFR_STORE(1) KFR_STORE(2) KFR_STORE(3) KFR_STORE(4) KFR_STORE(5) KFR_STORE(6)
    KFR_STORE(7)
#undef KFR_STORE
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
