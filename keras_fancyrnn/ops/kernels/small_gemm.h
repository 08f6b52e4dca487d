// C = A B or C += A B for the recurrent products of the sequence kernels (sequence.cc): A is a
// few batch rows of a state or gradient (n x K), B is the recurrent kernel U or its transpose,
// the same for every timestep. Three ways to compute it, chosen per op at run time (the ops'
// `product` attr; keras_fancyrnn.config's `recurrent_product`):
// - the AVX-512 register block, up to 8 rows x 48 or 32 columns (Avx512Width), B packed once
//   per op into column panels;
// - the AVX2/FMA register block, up to 4 rows x 24 columns or 6 rows x 16 (Avx2Width), B
//   packed likewise;
// - Eigen's product (compiled with -march=native), which repacks B at every call.
// A block is compiled in where the build's target CPU (this one: -march=native) has its
// instructions; "auto" picks the widest compiled in. The blocks are for float; double always
// takes Eigen's product. benchmarks/small_gemm.py measures all three side by side.
//
// Long (over 400 lines): one class, whose packing, width rules and two register blocks (each
// written out for its instruction set) only Multiply uses; split, they would be one class's
// private parts in several files. AlignedArray, its panels' storage, comes first.
#ifndef KERAS_FANCYRNN_SMALL_GEMM_H_
#define KERAS_FANCYRNN_SMALL_GEMM_H_

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define KERAS_FANCYRNN_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
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

// How RecurrentKernel multiplies (the values of the ops' `product` attr).
enum class Product { kEigen, kAvx2, kAvx512 };

// The widest register block compiled in: what "auto" runs.
constexpr Product kWidestProduct =
#if defined(KERAS_FANCYRNN_AVX512)
    Product::kAvx512;
#elif defined(KERAS_FANCYRNN_AVX2)
    Product::kAvx2;
#else
    Product::kEigen;
#endif

// Whether this build can run `product`: Eigen's always, a block where its instructions were
// compiled in.
constexpr bool Compiled(Product product) {
  switch (product) {
    case Product::kAvx512:
#if defined(KERAS_FANCYRNN_AVX512)
      return true;
#else
      return false;
#endif
    case Product::kAvx2:
#if defined(KERAS_FANCYRNN_AVX2)
      return true;
#else
      return false;
#endif
    default:
      return true;  // Eigen's
  }
}

// Storage for the register blocks' packed operands, 64-byte aligned (not zeroed). From the heap
// an array is 16-byte aligned, and a vector load from 16 bytes past a cache line's start spans
// two lines: benchmarks/small_gemm.py's 8 x 64 x 256 product ran at 98-111 GFLOP/s with the
// AVX-512 block's panels placed so, 155-158 aligned.
template <typename T>
class AlignedArray {
 public:
  AlignedArray() = default;
  explicit AlignedArray(int64_t n) { Reset(n); }

