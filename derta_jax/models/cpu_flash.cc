// Fused causal self-attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// Why: XLA:CPU runs attention as separate dots over materialised [B, N, T, S] scores plus
// loop fusions for the mask, softmax and their gradients; PyTorch's CPU flash kernel keeps
// a block of scores in cache and was 2-3x faster on the training step's attention
// (BENCHMARKS.md, "Where the CPU step's time goes"). This file does the same: per
// (row, kv head) task, one block of queries at a time against only the keys the block can
// see, scores in a cache-sized buffer, register-blocked float32 matmuls, a vectorised exp.
//
// The mask rule is models/attention.py's: query i attends key j iff seg[i] == seg[j],
// j <= i and (window == 0 or i - j < window). Layouts: q [B,T,N,D], k and v [B,T,K,D],
// seg [B,T] int32, out [B,T,N,D], lse [B,N,T] (log-sum-exp of each row's scaled scores,
// kept for the backward pass, which recomputes the probabilities from it as
// FlashAttention-2 does). Query head n reads kv head n / (N / K) (GQA). All float32.
// Work is spread over XLA's intra-op thread pool; the calling thread works too, so the
// call never waits for a pool thread to start.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

constexpr int BLOCK_Q = 32;  // queries per block: 32 x T scores stay in L2 up to T = 8192

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp for x <= 0 (Cephes' single-precision polynomial, range-reduced by ln 2); exp of
// anything below -87.3 (including -inf, the masked scores) is exactly 0.
inline vf vexp(vf x) {
  const vf lowest = splat(-87.33654f);
  vi under = x < lowest;
  x = under ? lowest : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf result = p * scale;
  return under ? vf{} : result;
}

// C[MR, NV*VW] (+)= A[MR, K] B[K, NV*VW], row-major; A read transposed (A[k, m]) when AT.
template <int MR, int NV, bool AT>
inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(C + r * ldc + v * VW) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VW);
    for (int r = 0; r < MR; ++r) {
      vf a = splat(AT ? A[k * lda + r] : A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VW, acc[r][v]);
}

// C[M, N] (+)= A[M, K] B[K, N] (A transposed when AT: stored [K, M]); N a multiple of VW.
template <bool AT>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int MR = 8;
  auto a_rows = [&](int64_t m) { return AT ? A + m : A + m * lda; };
  int64_t n = 0;
  for (; n + 2 * VW <= N; n += 2 * VW) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
      micro<MR, 2, AT>(K, a_rows(m), lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
    for (; m < M; ++m)
      micro<1, 2, AT>(K, a_rows(m), lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
  }
  for (; n < N; n += VW) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
      micro<MR, 1, AT>(K, a_rows(m), lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
    for (; m < M; ++m)
      micro<1, 1, AT>(K, a_rows(m), lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
  }
}

// Runs f(0) .. f(n-1) on the calling thread and the pool's; returns when all are done.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      if (state->done.fetch_add(1) + 1 == n) {
        { std::lock_guard<std::mutex> lock(state->mu); }
        state->cv.notify_all();
      }
    }
  };
  // A helper that starts after the work is gone claims nothing and never touches f.
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    auto helper = run;
    pool.Schedule(std::move(helper));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Shape {
  int64_t B, T, N, K, D, G, Dp, Tp;
  Shape(int64_t b, int64_t t, int64_t n, int64_t k, int64_t d)
      : B(b), T(t), N(n), K(k), D(d), G(n / k), Dp(round_up(d, VW)), Tp(round_up(t, VW)) {}
};

// lo[i]: no key before it is visible to query i (the first key of i's segment, or the
// window's start); the segment ids padded to Tp.
void row_bounds(const int32_t* seg, int64_t T, int64_t Tp, int64_t window,
                std::vector<int64_t>& lo, std::vector<int32_t>& seg_padded) {
  std::unordered_map<int32_t, int64_t> first;
  lo.resize(T);
  seg_padded.assign(Tp, 0);
  for (int64_t i = 0; i < T; ++i) {
    int64_t f = first.emplace(seg[i], i).first->second;
    lo[i] = window > 0 ? std::max(f, i - window + 1) : f;
    seg_padded[i] = seg[i];
  }
}

// Scores of rows [i0, i0 + rows) over key columns [c0, c1) are in s (row stride Tp);
// masked ones become -inf. Returns nothing; c0, c1 are multiples of VW.
void apply_mask(float* s, int64_t Tp, int64_t i0, int64_t rows, int64_t c0, int64_t c1,
                const int32_t* seg, int64_t window) {
  vi iota;
  for (int l = 0; l < VW; ++l) iota[l] = l;
  const vf neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t i = static_cast<int32_t>(i0 + r);
    const vi seg_i = vi{} + seg[i];
    float* row = s + r * Tp;
    for (int64_t c = c0; c < c1; c += VW) {
      vi j = iota + static_cast<int32_t>(c);
      vi segs;
      std::memcpy(&segs, seg + c, sizeof segs);
      vi ok = (j <= i) & (segs == seg_i);
      if (window > 0) ok &= (i - j) < static_cast<int32_t>(window);
      store(row + c, ok ? load(row + c) : neg_inf);
    }
  }
}

