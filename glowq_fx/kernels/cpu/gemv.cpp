// W4A16 decode GEMV for x86 CPUs with AVX2 (AVX-512 machines run it too): y = x deq(W)^T for a few
// rows of x, with W in 4-bit codes q, per-group scales s and zero points z, deq(W) = s (q - z).
//
// The activations are rounded to int16 with one scale per 32 columns (d_b = max|x_b| / 32767,
// relative error ~2e-5, smaller than bfloat16's), so that the inner product of a block is an
// integer one, two `madd_epi16` per 32 codes, as llama.cpp does with int8 (the int8 form is
// ~1.4x faster still but costs ~5e-3 relative error). Per output row n and group g:
//   sum_k deq(W)[n,k] x[k] = s[n,g] (sum_b d_b sum_{k in b} q[n,k] xq[k]) - s[n,g] z[n,g] X_g,
// where X_g = sum_b d_b sum_{k in b} xq[k] is the group's sum of the rounded activations.
//
// The int8 form (`w8a16_gemv`, the output head's storage) multiplies int8 codes with one scale
// per output row the same way: y[n] = s[n] sum_b d_b sum_{k in b} q[n,k] xq[k].
//
// Weight layout (made from the checkpoint's codes on the machine that runs it, `convert` in
// cpu_gemv.py): row n is K_pad / 2 bytes; each block of 32 codes is 16 bytes whose byte j holds
// q[j] in its low nibble and q[j + 16] in its high one, so one 16-byte load and two masks give the
// block's codes in order. Scales and s z are float32 (N, n_groups).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 16;

inline float horizontal_sum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

// Eight consecutive values as floats (bfloat16: its bits are a float's upper half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// sum_k a[k] b[k] over n values, a float32, b float32 or bfloat16.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), load8(b + k), acc);
  float tail = 0.f;
  for (; k < n; ++k) tail += a[k] * as_float(b[k]);
  return horizontal_sum(acc) + tail;
}

// Rows of x (M, K) -> int16 codes (M, K_pad), block scales d (M, K_pad / 32) and group sums X (M, G).
template <typename T>
void round_activations(const T* x, int64_t M, int64_t K, int64_t K_pad, int64_t group_size, int16_t* xq, float* d,
                       float* X) {
  const int64_t n_blocks = K_pad / kBlock, blocks_per_group = group_size / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      float v[kBlock], amax = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int64_t k = b * kBlock + i;
        v[i] = k < K ? as_float(x[m * K + k]) : 0.f;
        amax = std::fmax(amax, std::fabs(v[i]));
      }
      const float scale = amax / 32767.f, inverse = amax > 0.f ? 32767.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < kBlock; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(v[i] * inverse));
        xq[m * K_pad + b * kBlock + i] = static_cast<int16_t>(q);
        sum += q;
      }
      d[m * n_blocks + b] = scale;
      if (b % blocks_per_group == 0) X[m * (K_pad / group_size) + b / blocks_per_group] = 0.f;
      X[m * (K_pad / group_size) + b / blocks_per_group] += scale * static_cast<float>(sum);
    }
  }
}

// Output rows [n, n + NR) for the M rows of x (M and NR template arguments: the M x NR
// accumulators stay in registers, and NR > 1 rows at one activation row give the FMAs independent
// chains, where one row alone would wait on each FMA's latency). Blocks past the activations'
// last (`x_blocks`: zero codes against zero activations in the padded last group) are skipped.
template <int M, int NR>
inline void gemv_tile(const uint8_t* w, const float* s, const float* sz, const int16_t* xq, const float* d,
                      const float* X, float* y, int64_t N, int64_t K_pad, int64_t group_size, int64_t x_blocks,
                      int64_t n) {
  const int64_t n_blocks = K_pad / kBlock, n_groups = K_pad / group_size, blocks_per_group = group_size / kBlock;
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  __m256 acc[NR][M];
  float zero_term[NR][M];
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < M; ++m) {
      acc[r][m] = _mm256_setzero_ps();
      zero_term[r][m] = 0.f;
    }
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t b_end = std::min((g + 1) * blocks_per_group, x_blocks);
    for (int64_t b = g * blocks_per_group; b < b_end; ++b) {
      for (int r = 0; r < NR; ++r) {
        const uint8_t* w_b = w + (n + r) * (K_pad / 2) + b * (kBlock / 2);
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w_b));
        const __m256i q_low = _mm256_cvtepu8_epi16(_mm_and_si128(packed, low_nibble));
        const __m256i q_high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), low_nibble));
        const float s_rg = s[(n + r) * n_groups + g];
        for (int m = 0; m < M; ++m) {
          const int16_t* x_b = xq + m * K_pad + b * kBlock;
          const __m256i dot = _mm256_add_epi32(
              _mm256_madd_epi16(q_low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b))),
              _mm256_madd_epi16(q_high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + 16))));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s_rg * d[m * n_blocks + b]), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      for (int m = 0; m < M; ++m) zero_term[r][m] += sz[(n + r) * n_groups + g] * X[m * n_groups + g];
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < M; ++m) y[m * N + n + r] = horizontal_sum(acc[r][m]) - zero_term[r][m];
  }
}

