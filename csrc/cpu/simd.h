// One way to compile a CPU loop for each instruction set: a kernel is a struct holding its
// arguments, with `template <bool kAvx2> RELFLAT_INLINE void run() const`; run_best_isa(kernel)
// runs the AVX2+FMA instantiation where the CPU has both, else the baseline one (the idea of
// ATen's CPU_CAPABILITY builds, as one function). kAvx2 lets a body use intrinsics explicitly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__GNUC__)
#define RELFLAT_INLINE inline __attribute__((always_inline))
#else
#define RELFLAT_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RELFLAT_HAVE_AVX2_CLONE 1
#define RELFLAT_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace relflat {
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

template <typename Kernel>
RELFLAT_TARGET_AVX2 void run_avx2(const Kernel& kernel) {
  kernel.template run<true>();
}
}  // namespace relflat
#endif

namespace relflat {
template <typename Kernel>
void run_best_isa(const Kernel& kernel) {
#ifdef RELFLAT_HAVE_AVX2_CLONE
  if (cpu_has_avx2_fma()) return run_avx2(kernel);
#endif
  kernel.template run<false>();
}
}  // namespace relflat

#ifdef RELFLAT_HAVE_AVX2_CLONE
#include <immintrin.h>

namespace relflat {

// Vector exp for arguments <= 0 (softmax-style, after subtracting a running max), inlined so the
// exp-heavy loops stay in registers: Cody-Waite reduction x = n ln2 + r and Cephes' polynomial
// (float, ~1 ulp) or Pade form (double, ~1 ulp) for e^r, times 2^n built in the exponent bits.
// Arguments below the smallest normal exponent, -inf included, give 0.
RELFLAT_TARGET_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

RELFLAT_TARGET_AVX2 inline __m256d exp_nonpositive(__m256d x) {
  const __m256d underflow = _mm256_cmp_pd(x, _mm256_set1_pd(-708.3964185322641), _CMP_LT_OQ);
  x = _mm256_max_pd(x, _mm256_set1_pd(-708.3964185322641));
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634073599)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93145751953125e-1), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.42860682030941723212e-6), r);
  const __m256d rr = _mm256_mul_pd(r, r);
  __m256d p = _mm256_set1_pd(1.26177193074810590878e-4);
  p = _mm256_fmadd_pd(p, rr, _mm256_set1_pd(3.02994407707441961300e-2));
  p = _mm256_mul_pd(_mm256_fmadd_pd(p, rr, _mm256_set1_pd(9.99999999999999999910e-1)), r);
  __m256d q = _mm256_set1_pd(3.00198505138664455042e-6);
  q = _mm256_fmadd_pd(q, rr, _mm256_set1_pd(2.52448340349684104192e-3));
  q = _mm256_fmadd_pd(q, rr, _mm256_set1_pd(2.27265548208155028766e-1));
  q = _mm256_fmadd_pd(q, rr, _mm256_set1_pd(2.00000000000000000009e0));
  // e^r = 1 + 2 p / (q - p)
  const __m256d er = _mm256_fmadd_pd(_mm256_set1_pd(2.0), _mm256_div_pd(p, _mm256_sub_pd(q, p)), _mm256_set1_pd(1.0));
  const __m256i n64 = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
  const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(n64, _mm256_set1_epi64x(1023)), 52);
  return _mm256_andnot_pd(underflow, _mm256_mul_pd(er, _mm256_castsi256_pd(bits)));
}

}  // namespace relflat
#endif

namespace relflat {

// x[j] = exp(x[j] - shift) for x[j] <= shift; returns the sum of the results.
template <typename T, bool kAvx2>
struct ExpShiftedSum {
  static RELFLAT_INLINE T apply(T* x, int64_t n, T shift) {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
    return sum;
  }
};

#ifdef RELFLAT_HAVE_AVX2_CLONE
template <>
struct ExpShiftedSum<float, true> {
  static RELFLAT_TARGET_AVX2 inline float apply(float* x, int64_t n, float shift) {
    const __m256 s = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
      _mm256_storeu_ps(x + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    float sum = 0;
    for (float v : lanes) sum += v;
    for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
    return sum;
  }
};
template <>
struct ExpShiftedSum<double, true> {
  static RELFLAT_TARGET_AVX2 inline double apply(double* x, int64_t n, double shift) {
    const __m256d s = _mm256_set1_pd(shift);
    __m256d acc = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const __m256d e = exp_nonpositive(_mm256_sub_pd(_mm256_loadu_pd(x + j), s));
      _mm256_storeu_pd(x + j, e);
      acc = _mm256_add_pd(acc, e);
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, acc);
    double sum = 0;
    for (double v : lanes) sum += v;
    for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
    return sum;
  }
};
#endif

}  // namespace relflat