  void Reset(int64_t n) {
    const size_t bytes = (std::max<size_t>(1, n * sizeof(T)) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
  }

  T* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// B (K x N) for repeated products: U (transpose = false) or U^T (transpose = true) of a
// row-major u of shape [K, N] or [N, K], whose rows are ldu apart (by default N or K: a whole
// matrix; more for a block of columns of a wider one, such as the GRU's U_h in [U_z U_r U_h]).
// `product` must be Compiled(); for double it is Eigen's whatever is asked. `rows`: the most rows
// a Multiply will take (a shard's; 0 where not known), for the AVX2 block's panels (Avx2Width).
// `panel_width` 16 or 24 for the AVX2 block, 32 or 48 for the AVX-512 one, fixes the panels (for
// benchmarks/small_gemm.cc); any other value leaves them to Avx2Width and Avx512Width.
// For Eigen's product U^T is copied once, row-major: Eigen packs B at every product anyway, and
// packs a row-major B faster (benchmarks/small_gemm.py).
template <typename T>
class RecurrentKernel {
 public:
  RecurrentKernel(const T* u, int64_t K, int64_t N, bool transpose, int64_t ldu = -1,
                  Product product = kWidestProduct, int64_t rows = 0, int64_t panel_width = 0)
      : u_(u), K_(K), N_(N), transpose_(transpose), ldu_(ldu >= 0 ? ldu : transpose ? K : N),
        product_(std::is_same<T, float>::value ? product : Product::kEigen),
        cols_(product_ == Product::kAvx512
                  ? (panel_width == 32 || panel_width == 48 ? panel_width : Avx512Width(N))
              : product_ == Product::kAvx2
                  ? (panel_width == 16 || panel_width == 24 ? panel_width : Avx2Width(rows))
                  : 16) {
    if (product_ == Product::kEigen) {
      if (transpose) {
        transposed_.resize(K * N);
        MatOut<T>(transposed_.data(), K, N) =
            Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>(u, N, K,
                                                                Eigen::OuterStride<>(ldu_))
                .transpose();
      }
      return;
    }
    // B in panels of cols_ columns, the last one zero-padded. Copied in the order u is read
    // (this runs at every op call: at H = 256 it is 1 MB of U): U row by row, each row's
    // pieces to every panel (panel by panel, the reads of a row's pieces are a row apart and
    // the prefetchers miss them), each piece one fixed-size copy.
    const int64_t panels = (N + cols_ - 1) / cols_;
    packed_.Reset(panels * K * cols_);  // not zeroed: every element is written below
    if (!transpose) {
      const int64_t whole = N / cols_;  // panels without padding
      for (int64_t k = 0; k < K; ++k) {
        const T* row = u + k * ldu_;
        T* out = packed_.get() + k * cols_;  // panel p's row k: out + p K cols_
        const auto pieces = [&](auto width) {
          for (int64_t p = 0; p < whole; ++p) {
            std::memcpy(out + p * K * cols_, row + p * width, sizeof(T) * width);
          }
        };
        if (cols_ == 48) {
          pieces(std::integral_constant<int64_t, 48>{});
        } else if (cols_ == 32) {
          pieces(std::integral_constant<int64_t, 32>{});
        } else if (cols_ == 24) {
          pieces(std::integral_constant<int64_t, 24>{});
        } else {
          pieces(std::integral_constant<int64_t, 16>{});
        }
        if (whole < panels) {
          std::copy_n(row + whole * cols_, N - whole * cols_, out + whole * K * cols_);
          std::fill_n(out + whole * K * cols_ + N - whole * cols_, cols_ - (N - whole * cols_),
                      T(0));
        }
      }
      return;
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t j0 = p * cols_, width = std::min(N - j0, cols_);
      T* panel = packed_.get() + p * K * cols_;
      if (width < cols_) std::fill_n(panel, K * cols_, T(0));
      // Row j0 + j of u is column j of the panel, copied 16 k at a time: a 16-value run of a
      // row of u (one cache line) per column, into 16 panel rows that stay in L1 until every
      // column has written them (a whole column at a time wrote K lines per column).
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t k1 = std::min(K, k0 + 16);
        for (int64_t j = 0; j < width; ++j) {
          const T* row = u + (j0 + j) * ldu_;
          for (int64_t k = k0; k < k1; ++k) panel[k * cols_ + j] = row[k];
        }
      }
    }
  }

  // The width of the register block's column panels (Eigen's product has none).
  int64_t panel_width() const { return cols_; }

  // The default of Multiply's strides: rows contiguous.
  static constexpr int64_t kDense = INT64_MIN;

  // c (n x N, rows ldc apart) = a (n x K, rows lda apart) B, or += with accumulate; by default
  // the rows are contiguous. A stride may be negative (rows in reverse order). `bias` (N values,
  // or null) is added to every row as the result is stored (a pass over c the fewer).
  void Multiply(const T* a, int64_t n, T* c, bool accumulate, int64_t lda = kDense,
                int64_t ldc = kDense, const T* bias = nullptr) const {
    if (lda == kDense) lda = K_;
    if (ldc == kDense) ldc = N_;
    if constexpr (std::is_same<T, float>::value) {
#ifdef KERAS_FANCYRNN_AVX512
      if (product_ == Product::kAvx512) {
        if (cols_ == 48) {
          Panels<8, 48, &RecurrentKernel::Block8xN<48>>(a, lda, n, c, ldc, accumulate, bias);
        } else {
          Panels<8, 32, &RecurrentKernel::Block8xN<32>>(a, lda, n, c, ldc, accumulate, bias);
        }
        return;
      }
#endif
#ifdef KERAS_FANCYRNN_AVX2
      if (product_ == Product::kAvx2) {
        if (cols_ == 24) {
          Panels<4, 24, &RecurrentKernel::BlockAvx2Rows<24>>(a, lda, n, c, ldc, accumulate, bias);
        } else {
          Panels<6, 16, &RecurrentKernel::BlockAvx2Rows<16>>(a, lda, n, c, ldc, accumulate, bias);
        }
        return;
      }
#endif
    }
    if (n > 1 && (lda < 0 || ldc < 0)) {  // Eigen's maps take no negative stride: row by row
      for (int64_t i = 0; i < n; ++i) {
        Multiply(a + i * lda, 1, c + i * ldc, accumulate, K_, N_, bias);
      }
      return;
    }
    using Strided = Eigen::OuterStride<>;
    Eigen::Map<const RowMat<T>, 0, Strided> A(a, n, K_, Strided(lda));
    Eigen::Map<RowMat<T>, 0, Strided> C(c, n, N_, Strided(ldc));
    // B: U in place, or the row-major copy of U^T
    Eigen::Map<const RowMat<T>, 0, Strided> b(transpose_ ? transposed_.data() : u_, K_, N_,
                                              Strided(transpose_ ? N_ : ldu_));
    if (accumulate) C.noalias() += A * b; else C.noalias() = A * b;
    if (bias != nullptr) {
      C.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, N_);
    }
  }

