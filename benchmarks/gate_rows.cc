// The LSTM's gate rows (keras_fancyrnn/ops/kernels/gate_math.h) two ways in one process,
// alternating: the Eigen array expressions (LstmRowExpressions and LstmRowGradExpressions, what
// double runs) and the packet-at-a-time rows float runs (LstmRow<float>, LstmRowGrad<float>);
// forward and backward, median ns per row of H units on one core, and the largest difference
// between their outputs.
//
//   gate_rows ROUNDS H [H ...]     (run through benchmarks/gate_rows.py)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "gate_math.h"

namespace {

constexpr int kRows = 8;  // a shard's rows at batch 16 on two threads

template <typename F>
double NanosecondsPerRow(const F& rows, int reps) {
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) rows();
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start)
             .count() / (reps * kRows);
}

// Median ns per row of `expressions` and `packets`, alternating rounds.
template <typename F, typename G>
std::pair<double, double> Medians(const F& expressions, const G& packets, int rounds, int reps) {
  std::vector<double> t_expr, t_packet;
  for (int r = 0; r < rounds; ++r) {
    t_expr.push_back(NanosecondsPerRow(expressions, reps));
    t_packet.push_back(NanosecondsPerRow(packets, reps));
  }
  std::nth_element(t_expr.begin(), t_expr.begin() + rounds / 2, t_expr.end());
  std::nth_element(t_packet.begin(), t_packet.begin() + rounds / 2, t_packet.end());
  return {t_expr[rounds / 2], t_packet[rounds / 2]};
}

float MaxDifference(const std::vector<float>& a, const std::vector<float>& b) {
  float diff = 0.0f;
  for (size_t k = 0; k < a.size(); ++k) diff = std::max(diff, std::abs(a[k] - b[k]));
  return diff;
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = std::atoi(argv[1]);
  for (int a = 2; a < argc; ++a) {
    const int64_t H = std::atoll(argv[a]);
    std::mt19937 gen(1);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<float> z(kRows * 4 * H), c_prev(kRows * H), h(kRows * H), c(kRows * H),
        h2(kRows * H), c2(kRows * H);
    for (auto& v : z) v = normal(gen);
    for (auto& v : c_prev) v = normal(gen);
    const auto expressions = [&] {
      for (int b = 0; b < kRows; ++b) {
        keras_fancyrnn::LstmRowExpressions<float>(&z[b * 4 * H], &c_prev[b * H], nullptr,
                                                  &h[b * H], &c[b * H], H);
      }
    };
    const auto packets = [&] {
      for (int b = 0; b < kRows; ++b) {
        keras_fancyrnn::LstmRow<float>(&z[b * 4 * H], &c_prev[b * H], nullptr, &h2[b * H],
                                       &c2[b * H], H);
      }
    };
    const int reps = static_cast<int>(std::max<int64_t>(1, 200000 / H));
    auto [e, p] = Medians(expressions, packets, rounds, reps);
    std::printf("| forward | %lld | %.1f | %.1f | %.2f | %.2g |\n", static_cast<long long>(H), e,
                p, e / p, std::max(MaxDifference(h, h2), MaxDifference(c, c2)));

    // backward: dz (4H), dc_prev and the probe's gradient from dh, dc, z and c_prev
    std::vector<float> dh(kRows * H), dc(kRows * H), dz(kRows * 4 * H), dz2(kRows * 4 * H),
        dcp(kRows * H), dcp2(kRows * H), dp(kRows * H), dp2(kRows * H);
    for (auto& v : dh) v = normal(gen);
    for (auto& v : dc) v = normal(gen);
    keras_fancyrnn::LstmScratch<float> scratch(H);
    const auto grad_expressions = [&] {
      for (int b = 0; b < kRows; ++b) {
        keras_fancyrnn::LstmRowGradExpressions<float>(
            &dh[b * H], &dc[b * H], &z[b * 4 * H], &c_prev[b * H], nullptr, &dz[b * 4 * H],
            &dcp[b * H], &dp[b * H], H, H, scratch);
      }
    };
    const auto grad_packets = [&] {
      for (int b = 0; b < kRows; ++b) {
        keras_fancyrnn::LstmRowGrad<float>(&dh[b * H], &dc[b * H], &z[b * 4 * H],
                                           &c_prev[b * H], nullptr, &dz2[b * 4 * H],
                                           &dcp2[b * H], &dp2[b * H], H, scratch);
      }
    };
    std::tie(e, p) = Medians(grad_expressions, grad_packets, rounds, reps);
    std::printf("| backward | %lld | %.1f | %.1f | %.2f | %.2g |\n", static_cast<long long>(H),
                e, p, e / p,
                std::max({MaxDifference(dz, dz2), MaxDifference(dcp, dcp2),
                          MaxDifference(dp, dp2)}));
  }
  return 0;
}
