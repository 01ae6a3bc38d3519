// An exact judge for the task: the probability that a response of policy A beats one of policy B
// under a hidden reward, computed by enumerating every response (V^len of them per prompt, at
// most 5^5 = 3125 on the examples' tasks) instead of sampling a judge's verdicts.
//
//   win(A, B) = E_x [ P(r(x, yA) > r(x, yB)) + 1/2 P(r(x, yA) = r(x, yB)) ],  yA ~ A(.|x), yB ~ B(.|x)
// independently, prompts uniform. win(A, B) + win(B, A) = 1 and win(A, A) = 1/2.
#pragma once
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "task.hpp"

namespace examples {

/// One response of a prompt: its table value (e.g. its true reward) and its probability.
struct Outcome {
  double value, prob;
};

/// Calls f(tokens, probability) for every response to prompt x under dist (tokens has len[x]
/// entries, in lexicographic order).
template <class F>
void for_each_response(const Task& t, int x, const Dist& dist, F&& f) {
  const int n = t.length(x);
  std::vector<int> tok(static_cast<std::size_t>(n), 0);
  while (true) {
    double p = 1;
    for (int l = 0; l < n; ++l)
      p *= dist.p[t.shape.row(x, l) + static_cast<std::size_t>(tok[static_cast<std::size_t>(l)])];
    f(static_cast<const int*>(tok.data()), p);
    int l = n - 1;
    while (l >= 0 && ++tok[static_cast<std::size_t>(l)] == t.shape.V) tok[static_cast<std::size_t>(l--)] = 0;
    if (l < 0) return;
  }
}

/// Every response to prompt x with its value under `table` and its probability under dist.
inline std::vector<Outcome> outcomes(const Task& t, int x, const Dist& dist, const std::vector<double>& table) {
  std::vector<Outcome> out;
  for_each_response(t, x, dist, [&](const int* tok, double p) { out.push_back({t.table_sum(table, x, tok), p}); });
  return out;
}

/// P(vA > vB) + 1/2 P(vA = vB) for independent draws from two outcome lists: B sorted by value
/// with its cumulative probability, one binary search per outcome of A.
inline double win_probability(const std::vector<Outcome>& a, std::vector<Outcome> b) {
  std::sort(b.begin(), b.end(), [](const Outcome& u, const Outcome& v) { return u.value < v.value; });
  std::vector<double> below(b.size() + 1, 0.0);  // below[k] = P(vB among the first k sorted outcomes)
  for (std::size_t k = 0; k < b.size(); ++k) below[k + 1] = below[k] + b[k].prob;
  double win = 0;
  for (const Outcome& o : a) {
    const auto lo =
        std::lower_bound(b.begin(), b.end(), o.value, [](const Outcome& u, double v) { return u.value < v; });
    const auto hi =
        std::upper_bound(b.begin(), b.end(), o.value, [](double v, const Outcome& u) { return v < u.value; });
    const auto i = static_cast<std::size_t>(lo - b.begin()), j = static_cast<std::size_t>(hi - b.begin());
    win += o.prob * (below[i] + 0.5 * (below[j] - below[i]));
  }
  return win;
}

/// win(A, B) under a per-token reward table, averaged over the task's prompts. Exact.
inline double win_rate(const Task& t, const Dist& a, const Dist& b, const std::vector<double>& table) {
  double total = 0;
  for (int x = 0; x < t.shape.X; ++x) total += win_probability(outcomes(t, x, a, table), outcomes(t, x, b, table));
  return total / t.shape.X;
}
inline double win_rate(const Task& t, const Dist& a, const Dist& b) { return win_rate(t, a, b, t.score); }

/// The matrix W[i][j] = win(policy i, policy j), exact.
inline std::vector<std::vector<double>> win_matrix(const Task& t, const std::vector<Dist>& policies,
                                                   const std::vector<double>& table) {
  std::vector<std::vector<double>> w(policies.size(), std::vector<double>(policies.size()));
  for (std::size_t i = 0; i < policies.size(); ++i)
    for (std::size_t j = 0; j < policies.size(); ++j) w[i][j] = win_rate(t, policies[i], policies[j], table);
  return w;
}

}  // namespace examples