// Output rows [n0, n1): tiles of kTile(M) rows, then one row at a time.
constexpr int kTile(int M) { return M == 1 ? 2 : 1; }

template <int M>
void gemv_rows(const uint8_t* w, const float* s, const float* sz, const int16_t* xq, const float* d, const float* X,
               float* y, int64_t N, int64_t K_pad, int64_t group_size, int64_t x_blocks, int64_t n0, int64_t n1) {
  constexpr int NR = kTile(M);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv_tile<M, NR>(w, s, sz, xq, d, X, y, N, K_pad, group_size, x_blocks, n);
  for (; n < n1; ++n) gemv_tile<M, 1>(w, s, sz, xq, d, X, y, N, K_pad, group_size, x_blocks, n);
}

// gemv_rows<M> for M = 1..kMaxRows, indexed by M - 1.
using GemvRows = void (*)(const uint8_t*, const float*, const float*, const int16_t*, const float*, const float*,
                          float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template <int... Ms>
constexpr std::array<GemvRows, sizeof...(Ms)> gemv_table(std::integer_sequence<int, Ms...>) {
  return {&gemv_rows<Ms + 1>...};
}
constexpr auto kGemvRows = gemv_table(std::make_integer_sequence<int, kMaxRows>{});

// int8 codes (N, K), one scale per row; K_pad = K rounded up to whole blocks (x's codes are zero
// past K, and the last block's weights are read only up to K).
template <int M>
void gemv8_rows(const int8_t* w, const float* s, const int16_t* xq, const float* d, float* y, int64_t N, int64_t K,
                int64_t K_pad, int64_t n0, int64_t n1) {
  const int64_t n_blocks = K_pad / kBlock, full_blocks = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w_n = w + n * K;
    __m256 acc[M];
    float tail[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      tail[m] = 0.f;
    }
    for (int64_t b = 0; b < full_blocks; ++b) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w_n + b * kBlock));
      const __m256i q_low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(codes));
      const __m256i q_high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(codes, 1));
      for (int m = 0; m < M; ++m) {
        const int16_t* x_b = xq + m * K_pad + b * kBlock;
        const __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(q_low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b))),
            _mm256_madd_epi16(q_high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_b + 16))));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[m * n_blocks + b]), acc[m]);
      }
    }
    for (int64_t k = full_blocks * kBlock; k < K; ++k) {
      for (int m = 0; m < M; ++m) {
        tail[m] += static_cast<float>(w_n[k]) * static_cast<float>(xq[m * K_pad + k]) * d[m * n_blocks + k / kBlock];
      }
    }
    for (int m = 0; m < M; ++m) y[m * N + n] = s[n] * (horizontal_sum(acc[m]) + tail[m]);
  }
}

using Gemv8Rows = void (*)(const int8_t*, const float*, const int16_t*, const float*, float*, int64_t, int64_t,
                           int64_t, int64_t, int64_t);
template <int... Ms>
constexpr std::array<Gemv8Rows, sizeof...(Ms)> gemv8_table(std::integer_sequence<int, Ms...>) {
  return {&gemv8_rows<Ms + 1>...};
}
constexpr auto kGemv8Rows = gemv8_table(std::make_integer_sequence<int, kMaxRows>{});

// y[m, n] += bias[n] + sum_r R[m, r] A[n, r] for rows [n0, n1): the low-rank correction and the bias,
// added in float32 inside the GEMV's own task (A's rows for those n are read once, while hot).
template <typename T>
void add_epilogue(float* y, const float* bias, const T* A, const float* R, int64_t M, int64_t N, int64_t rank,
                  int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float v = bias != nullptr ? bias[n] : 0.f;
      if (A != nullptr) v += dot(R + m * rank, A + n * rank, rank);
      y[m * N + n] += v;
    }
  }
}

