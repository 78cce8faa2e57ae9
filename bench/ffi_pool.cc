// The T, H and W pools of a gated map in one read, for bench/ffi_pool.py.
//
// x is [b, t, h, w, c] (float32, row-major), g is [b, t, h, w] (a C gate's value per position).
// Each kernel reads every element of x once and keeps max and sum (and, for the training
// variant, how many elements equal the max, and y = x * g written out) over each of the t, h
// and w axes. The t accumulators of one (h, w) stay in cache while t runs; the h accumulators
// ([b, t, w, c]) are updated as h advances, the w ones ([b, t, h, c]) as w does. The channel
// axis, contiguous, is processed 16 lanes at a time (GCC vector extensions, lowered to what
// -march allows), its remainder one lane at a time by the same template.
//
// The third kernel is the gating product's gradient for the T, H and W gates (see below).
// Each runs on the calling thread, or with the attribute split=true in two halves of the
// (b, h) rows, the second on a task of XLA's intra-op thread pool (`ffi::ThreadPool`), each half
// with its own h accumulators, merged at the end.
//
// A benchmark's kernel, not the library's: a max ignores NaN (`a > b ? a : b`), where jnp.max
// propagates it.

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);

template <class V>
V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
void Store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// One element (or vector of lanes) v into one axis's accumulators at offset i.
template <class V, bool kTies>
inline void Accumulate(V v, float* m, float* s, float* n, int64_t i) {
  const V old = Load<V>(m + i);
  if constexpr (kTies) {
    const V one = V{} + 1.0f;
    const V count = Load<V>(n + i);
    Store(n + i, v > old ? one : (v == old ? count + one : count));
  }
  Store(m + i, v > old ? v : old);
  Store(s + i, Load<V>(s + i) + v);
}

void Fill(float* p, int64_t size, float value) {
  for (int64_t i = 0; i < size; ++i) p[i] = value;
}

struct Axis {
  float* max;
  float* sum;
  float* count;  // null without ties
};

// Accumulators [offset, offset + size) of `a` back to their start: max -inf, sum and count 0.
template <bool kTies>
void Reset(Axis a, int64_t offset, int64_t size) {
  Fill(a.max + offset, size, -std::numeric_limits<float>::infinity());
  Fill(a.sum + offset, size, 0.0f);
  if (kTies) Fill(a.count + offset, size, 0.0f);
}

// Runs body(first_row, last_row, part) on rows [0, rows) in two halves: the first on the calling
// thread (part 0), the second (part 1) on a task of XLA's intra-op thread pool, or on the
// calling thread too if that task has not started by the time the first half is done (so a busy
// pool costs no waiting). Returns once both halves are done.
template <class Body>
void TwoHalves(ffi::ThreadPool& pool, int64_t rows, const Body& body) {
  const int64_t half = rows / 2;
  // 0: second half unclaimed, 1: the task runs it, 2: the caller took it, 3: the task is done.
  auto state = std::make_shared<std::atomic<int>>(0);
  pool.Schedule([state, &body, half, rows] {
    int unclaimed = 0;
    if (!state->compare_exchange_strong(unclaimed, 1)) return;
    body(half, rows, 1);
    state->store(3, std::memory_order_release);
  });
  body(0, half, 0);
  int unclaimed = 0;
  if (state->compare_exchange_strong(unclaimed, 2)) {
    body(half, rows, 1);
    return;
  }
  while (state->load(std::memory_order_acquire) != 3) std::this_thread::yield();
}

struct Shape {
  int64_t B, T, H, W, C;
};

