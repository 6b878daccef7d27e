// Prefix keys' canonical chat items (see python/llmlb/prefix_keys.py, which defines them):
// the bytes orjson writes for `[role, shown, []]`, where `shown` is a long text's two ends
// and its length, and the CRC-32 that chains them. Pure C++; bindings.cpp walks the Python
// objects and calls these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace llmlb::prefix {

// zlib's crc32(data, seed): CRC-32/ISO-HDLC continued from `seed`.
std::uint32_t crc32(std::string_view data, std::uint32_t seed);

// Appends `text` as orjson writes a JSON string (quotes included): `"` and `\` escaped,
// \b \t \n \f \r short, other controls as \u00xx (lowercase), everything else raw UTF-8.
void append_json_string(std::string& out, std::string_view utf8);

// The same without the quotes.
void append_json_chars(std::string& out, std::string_view utf8);

// A message's text as an item shows it: the whole text (`head`) when it has at most
// 2 x edge_chars code points, else its first and last edge_chars code points, in UTF-8.
struct Edges {
  std::string_view head;
  std::string_view tail;
};

// The edges of a UTF-8 text of `chars` code points (views into `utf8`).
Edges split_utf8(std::string_view utf8, std::size_t chars, std::size_t edge_chars);

// Writes into `out` the item of a message without tool calls, `["role","shown",[]]`, for a
// text of `chars` code points shown by `text`. Returns the prompt characters it stands for
// (the item's bytes plus the characters the shortened text leaves out).
std::size_t message_item(std::string& out, std::string_view role, const Edges& text,
                         std::size_t chars, std::size_t edge_chars);

}  // namespace llmlb::prefix
