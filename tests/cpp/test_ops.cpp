// Calls every relflat op through the dispatcher on CPU tensors and checks it against naive loops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect_close(double got, double want, double rtol, const char* what) {
  if (!(std::fabs(got - want) <= rtol * std::fmax(std::fabs(want), 1e-12))) {
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
    ++failures;
  }
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

const char* const kLossNames[] = {"cross_entropy", "mse", "bce_with_logits"};

Pair call_last_layer(const at::Tensor& f, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t loss,
                     bool per_sample = true) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relflat::last_layer_flatness", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, bool, bool)>();
  return op.call(f, w, b, kLossNames[loss], true, per_sample);
}

// Naive per-sample Hessians Hz_i (d x d) for the three closed-form losses.
double naive_hz(const at::Tensor& z, int64_t i, int64_t s, int64_t t, int64_t loss) {
  const int64_t d = z.size(1);
  auto zi = z[i];
  if (loss == 1) return s == t ? 2.0 / d : 0.0;
  if (loss == 2) {
    const double sig = 1.0 / (1.0 + std::exp(-zi[s].item<double>()));
    return s == t ? sig * (1 - sig) / d : 0.0;
  }
  double mx = -INFINITY, sum = 0;
  for (int64_t k = 0; k < d; ++k) mx = std::fmax(mx, zi[k].item<double>());
  for (int64_t k = 0; k < d; ++k) sum += std::exp(zi[k].item<double>() - mx);
  const double ps = std::exp(zi[s].item<double>() - mx) / sum, pt = std::exp(zi[t].item<double>() - mx) / sum;
  return (s == t ? ps : 0.0) - ps * pt;
}

void test_last_layer() {
  at::manual_seed(0);
  const int64_t n = 9, m = 5;
  for (int64_t d : {1, 4, 40}) {
    for (int64_t loss = 0; loss < 3; ++loss) {
      auto f = at::randn({n, m}, at::kDouble), w = at::randn({d, m}, at::kDouble), b = at::randn({d}, at::kDouble);
      auto [per_sample, block] = call_last_layer(f, w, b, loss);
      auto z = at::matmul(f, w.t()) + b;
      auto g = at::matmul(w, w.t());
      for (int64_t i = 0; i < n; ++i) {
        double a = 0, quad = 0;
        for (int64_t j = 0; j < m; ++j) a += f[i][j].item<double>() * f[i][j].item<double>();
        for (int64_t s = 0; s < d; ++s)
          for (int64_t t = 0; t < d; ++t) quad += g[s][t].item<double>() * naive_hz(z, i, s, t, loss);
        expect_close(per_sample[i].item<double>(), a * quad, 1e-10, "last_layer_flatness per_sample");
      }
      for (int64_t s = 0; s < d; ++s)
        for (int64_t t = 0; t < d; ++t) {
          double want = 0;
          for (int64_t i = 0; i < n; ++i) want += f[i].pow(2).sum().item<double>() * naive_hz(z, i, s, t, loss);
          if (std::fabs(want) > 1e-12) expect_close(block[s][t].item<double>(), want, 1e-10, "last_layer block");
        }
      // Only the sum: the same block, and kappa = <G, block> equals the per-sample terms' sum.
      auto [none, block_alone] = call_last_layer(f, w, b, loss, false);
      if (none.numel() != 0) {
        std::printf("FAIL last_layer_flatness per_sample=false returned %lld per-sample terms\n",
                    static_cast<long long>(none.numel()));
        ++failures;
      }
      expect_close((g * block_alone).sum().item<double>(), per_sample.sum().item<double>(), 1e-10,
                   "last_layer kappa from the block alone");
    }
  }
}

void test_contract() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relflat::contract_output_hessians", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  auto sq = at::rand({6}, at::kDouble), hz = at::randn({6, 3, 4}, at::kDouble), g = at::randn({3, 4}, at::kDouble);
  auto [per_sample, block] = op.call(sq, hz, g, true);
  for (int64_t i = 0; i < 6; ++i) {
    double want = 0;
    for (int64_t s = 0; s < 3; ++s)
      for (int64_t k = 0; k < 4; ++k) want += g[s][k].item<double>() * hz[i][s][k].item<double>();
    expect_close(per_sample[i].item<double>(), sq[i].item<double>() * want, 1e-12, "contract per_sample");
  }
  for (int64_t s = 0; s < 3; ++s)
    for (int64_t k = 0; k < 4; ++k) {
      double want = 0;
      for (int64_t i = 0; i < 6; ++i) want += sq[i].item<double>() * hz[i][s][k].item<double>();
      expect_close(block[s][k].item<double>(), want, 1e-12, "contract block");
    }
}