// y (M, N) = x W^T for a dense float32 or bfloat16 W (N, K) and float32 x: the group's
// projection R = x B^T, B (rank, K), at decode rows.
template <typename T>
void dense_rows(const float* x, const T* W, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(x + m * K, W + n * K, K);
  }
}

void check_activations(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows, op, ": x must be (M, K) with M <= ", kMaxRows, " rows, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
}

// x (M, K) -> its int16 codes, block scales and group sums (groups of `group_size` columns).
struct RoundedActivations {
  std::vector<int16_t> xq;
  std::vector<float> d, X;
  RoundedActivations(const at::Tensor& x, int64_t K_pad, int64_t group_size)
      : xq(x.size(0) * K_pad), d(x.size(0) * (K_pad / kBlock)), X(x.size(0) * (K_pad / group_size)) {
    if (x.scalar_type() == at::kFloat) {
      round_activations(x.data_ptr<float>(), x.size(0), x.size(1), K_pad, group_size, xq.data(), d.data(), X.data());
    } else {
      round_activations(x.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), K_pad, group_size, xq.data(), d.data(),
                        X.data());
    }
  }
};

// Rows per parallel task: ~64 KB of weights, so that small matrices are not split finer than pays.
int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

at::Tensor in_dtype_of(const at::Tensor& y, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());  // rounded once, as PyTorch's kernels do
}

at::Tensor w8a16_gemv(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& s_in) {
  check_activations("w8a16_gemv", x_in);
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kChar && w_in.size(1) == x_in.size(1),
              "w8a16_gemv: w must be int8 (N, ", x_in.size(1), "), got ", w_in.scalar_type(), " ", w_in.sizes());
  TORCH_CHECK(s_in.dim() == 1 && s_in.size(0) == w_in.size(0) && s_in.scalar_type() == at::kFloat,
              "w8a16_gemv: scales must be float32 (", w_in.size(0), ",), got ", s_in.scalar_type(), " ", s_in.sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), s = s_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), K_pad = (K + kBlock - 1) / kBlock * kBlock;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0 || K == 0) return in_dtype_of(y.zero_(), x);
  const RoundedActivations a(x, K_pad, K_pad);
  const int8_t* w_p = w.data_ptr<int8_t>();
  const float* s_p = s.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const Gemv8Rows rows = kGemv8Rows[M - 1];
  at::parallel_for(0, N, grain_for(K), [&](int64_t n0, int64_t n1) {
    rows(w_p, s_p, a.xq.data(), a.d.data(), y_p, N, K, K_pad, n0, n1);
  });
  return in_dtype_of(y, x);
}

void check_arguments(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& sz,
                     int64_t group_size) {
  check_activations("w4a16_gemv", x);
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0, "w4a16_gemv: group_size must be a multiple of 32, got ",
              group_size);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && (2 * w.size(1)) % group_size == 0,
              "w4a16_gemv: w must be uint8 (N, K_pad / 2) with K_pad a multiple of the group size, got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(2 * w.size(1) >= x.size(1) && 2 * w.size(1) - x.size(1) < group_size,
              "w4a16_gemv: x has ", x.size(1), " columns, the weight ", 2 * w.size(1), " (padded to the group)");
  const int64_t n_groups = 2 * w.size(1) / group_size;
  for (const at::Tensor* t : {&s, &sz}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == w.size(0) && t->size(1) == n_groups &&
                    t->scalar_type() == at::kFloat,
                "w4a16_gemv: scales and scaled zeros must be float32 (", w.size(0), ", ", n_groups, "), got ",
                t->scalar_type(), " ", t->sizes());
  }
}

bool is_float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

void check_epilogue(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& R) {
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && is_float_or_bf16(*bias)),
              "w4a16_gemv: bias must be float32 or bfloat16 (", N, ",)");
  TORCH_CHECK(A.has_value() == R.has_value(), "w4a16_gemv: A and R come together (the correction R A^T)");
  if (A) {
    TORCH_CHECK(A->dim() == 2 && A->size(0) == N && is_float_or_bf16(*A),
                "w4a16_gemv: A must be float32 or bfloat16 (", N, ", rank), got ", A->scalar_type(), " ", A->sizes());
    TORCH_CHECK(R->dim() == 2 && R->size(0) == x.size(0) && R->size(1) == A->size(1) && is_float_or_bf16(*R),
                "w4a16_gemv: R must be float32 or bfloat16 (", x.size(0), ", ", A->size(1), "), got ", R->scalar_type(), " ",
                R->sizes());
  }
}