// Rows [r0, r1) of (b, h) pairs: every axis's accumulators, the h axis's into `ah` (one copy per
// half, merged afterwards).
template <bool kTies>
void PoolRows(const float* x, const float* g, float* y, Shape d, int64_t r0, int64_t r1, Axis at,
              Axis ah, Axis aw) {
  const auto [B, T, H, W, C] = d;
  (void)B;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, h = r % H;
    for (int64_t t = 0; t < T; ++t) Reset<kTies>(aw, ((b * T + t) * H + h) * C, C);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t ti = ((b * H + h) * W + w) * C;
      Reset<kTies>(at, ti, C);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t pos = ((b * T + t) * H + h) * W + w;
        const int64_t hi = ((b * T + t) * W + w) * C;
        const int64_t wi = ((b * T + t) * H + h) * C;
        const float* xp = x + pos * C;
        const float gate = g[pos];
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          const Vec v = Load<Vec>(xp + c) * gate;
          if (kTies) Store(y + pos * C + c, v);
          Accumulate<Vec, kTies>(v, at.max, at.sum, at.count, ti + c);
          Accumulate<Vec, kTies>(v, ah.max, ah.sum, ah.count, hi + c);
          Accumulate<Vec, kTies>(v, aw.max, aw.sum, aw.count, wi + c);
        }
        for (; c < C; ++c) {
          const float v = xp[c] * gate;
          if (kTies) y[pos * C + c] = v;
          Accumulate<float, kTies>(v, at.max, at.sum, at.count, ti + c);
          Accumulate<float, kTies>(v, ah.max, ah.sum, ah.count, hi + c);
          Accumulate<float, kTies>(v, aw.max, aw.sum, aw.count, wi + c);
        }
      }
    }
  }
}

template <bool kTies>
void PoolTHW(ffi::ThreadPool& pool, bool split, const float* x, const float* g, float* y, Shape d,
             Axis at, Axis ah, Axis aw) {
  const int64_t size = d.B * d.T * d.W * d.C;
  Reset<kTies>(ah, 0, size);
  if (!split) {
    PoolRows<kTies>(x, g, y, d, 0, d.B * d.H, at, ah, aw);
    return;
  }
  std::vector<float> spare((kTies ? 3 : 2) * size);
  Axis ah1{spare.data(), spare.data() + size, kTies ? spare.data() + 2 * size : nullptr};
  Reset<kTies>(ah1, 0, size);
  TwoHalves(pool, d.B * d.H, [&](int64_t r0, int64_t r1, int part) {
    PoolRows<kTies>(x, g, y, d, r0, r1, at, part ? ah1 : ah, aw);
  });
  for (int64_t i = 0; i < size; ++i) {
    const float m = ah.max[i] > ah1.max[i] ? ah.max[i] : ah1.max[i];
    if (kTies) {
      ah.count[i] = (ah.max[i] == m ? ah.count[i] : 0.0f) + (ah1.max[i] == m ? ah1.count[i] : 0.0f);
    }
    ah.max[i] = m;
    ah.sum[i] += ah1.sum[i];
  }
}

// The gradient of `x · w·(gT + gH + gW)` (each gate broadcast along the axis it pooled) in one
// read of x and dout: dx, and per gate w·Σ_axis dout·x. Rows as in PoolRows; dh per half.
void ProductGradRows(const float* x, const float* dout, const float* gt, const float* gh,
                     const float* gw, float weight, float* dx, float* dt, float* dh, float* dw,
                     Shape d, int64_t r0, int64_t r1) {
  const auto [B, T, H, W, C] = d;
  (void)B;
  const Vec wv = Vec{} + weight;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / H, h = r % H;
    for (int64_t t = 0; t < T; ++t) Fill(dw + ((b * T + t) * H + h) * C, C, 0.0f);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t ti = ((b * H + h) * W + w) * C;
      Fill(dt + ti, C, 0.0f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t at = (((b * T + t) * H + h) * W + w) * C;
        const int64_t hi = ((b * T + t) * W + w) * C;
        const int64_t wi = ((b * T + t) * H + h) * C;
        int64_t c = 0;
        for (; c + kLanes <= C; c += kLanes) {
          const Vec dv = Load<Vec>(dout + at + c);
          const Vec gate =
              wv * (Load<Vec>(gt + ti + c) + Load<Vec>(gh + hi + c) + Load<Vec>(gw + wi + c));
          Store(dx + at + c, dv * gate);
          const Vec p = dv * Load<Vec>(x + at + c);
          Store(dt + ti + c, Load<Vec>(dt + ti + c) + p);
          Store(dh + hi + c, Load<Vec>(dh + hi + c) + p);
          Store(dw + wi + c, Load<Vec>(dw + wi + c) + p);
        }
        for (; c < C; ++c) {
          const float dv = dout[at + c];
          dx[at + c] = dv * (weight * (gt[ti + c] + gh[hi + c] + gw[wi + c]));
          const float p = dv * x[at + c];
          dt[ti + c] += p;
          dh[hi + c] += p;
          dw[wi + c] += p;
        }
      }
    }
  }
}

