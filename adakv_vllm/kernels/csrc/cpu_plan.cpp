// The seal planner, compiled: every page's greedy knapsack of one seal list in one call.
//
// Contract and oracle: blocks/planner.py::allocate, page by page, with the same result. Per page of
// T tokens: every token starts at precision code 0; the floor (optional) is granted first, token by
// token in position order, one step at a time as far as the budget allows; then the upgrade step with
// the largest gain per extra byte, key = -(w_t * (d_t[c] - d_t[c + 1])) / (cost[c + 1] - cost[c]) in
// fp64 exactly as Python computes it, is taken while it fits -- ties by token position -- and a step
// that does not fit retires its token (the oracle's heap pops it and never pushes it again). The
// oracle keeps one heap entry per token still climbing; the least (key, t) among those tokens is the
// entry its heap pops, so a scan over the T tokens takes the very same steps (T is a block: <= 1024).
// Steps with zero gain or zero weight are never taken.

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

enum Status { kOk = 0, kBadArgs = 1, kOverBudget = 2, kNotFinite = 3 };

constexpr int kMaxCodes = 8;

// The key of token t's next step from `code`, or false when it has none.
inline bool step_key(const double* w, const double* d, const int64_t* cost, int num_codes, int t, int code,
                     double* key) {
  if (code + 1 >= num_codes) return false;
  const double gain = d[t * num_codes + code] - d[t * num_codes + code + 1];
  if (gain <= 0 || w[t] <= 0) return false;
  *key = -w[t] * gain / static_cast<double>(cost[code + 1] - cost[code]);
  return true;
}

int plan_page(const double* w, const double* d, const int64_t* cost, int num_codes, int64_t budget,
              const int64_t* floor_codes, int num_tokens, int64_t* codes) {
  int64_t spent = cost[0] * num_tokens;
  if (spent > budget) return kOverBudget;
  for (int t = 0; t < num_tokens; ++t) codes[t] = 0;
  if (floor_codes)
    for (int t = 0; t < num_tokens; ++t)
      while (codes[t] < floor_codes[t] && spent + cost[codes[t] + 1] - cost[codes[t]] <= budget) {
        spent += cost[codes[t] + 1] - cost[codes[t]];
        ++codes[t];
      }
  std::vector<double> key(static_cast<size_t>(num_tokens));
  std::vector<char> climbing(static_cast<size_t>(num_tokens));
  for (int t = 0; t < num_tokens; ++t)
    climbing[t] = step_key(w, d, cost, num_codes, t, static_cast<int>(codes[t]), &key[t]);
  for (;;) {
    int best = -1;
    for (int t = 0; t < num_tokens; ++t)
      if (climbing[t] && (best < 0 || key[t] < key[best])) best = t;  // ties: the first position
    if (best < 0) return kOk;
    const int64_t extra = cost[codes[best] + 1] - cost[codes[best]];
    if (spent + extra > budget) {
      climbing[best] = 0;  // this token cannot climb further; cheaper steps of others may still fit
      continue;
    }
    spent += extra;
    ++codes[best];
    climbing[best] = step_key(w, d, cost, num_codes, best, static_cast<int>(codes[best]), &key[best]);
  }
}

}  // namespace

extern "C" {

// weight [n, T] and distortion [n, T, P] fp64; cost [P] bytes per token at each code (increasing);
// floor_codes [n, T] codes granted first (null: none); codes [n, T] out. 0 = ok; 1 = inconsistent
// arguments; 2 = a page's tokens exceed the budget at code 0; 3 = a weight or distortion that is
// NaN or inf (the oracle's order is then Python's, not a number's) -- 1-3: `codes` unspecified.
int adakv_plan_pages(const double* weight, const double* distortion, const int64_t* cost, int64_t num_codes,
                     int64_t budget, const int64_t* floor_codes, int64_t n, int64_t num_tokens, int64_t* codes) {
  if (!weight || !distortion || !cost || !codes || n < 0 || num_tokens <= 0 || num_tokens > 1024 ||
      num_codes < 1 || num_codes > kMaxCodes)
    return kBadArgs;
  for (int64_t c = 1; c < num_codes; ++c)
    if (cost[c] <= cost[c - 1]) return kBadArgs;
  for (int64_t i = 0; i < n * num_tokens; ++i) {
    if (!std::isfinite(weight[i])) return kNotFinite;
    for (int64_t c = 0; c < num_codes; ++c)
      if (!std::isfinite(distortion[i * num_codes + c])) return kNotFinite;
    if (floor_codes && (floor_codes[i] < 0 || floor_codes[i] >= num_codes)) return kBadArgs;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = i * num_tokens;
    const int status = plan_page(weight + at, distortion + at * num_codes, cost, static_cast<int>(num_codes), budget,
                                 floor_codes ? floor_codes + at : nullptr, static_cast<int>(num_tokens), codes + at);
    if (status) return status;
  }
  return kOk;
}

}  // extern "C"