 private:
  // The AVX-512 block's panel width for N columns: 48 where that takes fewer panels than 32 (each
  // panel costs a broadcast of every row of A per k, so 24 accumulators do more FMAs per
  // broadcast: benchmarks/small_gemm.py), else 32 (N <= 32 or 49 to 64, as many panels either
  // way: the zero-padded last 48-column one costs more than it saves).
  static int64_t Avx512Width(int64_t N) { return (N + 47) / 48 < (N + 31) / 32 ? 48 : 32; }

  // The AVX2 block's panel width for products of up to `rows` rows (0: not known): 24 columns,
  // in blocks of up to 4 rows (12 accumulators, 3 loads and 4 broadcasts per 12 FMAs), unless
  // 16 columns in blocks of up to 6 rows keep more accumulators per block (5 or 6 rows: 10 or
  // 12 against 6 or 9; also 17-18, 29-30, ...; benchmarks/small_gemm.py).
  static int64_t Avx2Width(int64_t rows) {
    if (rows <= 0) return 24;
    const int64_t blocks_16 = (rows + 5) / 6, blocks_24 = (rows + 3) / 4;
    // accumulators per block: 2 rows / blocks_16 against 3 rows / blocks_24
    return 2 * blocks_24 > 3 * blocks_16 ? 16 : 24;
  }

  // Whether a panel `width` columns wide (K_ rows) fits in L1's share beside a block of A: then
  // Panels runs each panel over every block of rows, else the block prefetches it from L2.
  bool PanelInL1(int64_t width) const { return K_ * width * int64_t{sizeof(float)} <= 16384; }

  using BlockFn = void (RecurrentKernel::*)(const float* const*, const float*, float*, int64_t,
                                            int64_t, int64_t, bool, const float*) const;

  // f(std::integral_constant<int, rows>) for 1 <= rows <= kMax: a block compiled for each
  // height, chosen at run time.
  template <int kMax, typename F>
  static void WithRows(int64_t rows, const F& f) {
    if constexpr (kMax > 1) {
      if (rows < kMax) return WithRows<kMax - 1>(rows, f);
    }
    f(std::integral_constant<int, kMax>{});
  }