// One member: y = x deq(W)^T (+ bias + R A^T), from activations already rounded for its group size.
at::Tensor member_gemv(const at::Tensor& x, const RoundedActivations& a, const at::Tensor& w_in,
                       const at::Tensor& s_in, const at::Tensor& sz_in, int64_t group_size,
                       const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& A_in,
                       const at::Tensor& R) {
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous(), sz = sz_in.contiguous();
  // the bias (small) is read as float32; A as stored
  const at::Tensor bias = bias_in ? bias_in->to(at::kFloat).contiguous() : at::Tensor(),
                   A = A_in ? A_in->contiguous() : at::Tensor();
  const int64_t M = x.size(0), N = w.size(0), K_pad = 2 * w.size(1), rank = A.defined() ? A.size(1) : 0;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return in_dtype_of(y, x);
  const int64_t x_blocks = (x.size(1) + kBlock - 1) / kBlock;
  const uint8_t* w_p = w.data_ptr<uint8_t>();
  const float *s_p = s.data_ptr<float>(), *sz_p = sz.data_ptr<float>();
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* R_p = A.defined() ? R.data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  const GemvRows rows = kGemvRows[M - 1];
  at::parallel_for(0, N, grain_for(K_pad / 2), [&](int64_t n0, int64_t n1) {
    rows(w_p, s_p, sz_p, a.xq.data(), a.d.data(), a.X.data(), y_p, N, K_pad, group_size, x_blocks, n0, n1);
    if (!A.defined()) {
      if (bias_p != nullptr) add_epilogue<float>(y_p, bias_p, nullptr, nullptr, M, N, 0, n0, n1);
    } else if (A.scalar_type() == at::kFloat) {
      add_epilogue(y_p, bias_p, A.data_ptr<float>(), R_p, M, N, rank, n0, n1);
    } else {
      add_epilogue(y_p, bias_p, A.data_ptr<c10::BFloat16>(), R_p, M, N, rank, n0, n1);
    }
  });
  return in_dtype_of(y, x);
}

at::Tensor w4a16_gemv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s, const at::Tensor& sz,
                      int64_t group_size, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& A,
                      const std::optional<at::Tensor>& R) {
  check_arguments(x_in, w, s, sz, group_size);
  check_epilogue(x_in, w.size(0), bias, A, R);
  const at::Tensor x = x_in.contiguous();
  const RoundedActivations a(x, 2 * w.size(1), group_size);
  return member_gemv(x, a, w, s, sz, group_size, bias, A, R ? R->to(at::kFloat).contiguous() : at::Tensor());
}

at::Tensor dense_gemv(const at::Tensor& x_in, const at::Tensor& W_in);

// The members of a group reading one x, in one call: the activations rounded once (per group
// size), R = x B^T made here when B is given (rounded to x's dtype, as the projection op would
// return it), then each member with its bias and correction.
std::vector<at::Tensor> w4a16_gemv_group(const at::Tensor& x_in, at::TensorList w, at::TensorList s,
                                         at::TensorList sz, at::IntArrayRef group_sizes,
                                         const c10::List<std::optional<at::Tensor>>& biases,
                                         const c10::List<std::optional<at::Tensor>>& As,
                                         const std::optional<at::Tensor>& R_in, const std::optional<at::Tensor>& B) {
  const size_t n = w.size();
  TORCH_CHECK(n > 0 && s.size() == n && sz.size() == n && group_sizes.size() == n && biases.size() == n &&
                  As.size() == n,
              "w4a16_gemv_group: one weight, scales, scaled zeros, group size, bias and A per member");
  TORCH_CHECK(!(R_in && B), "w4a16_gemv_group: R or B (to make R from), not both");
  const at::Tensor x = x_in.contiguous();
  at::Tensor R;
  if (B) {
    R = dense_gemv(x.to(at::kFloat), *B).to(x.scalar_type()).to(at::kFloat).contiguous();
  } else if (R_in) {
    R = R_in->to(at::kFloat).contiguous();
  }
  std::vector<std::pair<int64_t, std::unique_ptr<RoundedActivations>>> rounded;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    const std::optional<at::Tensor> bias = biases.get(i), A = As.get(i);
    check_arguments(x, w[i], s[i], sz[i], group_sizes[i]);
    check_epilogue(x, w[i].size(0), bias, A, A ? std::optional<at::Tensor>(R) : std::nullopt);
    const int64_t key = group_sizes[i] * (1 << 20) + 2 * w[i].size(1);
    auto found = std::find_if(rounded.begin(), rounded.end(), [&](const auto& e) { return e.first == key; });
    if (found == rounded.end()) {
      rounded.emplace_back(key, std::make_unique<RoundedActivations>(x, 2 * w[i].size(1), group_sizes[i]));
      found = rounded.end() - 1;
    }
    out.push_back(member_gemv(x, *found->second, w[i], s[i], sz[i], group_sizes[i], bias, A, R));
  }
  return out;
}

