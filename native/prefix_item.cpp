#include "prefix_item.hpp"

#include <array>
#include <cstring>

namespace llmlb::prefix {
namespace {

using Table = std::array<std::array<std::uint32_t, 256>, 8>;

Table make_table() {
  Table t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[0][i] = c;
  }
  for (std::uint32_t i = 0; i < 256; ++i)
    for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}

const Table& table() {
  static const Table t = make_table();
  return t;
}

bool is_lead(unsigned char b) { return (b & 0xC0) != 0x80; }

// Byte offset just past the first `n` code points of `s`.
std::size_t head_bytes(std::string_view s, std::size_t n) {
  std::size_t i = 0;
  for (std::size_t seen = 0; i < s.size(); ++i) {
    if (is_lead(static_cast<unsigned char>(s[i])) && seen++ == n) return i;
  }
  return i;
}

// Byte offset where the last `n` code points of `s` begin.
std::size_t tail_start(std::string_view s, std::size_t n) {
  std::size_t i = s.size();
  for (std::size_t seen = 0; i > 0 && seen < n;) {
    --i;
    if (is_lead(static_cast<unsigned char>(s[i]))) ++seen;
  }
  return i;
}

constexpr char kHex[] = "0123456789abcdef";

// Bytes a JSON string cannot hold raw.
struct EscapeTable {
  bool needs[256] = {};
  EscapeTable() {
    for (int b = 0; b < 0x20; ++b) needs[b] = true;
    needs[static_cast<unsigned char>('"')] = needs[static_cast<unsigned char>('\\')] = true;
  }
};
const EscapeTable kEscape;

}  // namespace

std::uint32_t crc32(std::string_view data, std::uint32_t seed) {
  const Table& t = table();
  std::uint32_t c = ~seed;
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  std::size_t n = data.size();
  while (n >= 8) {
    const std::uint32_t lo = c ^ (std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 |
                                  std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24);
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
        t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

// Whether one of the 8 bytes of `x` is a control character, `"` or `\`.
bool any_escape(std::uint64_t x) {
  constexpr std::uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
  const std::uint64_t quote = x ^ (ones * '"'), slash = x ^ (ones * '\\');
  const std::uint64_t below = (x - ones * 0x20) & ~x;
  return ((below | ((quote - ones) & ~quote) | ((slash - ones) & ~slash)) & highs) != 0;
}

void append_json_chars(std::string& out, std::string_view utf8) {
  std::size_t run = 0;  // start of the bytes not yet copied
  const std::size_t size = utf8.size();
  for (std::size_t i = 0; i < size; ++i) {
    if (i + 8 <= size && (i & 7) == 0) {  // skip clean words whole
      std::uint64_t word;
      std::memcpy(&word, utf8.data() + i, 8);
      if (!any_escape(word)) {
        i += 7;
        continue;
      }
    }
    const auto b = static_cast<unsigned char>(utf8[i]);
    if (!kEscape.needs[b]) continue;
    out.append(utf8.substr(run, i - run));
    run = i + 1;
    switch (b) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        out += "\\u00";
        out.push_back(kHex[b >> 4]);
        out.push_back(kHex[b & 0xF]);
    }
  }
  out.append(utf8.substr(run));
}

void append_json_string(std::string& out, std::string_view utf8) {
  out.push_back('"');
  append_json_chars(out, utf8);
  out.push_back('"');
}

Edges split_utf8(std::string_view utf8, std::size_t chars, std::size_t edge_chars) {
  if (chars <= 2 * edge_chars) return {utf8, {}};
  const bool ascii = utf8.size() == chars;
  const std::size_t head = ascii ? edge_chars : head_bytes(utf8, edge_chars);
  const std::size_t tail = ascii ? chars - edge_chars : tail_start(utf8, edge_chars);
  return {utf8.substr(0, head), utf8.substr(tail)};
}

std::size_t message_item(std::string& out, std::string_view role, const Edges& text,
                         std::size_t chars, std::size_t edge_chars) {
  out.clear();
  out += '[';
  append_json_string(out, role);
  out += ',';
  if (chars <= 2 * edge_chars) {
    append_json_string(out, text.head);
    out += ",[]]";
    return out.size();
  }
  // `head \0 length \0 tail` as one JSON string.
  const std::string length = std::to_string(chars);
  out.push_back('"');
  append_json_chars(out, text.head);
  out += "\\u0000";
  out += length;
  out += "\\u0000";
  append_json_chars(out, text.tail);
  out += "\",[]]";
  return out.size() + chars - (2 * edge_chars + 2 + length.size());
}

}  // namespace llmlb::prefix
