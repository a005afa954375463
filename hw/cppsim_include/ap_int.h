// fedfinn wrapper for <ap_int.h>: the open-source ap_int.h plus the `half` type.
//
// Why: in Vitis HLS, ap_int.h also defines `half` for C simulation, and FINN's
// cnpy.h (templates/npy2stream) and finn-hlslib (flatten.hpp, interpret.hpp) use
// `half` after including only <ap_int.h>. The open-source headers
// (Xilinx/HLS_arbitrary_Precision_Types) have `half` switched off
// (_AP_ENABLE_HALF_ 0 in ap_common.h). hw/cppsim.py installs that project's
// ap_int.h, unchanged, as fedfinn_upstream/ap_int.h next to this wrapper (its other
// headers sit beside this file, unchanged and under their own names).
#ifndef FEDFINN_AP_INT_H
#define FEDFINN_AP_INT_H

#include "fedfinn_upstream/ap_int.h"
#include "hls_half.h"

#endif  // FEDFINN_AP_INT_H
