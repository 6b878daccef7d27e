#include "model_id.hpp"

#include <cctype>

namespace llmlb {
namespace {

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c == '\0') {
      out += "\\0";
    } else if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "'";
}

[[noreturn]] void fail(const std::string& raw, const std::string& why) {
  std::string shown = raw.size() > 300 ? raw.substr(0, 300) + "..." : raw;
  throw InvalidModelIdError("invalid model id " + quoted(shown) + ": " + why);
}

bool allowed_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

std::string describe_char(unsigned char c) {
  if (c == '\\') return "backslash";
  if (c == '\0') return "NUL";
  if (c == ' ') return "space";
  if (c < 0x20 || c == 0x7f) {
    static const char* hex = "0123456789abcdef";
    return std::string("control character \\x") + hex[c >> 4] + hex[c & 15];
  }
  if (c >= 0x80) return "non-ASCII byte";
  return std::string("character '") + static_cast<char>(c) + "'";
}

void check_base(const std::string& raw, const std::string& base) {
  if (base.empty()) fail(raw, "empty id");
  if (base.front() == '/') fail(raw, "leading '/'");
  if (base.back() == '/') fail(raw, "trailing '/'");
  std::size_t start = 0;
  while (start <= base.size()) {
    std::size_t end = base.find('/', start);
    if (end == std::string::npos) end = base.size();
    std::string segment = base.substr(start, end - start);
    if (segment.empty()) fail(raw, "empty path segment");
    if (segment == ".") fail(raw, "segment '.' is not allowed");
    if (segment == "..") fail(raw, "segment '..' is not allowed");
    // The store keeps its own state in dot-directories (.staging, .locks, .downloaded).
    if (segment.front() == '.') fail(raw, "segment '" + segment + "' starts with '.'");
    for (char c : segment) {
      if (!allowed_char(c)) fail(raw, describe_char(static_cast<unsigned char>(c)) + " is not allowed");
    }
    start = end + 1;
  }
}

}  // namespace

std::string normalize_model_id(const std::string& raw) {
  std::string id;
  id.reserve(raw.size());
  for (unsigned char c : raw) {
    id += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : static_cast<char>(c);
  }
  for (unsigned char c : id) {
    if (c == '\\' || c == '\0' || c < 0x20 || c >= 0x7f) fail(raw, describe_char(c) + " is not allowed");
  }
  if (id.size() > kMaxModelIdLength) {
    fail(raw, "longer than " + std::to_string(kMaxModelIdLength) + " characters");
  }
  const std::size_t colon = id.find(':');
  if (colon == std::string::npos) {
    check_base(raw, id);
    return id;
  }
  if (id.find(':', colon + 1) != std::string::npos) fail(raw, "more than one ':'");
  const std::string base = id.substr(0, colon);
  const std::string quant = id.substr(colon + 1);
  if (base.empty()) fail(raw, "nothing before ':'");
  if (quant.empty()) fail(raw, "empty quantisation after ':'");
  check_base(raw, base);
  for (char c : quant) {
    if (!allowed_char(c)) {
      fail(raw, describe_char(static_cast<unsigned char>(c)) + " is not allowed in the quantisation");
    }
  }
  return id;
}

std::pair<std::string, std::optional<std::string>> split_quant(const std::string& raw) {
  const std::string id = normalize_model_id(raw);
  const std::size_t colon = id.find(':');
  if (colon == std::string::npos) return {id, std::nullopt};
  return {id.substr(0, colon), id.substr(colon + 1)};
}

bool quant_matches_file_name(const std::string& token, const std::string& file_name) {
  if (token.empty()) return false;
  std::string name, tok;
  for (unsigned char c : file_name) name += static_cast<char>(std::tolower(c));
  for (unsigned char c : token) tok += static_cast<char>(std::tolower(c));
  std::size_t pos = name.find(tok);
  while (pos != std::string::npos) {
    const bool left_ok = pos == 0 || name[pos - 1] == '-' || name[pos - 1] == '.' || name[pos - 1] == '_';
    const std::size_t after = pos + tok.size();
    const bool right_ok = after == name.size() || name[after] == '-' || name[after] == '.';
    if (left_ok && right_ok) return true;
    pos = name.find(tok, pos + 1);
  }
  return false;
}

}  // namespace llmlb
