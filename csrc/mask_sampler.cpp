// Multi-block mask sampler, the compiled twin of ijepa_fast/masks/multiblock.py.
//
// It draws exactly the numbers the Python sampler draws (the generator is specified bit for bit
// in ijepa_fast/masks/rng.py: splitmix64 streams keyed by (seed, step, global image position)), and follows
// the same rules in the same order, so both return identical index tensors for the same seed.
// Floating-point steps (block sizes) use IEEE double arithmetic without contraction
// (-ffp-contract=off) and round half to even, as Python does.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kBatchWord = ~0ULL;  // the batch-level stream (block sizes), shared by all ranks
constexpr int kRetriesPerRelaxation = 20;

inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t derive(uint64_t seed, std::initializer_list<uint64_t> words) {
  uint64_t s = splitmix64(seed);
  for (uint64_t w : words) s = splitmix64(s ^ w);
  return s;
}

struct Stream {
  uint64_t state;
  uint64_t next() {
    uint64_t out = splitmix64(state);
    state += kGolden;
    return out;
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  int64_t randint(int64_t lo, int64_t hi) {  // [lo, hi), multiply-shift
    unsigned __int128 p = static_cast<unsigned __int128>(next()) * static_cast<uint64_t>(hi - lo);
    return lo + static_cast<int64_t>(p >> 64);
  }
};

struct Size {
  int64_t h, w;
};

// reference: sides clamped below the grid (its exclusive corner bound needs a spare row and column);
// default: up to the whole grid
Size block_size(double r, double s0, double s1, double a0, double a1, int64_t gh, int64_t gw, bool reference) {
  double s = s0 + r * (s1 - s0);
  auto n = static_cast<int64_t>(static_cast<double>(gh * gw) * s);
  double a = a0 + r * (a1 - a0);
  auto h = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(n) * a)));
  auto w = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(n) / a)));
  const int64_t spare = reference ? 1 : 0;
  return {std::min(h, gh - spare), std::min(w, gw - spare)};
}

struct Config {
  int64_t gh, gw;
  bool reference;
  int64_t num_targets, num_context, min_keep;
  double ts0, ts1, ta0, ta1, cs0, cs1;
  bool allow_overlap;
};

struct ImageDraw {
  std::vector<int64_t> tgt_top, tgt_left;
  std::vector<std::vector<int64_t>> ctx;  // per context block: kept patch indices, row-major
};

// One image's draws: target corners, then each context block (redrawn while it keeps <= min_keep
// patches, avoiding one fewer target block, the last first, after every 20 failures).
ImageDraw draw_image(Stream st, const Config& c, Size t, Size cb, int64_t shift) {
  ImageDraw d;
  const int64_t k = c.num_targets;
  std::vector<int64_t> first(c.gh * c.gw, k);  // the first target block covering each patch
  for (int64_t i = 0; i < k; ++i) {
    int64_t top = st.randint(0, c.gh - t.h + shift);
    int64_t left = st.randint(0, c.gw - t.w + shift);
    d.tgt_top.push_back(top);
    d.tgt_left.push_back(left);
    for (int64_t r = top; r < top + t.h; ++r)
      for (int64_t q = left; q < left + t.w; ++q) first[r * c.gw + q] = std::min(first[r * c.gw + q], i);
  }
  for (int64_t m = 0; m < c.num_context; ++m) {
    int64_t tries = 0, fails = 0, top = 0, left = 0, n = 0;
    while (true) {
      top = st.randint(0, c.gh - cb.h + shift);
      left = st.randint(0, c.gw - cb.w + shift);
      n = c.allow_overlap ? 0 : std::max<int64_t>(k - tries, 0);
      int64_t keep = 0;
      for (int64_t r = top; r < top + cb.h; ++r)
        for (int64_t q = left; q < left + cb.w; ++q) keep += first[r * c.gw + q] >= n;
      if (keep > c.min_keep) break;
      if (++fails == kRetriesPerRelaxation) {
        ++tries;
        fails = 0;
      }
    }
    std::vector<int64_t> kept;
    for (int64_t r = top; r < top + cb.h; ++r)
      for (int64_t q = left; q < left + cb.w; ++q)
        if (first[r * c.gw + q] >= n) kept.push_back(r * c.gw + q);
    d.ctx.push_back(std::move(kept));
  }
  return d;
}