void ProductGradTHW(ffi::ThreadPool& pool, bool split, const float* x, const float* dout,
                    const float* gt, const float* gh, const float* gw, float weight, float* dx,
                    float* dt, float* dh, float* dw, Shape d) {
  const int64_t size = d.B * d.T * d.W * d.C;
  std::vector<float> dh1(split ? size : 0, 0.0f);
  Fill(dh, size, 0.0f);
  if (split) {
    TwoHalves(pool, d.B * d.H, [&](int64_t r0, int64_t r1, int part) {
      ProductGradRows(x, dout, gt, gh, gw, weight, dx, dt, part ? dh1.data() : dh, dw, d, r0, r1);
    });
    for (int64_t i = 0; i < size; ++i) dh[i] += dh1[i];
  } else {
    ProductGradRows(x, dout, gt, gh, gw, weight, dx, dt, dh, dw, d, 0, d.B * d.H);
  }
  // Scaled after summing, as fused's gradient does.
  for (int64_t i = 0; i < size; ++i) dh[i] *= weight;
  for (int64_t i = 0; i < d.B * d.H * d.W * d.C; ++i) dt[i] *= weight;
  for (int64_t i = 0; i < d.B * d.T * d.H * d.C; ++i) dw[i] *= weight;
}

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

std::optional<Shape> MapShape(const F32& x) {
  auto d = x.dimensions();
  if (d.size() != 5) return std::nullopt;
  return Shape{d[0], d[1], d[2], d[3], d[4]};
}

ffi::Error PoolImpl(ffi::ThreadPool pool, F32 x, F32 g, bool split, Out mt, Out st, Out mh,
                    Out sh, Out mw, Out sw) {
  auto d = MapShape(x);
  if (!d) return ffi::Error::InvalidArgument("x must be [b, t, h, w, c]");
  PoolTHW<false>(pool, split, x.typed_data(), g.typed_data(), nullptr, *d,
                 {mt->typed_data(), st->typed_data(), nullptr},
                 {mh->typed_data(), sh->typed_data(), nullptr},
                 {mw->typed_data(), sw->typed_data(), nullptr});
  return ffi::Error::Success();
}

ffi::Error PoolTiesImpl(ffi::ThreadPool pool, F32 x, F32 g, bool split, Out y, Out mt, Out nt,
                        Out st, Out mh, Out nh, Out sh, Out mw, Out nw, Out sw) {
  auto d = MapShape(x);
  if (!d) return ffi::Error::InvalidArgument("x must be [b, t, h, w, c]");
  PoolTHW<true>(pool, split, x.typed_data(), g.typed_data(), y->typed_data(), *d,
                {mt->typed_data(), st->typed_data(), nt->typed_data()},
                {mh->typed_data(), sh->typed_data(), nh->typed_data()},
                {mw->typed_data(), sw->typed_data(), nw->typed_data()});
  return ffi::Error::Success();
}

ffi::Error ProductGradImpl(ffi::ThreadPool pool, F32 x, F32 dout, F32 gt, F32 gh, F32 gw,
                           float weight, bool split, Out dx, Out dt, Out dh, Out dw) {
  auto d = MapShape(x);
  if (!d) return ffi::Error::InvalidArgument("x must be [b, t, h, w, c]");
  ProductGradTHW(pool, split, x.typed_data(), dout.typed_data(), gt.typed_data(), gh.typed_data(),
                 gw.typed_data(), weight, dx->typed_data(), dt->typed_data(), dh->typed_data(),
                 dw->typed_data(), *d);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AiaPoolThw, PoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<bool>("split")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AiaPoolThwTies, PoolTiesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<bool>("split")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AiaProductThwGrad, ProductGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Attr<float>("weight")
                                  .Attr<bool>("split")
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
