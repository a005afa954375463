// A generic Verilator testbench for one FINN layer top with an AXI-lite slave
// (s_axilite_*), one AXI-stream input (in0_V_*) and one AXI-stream output
// (out0_V_*), e.g. a filled Thresholding_rtl wrapper. Driven by hw/rtl_sim.py.
// Built with -DTB_MEMSTREAM it drives a memstream wrapper instead (a weight
// memory: AXI-lite + the output stream m_axis_0_*, no input stream).
//
// Commands on stdin, one per line; replies on stdout:
//   seed S            seed of the handshake randomization
//   valid P / ready P  percent of cycles in0_V_TVALID may rise / out0_V_TREADY is high
//   reset N           ap_rst_n low for N cycles              -> "ok reset"
//   idle N            N clock cycles                          -> "ok idle"
//   write A D         one AXI-lite write (byte address A, word D, hex) -> "B <bresp>"
//   read A            one AXI-lite read                       -> "R <rdata hex> <rresp>"
//   stream N          then N lines of hex input words; runs until N output words
//                     came out                                -> N lines "O <hex>", then "ok stream <cycles>"
//   collect N         (no input stream) N output words        -> N lines "O <hex>", then "ok stream <cycles>"
// Any handshake that does not complete within the time-out prints "timeout ..." and exits 2.
// The verilated model is always class Vdut (verilator --prefix Vdut).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "Vdut.h"
#include "verilated.h"

#ifdef TB_MEMSTREAM
#define OUT_VALID m_axis_0_tvalid
#define OUT_READY m_axis_0_tready
#define OUT_DATA m_axis_0_tdata
#else
#define OUT_VALID out0_V_TVALID
#define OUT_READY out0_V_TREADY
#define OUT_DATA out0_V_TDATA
#endif

typedef std::vector<uint32_t> words_t;

static words_t parse_hex(const std::string& s) {  // little-endian 32-bit words
  words_t w;
  size_t end = s.size();
  while (end > 0) {
    size_t beg = end >= 8 ? end - 8 : 0;
    w.push_back(static_cast<uint32_t>(std::stoul(s.substr(beg, end - beg), nullptr, 16)));
    end = beg;
  }
  if (w.empty()) w.push_back(0);
  return w;
}

template <std::size_t N>
static void set_sig(VlWide<N>& sig, const words_t& w) {
  for (std::size_t i = 0; i < N; i++) sig[i] = i < w.size() ? w[i] : 0;
}
template <typename T>
static void set_sig(T& sig, const words_t& w) {
  uint64_t v = w[0];
  if (w.size() > 1) v |= static_cast<uint64_t>(w[1]) << 32;
  sig = static_cast<T>(v);
}
template <std::size_t N>
static std::string hex_of(const VlWide<N>& sig) {
  std::string s;
  char buf[9];
  for (std::size_t i = N; i-- > 0;) {
    std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(sig[i]));
    s += buf;
  }
  return s;
}
template <typename T>
static std::string hex_of(const T& sig) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(sig));
  return buf;
}

struct Bench {
  std::unique_ptr<VerilatedContext> ctx;
  std::unique_ptr<Vdut> top;
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  unsigned p_valid = 100, p_ready = 100;
  uint64_t cycles = 0;
  static constexpr uint64_t TIMEOUT = 2000000;