void test_dense_block_trace() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relflat::dense_block_trace", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&)>();
  const int64_t d = 3, m = 4;
  auto h = at::randn({d * m, d * m}, at::kDouble), w = at::randn({d, m}, at::kDouble);
  auto [kappa, t] = op.call(h, w);
  double want_kappa = 0;
  for (int64_t s = 0; s < d; ++s)
    for (int64_t u = 0; u < d; ++u) {
      double tr = 0, gsu = 0;
      for (int64_t j = 0; j < m; ++j) {
        tr += h[s * m + j][u * m + j].item<double>();
        gsu += w[s][j].item<double>() * w[u][j].item<double>();
      }
      expect_close(t[s][u].item<double>(), tr, 1e-12, "dense_block_trace T");
      want_kappa += gsu * tr;
    }
  expect_close(kappa.item<double>(), want_kappa, 1e-12, "dense_block_trace kappa");
}

// Split ids: query q sees key k in split r when their ids differ; per-key bandwidths h * scale[k].
void test_gaussian_kernel_reduce() {
  using Opt = std::optional<at::Tensor>;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("relflat::gaussian_kernel_reduce", "")
                       .typed<Pair(const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&, const Opt&,
                                   const Opt&, const Opt&)>();
  const int64_t nq = 7, nk = 300, m = 5, c = 2, n_bw = 2, n_splits = 2;
  auto q = at::randn({nq, m}, at::kDouble), k = at::randn({nk, m}, at::kDouble);
  auto v = at::randn({nk, c}, at::kDouble), bw = at::tensor({0.3, 2.0}, at::kDouble);
  auto scale = at::rand({nk}, at::kDouble) + 0.5;
  auto qs = at::randint(0, 3, {n_splits, nq}, at::kLong), ks = at::randint(0, 3, {n_splits, nk}, at::kLong);
  auto [logdens, wval] = op.call(q, k, v, bw, scale, qs, ks);
  for (int64_t r = 0; r < n_splits; ++r)
    for (int64_t b = 0; b < n_bw; ++b)
      for (int64_t i = 0; i < nq; ++i) {
        double mx = -INFINITY;
        std::vector<double> logit(nk, -INFINITY);
        int64_t seen = 0;
        for (int64_t j = 0; j < nk; ++j) {
          if (ks[r][j].item<int64_t>() == qs[r][i].item<int64_t>()) continue;
          const double h = bw[b].item<double>() * scale[j].item<double>();
          const double d2 = (q[i] - k[j]).square().sum().item<double>();
          logit[j] = -d2 / (2 * h * h) - m * std::log(h) - 0.5 * m * std::log(2 * M_PI);
          mx = std::fmax(mx, logit[j]);
          ++seen;
        }
        double sum = 0, acc[c] = {0, 0};
        for (int64_t j = 0; j < nk; ++j) {
          const double e = std::exp(logit[j] - mx);
          sum += e;
          for (int64_t u = 0; u < c; ++u) acc[u] += e * v[j][u].item<double>();
        }
        expect_close(logdens[r][b][i].item<double>(), mx + std::log(sum) - std::log(double(seen)), 1e-10,
                     "gaussian_kernel_reduce logdens");
        for (int64_t u = 0; u < c; ++u)
          expect_close(wval[r][b][i][u].item<double>(), acc[u] / sum, 1e-10, "gaussian_kernel_reduce wval");
      }
}

void test_bad_arguments_throw() {
  try {
    call_last_layer(at::randn({3, 4}), at::randn({2, 5}), std::nullopt, 0);
    std::printf("FAIL: mismatched weight accepted\n");
    ++failures;
  } catch (const c10::Error&) {
  }
}

}  // namespace

int main() {
  test_last_layer();
  test_contract();
  test_dense_block_trace();
  test_gaussian_kernel_reduce();
  test_bad_arguments_throw();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all relflat op checks passed\n");
  return 0;
}
