#include "json.hpp"

#include <cstdlib>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llmlb::json {
namespace {

constexpr int kMaxDepth = 256;

// Bytes that end a plain run inside a string: '"', '\\', control characters, non-ASCII.
struct SpecialTable {
  bool v[256];
  constexpr SpecialTable() : v() {
    for (int c = 0; c < 256; ++c) v[c] = c == '"' || c == '\\' || c < 0x20 || c >= 0x80;
  }
  constexpr bool operator[](unsigned char c) const { return v[c]; }
};
constexpr SpecialTable kSpecial;

// End of the run of plain string bytes starting at `pos` (16 bytes at a time with SSE2).
inline std::size_t plain_run_end(const char* data, std::size_t pos, std::size_t size) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i space = _mm_set1_epi8(0x20);
  while (pos + 16 <= size) {
    const __m128i chunk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + pos));
    // Signed compare: bytes >= 0x80 are negative, so "< 0x20" also catches non-ASCII.
    const __m128i special = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(chunk, quote), _mm_cmpeq_epi8(chunk, backslash)),
                                         _mm_cmplt_epi8(chunk, space));
    const int mask = _mm_movemask_epi8(special);
    if (mask != 0) return pos + static_cast<std::size_t>(__builtin_ctz(static_cast<unsigned>(mask)));
    pos += 16;
  }
#endif
  while (pos < size && !kSpecial[static_cast<unsigned char>(data[pos])]) ++pos;
  return pos;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, unsigned cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace

bool Cursor::fail(const char* why) {
  if (error_.empty()) error_ = "invalid JSON at byte " + std::to_string(pos_) + ": " + why;
  return false;
}


bool Cursor::begin_object() {
  skip_ws();
  if (pos_ >= s_.size() || s_[pos_] != '{') return fail("expected '{'");
  if (++depth_ > kMaxDepth) return fail("nesting too deep");
  ++pos_;
  return true;
}

bool Cursor::next_member(std::size_t& count, std::string_view& key, std::deque<std::string>* keep) {
  if (!ok()) return false;
  skip_ws();
  if (pos_ >= s_.size()) return fail("unexpected end of input in object");
  if (s_[pos_] == '}') {
    ++pos_;
    --depth_;
    return false;
  }
  if (count > 0) {
    if (s_[pos_] != ',') return fail("expected ',' or '}'");
    ++pos_;
    skip_ws();
  }
  if (pos_ >= s_.size() || s_[pos_] != '"') return fail("expected a string key");
  if (!read_string(key, keep)) return false;
  skip_ws();
  if (pos_ >= s_.size() || s_[pos_] != ':') return fail("expected ':'");
  ++pos_;
  ++count;
  return true;
}

bool Cursor::begin_array() {
  skip_ws();
  if (pos_ >= s_.size() || s_[pos_] != '[') return fail("expected '['");
  if (++depth_ > kMaxDepth) return fail("nesting too deep");
  ++pos_;
  return true;
}


bool Cursor::hex4(unsigned& cp) {
  if (pos_ + 4 > s_.size()) return fail("truncated \\u escape");
  cp = 0;
  for (int i = 0; i < 4; ++i) {
    const int d = hex_digit(s_[pos_ + i]);
    if (d < 0) return fail("invalid \\u escape");
    cp = cp * 16 + static_cast<unsigned>(d);
  }
  pos_ += 4;
  return true;
}

bool Cursor::utf8(std::string* out) {
  const auto b0 = static_cast<unsigned char>(s_[pos_]);
  int extra;
  unsigned cp;
  if (b0 < 0xC2) return fail("invalid UTF-8");
  if (b0 < 0xE0) {
    extra = 1;
    cp = b0 & 0x1F;
  } else if (b0 < 0xF0) {
    extra = 2;
    cp = b0 & 0x0F;
  } else if (b0 < 0xF5) {
    extra = 3;
    cp = b0 & 0x07;
  } else {
    return fail("invalid UTF-8");
  }
  if (pos_ + extra >= s_.size()) return fail("truncated UTF-8");
  for (int i = 1; i <= extra; ++i) {
    const auto b = static_cast<unsigned char>(s_[pos_ + i]);
    if ((b & 0xC0) != 0x80) return fail("invalid UTF-8");
    cp = (cp << 6) | (b & 0x3F);
  }
  if ((extra == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
      (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF))) {
    return fail("invalid UTF-8");
  }
  if (out) out->append(s_.data() + pos_, extra + 1);
  pos_ += extra + 1;
  return true;
}

