// A small, strict JSON reader (RFC 8259) for safetensors headers, index files and
// config/tokenizer files. No third-party dependency; bounded nesting depth.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llmlb::json {

enum class Type { Null, Bool, Number, String, Array, Object };

struct Value {
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  // Set when the number is a non-negative integer that fits in 64 bits.
  bool is_uint = false;
  std::uint64_t uint_value = 0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // in document order

  // First member named `key`, or nullptr (objects only).
  const Value* find(std::string_view key) const;
};

// Parse `text` into `out`. On failure returns false and sets `error` to a message such
// as "invalid JSON at byte 12: expected ':'".
bool parse(std::string_view text, Value& out, std::string& error);

// Check that `text` is one well-formed JSON value without building a tree.
bool check(std::string_view text, std::string& error);

}  // namespace llmlb::json