// Keys and values of task (b, h) gathered: kt [Dp, Tp] (transposed) and rows [Tp, Dp].
void gather_transposed(const float* x, const Shape& s, int64_t b, int64_t h, float* xt) {
  std::fill(xt, xt + s.Dp * s.Tp, 0.0f);
  for (int64_t j = 0; j < s.T; ++j) {
    const float* src = x + ((b * s.T + j) * s.K + h) * s.D;
    for (int64_t d = 0; d < s.D; ++d) xt[d * s.Tp + j] = src[d];
  }
}

void gather_rows(const float* x, int64_t stride, int64_t D, int64_t rows, int64_t Dp,
                 float* out, float factor = 1.0f) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * stride;
    float* dst = out + r * Dp;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * factor;
    std::fill(dst + D, dst + Dp, 0.0f);
  }
}

struct Block {
  int64_t i0, rows, c0, c1;
};

Block block_at(const Shape& s, const std::vector<int64_t>& lo, int64_t i0) {
  int64_t rows = std::min<int64_t>(BLOCK_Q, s.T - i0);
  int64_t klo = *std::min_element(lo.begin() + i0, lo.begin() + i0 + rows);
  return {i0, rows, klo / VW * VW, round_up(i0 + rows, VW)};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t window, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[3] != kd[3] || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("cpu_flash: q [B,T,N,D], k and v [B,T,K,D], K | N");
  const Shape s(qd[0], qd[1], qd[2], kd[2], qd[3]);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* segp = segment_ids.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, s.B * s.K, [&](int64_t task) {
    const int64_t b = task / s.K, h = task % s.K;
    std::vector<int64_t> lo;
    std::vector<int32_t> seg;
    row_bounds(segp + b * s.T, s.T, s.Tp, window, lo, seg);
    std::vector<float> kt(s.Dp * s.Tp), vrows(s.Tp * s.Dp, 0.0f), qblk(BLOCK_Q * s.Dp),
        scores(BLOCK_Q * s.Tp), acc(BLOCK_Q * s.Dp);
    gather_transposed(kp, s, b, h, kt.data());
    gather_rows(vp + (b * s.T * s.K + h) * s.D, s.K * s.D, s.D, s.T, s.Dp, vrows.data());
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t n = h * s.G + g;
      for (int64_t i0 = 0; i0 < s.T; i0 += BLOCK_Q) {
        const Block blk = block_at(s, lo, i0);
        const int64_t width = blk.c1 - blk.c0;
        gather_rows(qp + ((b * s.T + i0) * s.N + n) * s.D, s.N * s.D, s.D, blk.rows, s.Dp,
                    qblk.data(), scale);
        gemm<false>(blk.rows, width, s.Dp, qblk.data(), s.Dp, kt.data() + blk.c0, s.Tp,
                    scores.data() + blk.c0, s.Tp, false);
        apply_mask(scores.data(), s.Tp, i0, blk.rows, blk.c0, blk.c1, seg.data(), window);
        float row_max[BLOCK_Q], row_sum[BLOCK_Q];
        for (int64_t r = 0; r < blk.rows; ++r) {
          float* row = scores.data() + r * s.Tp;
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t c = blk.c0; c < blk.c1; ++c) m = std::max(m, row[c]);
          vf total{};
          for (int64_t c = blk.c0; c < blk.c1; c += VW) {
            vf p = vexp(load(row + c) - m);
            store(row + c, p);
            total += p;
          }
          float sum = 0.0f;
          for (int l = 0; l < VW; ++l) sum += total[l];
          row_max[r] = m;
          row_sum[r] = sum;
        }
        gemm<false>(blk.rows, s.Dp, width, scores.data() + blk.c0, s.Tp,
                    vrows.data() + blk.c0 * s.Dp, s.Dp, acc.data(), s.Dp, false);
        for (int64_t r = 0; r < blk.rows; ++r) {
          const int64_t i = i0 + r;
          float* dst = op + ((b * s.T + i) * s.N + n) * s.D;
          const float inv = 1.0f / row_sum[r];
          for (int64_t d = 0; d < s.D; ++d) dst[d] = acc[r * s.Dp + d] * inv;
          lp[(b * s.N + n) * s.T + i] = row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t window, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[3] != kd[3] || qd[2] % kd[2] != 0)
    return ffi::Error::InvalidArgument("cpu_flash: q [B,T,N,D], k and v [B,T,K,D], K | N");
  const Shape s(qd[0], qd[1], qd[2], kd[2], qd[3]);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *op = out.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  const int32_t* segp = segment_ids.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, s.B * s.K, [&](int64_t task) {
    const int64_t b = task / s.K, h = task % s.K;
    std::vector<int64_t> lo;
    std::vector<int32_t> seg;
    row_bounds(segp + b * s.T, s.T, s.Tp, window, lo, seg);
    std::vector<float> kt(s.Dp * s.Tp), vt(s.Dp * s.Tp), krows(s.Tp * s.Dp, 0.0f),
        dk_acc(s.Tp * s.Dp, 0.0f), dv_acc(s.Tp * s.Dp, 0.0f), qblk(BLOCK_Q * s.Dp),
        doblk(BLOCK_Q * s.Dp), probs(BLOCK_Q * s.Tp), dscores(BLOCK_Q * s.Tp),
        dq_acc(BLOCK_Q * s.Dp);
    gather_transposed(kp, s, b, h, kt.data());
    gather_transposed(vp, s, b, h, vt.data());
    gather_rows(kp + (b * s.T * s.K + h) * s.D, s.K * s.D, s.D, s.T, s.Dp, krows.data());
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t n = h * s.G + g;
      for (int64_t i0 = 0; i0 < s.T; i0 += BLOCK_Q) {
        const Block blk = block_at(s, lo, i0);
        const int64_t width = blk.c1 - blk.c0;
        const int64_t row0 = (b * s.T + i0) * s.N + n;
        gather_rows(qp + row0 * s.D, s.N * s.D, s.D, blk.rows, s.Dp, qblk.data(), scale);
        gather_rows(dop + row0 * s.D, s.N * s.D, s.D, blk.rows, s.Dp, doblk.data());
        gemm<false>(blk.rows, width, s.Dp, qblk.data(), s.Dp, kt.data() + blk.c0, s.Tp,
                    probs.data() + blk.c0, s.Tp, false);
        apply_mask(probs.data(), s.Tp, i0, blk.rows, blk.c0, blk.c1, seg.data(), window);
        gemm<false>(blk.rows, width, s.Dp, doblk.data(), s.Dp, vt.data() + blk.c0, s.Tp,
                    dscores.data() + blk.c0, s.Tp, false);
        for (int64_t r = 0; r < blk.rows; ++r) {
          const int64_t i = i0 + r;
          const float* o = op + ((b * s.T + i) * s.N + n) * s.D;
          const float* dor = doblk.data() + r * s.Dp;
          float delta = 0.0f;  // rowsum(dO * O): the softmax gradient's correction
          for (int64_t d = 0; d < s.D; ++d) delta += dor[d] * o[d];
          const float row_lse = lp[(b * s.N + n) * s.T + i];
          float *prow = probs.data() + r * s.Tp, *dsrow = dscores.data() + r * s.Tp;
          for (int64_t c = blk.c0; c < blk.c1; c += VW) {
            vf p = vexp(load(prow + c) - row_lse);
            store(prow + c, p);
            store(dsrow + c, p * (load(dsrow + c) - delta));
          }
        }
        // dQ = scale dS K; dK += dS^T (scale Q); dV += P^T dO.
        gemm<false>(blk.rows, s.Dp, width, dscores.data() + blk.c0, s.Tp,
                    krows.data() + blk.c0 * s.Dp, s.Dp, dq_acc.data(), s.Dp, false);
        gemm<true>(width, s.Dp, blk.rows, dscores.data() + blk.c0, s.Tp, qblk.data(), s.Dp,
                   dk_acc.data() + blk.c0 * s.Dp, s.Dp, true);
        gemm<true>(width, s.Dp, blk.rows, probs.data() + blk.c0, s.Tp, doblk.data(), s.Dp,
                   dv_acc.data() + blk.c0 * s.Dp, s.Dp, true);
        for (int64_t r = 0; r < blk.rows; ++r) {
          float* dst = dqp + (row0 + r * s.N) * s.D;
          for (int64_t d = 0; d < s.D; ++d) dst[d] = dq_acc[r * s.Dp + d] * scale;
        }
      }
    }
    for (int64_t j = 0; j < s.T; ++j) {
      const int64_t at = ((b * s.T + j) * s.K + h) * s.D;
      std::memcpy(dkp + at, dk_acc.data() + j * s.Dp, s.D * sizeof(float));
      std::memcpy(dvp + at, dv_acc.data() + j * s.Dp, s.D * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DertaCpuFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DertaCpuFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
