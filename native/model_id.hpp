// Model id rules: normalisation, validation and the optional ":QUANT" suffix.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace llmlb {

// Thrown for a malformed model id; the message names the exact rule broken.
class InvalidModelIdError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

inline constexpr std::size_t kMaxModelIdLength = 256;

// Lowercase and validate `raw`; throws InvalidModelIdError instead of ever rewriting
// anything but letter case. Accepts an optional ":QUANT" suffix.
std::string normalize_model_id(const std::string& raw);

// Normalise `raw` and split it into (base id, quantisation token or nullopt).
std::pair<std::string, std::optional<std::string>> split_quant(const std::string& raw);

// True when `token` occurs in `file_name` case-insensitively as a whole token: preceded
// by the start or one of "-._", followed by the end or one of "-.".
bool quant_matches_file_name(const std::string& token, const std::string& file_name);

}  // namespace llmlb