// Returns (context [M, B, L], context lengths [M, B], targets [K, B, th * tw], sizes [4]).
// Reference mode truncates every context to the batch minimum; default mode pads with index 0 to
// the batch maximum (the lengths say which positions are real).
// Image b of this rank is image rank + b * world of the global batch (the data loader's sharding).
std::vector<torch::Tensor> sample(int64_t seed, int64_t step, int64_t rank, int64_t world, int64_t batch, int64_t gh,
                                  int64_t gw,
                                  bool reference, int64_t num_targets, std::vector<double> target_scale,
                                  std::vector<double> target_aspect, int64_t num_context,
                                  std::vector<double> context_scale, int64_t min_keep, bool allow_overlap) {
  TORCH_CHECK(batch >= 0 && gh > 1 && gw > 1, "mask sampler: need a batch size >= 0 and a grid of at least 2x2");
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "mask sampler: rank must be in 0 .. world-1");
  TORCH_CHECK(num_targets >= 1 && num_context >= 1, "mask sampler: need at least one target and one context block");
  TORCH_CHECK(target_scale.size() == 2 && target_aspect.size() == 2 && context_scale.size() == 2,
              "mask sampler: scales and aspects are (min, max) pairs");
  Config c{gh, gw, reference, num_targets, num_context, min_keep, target_scale[0], target_scale[1],
           target_aspect[0], target_aspect[1], context_scale[0], context_scale[1], allow_overlap};
  Stream sizes{derive(static_cast<uint64_t>(seed), {static_cast<uint64_t>(step), kBatchWord})};
  Size t = block_size(sizes.uniform(), c.ts0, c.ts1, c.ta0, c.ta1, gh, gw, reference);
  Size cb = block_size(sizes.uniform(), c.cs0, c.cs1, 1.0, 1.0, gh, gw, reference);
  TORCH_CHECK(t.h * t.w > min_keep, "mask.min_keep=", min_keep, ": target blocks of ", t.h, "x", t.w,
              " patches never keep more; lower mask.min_keep or raise mask.target_scale");
  TORCH_CHECK(cb.h * cb.w > min_keep, "mask.min_keep=", min_keep, ": context blocks of ", cb.h, "x", cb.w,
              " patches never keep more; lower mask.min_keep or raise mask.context_scale");
  const int64_t shift = reference ? 0 : 1;  // reference: exclusive bound, the last position is never drawn
  std::vector<ImageDraw> draws;
  draws.reserve(batch);
  for (int64_t b = 0; b < batch; ++b)
    draws.push_back(draw_image(
        Stream{derive(static_cast<uint64_t>(seed),
                      {static_cast<uint64_t>(step), static_cast<uint64_t>(rank + b * world)})},
        c, t, cb, shift));

  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  const int64_t lt = t.h * t.w;
  auto targets = torch::empty({num_targets, batch, lt}, opts);
  auto* tp = targets.data_ptr<int64_t>();
  for (int64_t k = 0; k < num_targets; ++k)
    for (int64_t b = 0; b < batch; ++b) {
      int64_t* row = tp + (k * batch + b) * lt;
      for (int64_t i = 0; i < t.h; ++i)
        for (int64_t j = 0; j < t.w; ++j)
          row[i * t.w + j] = (draws[b].tgt_top[k] + i) * gw + draws[b].tgt_left[k] + j;
    }

  auto lens = torch::empty({num_context, batch}, opts);
  auto* lp = lens.data_ptr<int64_t>();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int64_t m = 0; m < num_context; ++m)
    for (int64_t b = 0; b < batch; ++b) {
      auto n = static_cast<int64_t>(draws[b].ctx[m].size());
      lp[m * batch + b] = n;
      lo = std::min(lo, n);
      hi = std::max(hi, n);
    }
  if (batch == 0) lo = hi = 0;
  const int64_t width = reference ? lo : hi;
  auto context = torch::zeros({num_context, batch, width}, opts);
  auto* cp = context.data_ptr<int64_t>();
  for (int64_t m = 0; m < num_context; ++m)
    for (int64_t b = 0; b < batch; ++b) {
      const auto& kept = draws[b].ctx[m];
      const int64_t n = std::min<int64_t>(width, static_cast<int64_t>(kept.size()));
      std::copy(kept.begin(), kept.begin() + n, cp + (m * batch + b) * width);
    }
  auto dims = torch::tensor({t.h, t.w, cb.h, cb.w}, opts);
  return {context, lens, targets, dims};
}

// The same draws, contexts packed: (indices [T], int32 cu_seqlens [M * B + 1], targets, sizes).
std::vector<torch::Tensor> sample_packed(int64_t seed, int64_t step, int64_t rank, int64_t world, int64_t batch,
                                         int64_t gh, int64_t gw, bool reference, int64_t num_targets,
                                         std::vector<double> target_scale, std::vector<double> target_aspect,
                                         int64_t num_context, std::vector<double> context_scale, int64_t min_keep,
                                         bool allow_overlap) {
  auto out = sample(seed, step, rank, world, batch, gh, gw, reference, num_targets, target_scale, target_aspect,
                    num_context, context_scale, min_keep, allow_overlap);
  auto& context = out[0];
  auto lens = reference ? torch::full_like(out[1], context.size(2)) : out[1];
  auto flat_lens = lens.reshape({-1});
  auto cu = torch::zeros({flat_lens.numel() + 1}, torch::TensorOptions().dtype(torch::kInt32));
  cu.slice(0, 1).copy_(torch::cumsum(flat_lens, 0));
  const int64_t width = context.size(2);
  auto keep = torch::arange(width, torch::TensorOptions().dtype(torch::kInt64)).unsqueeze(0) < flat_lens.unsqueeze(1);
  auto idx = context.reshape({-1, width}).masked_select(keep);
  return {idx, cu, out[2], out[3]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ijepa-fast compiled extension: the multi-block mask sampler";
  m.def("sample", &sample, "Multi-block masks of one step (padded or truncated contexts)");
  m.def("sample_packed", &sample_packed, "Multi-block masks of one step (packed contexts)");
}
