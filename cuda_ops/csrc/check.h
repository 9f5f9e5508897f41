// PETOPS_CHECK: TORCH_CHECK whose message is formatted by petops, not by c10::str.
//
// On the H100 host's torch 2.11 wheel, c10::str streaming an *integer* from an extension
// segfaults instead of raising (a minimal torch.utils.cpp_extension.load_inline module with
// TORCH_CHECK(v == 0, "v=", v) crashes there too, so it is not petops-specific), while a
// message handed over as one std::string raises normally. PETOPS_CHECK therefore builds the
// whole message here — integers via std::to_string, shapes as "[a, b]", dtypes and devices
// by name — and passes TORCH_CHECK a single string. As with TORCH_CHECK, the message is only
// built when the check fails.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace petops {
namespace detail {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const at::Device& v) { s += v.str(); }
inline void put(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (put(s, args), ...);
  return s;
}

}  // namespace detail
}  // namespace petops

#define PETOPS_CHECK(cond, ...) TORCH_CHECK(cond, ::petops::detail::message(__VA_ARGS__))
