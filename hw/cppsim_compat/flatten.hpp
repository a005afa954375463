// fedfinn compatibility header: finn-hlslib's flatten.hpp plus unflatten().
//
// finn-plus 1.6.1's npy2apintstream.hpp (apintstream2npy) calls
// unflatten(ElemT (&buffer)[N], PackedT const &packed), which the vendored
// finn-hlslib (0141fa8) does not have. This header includes that finn-hlslib's own
// flatten.hpp, unchanged (installed beside it as fedfinn_upstream/flatten.hpp), and
// adds unflatten as the exact inverse of its flatten(T const (&)[N]):
// element j occupies bits [(j+1)*W-1 : j*W] of the packed word, W = width_v<T>.
// hw/cppsim.py uses this overlay only when a probe compile shows unflatten missing.
#ifndef FEDFINN_COMPAT_FLATTEN_HPP
#define FEDFINN_COMPAT_FLATTEN_HPP

#include "fedfinn_upstream/flatten.hpp"

#include <cstdint>
#include <cstring>

// Bit image -> value, for the element types FINN streams (inverse of to_bitimage).
template <int W>
inline void fedfinn_from_bitimage(ap_uint<W> &dst, ap_uint<W> const &bits) { dst = bits; }
template <int W>
inline void fedfinn_from_bitimage(ap_int<W> &dst, ap_uint<W> const &bits) {
  dst = ap_int<W>(bits);  // same width: the bits are reinterpreted (two's complement)
}
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
inline void fedfinn_from_bitimage(ap_fixed<W, I, Q, O, N> &dst, ap_uint<W> const &bits) {
  dst.range(W - 1, 0) = bits;
}
template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
inline void fedfinn_from_bitimage(ap_ufixed<W, I, Q, O, N> &dst, ap_uint<W> const &bits) {
  dst.range(W - 1, 0) = bits;
}
inline void fedfinn_from_bitimage(float &dst, ap_uint<32> const &bits) {
  std::uint32_t const u = std::uint32_t(bits.to_uint());
  std::memcpy(&dst, &u, 4);
}
inline void fedfinn_from_bitimage(half &dst, ap_uint<16> const &bits) {
  dst = half::from_bits(std::uint16_t(bits.to_uint()));
}

// Unpack an ap_uint<> into an array of N elements of type T.
template <typename T, std::size_t N, int PW>
void unflatten(T (&buffer)[N], ap_uint<PW> const &packed) {
#pragma HLS INLINE
  constexpr std::size_t W = width_v<T>;
  static_assert(std::size_t(PW) >= N * W, "packed word narrower than N elements");
  for (std::size_t j = 0; j < N; j++) {
#pragma HLS UNROLL
    ap_uint<W> const bits = packed((j + 1) * W - 1, j * W);
    fedfinn_from_bitimage(buffer[j], bits);
  }
}

#endif  // FEDFINN_COMPAT_FLATTEN_HPP
