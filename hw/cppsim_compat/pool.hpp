// fedfinn compatibility header: the hls::vector pooling interface that finn-plus
// 1.6.1's Pool_hls generates code for, for a finn-hlslib that lacks it (0141fa8).
//
// Pool_hls (finn/custom_op/fpgadataflow/hls/pool_hls.py) emits
//     MaxPoolFunction<hls::vector<T, PE>> pool_fxn;
//     Pool_batch<ISIZE, K>(in0_V, out0_V, pool_fxn);
// on streams of hls::vector<T, PE>. The input is the depthwise sliding window's
// output: per output pixel and channel fold, K consecutive vectors (one per kernel
// position) of PE channels; ISIZE = pixels * folds * K vectors in all. Each group of
// K vectors is reduced element-wise to one output vector - FINN's Python execution
// (Pool.execute_node: np.max over the kernel axis) computes the same per channel.
//
// This header replaces the vendored pool.hpp for that generated code (0141fa8's
// MaxPoolFunction<T, size> has another template signature, so the two cannot both be
// declared). Only max pooling is provided: fedfinn's models use no other pool
// function, and there is no reference run for the others here.
#ifndef FEDFINN_COMPAT_POOL_HPP
#define FEDFINN_COMPAT_POOL_HPP

#include <cstddef>
#include <limits>
#include <type_traits>

#include <ap_int.h>
#include <hls_stream.h>
#include <hls_vector.h>

namespace fedfinn_pool_detail {
// Smallest value of an ap_int / ap_uint element (the max-pool's neutral element).
template <typename T> struct lowest;
template <int W> struct lowest<ap_uint<W>> { static ap_uint<W> value() { return ap_uint<W>(0); } };
template <int W> struct lowest<ap_int<W>> {
  static ap_int<W> value() {
    ap_int<W> v = 0;
    v[W - 1] = 1;  // 100...0: the most negative two's complement value
    return v;
  }
};
template <typename T> struct unsupported : std::false_type {};
}  // namespace fedfinn_pool_detail

template <typename V> class MaxPoolFunction;

// Max pool over hls::vector<T, PE>: element-wise maximum.
template <typename T, std::size_t PE>
class MaxPoolFunction<hls::vector<T, PE>> {
public:
  using vec_t = hls::vector<T, PE>;
  vec_t init() const {
#pragma HLS inline
    return vec_t(fedfinn_pool_detail::lowest<T>::value());
  }
  vec_t pool(vec_t const &input, vec_t const &accu) const {
#pragma HLS inline
    vec_t r;
    for (std::size_t i = 0; i < PE; i++) {
#pragma HLS unroll
      r[i] = input[i] > accu[i] ? input[i] : accu[i];
    }
    return r;
  }
  vec_t activate(vec_t const &accu) const {
#pragma HLS inline
    return accu;
  }
};

// Other pool functions of Pool_hls: not provided (see the header comment).
template <typename... Args> struct AccPoolFunction {
  static_assert(fedfinn_pool_detail::unsupported<AccPoolFunction>::value,
                "AccPool is not provided by fedfinn's hw/cppsim_compat/pool.hpp");
};
template <typename VO, typename VA, unsigned N> struct AvgPoolFunction {
  static_assert(fedfinn_pool_detail::unsupported<VO>::value,
                "AvgPool is not provided by fedfinn's hw/cppsim_compat/pool.hpp");
};
template <typename VO, typename VA, unsigned N> struct QuantAvgPoolFunction {
  static_assert(fedfinn_pool_detail::unsupported<VO>::value,
                "QuantAvgPool is not provided by fedfinn's hw/cppsim_compat/pool.hpp");
};

// Reduce every K consecutive input vectors to one output vector; ISIZE inputs in all.
template <unsigned ISIZE, unsigned K, typename TI, typename TO, typename F>
void Pool_batch(hls::stream<TI> &in, hls::stream<TO> &out, F const &fxn) {
  static_assert(K > 0 && ISIZE % K == 0, "Pool_batch: ISIZE must be a multiple of K");
  for (unsigned o = 0; o < ISIZE / K; o++) {
    auto accu = fxn.init();
    for (unsigned k = 0; k < K; k++) {
#pragma HLS pipeline II=1
      accu = fxn.pool(in.read(), accu);
    }
    out.write(fxn.activate(accu));
  }
}

#endif  // FEDFINN_COMPAT_POOL_HPP
