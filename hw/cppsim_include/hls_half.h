// fedfinn stand-in for Vitis HLS' <hls_half.h>: the `half` type (IEEE 754 binary16).
//
// Why: in a Vitis install ap_int.h defines `half` for C simulation; the open-source
// HLS_arbitrary_Precision_Types headers switch it off (_AP_ENABLE_HALF_ 0), but
// finn-hlslib has non-template overloads on `half` (flatten.hpp: to_bitimage(half),
// interpret.hpp: Caster<half>), and FINN's cnpy.h names it. fedfinn's ap_int.h
// wrapper includes this header, so `half` exists wherever ap_int.h was included.
//
// A trivially copyable 16-bit value (finn-hlslib puts it in unions) converting
// to/from float with round-to-nearest-even. No fedfinn model computes in half; the
// conversions exist so that an accidental use computes the right thing.
#ifndef FEDFINN_HLS_HALF_H
#define FEDFINN_HLS_HALF_H
#ifndef __HLS_HALF_H__
#define __HLS_HALF_H__

#include <cstdint>
#include <cstring>

class half {
public:
  half() = default;
  half(float f) : bits_(from_float(f)) {}
  half(double d) : bits_(from_float(float(d))) {}
  half(int i) : bits_(from_float(float(i))) {}
  operator float() const { return to_float(bits_); }

  std::uint16_t bits() const { return bits_; }
  static half from_bits(std::uint16_t b) { half h; h.bits_ = b; return h; }

private:
  std::uint16_t bits_;

  static std::uint16_t from_float(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    std::uint32_t const sign = (x >> 16) & 0x8000u;
    std::uint32_t const absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u)  // inf or nan (keep a quiet nan)
      return std::uint16_t(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    if (absx >= 0x477ff000u)  // rounds to >= 65520: overflow to inf
      return std::uint16_t(sign | 0x7c00u);
    if (absx < 0x38800000u) {  // subnormal half (or zero)
      if (absx < 0x33000000u) return std::uint16_t(sign);  // < half of the smallest subnormal
      std::uint32_t const mant = (absx & 0x7fffffu) | 0x800000u;
      int const shift = 126 - int(absx >> 23);  // 14 + (113 - exp) ... result in units of 2^-24
      std::uint32_t const q = mant >> (shift);
      std::uint32_t const rem = mant & ((1u << shift) - 1u);
      std::uint32_t const halfway = 1u << (shift - 1);
      std::uint32_t r = q;
      if (rem > halfway || (rem == halfway && (q & 1u))) r++;
      return std::uint16_t(sign | r);
    }
    // normal: rebias exponent (127 -> 15), round 23-bit mantissa to 10 bits
    std::uint32_t const m = absx + 0xc8000000u;  // subtract (127-15) << 23
    std::uint32_t const q = m >> 13;
    std::uint32_t const rem = m & 0x1fffu;
    std::uint32_t r = q;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) r++;
    return std::uint16_t(sign | r);
  }

  static float to_float(std::uint16_t h) {
    std::uint32_t const sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t const e = (h >> 10) & 0x1fu;
    std::uint32_t m = h & 0x3ffu;
    std::uint32_t x;
    if (e == 0x1fu) {
      x = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
      x = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
      x = sign;
    } else {  // subnormal: normalize
      int ee = -1;
      do { m <<= 1; ee++; } while (!(m & 0x400u));
      x = sign | (std::uint32_t(112 - ee) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
  }
};

#endif  // __HLS_HALF_H__
#endif  // FEDFINN_HLS_HALF_H
