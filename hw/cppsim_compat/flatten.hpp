// fedfinn compatibility header: finn-hlslib's flatten.hpp plus unflatten().
//
// finn-plus 1.6.1's npy2apintstream.hpp (apintstream2npy) calls
// unflatten(ElemT (&buffer)[N], PackedT const &packed), which the vendored
// finn-hlslib (0141fa8) does not have. This header includes that finn-hlslib's own
// flatten.hpp, unchanged (installed beside it as fedfinn_upstream/flatten.hpp), and
// adds unflatten as the exact inverse of its flatten(T const (&)[N]):
// element j occupies bits [(j+1)*W-1 : j*W] of the packed word, W = width_v<T>.
// hw/cppsim.py uses this overlay only when a probe compile shows unflatten missing.
//
// It also adds flatten() overloads for arrays of ap_int<W> / ap_uint<W>, W <= 64,
// with the same result as the upstream template (bit for bit; tests/test_cppsim.py
// checks it), for speed only: FINN's npy2apintstream rebuilds every weight word of
// an MVAU once per output pixel, and the upstream loop does one range assignment
// on the full-width word per element (quadratic in the width: 2/3 of a cnv
// layer's cppsim time went there). Here the bits are gathered in 64-bit words
// first. The HLS layers themselves (mvau.hpp, ...) are untouched.
#ifndef FEDFINN_COMPAT_FLATTEN_HPP
#define FEDFINN_COMPAT_FLATTEN_HPP

#include "fedfinn_upstream/flatten.hpp"

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Faster flatten for ap_int / ap_uint elements (more specialized than the upstream
// template, so overload resolution picks it; upstream's flatten<T, N>(...) with
// explicit template arguments still names the original).
template <int W, typename T, std::size_t N>
ap_uint<N * W> fedfinn_flatten_words(T const (&buffer)[N]) {
  static_assert(W >= 1 && W <= 64, "fedfinn_flatten_words: elements of at most 64 bits");
  constexpr std::size_t TOTAL = N * W;
  constexpr std::size_t WORDS = (TOTAL + 63) / 64;
  std::uint64_t words[WORDS] = {};
  std::uint64_t const mask = W == 64 ? ~std::uint64_t(0) : ((std::uint64_t(1) << W) - 1);
  for (std::size_t j = 0; j < N; j++) {
    std::uint64_t const v = std::uint64_t(buffer[j].to_uint64()) & mask;  // two's complement bits
    std::size_t const bit = j * W, w = bit / 64, off = bit % 64;
    words[w] |= v << off;
    if (off + W > 64) words[w + 1] |= v >> (64 - off);
  }
  ap_uint<TOTAL> flat = 0;
  for (std::size_t w = WORDS; w-- > 0;) {  // most significant word first
    std::size_t const bits = TOTAL - w * 64 < 64 ? TOTAL - w * 64 : 64;
    flat <<= int(bits);
    flat |= ap_uint<TOTAL>(ap_uint<64>(words[w]));  // bits above TOTAL are zero already
  }
  return flat;
}
template <int W, std::size_t N, typename std::enable_if<(W <= 64), int>::type = 0>
ap_uint<N * W> flatten(ap_uint<W> const (&buffer)[N]) {
  return fedfinn_flatten_words<W>(buffer);
}
template <int W, std::size_t N, typename std::enable_if<(W <= 64), int>::type = 0>
ap_uint<N * W> flatten(ap_int<W> const (&buffer)[N]) {
  return fedfinn_flatten_words<W>(buffer);
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
