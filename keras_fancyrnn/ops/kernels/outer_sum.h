// The weight gradients of the sequence kernels and the projection (sequence.cc): C (K x N) =
// sum over m of a_m^T b_m, the outer products of M pairs of rows (a_m: K values, b_m: N values).
// Each row is found through a pointer, so the pairs need no common layout: U's gradient pairs
// h_{t-1} (h_0's rows at t = 0) with dz_t, W's pairs a batch-major x with a time-major dy, and
// neither is copied into one matrix first.
//
// For float with a register block compiled in (the ops' `product`), C is computed in blocks of
// rows x columns held in registers (AVX-512: up to 8 x 48, AVX2: up to 4 x 24) while a chunk of
// pairs streams through them: per pair, the block's columns of b_m are loaded and each of its
// rows of a_m broadcast. A chunk's columns of b (kChunk pairs: 24 KB for AVX-512) stay in L1
// while every block of rows takes them, and the next chunk adds into C. Threads split C's
// columns, or the pairs (SplitPairs). Double, and Eigen's product, gather the rows into two
// matrices and run Eigen's A^T B on one thread (the layers send those to TensorFlow's matmuls
// instead: keras_fancyrnn/ops/gradients.py).
#ifndef KERAS_FANCYRNN_OUTER_SUM_H_
#define KERAS_FANCYRNN_OUTER_SUM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "small_gemm.h"

namespace keras_fancyrnn {

template <typename T>
class OuterSum {
 public:
  // c [K, N] (rows N apart) will get sum_m a[m]^T b[m] for m < M, on up to `threads` threads.
  OuterSum(Product product, int64_t M, int64_t K, int64_t N, const T* const* a,
           const T* const* b, T* c, int64_t threads)
      : M_(M), K_(K), N_(N), threads_(threads), a_(a), b_(b), c_(c),
        product_(std::is_same<T, float>::value ? product : Product::kEigen),
        rows_(product_ == Product::kAvx512 ? 8 : 4), cols_(product_ == Product::kAvx512 ? 48 : 24),
        vector_(product_ == Product::kAvx512 ? 16 : 8), blocks_((K + rows_ - 1) / rows_) {}

  // Whether threads split the pairs, each summing its own into a C of its own that the op adds
  // up after, rather than C's columns, each copying every pair's row of a (below). Per thread,
  // the copies cost about M K and the adding (threads - 1) K N; on two threads the pairs split
  // paid where M > 3 N (benchmarks/results/2026-12-05_weight_gradient_ops.md).
  bool SplitPairs() const {
    return product_ != Product::kEigen && threads_ > 1 && M_ > 3 * (threads_ - 1) * N_;
  }

  // The pieces of work Run splits: pairs (SplitPairs), or C's columns in vectors (16 for the
  // AVX-512 block, 8 for AVX2), each with all of C's rows; one piece for Eigen's product, which
  // runs whole. Threads that take equal ranges of them take equal work.
  int64_t Items() const {
    if (product_ == Product::kEigen) return 1;
    return SplitPairs() ? M_ : (N_ + vector_ - 1) / vector_;
  }

  // Items [lo, hi): C's columns, or with SplitPairs the sum over pairs [lo, hi) into `partial`
  // [K, N]. Threads may run disjoint ranges at once.
  void Run(int64_t lo, int64_t hi, T* partial = nullptr) const {
    if (K_ == 0 || N_ == 0) return;
    if (product_ == Product::kEigen) return RunEigen();
    if constexpr (std::is_same<T, float>::value) {
      if (SplitPairs()) {
        Sum(lo, hi, 0, N_, partial);
      } else {
        Sum(0, M_, lo * vector_, std::min(N_, hi * vector_), c_);
      }
    }
  }