  // The rows of a in blocks of at most kRows, each times every kCols-column panel of B. The n
  // rows are split into ceil(n / kRows) blocks of sizes as equal as they can be (8 rows: 4 + 4
  // for the AVX2 block, not 6 + 2; 50 rows: six blocks of 7 and one of 8 for the AVX-512 one,
  // not six of 8 and one of 2), so that no block computes rows it does not store and none is
  // left with too few rows to keep the FMA units busy.
  template <int64_t kRows, int64_t kCols, BlockFn kBlock>
  void Panels(const T* a_in, int64_t lda, int64_t n, T* c_in, int64_t ldc, bool accumulate,
              const T* bias_in) const {
    const float* a = reinterpret_cast<const float*>(a_in);
    const float* bias = reinterpret_cast<const float*>(bias_in);
    float* c = reinterpret_cast<float*>(c_in);
    const float* packed = reinterpret_cast<const float*>(packed_.get());
    const int64_t panels = (N_ + kCols - 1) / kCols;
    // Where a panel fits in L1 beside a block of A, each panel once, times every block of rows
    // (benchmarks/small_gemm.py: 32 x 128 x 512 ran 10-15 % faster so); a larger panel would
    // push A's block out, so then each block of rows once, times every panel.
    const bool panel_outer = PanelInL1(kCols);
    const int64_t blocks = (n + kRows - 1) / kRows;
    for (int64_t i = 0; i < panels * blocks; ++i) {
      const int64_t p = panel_outer ? i / blocks : i % panels;
      const int64_t b = panel_outer ? i % blocks : i / panels;
      const int64_t r = n * b / blocks, rows = n * (b + 1) / blocks - r;
      const float* row[kRows];
      for (int64_t k = 0; k < rows; ++k) row[k] = a + (r + k) * lda;
      (this->*kBlock)(row, packed + p * K_ * kCols, c + r * ldc + p * kCols, ldc, rows,
                      std::min(kCols, N_ - p * kCols), accumulate,
                      bias == nullptr ? nullptr : bias + p * kCols);
    }
  }

#if defined(KERAS_FANCYRNN_AVX2) || defined(KERAS_FANCYRNN_AVX512)
  // Prefetches kLines cache lines from p into L1 (a hint: past the panel's end it never faults).
  template <int kLines>
  static void PrefetchLines(const float* p) {
    const char* line = reinterpret_cast<const char*>(p);
    for (int i = 0; i < kLines; ++i) _mm_prefetch(line + 64 * i, _MM_HINT_T0);
  }
#endif

#ifdef KERAS_FANCYRNN_AVX2
  // `rows` (1 to 6 for 16-column panels, 1 to 4 for 24) rows of a times one panel of kWidth
  // columns, into `rows` rows and `cols` columns of c (rows ldc apart), plus `cols` values of
  // bias (where not null).
  template <int64_t kWidth>
  void BlockAvx2Rows(const float* const* a, const float* panel, float* c, int64_t ldc,
                     int64_t rows, int64_t cols, bool accumulate, const float* bias) const {
    // A 24-column panel larger than L1's share streams from L2 at every block: prefetched
    // (benchmarks/small_gemm.py; 16-column ones did not gain).
    const bool streamed = kWidth == 24 && !PanelInL1(kWidth);
    WithRows<kWidth == 24 ? 4 : 6>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      // a partial last panel: only the vectors it has columns in
      const auto vectors = [&](auto z) {
        constexpr int Z = decltype(z)::value;
        if (streamed) {
          this->template BlockAvx2<R, Z, kWidth, true>(a, panel, c, ldc, cols, accumulate, bias);
        } else {
          this->template BlockAvx2<R, Z, kWidth, false>(a, panel, c, ldc, cols, accumulate, bias);
        }
      };
      if constexpr (kWidth > 16) {
        if (cols > 16) return vectors(std::integral_constant<int, 3>{});
      }
      if (cols > 8) return vectors(std::integral_constant<int, 2>{});
      vectors(std::integral_constant<int, 1>{});
    });
  }

  // R rows times Z 8-column vectors of a panel whose rows are kWidth apart: Z R named
  // accumulators (so that they stay in registers; the rows and vectors past R and Z compile
  // away), Z loads of the panel and R broadcasts per k. kPrefetch: the panel's rows 8 k ahead
  // are prefetched.
  template <int R, int Z, int64_t kWidth, bool kPrefetch>
  void BlockAvx2(const float* const* a, const float* panel, float* c, int64_t ldc, int64_t cols,
                 bool accumulate, const float* bias) const {
#define KFR_ACC(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = c##r##0, c##r##2 = c##r##0;
    KFR_ACC(0) KFR_ACC(1) KFR_ACC(2) KFR_ACC(3) KFR_ACC(4) KFR_ACC(5)
#undef KFR_ACC
#define KFR_ROW(r) const float* a##r = a[R > r ? r : 0];
    KFR_ROW(0) KFR_ROW(1) KFR_ROW(2) KFR_ROW(3) KFR_ROW(4) KFR_ROW(5)
#undef KFR_ROW
    const int64_t K = K_;
    for (int64_t k = 0; k < K; ++k) {
      const float* b = panel + k * kWidth;
      if constexpr (kPrefetch) PrefetchLines<(Z > 1 ? 2 : 1)>(b + 8 * kWidth);
      const __m256 b0 = _mm256_loadu_ps(b);
      const __m256 b1 = Z > 1 ? _mm256_loadu_ps(b + 8) : b0;
      const __m256 b2 = Z > 2 ? _mm256_loadu_ps(b + 16) : b0;
#define KFR_FMA(r)                                                   \
  if constexpr (R > r) {                                             \
    const __m256 x = _mm256_broadcast_ss(a##r + k);                  \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0);                       \
    if constexpr (Z > 1) c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1);  \
    if constexpr (Z > 2) c##r##2 = _mm256_fmadd_ps(x, b2, c##r##2);  \
  }
      KFR_FMA(0) KFR_FMA(1) KFR_FMA(2) KFR_FMA(3) KFR_FMA(4) KFR_FMA(5)
#undef KFR_FMA
    }
    // Vector z holds min(8, cols - 8 z) columns: whole vectors through plain loads and stores,
    // a partial one through masked ones (lane j on where j < its columns; masked stores are slow
    // on some AVX2 CPUs, AMD's Zen 1-3, so only a partial vector takes them).
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const auto lanes = [&](int z) {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8 * z), lane);
    };
    const __m256i m0 = lanes(0), m1 = lanes(1), m2 = lanes(2);
    const bool whole0 = cols >= 8, whole1 = cols >= 16, whole2 = cols >= 24;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 bias0 = bias == nullptr ? zero : _mm256_maskload_ps(bias, m0);
    const __m256 bias1 = bias == nullptr || Z < 2 ? zero : _mm256_maskload_ps(bias + 8, m1);
    const __m256 bias2 = bias == nullptr || Z < 3 ? zero : _mm256_maskload_ps(bias + 16, m2);
