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
//
// Three things keep the inner loops fast (docs/training-step.md has the timings): the common channel
// counts (16, 32, 64) are compile-time constants, so a row of channels is a few whole vectors; a sum over
// channels runs in one partial sum per vector lane, since a single running sum is a chain of dependent
// additions that the compiler may not reorder (no -ffast-math) and would run one channel at a time; and
// where a plane outgrows a core's cache, the rows of a point a few ahead are prefetched, so that their
// misses overlap the work on this one.

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

namespace {

constexpr int LANES = 16;                        // partial sums of a sum over channels
constexpr int64_t AHEAD = 4;                     // points ahead whose rows are prefetched
constexpr int64_t CACHED_PLANE = int64_t{1} << 20;  // bytes of a plane below which prefetching only costs

// The four taps of a point on one plane, (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1): their
// offsets, whether each is inside the plane, and the row each reads (a row of zeros outside: zero padding).
struct Quad {
  const float* f[4];
  int64_t offset[4];
  bool in[4];
  float wx, wy;
};

inline Quad quad_of(const float* g, const float* plane, const float* zeros, int64_t H, int64_t W, Strides st) {
  const Tap t = tap_of(g, H, W);
  Quad q;
  q.wx = t.wx;
  q.wy = t.wy;
  for (int j = 0; j < 4; ++j) {
    const int64_t x = t.x0 + (j & 1), y = t.y0 + (j >> 1);
    q.in[j] = inside(x, y, H, W);
    q.offset[j] = q.in[j] ? y * st.y + x * st.x : 0;
    q.f[j] = q.in[j] ? plane + q.offset[j] : zeros;
  }
  return q;
}

// The offset of the top-left tap of the point at g, or -1 outside the plane.
inline int64_t corner_offset(const float* g, int64_t H, int64_t W, Strides st) {
  const Tap t = tap_of(g, H, W);
  return inside(t.x0, t.y0, H, W) ? t.y0 * st.y + t.x0 * st.x : -1;
}

inline bool large(int64_t H, int64_t W, int64_t C) {
  return H * W * C * static_cast<int64_t>(sizeof(float)) > CACHED_PLANE;
}

// CC > 0: the channel count, known at compile time; CC = 0: any count, read from C at run time.
template <int CC>
VECTOR_CLONES void forward_range(const float* __restrict__ planes, const float* __restrict__ grid,
                                 float* __restrict__ out, const float* zeros, int64_t P, int64_t H, int64_t W,
                                 int64_t C_, Strides st, int64_t begin, int64_t end) {
  const int64_t C = CC > 0 ? CC : C_;
  const bool prefetch = large(H, W, C);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / P;
    if (prefetch && i + AHEAD < end && (i + AHEAD) / P == b) {
      for (int64_t k = 0; k < 3; ++k) {
        const int64_t at = corner_offset(grid + ((i + AHEAD) * 3 + k) * 2, H, W, st);
        if (at < 0) continue;
        const float* f = planes + b * st.b + k * st.k + at;
        __builtin_prefetch(f);
        __builtin_prefetch(f + st.y);
      }
    }
    float* __restrict__ o = out + i * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
    for (int64_t k = 0; k < 3; ++k) {
      const Quad q = quad_of(grid + (i * 3 + k) * 2, planes + b * st.b + k * st.k, zeros, H, W, st);
      const float w00 = (1.0f - q.wx) * (1.0f - q.wy), w10 = q.wx * (1.0f - q.wy);
      const float w01 = (1.0f - q.wx) * q.wy, w11 = q.wx * q.wy;
      const float *__restrict__ f00 = q.f[0], *__restrict__ f10 = q.f[1], *__restrict__ f01 = q.f[2],
                  *__restrict__ f11 = q.f[3];
      for (int64_t c = 0; c < C; ++c) o[c] += w00 * f00[c] + w10 * f10[c] + w01 * f01[c] + w11 * f11[c];
    }
  }
}