 private:
  // Columns [j_lo, j_hi) of c [K, N] = the sum over pairs [m_lo, m_hi) (zeros for none). Chunk by
  // chunk of pairs, each panel of the columns (cols_ wide, the last one narrower) times every
  // block of rows over the chunk, added to what the chunks before it left in c. A chunk's rows
  // of a and b are first copied into consecutive memory, a's by blocks of rows (kChunk x rows_
  // values of a block in a row), b's by panels (kChunk x cols_, zero-padded): in place, their
  // rows are often a multiple of 1 or 4 KB apart, would share a few of L1's sets and miss at
  // every block. The next rows of b are prefetched as a panel is copied.
  void Sum(int64_t m_lo, int64_t m_hi, int64_t j_lo, int64_t j_hi, float* c) const {
    const AlignedArray<float> a_chunk(blocks_ * kChunk * rows_), b_chunk(kChunk * cols_);
    std::fill_n(a_chunk.get(), blocks_ * kChunk * rows_, 0.0f);
    for (int64_t m = m_lo; m == m_lo || m < m_hi; m += kChunk) {
      const int64_t n = std::min(m_hi, m + kChunk) - m;
      for (int64_t k = 0; k < n; ++k) {
        Copy(reinterpret_cast<const float*>(a_[m + k]), K_, rows_, kChunk * rows_,
             a_chunk.get() + k * rows_);
      }
      for (int64_t j = j_lo; j < j_hi; j += cols_) {
        const int64_t cols = std::min(cols_, j_hi - j);
        for (int64_t k = 0; k < n; ++k) {
          if (k + kAhead < n) {
            const char* ahead = reinterpret_cast<const char*>(b_[m + k + kAhead] + j);
            for (int64_t at = 0; at < cols * 4; at += 64) __builtin_prefetch(ahead + at);
          }
          float* row = b_chunk.get() + k * cols_;
          Copy(reinterpret_cast<const float*>(b_[m + k]) + j, cols, cols_, cols_, row);
          std::fill(row + cols, row + cols_, 0.0f);
        }
        for (int64_t i = 0; i < K_; i += rows_) {
          Block(a_chunk.get() + i * kChunk, b_chunk.get(), n, c + i * N_ + j,
                std::min(rows_, K_ - i), cols, m > m_lo);
        }
      }
    }
  }

  static constexpr int64_t kChunk = 128;
  static constexpr int64_t kAhead = 8;  // rows of b prefetched ahead

  // n values of `from` into pieces of `piece` values, `stride` apart from `to` on (a fixed-size
  // copy per piece where the piece is whole: a call of memmove per piece cost more than it copied)
  static void Copy(const float* from, int64_t n, int64_t piece, int64_t stride, float* to) {
    const auto pieces = [&](auto size) {
      int64_t i = 0;
      for (; i + size <= n; i += size, to += stride) {
        std::memcpy(to, from + i, sizeof(float) * size);
      }
      if (i < n) std::memcpy(to, from + i, sizeof(float) * (n - i));
    };
    switch (piece) {
      case 4: return pieces(std::integral_constant<int64_t, 4>{});
      case 8: return pieces(std::integral_constant<int64_t, 8>{});
      case 24: return pieces(std::integral_constant<int64_t, 24>{});
      default: return pieces(std::integral_constant<int64_t, 48>{});
    }
  }

  void RunEigen() const {
    RowMat<T> a(M_, K_), b(M_, N_);
    for (int64_t m = 0; m < M_; ++m) {
      a.row(m) = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(a_[m], K_);
      b.row(m) = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(b_[m], N_);
    }
    MatOut<T>(c_, K_, N_).noalias() = a.transpose() * b;
  }

  // f(std::integral_constant<int, n>) for 1 <= n <= kMax, n chosen at run time.
  template <int kMax, typename F>
  static void With(int64_t n, const F& f) {
    if constexpr (kMax > 1) {
      if (n < kMax) return With<kMax - 1>(n, f);
    }
    f(std::integral_constant<int, kMax>{});
  }

