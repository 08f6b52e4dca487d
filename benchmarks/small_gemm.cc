// The recurrent product of the sequence kernels (keras_fancyrnn/ops/kernels/small_gemm.h,
// RecurrentKernel::Multiply: c = a U or a U^T for a shard's few rows) every way in one process:
// Eigen's product and the register blocks this CPU can run (AVX2/FMA with 16- and with 24-column
// panels; AVX-512 with 32- and with 48-column panels; and the width each block picks for the
// shape), alternating, median GFLOP/s per shape on one core; and the widest block's packing of U
// (what each op call does once), median us, from 8 copies of U in turn (as an op finds U: not in this core's
// caches). Each result is first checked against a plain double-precision product.
//
//   small_gemm ROUNDS nxKxN [nxKxN ...]     (run through benchmarks/small_gemm.py)
//
// Prints one Markdown row per shape and transpose; exits 1 if a product is wrong.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

#include "small_gemm.h"

using keras_fancyrnn::Compiled;
using keras_fancyrnn::Product;
using Kernel = keras_fancyrnn::RecurrentKernel<float>;

namespace {

// The largest |c - reference| over the largest |reference|, reference in double. The check
// builds its own kernel over a copy of u with rows 2 further apart, and multiplies rows 3
// further apart into rows 5 further apart, accumulating (as the sequence kernels use blocks of
// wider matrices): both of Multiply's modes and every stride are checked.
double RelativeError(const std::vector<float>& a, const std::vector<float>& u, int64_t n,
                     int64_t K, int64_t N, bool transpose, Product product, int64_t width) {
  const int64_t rows = transpose ? N : K, cols = transpose ? K : N, ldu = cols + 2;
  const int64_t lda = K + 3, ldc = N + 5;
  std::vector<float> wide_u(rows * ldu, 0.0f), strided(n * lda, 0.0f), c(n * ldc, 0.5f);
  for (int64_t i = 0; i < rows; ++i) {
    std::copy_n(u.data() + i * cols, cols, wide_u.data() + i * ldu);
  }
  for (int64_t i = 0; i < n; ++i) std::copy_n(a.data() + i * K, K, strided.data() + i * lda);
  const Kernel kernel(wide_u.data(), K, N, transpose, ldu, product, n, width);
  kernel.Multiply(strided.data(), n, c.data(), true, lda, ldc);
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      double ref = 0.5;  // the columns past N must stay 0.5
      for (int64_t k = 0; j < N && k < K; ++k) {
        ref += double(a[i * K + k]) * (transpose ? u[j * K + k] : u[k * N + j]);
      }
      err = std::max(err, std::abs(c[i * ldc + j] - ref));
      scale = std::max(scale, std::abs(ref));
    }
  }
  return err / std::max(scale, 1e-30);
}

// Seconds per product, after one untimed product: the op reuses its packed U at every step, so
// the panels are in cache from its second step on (timed cold, the panels of a large U came from
// L3 while the other variants' panels had taken L2: benchmarks/results/).
double Seconds(const Kernel& kernel, const float* a, int64_t n, float* c, int reps) {
  kernel.Multiply(a, n, c, false);
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) kernel.Multiply(a, n, c, false);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / reps;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Microseconds to build `product`'s kernel for products of n rows (pack U into panels), median
// of 64, each from the next of 8 copies of u.
double PackMicroseconds(const std::vector<float>& u, int64_t n, int64_t K, int64_t N,
                        bool transpose, Product product) {
  const std::vector<std::vector<float>> copies(8, u);
  std::vector<double> times;
  for (int r = 0; r < 64; ++r) {
    const auto start = std::chrono::steady_clock::now();
    const Kernel kernel(copies[r % 8].data(), K, N, transpose, -1, product, n);
    times.push_back(std::chrono::duration<double, std::micro>(
        std::chrono::steady_clock::now() - start).count());
  }
  return Median(times);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s ROUNDS nxKxN [nxKxN ...]\n", argv[0]);
    return 2;
  }
  const int rounds = std::max(1, std::atoi(argv[1]));
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  bool ok = true;
  for (int s = 2; s < argc; ++s) {
    long n, K, N;
    if (std::sscanf(argv[s], "%ldx%ldx%ld", &n, &K, &N) != 3 || n < 1 || K < 1 || N < 1) {
      std::fprintf(stderr, "bad shape %s: want nxKxN (positive integers, e.g. 32x128x512)\n",
                   argv[s]);
      return 2;
    }
    for (bool transpose : {false, true}) {
      std::vector<float> a(n * K), u(K * N), c(n * N);
      for (auto& v : a) v = normal(gen);
      for (auto& v : u) v = normal(gen);
      const double flops = 2.0 * n * K * N;
      const int reps = std::max<int>(1, int(2e7 / flops));
      // per variant: checked error, then alternating timed rounds (one vector per variant):
      // Eigen's, the AVX2 block with 16- and with 24-column panels, the AVX-512 block with 32-
      // and with 48-column panels
      const Product products[5] = {Product::kEigen, Product::kAvx2, Product::kAvx2,
                                   Product::kAvx512, Product::kAvx512};
      const int64_t widths[5] = {0, 16, 24, 32, 48};
      std::vector<std::vector<double>> times(5);
      double err = 0;
      std::vector<Kernel> kernels;
      kernels.reserve(5);
      for (int v = 0; v < 5 && Compiled(products[v]); ++v) {
        kernels.emplace_back(u.data(), K, N, transpose, -1, products[v], n, widths[v]);
        err = std::max(err, RelativeError(a, u, n, K, N, transpose, products[v], widths[v]));
      }
      for (int r = 0; r < rounds; ++r) {
        for (size_t v = 0; v < kernels.size(); ++v) {
          times[v].push_back(Seconds(kernels[v], a.data(), n, c.data(), reps));
        }
      }
      ok = ok && err < 1e-5;
      const double g_eigen = flops / Median(times[0]) / 1e9;
      double best = g_eigen;
      char cells[4][32];
      for (int v = 1; v <= 4; ++v) {
        std::snprintf(cells[v - 1], sizeof cells[v - 1], "n/a");
        if (times[v].empty()) continue;
        const double g = flops / Median(times[v]) / 1e9;
        best = std::max(best, g);
        std::snprintf(cells[v - 1], sizeof cells[v - 1], "%.1f", g);
      }
      // the panels each block takes for this shape when the op chooses
      char chosen[2][8] = {"n/a", "n/a"};
      for (int i = 0; i < 2; ++i) {
        const Product block = i == 0 ? Product::kAvx2 : Product::kAvx512;
        if (!Compiled(block)) continue;
        const Kernel auto_width(u.data(), K, N, transpose, -1, block, n);
        std::snprintf(chosen[i], sizeof chosen[i], "%ld", long(auto_width.panel_width()));
      }
      const double pack = PackMicroseconds(u, n, K, N, transpose, keras_fancyrnn::kWidestProduct);
      std::printf("| %ld | %ld | %ld | %s | %.1f | %s | %s | %s | %s | %s | %s | %.2f | %.1f | "
                  "%.1e |\n", n, K, N, transpose ? "U^T" : "U", g_eigen, cells[0], cells[1],
                  chosen[0], cells[2], cells[3], chosen[1], best / g_eigen, pack, err);
    }
  }
  return ok ? 0 : 1;
}
