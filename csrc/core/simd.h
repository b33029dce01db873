// Portable SIMD for the vocabulary-wide loops of csrc/core (top-k confidence, argmax, sampling
// verification), torch-free and header-only.
//
// Written with the GCC / Clang vector extensions for W float lanes. Every function is templated on W
// and force-inlined, so whoever instantiates a loop decides the instruction set: csrc/cpu compiles
// each loop twice, W = 8 inside functions built for AVX2 + FMA (chosen at run time when the CPU has
// them) and W = kPortableWidth = 4 (SSE2 / NEON) otherwise; the torch-free tests use W = 4. Results
// depend on W only in the last bits: the order of additions in sums, and fused multiply-adds.
//
// Also here: float16 / bfloat16 storage read as raw bits (what c10::Half / c10::BFloat16 hold),
// converted exactly to float.
//
// GCC warns (-Wpsabi) that 32-byte vectors change the ABI in code built without AVX, where W = 8 is
// instantiated; it does not matter as nothing here is called out of line, and files instantiating
// W = 8 silence it. Vector arguments are passed by const reference, which avoids a second note.
#pragma once

#include <bit>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <limits>

#define SAGE_EXT_SIMD_INLINE [[gnu::always_inline]] inline

namespace sage_ext::core {

// IEEE binary16 and bfloat16 values as stored: 16 raw bits each.
enum class Float16Bits : uint16_t {};
enum class BFloat16Bits : uint16_t {};

namespace simd {

constexpr int kPortableWidth = 4;  // 128-bit vectors: every x86-64 (SSE2) and ARM64 (NEON) CPU

template <int W>
struct Types {
  static_assert(W == 4 || W == 8, "W float lanes: 4 (128-bit) or 8 (256-bit)");
  typedef float Floats __attribute__((vector_size(4 * W)));
  typedef int32_t Ints __attribute__((vector_size(4 * W)));     // also lane masks: -1 true, 0 false
  typedef uint16_t Bits16 __attribute__((vector_size(2 * W)));  // W half / bfloat16 values
  typedef double Doubles __attribute__((vector_size(4 * W)));   // W / 2 doubles
};
template <int W>
using Floats = typename Types<W>::Floats;
template <int W>
using Ints = typename Types<W>::Ints;
template <int W>
using Doubles = typename Types<W>::Doubles;

// ---- scalar loads ---------------------------------------------------------------------------
// Exact half -> float on the bits: normal numbers rebias the exponent, inf / NaN keep an all-ones
// exponent, zeros and subnormals are their 10-bit mantissa times 2^-24.
SAGE_EXT_SIMD_INLINE float half_bits_to_float(uint32_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t magnitude = bits & 0x7fffu;
  float value;
  if (magnitude < 0x0400u) {
    value = static_cast<float>(magnitude) * 0x1p-24f;
  } else {
    value = std::bit_cast<float>((magnitude << 13) + ((magnitude >= 0x7c00u ? 224u : 112u) << 23));
  }
  return std::bit_cast<float>(std::bit_cast<uint32_t>(value) | sign);
}

// *p as float (16-bit storage through memcpy: it may be memory of another 16-bit type).
SAGE_EXT_SIMD_INLINE float load_scalar(const float* p) { return *p; }
SAGE_EXT_SIMD_INLINE float load_scalar(const Float16Bits* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return half_bits_to_float(bits);
}
SAGE_EXT_SIMD_INLINE float load_scalar(const BFloat16Bits* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}
template <typename T>  // any other type convertible to float
SAGE_EXT_SIMD_INLINE float load_scalar(const T* p) {
  return static_cast<float>(*p);
}

// ---- vector basics --------------------------------------------------------------------------
// The same bits as the other lane type.
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> as_floats(const Ints<W>& v) {
  return __builtin_bit_cast(Floats<W>, v);
}
template <int W>
SAGE_EXT_SIMD_INLINE Ints<W> as_ints(const Floats<W>& v) {
  return __builtin_bit_cast(Ints<W>, v);
}

template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> splat(float value) {
  Floats<W> v;
  for (int i = 0; i < W; ++i) v[i] = value;
  return v;
}

template <int W>
SAGE_EXT_SIMD_INLINE Ints<W> splat_int(int32_t value) {
  Ints<W> v;
  for (int i = 0; i < W; ++i) v[i] = value;
  return v;
}

// mask ? a : b, lane by lane.
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> select(const Ints<W>& mask, const Floats<W>& a, const Floats<W>& b) {
  return as_floats<W>((as_ints<W>(a) & mask) | (as_ints<W>(b) & ~mask));
}

template <int W>
SAGE_EXT_SIMD_INLINE Ints<W> select(const Ints<W>& mask, const Ints<W>& a, const Ints<W>& b) {
  return (a & mask) | (b & ~mask);
}

// Lane-wise max of NaN-free vectors.
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> max(const Floats<W>& a, const Floats<W>& b) {
  return select<W>(a > b, a, b);
}

template <int W>
SAGE_EXT_SIMD_INLINE float reduce_max(const Floats<W>& v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

template <int W>
SAGE_EXT_SIMD_INLINE bool any(const Ints<W>& mask) {
  int32_t bits = 0;
  for (int i = 0; i < W; ++i) bits |= mask[i];
  return bits != 0;
}

// ---- vector loads and stores ----------------------------------------------------------------
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> load(const float* p) {
  Floats<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> load(const BFloat16Bits* p) {
  typename Types<W>::Bits16 bits;
  std::memcpy(&bits, p, sizeof bits);
  return as_floats<W>(__builtin_convertvector(bits, Ints<W>) << 16);
}

// The lane-wise form of half_bits_to_float.
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> load(const Float16Bits* p) {
  typename Types<W>::Bits16 raw;
  std::memcpy(&raw, p, sizeof raw);
  const Ints<W> bits = __builtin_convertvector(raw, Ints<W>);
  const Ints<W> magnitude = bits & 0x7fff;
  const Ints<W> normal =
      (magnitude << 13) + select<W>(magnitude >= 0x7c00, splat_int<W>(224 << 23), splat_int<W>(112 << 23));
  const Floats<W> tiny = __builtin_convertvector(magnitude, Floats<W>) * 0x1p-24f;
  const Floats<W> value = select<W>(magnitude < 0x0400, tiny, as_floats<W>(normal));
  return as_floats<W>(as_ints<W>(value) | ((bits & 0x8000) << 16));
}

template <int W, typename T>  // any other type convertible to float, one lane at a time
SAGE_EXT_SIMD_INLINE Floats<W> load(const T* p) {
  Floats<W> v;
  for (int i = 0; i < W; ++i) v[i] = load_scalar(p + i);
  return v;
}

// The first `count` (< W) lanes from p, the others `fill`.
template <int W, typename T>
SAGE_EXT_SIMD_INLINE Floats<W> load_partial(const T* p, int count, float fill) {
  Floats<W> v = splat<W>(fill);
  for (int i = 0; i < count; ++i) v[i] = load_scalar(p + i);
  return v;
}

template <int W>
SAGE_EXT_SIMD_INLINE void store(float* p, const Floats<W>& v) {
  std::memcpy(p, &v, sizeof v);
}

// ---- sums in double -------------------------------------------------------------------------
// low += the first W / 2 lanes of v as doubles, high += the others.
template <int W>
SAGE_EXT_SIMD_INLINE void add_as_doubles(Doubles<W>& low, Doubles<W>& high, const Floats<W>& v) {
  if constexpr (W == 8) {
    low += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), Doubles<W>);
    high += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), Doubles<W>);
  } else {
    low += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1), Doubles<W>);
    high += __builtin_convertvector(__builtin_shufflevector(v, v, 2, 3), Doubles<W>);
  }
}