  // `rows` rows and `cols` columns of C from c on (rows N apart) over the n pairs of a chunk
  // (a: the block's rows of a_m, rows_ apart; b: the panel's columns of b_m, cols_ apart): set,
  // or added to what they hold with `accumulate`.
  void Block(const float* a, const float* b, int64_t n, float* c, int64_t rows, int64_t cols,
             bool accumulate) const {
    const auto block = [&](auto isa) {
      using Isa = decltype(isa);
      With<Isa::kRows>(rows, [&](auto r) {
        With<3>((cols + Isa::kWidth - 1) / Isa::kWidth, [&](auto z) {
          BlockOf<Isa, decltype(r)::value, decltype(z)::value>(a, b, n, c, cols, accumulate);
        });
      });
    };
#ifdef KERAS_FANCYRNN_AVX512
    if (product_ == Product::kAvx512) return block(Avx512{});
#endif
#ifdef KERAS_FANCYRNN_AVX2
    block(Avx2{});
#endif
  }

  // The vector operations of a block, per instruction set: Lanes(n) masks the first n of a
  // vector's kWidth floats, for the partial last vector of a panel (masked loads and stores
  // only there: on some AVX2 CPUs they are slow).
#ifdef KERAS_FANCYRNN_AVX512
  struct Avx512 {
    using V = __m512;
    using Mask = __mmask16;
    static constexpr int kWidth = 16, kRows = 8;
    static Mask Lanes(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1); }
    static V Zero() { return _mm512_setzero_ps(); }
    static V Load(const float* p) { return _mm512_loadu_ps(p); }
    static V LoadPart(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
    static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
    static V Fma(V x, V y, V acc) { return _mm512_fmadd_ps(x, y, acc); }
    static V Add(V x, V y) { return _mm512_add_ps(x, y); }
    static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static void StorePart(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  };
#endif
#ifdef KERAS_FANCYRNN_AVX2
  struct Avx2 {
    using V = __m256;
    using Mask = __m256i;
    static constexpr int kWidth = 8, kRows = 4;
    static Mask Lanes(int64_t n) {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static V Zero() { return _mm256_setzero_ps(); }
    static V Load(const float* p) { return _mm256_loadu_ps(p); }
    static V LoadPart(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
    static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    static V Fma(V x, V y, V acc) { return _mm256_fmadd_ps(x, y, acc); }
    static V Add(V x, V y) { return _mm256_add_ps(x, y); }
    static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static void StorePart(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
  };
#endif

  // R rows x Z vectors (R Z accumulators in registers; the loops are unrolled so that they
  // stay there): per pair, Z loads of b and R broadcasts of a. The chunks' strides are the
  // widest block's: Isa::kRows values of a and 3 Isa::kWidth of b per pair.
  template <typename Isa, int R, int Z>
  void BlockOf(const float* a, const float* b, int64_t n, float* c, int64_t cols,
               bool accumulate) const {
    using V = typename Isa::V;
    constexpr int W = Isa::kWidth;
    const int64_t tail = cols - W * (Z - 1);  // columns of the last vector (1 to W)
    const auto last = Isa::Lanes(tail);
    V acc[R][Z];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
      for (int z = 0; z < Z; ++z) acc[r][z] = Isa::Zero();
    }
    for (int64_t m = 0; m < n; ++m) {
      const float* bm = b + m * 3 * W;
      const float* am = a + m * Isa::kRows;
      V v[Z];
#pragma GCC unroll 3
      for (int z = 0; z < Z; ++z) v[z] = Isa::Load(bm + W * z);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V x = Isa::Broadcast(am + r);
#pragma GCC unroll 3
        for (int z = 0; z < Z; ++z) acc[r][z] = Isa::Fma(x, v[z], acc[r][z]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
      for (int z = 0; z < Z; ++z) {
        float* out = c + r * N_ + W * z;
        V sum = acc[r][z];
        if (z + 1 < Z || tail == W) {
          if (accumulate) sum = Isa::Add(sum, Isa::Load(out));
          Isa::Store(out, sum);
        } else {
          if (accumulate) sum = Isa::Add(sum, Isa::LoadPart(out, last));
          Isa::StorePart(out, last, sum);
        }
      }
    }
  }

  const int64_t M_, K_, N_, threads_;
  const T* const* a_;
  const T* const* b_;
  T* c_;
  const Product product_;
  const int64_t rows_, cols_, vector_, blocks_;
};

}  // namespace keras_fancyrnn

#endif  // KERAS_FANCYRNN_OUTER_SUM_H_
