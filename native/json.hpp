// A small, strict JSON reader (RFC 8259) for safetensors headers, index files and
// config/tokenizer files. No third-party dependency; bounded nesting depth.
//
// Two ways in: `Cursor` walks a document in place without allocating (strings come back
// as views into the text), for the hot safetensors paths; `parse` builds a `Value` tree,
// for small documents such as config.json.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace llmlb::json {

enum class Type { Null, Bool, Number, String, Array, Object };

class Cursor {
 public:
  explicit Cursor(std::string_view text) : s_(text) {}

  bool ok() const { return error_.empty(); }
  // "invalid JSON at byte N: why" once something failed, else "".
  const std::string& error() const { return error_; }

  // Type of the next value (skipping whitespace); sets an error on an invalid start.
  Type peek() {
    skip_ws();
    if (pos_ >= s_.size()) {
      fail("unexpected end of input");
      return Type::Null;
    }
    switch (s_[pos_]) {
      case '{': return Type::Object;
      case '[': return Type::Array;
      case '"': return Type::String;
      case 't': case 'f': return Type::Bool;
      case 'n': return Type::Null;
      default:
        if (s_[pos_] == '-' || (s_[pos_] >= '0' && s_[pos_] <= '9')) return Type::Number;
        fail("unexpected character");
        return Type::Null;
    }
  }

  // Consume '{'. Then call next_member until it returns false ('}' reached, or an error:
  // check ok()). `count` starts at 0 and is maintained by the cursor.
  bool begin_object();
  bool next_member(std::size_t& count, std::string_view& key, std::deque<std::string>* keep = nullptr);

  // Consume '['. Then call next_element until it returns false.
  bool begin_array();
  bool next_element(std::size_t& count) {
    if (!ok()) return false;
    skip_ws();
    if (pos_ >= s_.size()) return fail("unexpected end of input in array");
    if (s_[pos_] == ']') {
      ++pos_;
      --depth_;
      return false;
    }
    if (count > 0) {
      if (s_[pos_] != ',') return fail("expected ',' or ']'");
      ++pos_;
    }
    ++count;
    return true;
  }

  // Read a string. The view points into the text, or (when it held escapes) into `keep`
  // if given, else into a scratch buffer valid until the next read.
  bool read_string(std::string_view& out, std::deque<std::string>* keep = nullptr);

  // Read a number; `is_uint` tells whether it is a non-negative integer fitting 64 bits.
  bool read_number(double& value, bool& is_uint, std::uint64_t& uint_value);

  // Read a non-negative 64-bit integer; false (without an error) if the next value is
  // another kind of number or not a number, and then it is left unread.
  bool read_uint(std::uint64_t& out);

  bool read_literal(Type& type, bool& boolean);

  // Skip (and fully validate) the next value.
  bool skip_value();

  // Only whitespace remains.
  bool finish();

  bool fail(const char* why);

 private:
  bool skip_value_at(int depth);
  bool string_impl(std::string* out, std::string_view* view, std::deque<std::string>* keep);
  bool utf8(std::string* out);
  bool hex4(unsigned& cp);
  void skip_ws() {
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c != ' ' && c != '\n' && c != '\r' && c != '\t') break;
      ++pos_;
    }
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  std::string error_;
  std::string scratch_;
  int depth_ = 0;
};

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