template <int W>
SAGE_EXT_SIMD_INLINE double reduce_sum(const Doubles<W>& v) {
  double s = v[0];
  for (int i = 1; i < W / 2; ++i) s += v[i];
  return s;
}

template <int W>
SAGE_EXT_SIMD_INLINE double reduce_sum_as_double(const Floats<W>& v) {
  double s = v[0];
  for (int i = 1; i < W; ++i) s += v[i];
  return s;
}

// sum(p[0, n)) of the values as float, accumulated in double.
template <int W, typename T>
SAGE_EXT_SIMD_INLINE double sum(const T* p, int64_t n) {
  Doubles<W> a{}, b{}, c{}, d{};  // two independent chains per half, to hide the add latency
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    add_as_doubles<W>(a, b, load<W>(p + i));
    add_as_doubles<W>(c, d, load<W>(p + i + W));
  }
  for (; i + W <= n; i += W) add_as_doubles<W>(a, b, load<W>(p + i));
  double total = reduce_sum<W>((a + c) + (b + d));
  for (; i < n; ++i) total += load_scalar(p + i);
  return total;
}

// ---- exp ------------------------------------------------------------------------------------
// e^x for x <= 0 within 2 float ulps; x below ln(FLT_MIN), -inf included, gives FLT_MIN instead of
// a smaller number (1.2e-38: nothing next to the 1 that the max of a softmax adds to a sum).
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), a degree-7
// polynomial for e^r, and 2^n written into the exponent bits. (The compiler fuses the multiply-adds
// where the target has FMA, as in the W = 8 functions of csrc/cpu.)
template <int W>
SAGE_EXT_SIMD_INLINE Floats<W> exp_nonpositive(const Floats<W>& x_in) {
  const Floats<W> x = max<W>(x_in, splat<W>(-87.33654475f));
  // Adding 1.5 * 2^23 rounds x log2(e) to an integer, which then sits in the low mantissa bits.
  const Floats<W> shifter = splat<W>(12582912.0f);
  const Floats<W> shifted = x * 1.44269504088896341f + shifter;
  const Floats<W> n = shifted - shifter;
  const Floats<W> r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Floats<W> poly = splat<W>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const Floats<W> exp_r = poly * (r * r) + r + 1.0f;
  const Ints<W> exponent = as_ints<W>(shifted) - as_ints<W>(shifter);
  return exp_r * as_floats<W>((exponent + 127) << 23);
}

}  // namespace simd
}  // namespace sage_ext::core
