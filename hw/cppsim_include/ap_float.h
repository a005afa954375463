// fedfinn stand-in for Vitis HLS' <ap_float.h> (arbitrary-precision floating point,
// Vitis HLS 2024.1+).
//
// Why: finn-hlslib's flatten.hpp includes <ap_float.h> and declares a template
// overload to_bitimage(ap_float<W, E> const &). fedfinn's models never instantiate it,
// so the type is only *declared* here: any real use of ap_float fails to compile
// ("incomplete type") instead of silently computing something else.
#ifndef FEDFINN_AP_FLOAT_H
#define FEDFINN_AP_FLOAT_H

#include <ap_int.h>


template <int W, int E>
class ap_float;  // declared only (see above)

#endif  // FEDFINN_AP_FLOAT_H