#define KFR_STORE_VECTOR(r, z)                                                                \
  if constexpr (Z > z) {                                                                      \
    __m256 v = c##r##z;                                                                       \
    float* out = c_r + 8 * z;                                                                 \
    if (accumulate) {                                                                         \
      v = _mm256_add_ps(v, whole##z ? _mm256_loadu_ps(out) : _mm256_maskload_ps(out, m##z));  \
    }                                                                                         \
    if (bias != nullptr) v = _mm256_add_ps(v, bias##z);                                       \
    if (whole##z) {                                                                           \
      _mm256_storeu_ps(out, v);                                                               \
    } else {                                                                                  \
      _mm256_maskstore_ps(out, m##z, v);                                                      \
    }                                                                                         \
  }
#define KFR_STORE(r)                                                                          \
  if constexpr (R > r) {                                                                      \
    float* c_r = c + r * ldc;                                                                 \
    KFR_STORE_VECTOR(r, 0) KFR_STORE_VECTOR(r, 1) KFR_STORE_VECTOR(r, 2)                      \
  }
    KFR_STORE(0) KFR_STORE(1) KFR_STORE(2) KFR_STORE(3) KFR_STORE(4) KFR_STORE(5)
#undef KFR_STORE
#undef KFR_STORE_VECTOR
  }
#endif

#ifdef KERAS_FANCYRNN_AVX512
  // `rows` (1 to 8) rows of a times one panel of kWidth (32 or 48) columns, into `rows` rows and
  // `cols` columns of c (rows ldc apart).
  template <int64_t kWidth>
  void Block8xN(const float* const* a, const float* panel, float* c, int64_t ldc, int64_t rows,
                int64_t cols, bool accumulate, const float* bias) const {
    // A panel larger than L1's share (see Panels) streams from L2 at every block: prefetched
    // (benchmarks/small_gemm.py; panels that stay in L1 did not gain).
    const bool streamed = !PanelInL1(kWidth);
    WithRows<8>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      // a partial last panel: only the vectors it has columns in
      const auto vectors = [&](auto z) {
        constexpr int Z = decltype(z)::value;
        if (streamed) {
          this->template BlockAvx512<R, Z, kWidth, true>(a, panel, c, ldc, cols, accumulate,
                                                         bias);
        } else {
          this->template BlockAvx512<R, Z, kWidth, false>(a, panel, c, ldc, cols, accumulate,
                                                          bias);
        }
      };
      if constexpr (kWidth > 32) {
        if (cols > 32) return vectors(std::integral_constant<int, 3>{});
      }
      if (cols > 16) return vectors(std::integral_constant<int, 2>{});
      vectors(std::integral_constant<int, 1>{});
    });
  }

  // R rows times Z 16-column vectors of a panel whose rows are kWidth apart: Z R named
  // accumulators (so that they stay in registers; the rows and vectors past R and Z compile
  // away), Z loads of the panel and R broadcasts per k; partial columns through masked loads
  // and stores. kPrefetch: the panel's rows 8 k ahead are prefetched.
  template <int R, int Z, int64_t kWidth, bool kPrefetch>
  void BlockAvx512(const float* const* a, const float* panel, float* c, int64_t ldc,
                   int64_t cols, bool accumulate, const float* bias) const {
    constexpr int64_t kAhead = 8 * kWidth;
#define KFR_ACC(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = c##r##0, c##r##2 = c##r##0;
    KFR_ACC(0) KFR_ACC(1) KFR_ACC(2) KFR_ACC(3) KFR_ACC(4) KFR_ACC(5) KFR_ACC(6) KFR_ACC(7)
#undef KFR_ACC
#define KFR_ROW(r) const float* a##r = a[R > r ? r : 0];
    KFR_ROW(0) KFR_ROW(1) KFR_ROW(2) KFR_ROW(3) KFR_ROW(4) KFR_ROW(5) KFR_ROW(6) KFR_ROW(7)
#undef KFR_ROW
    const int64_t K = K_;
    for (int64_t k = 0; k < K; ++k) {
      const float* b = panel + k * kWidth;
      if constexpr (kPrefetch) PrefetchLines<Z>(b + kAhead);
      const __m512 b0 = _mm512_loadu_ps(b);
      const __m512 b1 = Z > 1 ? _mm512_loadu_ps(b + 16) : b0;
      const __m512 b2 = Z > 2 ? _mm512_loadu_ps(b + 32) : b0;
#define KFR_FMA(r)                                                   \
  if constexpr (R > r) {                                             \
    const __m512 x = _mm512_set1_ps(a##r[k]);                        \
    c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);                       \
    if constexpr (Z > 1) c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1);  \
    if constexpr (Z > 2) c##r##2 = _mm512_fmadd_ps(x, b2, c##r##2);  \
  }
      KFR_FMA(0) KFR_FMA(1) KFR_FMA(2) KFR_FMA(3) KFR_FMA(4) KFR_FMA(5) KFR_FMA(6) KFR_FMA(7)
#undef KFR_FMA
    }
    // the lanes of vector z that hold columns (all of them but in a partial panel's last)
    const auto lanes = [cols](int64_t z) {
      const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, cols - 16 * z));
      return n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    };
    const __mmask16 m0 = lanes(0), m1 = lanes(1), m2 = lanes(2);
    const __m512 zero = _mm512_setzero_ps();
    const __m512 bias0 = bias == nullptr ? zero : _mm512_maskz_loadu_ps(m0, bias);
    const __m512 bias1 = bias == nullptr || Z < 2 ? zero : _mm512_maskz_loadu_ps(m1, bias + 16);
    const __m512 bias2 = bias == nullptr || Z < 3 ? zero : _mm512_maskz_loadu_ps(m2, bias + 32);
