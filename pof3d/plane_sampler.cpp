// Bilinear tri-plane sampling summed over the three planes, for float32 tensors on the CPU.
//
// The same values and gradients as torch's grid_sample (bilinear, zero padding, align_corners=False)
// followed by a sum over the planes, but laid out for the tri-plane renderer: planes channels-innermost
// [B, 3, H, W, C] with any strides for B, the plane, H and W (the backbone's channels-last image read in
// place: its three planes' channels interleave per texel), the sample positions [B, P, 3, 2] (a point's
// three planes together, as the projection writes them), output and its gradient [B, P, C]. The planes'
// gradient is written with the planes' own strides. Each bilinear tap then reads (and its gradient
// writes) C consecutive floats, and every tap of a point is handled while its rows are in cache; torch's
// CPU backward walks all points once per channel, which makes its scatter into the planes' gradient the
// largest single cost of a training step at the benchmark size.
//
// Plain C++ with no torch headers, so that it compiles in about a second (pof3d/plane_kernel.py builds
// and caches it). Work is split over std::threads: the forward pass over points (each point sums its
// three planes), the backward pass over the 3B plane images (each thread owns whole planes of the
// gradient, so no two threads ever add into the same value).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

struct Tap {
  int64_t x0, y0;  // top-left texel
  float wx, wy;    // weights of the right and lower texels
};

inline Tap tap_of(const float* g, int64_t H, int64_t W) {
  // align_corners=False: -1 and 1 are the outer edges of the border texels.
  const float ix = ((g[0] + 1.0f) * W - 1.0f) * 0.5f;
  const float iy = ((g[1] + 1.0f) * H - 1.0f) * 0.5f;
  const float fx = std::floor(ix), fy = std::floor(iy);
  return {static_cast<int64_t>(fx), static_cast<int64_t>(fy), ix - fx, iy - fy};
}

// Element strides of the planes (and of their gradient) for the batch, the plane, a row and a texel;
// channels are always consecutive.
struct Strides {
  int64_t b, k, y, x;
};

inline bool inside(int64_t x, int64_t y, int64_t H, int64_t W) { return x >= 0 && x < W && y >= 0 && y < H; }

template <typename Body>
void split(int64_t n, int threads, Body body) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = std::min(n, t * chunk), end = std::min(n, (t + 1) * chunk);
    pool.emplace_back(body, begin, end);
  }
  body(0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace

// The inner loops run over C consecutive floats; compiled once per instruction set and chosen when the
// library loads (GCC's target_clones), so one cached library is both portable and vectorised widely.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

VECTOR_CLONES
static void forward_range(const float* __restrict__ planes, const float* __restrict__ grid, float* __restrict__ out,
                          int64_t P, int64_t H, int64_t W, int64_t C, Strides st, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / P, p = i % P;
    float* __restrict__ o = out + i * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
    for (int64_t k = 0; k < 3; ++k) {
      const Tap t = tap_of(grid + (i * 3 + k) * 2, H, W);
      const float* __restrict__ plane = planes + b * st.b + k * st.k;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          const int64_t x = t.x0 + dx, y = t.y0 + dy;
          if (!inside(x, y, H, W)) continue;
          const float w = (dx ? t.wx : 1.0f - t.wx) * (dy ? t.wy : 1.0f - t.wy);
          const float* __restrict__ f = plane + y * st.y + x * st.x;
          for (int64_t c = 0; c < C; ++c) o[c] += w * f[c];
        }
      }
    }
  }
}

VECTOR_CLONES
static void backward_range(const float* __restrict__ grad_out, const float* __restrict__ planes,
                           const float* __restrict__ grid, float* __restrict__ grad_planes,
                           float* __restrict__ grad_grid, int64_t P, int64_t H, int64_t W, int64_t C,
                           Strides st, int64_t begin, int64_t end) {
  for (int64_t image = begin; image < end; ++image) {
    const int64_t b = image / 3, k = image % 3;
    const float* __restrict__ plane = planes + b * st.b + k * st.k;
    float* __restrict__ gplane = grad_planes ? grad_planes + b * st.b + k * st.k : nullptr;
    for (int64_t p = 0; p < P; ++p) {
      const float* __restrict__ g = grad_out + (b * P + p) * C;
      const int64_t at = ((b * P + p) * 3 + k) * 2;
      const Tap t = tap_of(grid + at, H, W);
      float gx = 0.0f, gy = 0.0f;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          const int64_t x = t.x0 + dx, y = t.y0 + dy;
          if (!inside(x, y, H, W)) continue;  // zero padding: no value, no gradient
          const int64_t offset = y * st.y + x * st.x;
          const float wx = dx ? t.wx : 1.0f - t.wx, wy = dy ? t.wy : 1.0f - t.wy;
          if (gplane) {
            const float w = wx * wy;
            float* __restrict__ gp = gplane + offset;
            for (int64_t c = 0; c < C; ++c) gp[c] += w * g[c];
          }
          if (grad_grid) {
            const float* __restrict__ f = plane + offset;
            float dot = 0.0f;
            for (int64_t c = 0; c < C; ++c) dot += g[c] * f[c];
            gx += (dx ? wy : -wy) * dot;
            gy += (dy ? wx : -wx) * dot;
          }
        }
      }
      if (grad_grid) {
        // d ix / d x = W / 2 and d iy / d y = H / 2 (align_corners=False).
        grad_grid[at] = gx * 0.5f * W;
        grad_grid[at + 1] = gy * 0.5f * H;
      }
    }
  }
}

extern "C" {

// out[b, p, :] = sum over planes k of bilinear(planes[b, k], grid[b, p, k]).
void plane_sum_forward(const float* planes, const float* grid, float* out, int64_t B, int64_t P, int64_t H,
                       int64_t W, int64_t C, int64_t sb, int64_t sk, int64_t sy, int64_t sx, int threads) {
  const Strides st{sb, sk, sy, sx};
  split(B * P, threads,
        [=](int64_t begin, int64_t end) { forward_range(planes, grid, out, P, H, W, C, st, begin, end); });
}

// Gradients of sum(grad_out * out): into the planes (grad_planes, zero on entry) and into the grid
// coordinates (grad_grid). Either may be null when its input needs no gradient.
void plane_sum_backward(const float* grad_out, const float* planes, const float* grid, float* grad_planes,
                        float* grad_grid, int64_t B, int64_t P, int64_t H, int64_t W, int64_t C, int64_t sb,
                        int64_t sk, int64_t sy, int64_t sx, int threads) {
  const Strides st{sb, sk, sy, sx};
  split(B * 3, threads, [=](int64_t begin, int64_t end) {
    backward_range(grad_out, planes, grid, grad_planes, grad_grid, P, H, W, C, st, begin, end);
  });
}

}  // extern "C"
