// fedfinn stand-in for Vitis HLS' <ap_axi_sdata.h>: AXI4-Stream words with side channels.
//
// Why: finn-hlslib's streamtools.h includes this header (its QDMA helpers
// Qdma2Stream_Batch / Stream2Qdma_Batch use qdma_axis). No layer of fedfinn's models
// uses them; the types are here so that streamtools.h compiles, with the fields and
// accessors of Vitis' definitions (ap_axis / ap_axiu: data, keep, strb, user, last,
// id, dest; qdma_axis: data, keep, last with get_/set_ accessors).
#ifndef FEDFINN_AP_AXI_SDATA_H
#define FEDFINN_AP_AXI_SDATA_H

#include <ap_int.h>


namespace fedfinn_axi_detail {
// Vitis allows zero-width side channels; ap_uint<0> is not a type, use one bit.
template <int W> struct side { using type = ap_uint<(W > 0 ? W : 1)>; };
}  // namespace fedfinn_axi_detail

template <int D, int U, int TI, int TD>
struct ap_axis {
  ap_int<D> data;
  ap_uint<(D + 7) / 8> keep;
  ap_uint<(D + 7) / 8> strb;
  typename fedfinn_axi_detail::side<U>::type user;
  ap_uint<1> last;
  typename fedfinn_axi_detail::side<TI>::type id;
  typename fedfinn_axi_detail::side<TD>::type dest;
};

template <int D, int U, int TI, int TD>
struct ap_axiu {
  ap_uint<D> data;
  ap_uint<(D + 7) / 8> keep;
  ap_uint<(D + 7) / 8> strb;
  typename fedfinn_axi_detail::side<U>::type user;
  ap_uint<1> last;
  typename fedfinn_axi_detail::side<TI>::type id;
  typename fedfinn_axi_detail::side<TD>::type dest;
};

template <int D, int U, int TI, int TD>
struct qdma_axis {
  ap_uint<D> data;
  ap_uint<(D + 7) / 8> keep;
  ap_uint<1> last;

  ap_uint<D> get_data() const { return data; }
  ap_uint<(D + 7) / 8> get_keep() const { return keep; }
  ap_uint<1> get_last() const { return last; }
  void set_data(ap_uint<D> const &d) { data = d; }
  void set_keep(ap_uint<(D + 7) / 8> const &k) { keep = k; }
  void set_last(ap_uint<1> const &l) { last = l; }
};

#endif  // FEDFINN_AP_AXI_SDATA_H