  unsigned roll() {  // xorshift64*, 0..99
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return static_cast<unsigned>((rng * 2685821657736338717ull) >> 33) % 100;
  }
  void settle() { top->ap_clk = 0; top->eval(); }
  void rise() { top->ap_clk = 1; top->eval(); cycles++; ctx->timeInc(1); }
  void quiet() {
    top->s_axilite_AWVALID = 0; top->s_axilite_WVALID = 0; top->s_axilite_BREADY = 0;
    top->s_axilite_ARVALID = 0; top->s_axilite_RREADY = 0;
    top->OUT_READY = 0;
#ifdef TB_MEMSTREAM
    top->s_axilite_AWPROT = 0; top->s_axilite_ARPROT = 0;
    top->s_axis_0_tvalid = 0; top->s_axis_0_tdata = 0; top->ap_clk2x = 0;
#else
    top->in0_V_TVALID = 0; top->in1_V_TVALID = 0;
#endif
  }
  [[noreturn]] void timeout(const char* what) {
    std::printf("timeout %s after %llu cycles\n", what, static_cast<unsigned long long>(cycles));
    std::fflush(stdout);
    std::exit(2);
  }
  void reset(unsigned n) {
    quiet();
    top->ap_rst_n = 0;
    for (unsigned i = 0; i < n; i++) { settle(); rise(); }
    top->ap_rst_n = 1;
    settle();
  }
  unsigned write(const words_t& addr, const words_t& data) {
    quiet();
    set_sig(top->s_axilite_AWADDR, addr);
    set_sig(top->s_axilite_WDATA, data);
    top->s_axilite_WSTRB = 0xf;
    bool aw = false, w = false;
    for (uint64_t t = 0;; t++) {
      if (t > TIMEOUT) timeout("axilite write");
      top->s_axilite_AWVALID = !aw; top->s_axilite_WVALID = !w; top->s_axilite_BREADY = aw && w;
      settle();
      bool aw_fire = !aw && top->s_axilite_AWREADY, w_fire = !w && top->s_axilite_WREADY;
      bool b_fire = aw && w && top->s_axilite_BVALID;
      unsigned resp = top->s_axilite_BRESP;
      rise();
      aw |= aw_fire; w |= w_fire;
      if (b_fire) { quiet(); settle(); return resp; }
    }
  }
  std::string read(const words_t& addr, unsigned& resp) {
    quiet();
    set_sig(top->s_axilite_ARADDR, addr);
    bool ar = false;
    for (uint64_t t = 0;; t++) {
      if (t > TIMEOUT) timeout("axilite read");
      top->s_axilite_ARVALID = !ar; top->s_axilite_RREADY = ar;
      settle();
      bool ar_fire = !ar && top->s_axilite_ARREADY;
      bool r_fire = ar && top->s_axilite_RVALID;
      std::string data = hex_of(top->s_axilite_RDATA);
      resp = top->s_axilite_RRESP;
      rise();
      ar |= ar_fire;
      if (r_fire) { quiet(); settle(); return data; }
    }
  }
  // Feed `in` (none for a memstream) and collect `n_out` output words.
  void stream(const std::vector<words_t>& in, std::size_t n_out) {
    quiet();
    std::size_t sent = 0, got = 0;
    bool vld = false;
    uint64_t start = cycles, idle = 0;
    while (got < n_out) {
      if (idle > TIMEOUT) timeout("stream");
#ifndef TB_MEMSTREAM
      if (!vld && sent < in.size() && roll() < p_valid) {
        vld = true;
        set_sig(top->in0_V_TDATA, in[sent]);
      }
      top->in0_V_TVALID = vld;
#endif
      top->OUT_READY = roll() < p_ready;
      settle();
#ifndef TB_MEMSTREAM
      bool in_fire = vld && top->in0_V_TREADY;
#else
      bool in_fire = false;
#endif
      bool out_fire = top->OUT_VALID && top->OUT_READY;
      if (out_fire) std::printf("O %s\n", hex_of(top->OUT_DATA).c_str());
      rise();
      if (in_fire) { vld = false; sent++; }
      if (out_fire) got++;
      idle = (in_fire || out_fire) ? 0 : idle + 1;
    }
    quiet();
    settle();
    std::printf("ok stream %llu\n", static_cast<unsigned long long>(cycles - start));
  }
};

int main(int argc, char** argv) {
  Bench b;
  b.ctx.reset(new VerilatedContext);
  b.ctx->commandArgs(argc, argv);
  b.top.reset(new Vdut{b.ctx.get()});
  b.quiet();
  b.top->ap_rst_n = 0;
  b.settle();
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream is(line);
    std::string cmd;
    if (!(is >> cmd)) continue;
    if (cmd == "seed") { unsigned long long s; is >> s; b.rng = s * 0x9e3779b97f4a7c15ull + 1; }
    else if (cmd == "valid") is >> b.p_valid;
    else if (cmd == "ready") is >> b.p_ready;
    else if (cmd == "reset") { unsigned n; is >> n; b.reset(n); std::printf("ok reset\n"); }
    else if (cmd == "idle") { unsigned n; is >> n; for (unsigned i = 0; i < n; i++) { b.settle(); b.rise(); } b.settle(); std::printf("ok idle\n"); }
    else if (cmd == "write") {
      std::string a, d; is >> a >> d;
      std::printf("B %u\n", b.write(parse_hex(a), parse_hex(d)));
    } else if (cmd == "read") {
      std::string a; is >> a;
      unsigned resp = 0;
      std::string data = b.read(parse_hex(a), resp);
      std::printf("R %s %u\n", data.c_str(), resp);
    } else if (cmd == "stream") {
#ifdef TB_MEMSTREAM
      std::printf("error: a memstream has no input stream (use collect)\n"); return 3;
#endif
      std::size_t n; is >> n;
      std::vector<words_t> in;
      in.reserve(n);
      for (std::size_t i = 0; i < n && std::getline(std::cin, line); i++) in.push_back(parse_hex(line));
      if (in.size() != n) { std::printf("error: stream expected %zu words\n", n); return 3; }
      b.stream(in, n);
    } else if (cmd == "collect") {
      std::size_t n; is >> n;
      b.stream({}, n);
    } else { std::printf("error: unknown command %s\n", cmd.c_str()); return 3; }
    std::fflush(stdout);
  }
  b.top->final();
  return 0;
}