#define KFR_STORE_VECTOR(r, z)                                                      \
  if constexpr (Z > z) {                                                            \
    __m512 v = c##r##z;                                                             \
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m##z, c_r + 16 * z)); \
    if (bias != nullptr) v = _mm512_add_ps(v, bias##z);                             \
    _mm512_mask_storeu_ps(c_r + 16 * z, m##z, v);                                   \
  }
#define KFR_STORE(r)                                                                \
  if constexpr (R > r) {                                                            \
    float* c_r = c + r * ldc;                                                       \
    KFR_STORE_VECTOR(r, 0) KFR_STORE_VECTOR(r, 1) KFR_STORE_VECTOR(r, 2)            \
  }
    KFR_STORE(0) KFR_STORE(1) KFR_STORE(2) KFR_STORE(3) KFR_STORE(4) KFR_STORE(5) KFR_STORE(6)
    KFR_STORE(7)
#undef KFR_STORE
#undef KFR_STORE_VECTOR
  }
#endif

  const T* u_;
  const int64_t K_, N_;
  const bool transpose_;
  const int64_t ldu_;
  const Product product_;
  const int64_t cols_;         // a block's panel width
  AlignedArray<T> packed_;  // the block's panels
  std::vector<T> transposed_;  // Eigen's U^T, row-major [K, N]
};

}  // namespace keras_fancyrnn

#endif  // KERAS_FANCYRNN_SMALL_GEMM_H_