at::Tensor dense_gemv(const at::Tensor& x_in, const at::Tensor& W_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= kMaxRows && x_in.scalar_type() == at::kFloat,
              "dense_gemv: x must be float32 (M, K) with M <= ", kMaxRows, " rows, got ", x_in.scalar_type(), " ",
              x_in.sizes());
  TORCH_CHECK(W_in.dim() == 2 && W_in.size(1) == x_in.size(1) &&
                  (W_in.scalar_type() == at::kFloat || W_in.scalar_type() == at::kBFloat16),
              "dense_gemv: W must be float32 or bfloat16 (N, ", x_in.size(1), "), got ", W_in.scalar_type(), " ",
              W_in.sizes());
  const at::Tensor x = x_in.contiguous(), W = W_in.contiguous();
  const int64_t M = x.size(0), N = W.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* x_p = x.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const int64_t row_bytes = K * static_cast<int64_t>(W.element_size());
  at::parallel_for(0, N, grain_for(row_bytes), [&](int64_t n0, int64_t n1) {
    if (W.scalar_type() == at::kFloat) {
      dense_rows(x_p, W.data_ptr<float>(), y_p, M, N, K, n0, n1);
    } else {
      dense_rows(x_p, W.data_ptr<c10::BFloat16>(), y_p, M, N, K, n0, n1);
    }
  });
  return y;
}

at::Tensor w8a16_gemv_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

std::vector<at::Tensor> w4a16_gemv_group_meta(const at::Tensor& x, at::TensorList w, at::TensorList s,
                                              at::TensorList sz, at::IntArrayRef group_sizes,
                                              const c10::List<std::optional<at::Tensor>>& biases,
                                              const c10::List<std::optional<at::Tensor>>& As,
                                              const std::optional<at::Tensor>& R, const std::optional<at::Tensor>& B) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& wi : w) out.push_back(at::empty({x.size(0), wi.size(0)}, x.options()));
  return out;
}

at::Tensor dense_gemv_meta(const at::Tensor& x, const at::Tensor& W) { return at::empty({x.size(0), W.size(0)}, x.options()); }

at::Tensor w4a16_gemv_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& sz,
                           int64_t group_size, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& A,
                           const std::optional<at::Tensor>& R) {
  return at::empty({x.size(0), w.size(0)}, x.options());
}

}  // namespace

TORCH_LIBRARY(glowq_cpu, m) {
  m.def(
      "w4a16_gemv(Tensor x, Tensor w, Tensor scales, Tensor scaled_zeros, int group_size, Tensor? bias=None, "
      "Tensor? A=None, Tensor? R=None) -> Tensor");
  m.def(
      "w4a16_gemv_group(Tensor x, Tensor[] w, Tensor[] scales, Tensor[] scaled_zeros, int[] group_sizes, "
      "Tensor?[] biases, Tensor?[] A, Tensor? R=None, Tensor? B=None) -> Tensor[]");
  m.def("w8a16_gemv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("dense_gemv(Tensor x, Tensor W) -> Tensor");
}

TORCH_LIBRARY_IMPL(glowq_cpu, CPU, m) {
  m.impl("w4a16_gemv", &w4a16_gemv);
  m.impl("w4a16_gemv_group", &w4a16_gemv_group);
  m.impl("w8a16_gemv", &w8a16_gemv);
  m.impl("dense_gemv", &dense_gemv);
}

TORCH_LIBRARY_IMPL(glowq_cpu, Meta, m) {
  m.impl("w4a16_gemv", &w4a16_gemv_meta);
  m.impl("w4a16_gemv_group", &w4a16_gemv_group_meta);
  m.impl("w8a16_gemv", &w8a16_gemv_meta);
  m.impl("dense_gemv", &dense_gemv_meta);
}