// Reads a string starting at the opening quote. Without escapes the result is a view into
// the text; otherwise it is decoded into `out` (when given).
bool Cursor::string_impl(std::string* out, std::string_view* view, std::deque<std::string>* keep) {
  ++pos_;  // opening quote
  const std::size_t start = pos_;
  bool escaped = false;
  std::string* decoded = nullptr;
  while (true) {
    const std::size_t run = plain_run_end(s_.data(), pos_, s_.size());
    if (decoded && run > pos_) decoded->append(s_.data() + pos_, run - pos_);
    pos_ = run;
    if (pos_ >= s_.size()) return fail("unterminated string");
    const auto c = static_cast<unsigned char>(s_[pos_]);
    if (c == '"') {
      ++pos_;
      if (!escaped) {
        if (view) *view = s_.substr(start, pos_ - 1 - start);
        if (out) out->assign(s_.data() + start, pos_ - 1 - start);
      } else if (view) {
        if (keep) {
          keep->push_back(*decoded);
          *view = keep->back();
        } else {
          *view = *decoded;
        }
      }
      return true;
    }
    if (c < 0x20) return fail("control character in string");
    if (c >= 0x80) {
      if (!utf8(decoded)) return false;
      continue;
    }
    // A backslash: switch to decoding, copying what came before.
    if (!escaped) {
      escaped = true;
      decoded = out ? out : &scratch_;
      decoded->assign(s_.data() + start, pos_ - start);
    }
    if (++pos_ >= s_.size()) return fail("unterminated escape");
    const char e = s_[pos_++];
    char ch = 0;
    switch (e) {
      case '"': ch = '"'; break;
      case '\\': ch = '\\'; break;
      case '/': ch = '/'; break;
      case 'b': ch = '\b'; break;
      case 'f': ch = '\f'; break;
      case 'n': ch = '\n'; break;
      case 'r': ch = '\r'; break;
      case 't': ch = '\t'; break;
      case 'u': {
        unsigned cp;
        if (!hex4(cp)) return false;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          unsigned low;
          if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') return fail("unpaired surrogate");
          pos_ += 2;
          if (!hex4(low)) return false;
          if (low < 0xDC00 || low > 0xDFFF) return fail("unpaired surrogate");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
          return fail("unpaired surrogate");
        }
        append_utf8(*decoded, cp);
        continue;
      }
      default:
        return fail("invalid escape");
    }
    *decoded += ch;
  }
}

bool Cursor::read_string(std::string_view& out, std::deque<std::string>* keep) {
  skip_ws();
  if (pos_ >= s_.size() || s_[pos_] != '"') return fail("expected a string");
  return string_impl(nullptr, &out, keep);
}

