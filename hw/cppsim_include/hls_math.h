// fedfinn stand-in for Vitis HLS' <hls_math.h>: the hls:: math functions.
//
// Why: finn-hlslib's normalize.hpp includes it (hls::exp, hls::isinf). fedfinn's
// models do not use that header; for float/double arguments Vitis' C simulation
// computes the same as <cmath>, which is what these names forward to. Vitis'
// overloads for ap_fixed / half arguments are not provided.
#ifndef FEDFINN_HLS_MATH_H
#define FEDFINN_HLS_MATH_H

#include <cmath>


namespace hls {
using std::abs;
using std::ceil;
using std::cos;
using std::exp;
using std::floor;
using std::isinf;
using std::isnan;
using std::log;
using std::pow;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;
}  // namespace hls

#endif  // FEDFINN_HLS_MATH_H
