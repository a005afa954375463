// fedfinn stand-in for Vitis HLS' <hls_stream.h> (C simulation model of hls::stream).
//
// Why: FINN's cppsim (finn-plus 1.6.1, HLSBackend.compile_singlenode_code) compiles
// each HLS layer against $XILINX_HLS/include; without a Vitis HLS install this header
// takes the place of Vitis' own. In C simulation an hls::stream is an unbounded FIFO;
// DEPTH (Vitis 2020.1+) only matters for synthesis and is accepted and ignored.
//
// Stricter than Vitis on purpose: reading an empty stream (Vitis: a warning and a
// default value) ends the program with status 2, and a stream destroyed while it
// still holds values (Vitis: "contains leftover data") ends it with status 3. FINN
// raises on a non-zero exit, so a layer that consumes more or less than it was given
// fails the run instead of producing a plausible-looking tensor.
#ifndef FEDFINN_HLS_STREAM_H
#define FEDFINN_HLS_STREAM_H

#include <cstddef>
#include <cstdlib>
#include <deque>
#include <exception>
#include <iostream>
#include <string>

namespace hls {

template <typename T, int DEPTH = 0>
class stream {
public:
  stream() : name_("hls::stream") {}
  explicit stream(char const *name) : name_(name ? name : "hls::stream") {}
  explicit stream(std::string const &name) : name_(name) {}
  stream(stream const &) = delete;             // streams are channels, not values
  stream &operator=(stream const &) = delete;
  ~stream() {
    if (!fifo_.empty() && std::uncaught_exceptions() == 0) {  // (unwinding: let the exception report)
      std::cerr << "ERROR [fedfinn hls_stream.h]: hls::stream '" << name_ << "' destroyed holding "
                << fifo_.size() << " unread value(s)" << std::endl;
      std::_Exit(3);
    }
  }

  // blocking read / write (C simulation: never blocks; empty read is an error)
  T read() {
    if (fifo_.empty()) {
      std::cerr << "ERROR [fedfinn hls_stream.h]: hls::stream '" << name_ << "' read while empty"
                << std::endl;
      std::_Exit(2);
    }
    T v = fifo_.front();
    fifo_.pop_front();
    return v;
  }
  void read(T &v) { v = read(); }
  void write(T const &v) { fifo_.push_back(v); }
  stream &operator>>(T &v) { read(v); return *this; }
  stream &operator<<(T const &v) { write(v); return *this; }

  // non-blocking variants
  bool read_nb(T &v) {
    if (fifo_.empty()) return false;
    v = fifo_.front();
    fifo_.pop_front();
    return true;
  }
  bool write_nb(T const &v) { write(v); return true; }

  // status
  bool empty() const { return fifo_.empty(); }
  bool full() const { return false; }  // unbounded in C simulation
  std::size_t size() const { return fifo_.size(); }
  std::size_t capacity() const { return DEPTH > 0 ? std::size_t(DEPTH) : std::size_t(-1); }
  std::string const &name() const { return name_; }

private:
  std::string name_;
  std::deque<T> fifo_;
};

}  // namespace hls

#endif  // FEDFINN_HLS_STREAM_H