template <int CC>
VECTOR_CLONES void backward_range(const float* __restrict__ grad_out, const float* __restrict__ planes,
                                  const float* __restrict__ grid, float* __restrict__ grad_planes,
                                  float* __restrict__ grad_grid, const float* zeros, int64_t P, int64_t H,
                                  int64_t W, int64_t C_, Strides st, int64_t begin, int64_t end) {
  const int64_t C = CC > 0 ? CC : C_;
  const bool prefetch = large(H, W, C);
  for (int64_t image = begin; image < end; ++image) {
    const int64_t b = image / 3, k = image % 3;
    const float* __restrict__ plane = planes + b * st.b + k * st.k;
    float* __restrict__ gplane = grad_planes ? grad_planes + b * st.b + k * st.k : nullptr;
    for (int64_t p = 0; p < P; ++p) {
      const float* __restrict__ g = grad_out + (b * P + p) * C;
      const int64_t at = ((b * P + p) * 3 + k) * 2;
      if (prefetch && p + AHEAD < P) {
        const int64_t ahead = corner_offset(grid + at + AHEAD * 3 * 2, H, W, st);
        if (ahead >= 0) {
          __builtin_prefetch(plane + ahead);
          __builtin_prefetch(plane + ahead + st.y);
          if (gplane) {
            __builtin_prefetch(gplane + ahead, 1);
            __builtin_prefetch(gplane + ahead + st.y, 1);
          }
        }
      }
      const Quad q = quad_of(grid + at, plane, zeros, H, W, st);
      const float w[4] = {(1.0f - q.wx) * (1.0f - q.wy), q.wx * (1.0f - q.wy), (1.0f - q.wx) * q.wy,
                          q.wx * q.wy};
      if (gplane && q.in[0] && q.in[1] && q.in[2] && q.in[3]) {
        // Inside: the four rows of the gradient updated in one pass over the channels.
        float *__restrict__ g00 = gplane + q.offset[0], *__restrict__ g10 = gplane + q.offset[1],
                           *__restrict__ g01 = gplane + q.offset[2], *__restrict__ g11 = gplane + q.offset[3];
        for (int64_t c = 0; c < C; ++c) {
          g00[c] += w[0] * g[c];
          g10[c] += w[1] * g[c];
          g01[c] += w[2] * g[c];
          g11[c] += w[3] * g[c];
        }
      } else if (gplane) {
        for (int j = 0; j < 4; ++j) {
          if (!q.in[j]) continue;  // zero padding: no value, no gradient
          float* __restrict__ gp = gplane + q.offset[j];
          for (int64_t c = 0; c < C; ++c) gp[c] += w[j] * g[c];
        }
      }
      if (grad_grid) {
        // d out / d wx = (1 - wy)(f10 - f00) + wy (f11 - f01) and d out / d wy alike, each summed over the
        // channels against the output's gradient.
        const float *__restrict__ f00 = q.f[0], *__restrict__ f10 = q.f[1], *__restrict__ f01 = q.f[2],
                    *__restrict__ f11 = q.f[3];
        float sx[LANES] = {}, sy[LANES] = {};
        for (int64_t c0 = 0; c0 < C; c0 += LANES) {
          const int64_t n = CC > 0 && CC % LANES == 0 ? LANES : std::min<int64_t>(LANES, C - c0);
          for (int64_t l = 0; l < n; ++l) {
            const int64_t c = c0 + l;
            sx[l] += g[c] * ((1.0f - q.wy) * (f10[c] - f00[c]) + q.wy * (f11[c] - f01[c]));
            sy[l] += g[c] * ((1.0f - q.wx) * (f01[c] - f00[c]) + q.wx * (f11[c] - f10[c]));
          }
        }
        float gx = 0.0f, gy = 0.0f;
        for (int l = 0; l < LANES; ++l) {
          gx += sx[l];
          gy += sy[l];
        }
        // d ix / d x = W / 2 and d iy / d y = H / 2 (align_corners=False).
        grad_grid[at] = gx * 0.5f * W;
        grad_grid[at + 1] = gy * 0.5f * H;
      }
    }
  }
}

template <int CC>
void forward(const float* planes, const float* grid, float* out, int64_t B, int64_t P, int64_t H, int64_t W,
             int64_t C, Strides st, int threads) {
  const std::vector<float> zeros(C, 0.0f);
  const float* z = zeros.data();
  split(B * P, threads,
        [=](int64_t begin, int64_t end) { forward_range<CC>(planes, grid, out, z, P, H, W, C, st, begin, end); });
}

template <int CC>
void backward(const float* grad_out, const float* planes, const float* grid, float* grad_planes, float* grad_grid,
              int64_t B, int64_t P, int64_t H, int64_t W, int64_t C, Strides st, int threads) {
  const std::vector<float> zeros(C, 0.0f);
  const float* z = zeros.data();
  split(B * 3, threads, [=](int64_t begin, int64_t end) {
    backward_range<CC>(grad_out, planes, grid, grad_planes, grad_grid, z, P, H, W, C, st, begin, end);
  });
}

}  // namespace

extern "C" {

// out[b, p, :] = sum over planes k of bilinear(planes[b, k], grid[b, p, k]).
void plane_sum_forward(const float* planes, const float* grid, float* out, int64_t B, int64_t P, int64_t H,
                       int64_t W, int64_t C, int64_t sb, int64_t sk, int64_t sy, int64_t sx, int threads) {
  const Strides st{sb, sk, sy, sx};
  switch (C) {
    case 16: return forward<16>(planes, grid, out, B, P, H, W, C, st, threads);
    case 32: return forward<32>(planes, grid, out, B, P, H, W, C, st, threads);
    case 64: return forward<64>(planes, grid, out, B, P, H, W, C, st, threads);
    default: return forward<0>(planes, grid, out, B, P, H, W, C, st, threads);
  }
}

// Gradients of sum(grad_out * out): into the planes (grad_planes, zero on entry) and into the grid
// coordinates (grad_grid). Either may be null when its input needs no gradient.
void plane_sum_backward(const float* grad_out, const float* planes, const float* grid, float* grad_planes,
                        float* grad_grid, int64_t B, int64_t P, int64_t H, int64_t W, int64_t C, int64_t sb,
                        int64_t sk, int64_t sy, int64_t sx, int threads) {
  const Strides st{sb, sk, sy, sx};
  switch (C) {
    case 16: return backward<16>(grad_out, planes, grid, grad_planes, grad_grid, B, P, H, W, C, st, threads);
    case 32: return backward<32>(grad_out, planes, grid, grad_planes, grad_grid, B, P, H, W, C, st, threads);
    case 64: return backward<64>(grad_out, planes, grid, grad_planes, grad_grid, B, P, H, W, C, st, threads);
    default: return backward<0>(grad_out, planes, grid, grad_planes, grad_grid, B, P, H, W, C, st, threads);
  }
}

}  // extern "C"
