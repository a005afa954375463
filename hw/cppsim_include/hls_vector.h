// fedfinn stand-in for Vitis HLS' <hls_vector.h>: hls::vector<T, N>, a fixed-size
// array of N elements with element-wise operators (Vitis HLS 2020.2+).
//
// Why: finn-plus layers with cpp_interface="hls_vector" (e.g. Pool_hls) stream
// hls::vector<ap_uint<B>, PE>, and finn-hlslib's flatten.hpp / utils.hpp overload on
// it. Only what those need plus the obvious element-wise arithmetic is provided;
// comparisons == / != compare whole vectors (true when all elements are equal).
#ifndef FEDFINN_HLS_VECTOR_H
#define FEDFINN_HLS_VECTOR_H

#include <array>
#include <cstddef>
#include <initializer_list>


namespace hls {

template <typename T, std::size_t N>
class vector {
  static_assert(N > 0, "hls::vector needs at least one element");

public:
  using value_type = T;

  vector() : data_() {}
  vector(T const &v) { data_.fill(v); }  // broadcast, as in Vitis
  vector(std::initializer_list<T> init) : data_() {
    std::size_t i = 0;
    for (T const &v : init) {
      if (i == N) break;
      data_[i++] = v;
    }
  }

  T &operator[](std::size_t i) { return data_[i]; }
  T const &operator[](std::size_t i) const { return data_[i]; }
  static constexpr std::size_t size() { return N; }
  T *begin() { return data_.data(); }
  T *end() { return data_.data() + N; }
  T const *begin() const { return data_.data(); }
  T const *end() const { return data_.data() + N; }

#define FEDFINN_HLS_VECTOR_OP(op)                                        \
  vector &operator op##=(vector const &o) {                              \
    for (std::size_t i = 0; i < N; i++) data_[i] op## = o.data_[i];      \
    return *this;                                                        \
  }                                                                      \
  friend vector operator op(vector a, vector const &b) { return a op## = b; }
  FEDFINN_HLS_VECTOR_OP(+)
  FEDFINN_HLS_VECTOR_OP(-)
  FEDFINN_HLS_VECTOR_OP(*)
  FEDFINN_HLS_VECTOR_OP(/)
  FEDFINN_HLS_VECTOR_OP(&)
  FEDFINN_HLS_VECTOR_OP(|)
  FEDFINN_HLS_VECTOR_OP(^)
#undef FEDFINN_HLS_VECTOR_OP

  vector operator-() const {
    vector r;
    for (std::size_t i = 0; i < N; i++) r.data_[i] = -data_[i];
    return r;
  }
  friend bool operator==(vector const &a, vector const &b) {
    for (std::size_t i = 0; i < N; i++)
      if (!(a.data_[i] == b.data_[i])) return false;
    return true;
  }
  friend bool operator!=(vector const &a, vector const &b) { return !(a == b); }

private:
  std::array<T, N> data_;
};

}  // namespace hls

#endif  // FEDFINN_HLS_VECTOR_H