bool Cursor::read_number(double& value, bool& is_uint, std::uint64_t& uint_value) {
  skip_ws();
  const std::size_t start = pos_;
  const std::size_t size = s_.size();
  const char* d = s_.data();
  bool negative = false;
  if (pos_ < size && d[pos_] == '-') {
    negative = true;
    ++pos_;
  }
  if (pos_ >= size) return fail("invalid number");
  std::uint64_t v = 0;
  bool overflow = false;
  if (d[pos_] == '0') {
    ++pos_;
  } else if (d[pos_] >= '1' && d[pos_] <= '9') {
    // Accumulate while scanning; the common case is a small non-negative integer.
    while (pos_ < size && d[pos_] >= '0' && d[pos_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(d[pos_] - '0');
      if (v > (UINT64_MAX - digit) / 10) overflow = true;
      v = v * 10 + digit;
      ++pos_;
    }
  } else {
    return fail(negative ? "invalid number" : "unexpected character");
  }
  bool integral = true;
  if (pos_ < size && d[pos_] == '.') {
    integral = false;
    ++pos_;
    if (pos_ >= size || d[pos_] < '0' || d[pos_] > '9') return fail("invalid number");
    while (pos_ < size && d[pos_] >= '0' && d[pos_] <= '9') ++pos_;
  }
  if (pos_ < size && (d[pos_] == 'e' || d[pos_] == 'E')) {
    integral = false;
    ++pos_;
    if (pos_ < size && (d[pos_] == '+' || d[pos_] == '-')) ++pos_;
    if (pos_ >= size || d[pos_] < '0' || d[pos_] > '9') return fail("invalid number");
    while (pos_ < size && d[pos_] >= '0' && d[pos_] <= '9') ++pos_;
  }
  is_uint = integral && !negative && !overflow;
  if (is_uint) {
    uint_value = v;
    value = static_cast<double>(v);
    return true;
  }
  value = std::strtod(std::string(s_.substr(start, pos_ - start)).c_str(), nullptr);
  return true;
}

bool Cursor::read_uint(std::uint64_t& out) {
  if (peek() != Type::Number) return false;
  const std::size_t saved = pos_;
  double value;
  bool is_uint;
  if (!read_number(value, is_uint, out)) return false;
  if (!is_uint) {
    pos_ = saved;
    return false;
  }
  return true;
}

bool Cursor::read_literal(Type& type, bool& boolean) {
  skip_ws();
  auto word = [&](std::string_view w) {
    if (s_.substr(pos_, w.size()) != w) return fail("invalid literal");
    pos_ += w.size();
    return true;
  };
  if (pos_ < s_.size() && s_[pos_] == 't') {
    type = Type::Bool;
    boolean = true;
    return word("true");
  }
  if (pos_ < s_.size() && s_[pos_] == 'f') {
    type = Type::Bool;
    boolean = false;
    return word("false");
  }
  type = Type::Null;
  return word("null");
}

bool Cursor::skip_value() { return skip_value_at(0); }

bool Cursor::skip_value_at(int depth) {
  if (depth > kMaxDepth) return fail("nesting too deep");
  switch (peek()) {
    case Type::Object: {
      if (!begin_object()) return false;
      std::size_t n = 0;
      std::string_view key;
      while (next_member(n, key)) {
        if (!skip_value_at(depth + 1)) return false;
      }
      return ok();
    }
    case Type::Array: {
      if (!begin_array()) return false;
      std::size_t n = 0;
      while (next_element(n)) {
        if (!skip_value_at(depth + 1)) return false;
      }
      return ok();
    }
    case Type::String:
      return string_impl(nullptr, nullptr, nullptr);
    case Type::Number: {
      double v;
      bool u;
      std::uint64_t x;
      return read_number(v, u, x);
    }
    case Type::Bool:
    case Type::Null: {
      Type t;
      bool b;
      return ok() && read_literal(t, b);
    }
  }
  return false;
}

bool Cursor::finish() {
  if (!ok()) return false;
  skip_ws();
  if (pos_ != s_.size()) return fail("trailing data");
  return true;
}

namespace {

bool build(Cursor& c, Value& out, int depth) {
  if (depth > kMaxDepth) return c.fail("nesting too deep");
  out.type = c.peek();
  if (!c.ok()) return false;
  switch (out.type) {
    case Type::Object: {
      if (!c.begin_object()) return false;
      std::size_t n = 0;
      std::string_view key;
      while (c.next_member(n, key)) {
        out.object.emplace_back(std::string(key), Value{});
        if (!build(c, out.object.back().second, depth + 1)) return false;
      }
      return c.ok();
    }
    case Type::Array: {
      if (!c.begin_array()) return false;
      std::size_t n = 0;
      while (c.next_element(n)) {
        out.array.emplace_back();
        if (!build(c, out.array.back(), depth + 1)) return false;
      }
      return c.ok();
    }
    case Type::String: {
      std::string_view s;
      if (!c.read_string(s)) return false;
      out.string.assign(s);
      return true;
    }
    case Type::Number:
      return c.read_number(out.number, out.is_uint, out.uint_value);
    default:
      return c.read_literal(out.type, out.boolean);
  }
}

}  // namespace

const Value* Value::find(std::string_view key) const {
  for (const auto& [k, v] : object) {
    if (k == key) return &v;
  }
  return nullptr;
}

bool parse(std::string_view text, Value& out, std::string& error) {
  out = Value{};
  Cursor c(text);
  if (!build(c, out, 0) || !c.finish()) {
    error = c.error();
    return false;
  }
  return true;
}

bool check(std::string_view text, std::string& error) {
  Cursor c(text);
  if (!c.skip_value() || !c.finish()) {
    error = c.error();
    return false;
  }
  return true;
}

}  // namespace llmlb::json
