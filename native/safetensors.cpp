#include "safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <unordered_set>

#include "fs_util.hpp"
#include "json.hpp"

namespace llmlb::safetensors {
namespace {

// `s == lit` with the length known at compile time, so the comparison is inlined.
template <std::size_t N>
inline bool is(std::string_view s, const char (&lit)[N]) {
  return s.size() == N - 1 && std::memcmp(s.data(), lit, N - 1) == 0;
}

// dtype -> size in bits; 0 when unknown.
int dtype_bits(std::string_view d) {
  switch (d.size()) {
    case 2:
      if (is(d, "U8") || is(d, "I8")) return 8;
      if (is(d, "F4")) return 4;
      return 0;
    case 3:
      if (is(d, "F32") || is(d, "I32") || is(d, "U32")) return 32;
      if (is(d, "F16") || is(d, "I16") || is(d, "U16")) return 16;
      if (is(d, "F64") || is(d, "I64") || is(d, "U64") || is(d, "C64")) return 64;
      return 0;
    case 4:
      if (is(d, "BF16")) return 16;
      if (is(d, "BOOL")) return 8;
      return 0;
    case 7:
      if (is(d, "F8_E5M2") || is(d, "F8_E4M3") || is(d, "F8_E8M0")) return 8;
      if (is(d, "F6_E2M3") || is(d, "F6_E3M2")) return 6;
      return 0;
    default:
      return 0;
  }
}

struct Tensor {
  std::string_view name;
  std::uint64_t begin;
  std::uint64_t end;
};

// Reads [a, b] of unsigned integers; false (value consumed) when it is anything else.
bool read_offsets(json::Cursor& c, std::uint64_t& begin, std::uint64_t& end) {
  if (c.peek() != json::Type::Array) {
    c.skip_value();
    return false;
  }
  c.begin_array();
  std::size_t n = 0;
  bool good = true;
  std::uint64_t values[2] = {0, 0};
  while (c.next_element(n)) {
    std::uint64_t v;
    if (n <= 2 && c.read_uint(v)) {
      values[n - 1] = v;
    } else {
      good = false;
      if (!c.skip_value()) return false;
    }
  }
  begin = values[0];
  end = values[1];
  return c.ok() && good && n == 2;
}

// Reads an array of unsigned dims, returning the element count; false if not such an array.
bool read_shape(json::Cursor& c, unsigned __int128& elements) {
  if (c.peek() != json::Type::Array) {
    c.skip_value();
    return false;
  }
  c.begin_array();
  std::size_t n = 0;
  bool good = true;
  elements = 1;
  while (c.next_element(n)) {
    std::uint64_t dim;
    if (c.read_uint(dim)) {
      elements *= dim;
      if (elements > UINT64_MAX) {
        good = false;
        elements = 0;
      }
    } else {
      good = false;
      if (!c.skip_value()) return false;
    }
  }
  return c.ok() && good;
}

}  // namespace

FileCheck check_file(const std::string& path, const std::vector<std::string_view>& expected) {
  FileCheck out;
  fs::File file;
  std::string error;
  if (!file.open(path, error)) {
    if (errno == ENOENT || error == "not a regular file") {
      out.not_found = true;
    }
    out.problems.push_back("cannot open: " + error);
    return out;
  }
  out.file_size = file.size();
  if (file.size() < 8) {
    out.problems.push_back("file too small for a safetensors header (" + std::to_string(file.size()) + " bytes)");
    return out;
  }
  // One read covers the length prefix and, almost always, the whole header.
  constexpr std::uint64_t kFirstRead = 64 << 10;
  std::string head(static_cast<std::size_t>(std::min<std::uint64_t>(file.size(), kFirstRead)), '\0');
  if (!file.read_at(0, head.data(), head.size())) {
    out.problems.push_back("read error");
    return out;
  }
  std::uint64_t n = 0;
  std::memcpy(&n, head.data(), 8);
  if (n > kMaxHeaderBytes) {
    out.problems.push_back("header too large: " + std::to_string(n) + " bytes (limit " +
                           std::to_string(kMaxHeaderBytes) + ")");
    return out;
  }
  if (n > file.size() - 8) {
    out.problems.push_back("header length " + std::to_string(n) + " exceeds the file size " +
                           std::to_string(file.size()));
    return out;
  }
  std::string text;
  if (8 + n <= head.size()) {
    head.resize(static_cast<std::size_t>(8 + n));
    head.erase(0, 8);
    text = std::move(head);
  } else {
    text.assign(static_cast<std::size_t>(n), '\0');
    if (!file.read_at(8, text.data(), text.size())) {
      out.problems.push_back("read error");
      return out;
    }
  }

  json::Cursor c(text);
  if (c.peek() != json::Type::Object) {
    if (c.ok() && c.skip_value() && c.finish()) {
      out.problems.push_back("header is not a JSON object");
    } else {
      out.problems.push_back("header is not valid JSON: " + c.error());
    }
    return out;
  }
  std::deque<std::string> keep;  // names that held escapes
  std::vector<Tensor> tensors;
  std::vector<std::string_view> names;  // sorted after the scan: duplicates and lookups
  names.reserve(text.size() / 64 + 1);
  tensors.reserve(names.capacity());
  std::vector<std::string> problems;
  c.begin_object();
  std::size_t members = 0;
  std::string_view name;
  while (c.next_member(members, name, &keep)) {
    if (is(name, "__metadata__")) {
      bool good = c.peek() == json::Type::Object;
      if (!good) {
        c.skip_value();
      } else {
        c.begin_object();
        std::size_t m = 0;
        std::string_view key, value;
        while (c.next_member(m, key)) {
          if (c.peek() == json::Type::String) {
            c.read_string(value);
          } else {
            good = false;
            c.skip_value();
          }
        }
      }
      if (!good) problems.push_back("__metadata__ must map strings to strings");
      continue;
    }
    names.push_back(name);
    if (c.peek() != json::Type::Object) {
      problems.push_back("tensor " + std::string(name) + ": entry is not an object");
      c.skip_value();
      continue;
    }
    c.begin_object();
    std::size_t fields = 0;
    std::string_view field, dtype;
    bool has_dtype = false, has_shape = false, shape_ok = false, offsets_ok = false;
    unsigned __int128 elements = 0;
    std::uint64_t begin = 0, end = 0;
    while (c.next_member(fields, field)) {
      if (is(field, "dtype") && c.peek() == json::Type::String) {
        has_dtype = c.read_string(dtype, &keep);
      } else if (is(field, "shape")) {
        has_shape = true;
        shape_ok = read_shape(c, elements);
      } else if (is(field, "data_offsets")) {
        offsets_ok = read_offsets(c, begin, end);
      } else {
        c.skip_value();
      }
    }
    if (!c.ok()) break;
    const auto tname = [name] { return std::string(name); };
    if (!has_dtype) {
      problems.push_back("tensor " + tname() + ": missing dtype");
      continue;
    }
    const int bits = dtype_bits(dtype);
    if (bits == 0) {
      problems.push_back("tensor " + tname() + ": unknown dtype " + std::string(dtype));
      continue;
    }
    if (!has_shape) {
      problems.push_back("tensor " + tname() + ": missing shape");
      continue;
    }
    if (!shape_ok) {
      problems.push_back("tensor " + tname() + ": invalid shape");
      continue;
    }
    if (!offsets_ok) {
      problems.push_back("tensor " + tname() + ": data_offsets must be two non-negative integers");
      continue;
    }
    if (end < begin) {
      problems.push_back("tensor " + tname() + ": data_offsets end " + std::to_string(end) + " before begin " +
                         std::to_string(begin));
      continue;
    }
    const unsigned __int128 total_bits = elements * static_cast<unsigned>(bits);
    if (total_bits % 8 != 0 || total_bits / 8 != end - begin) {
      problems.push_back("tensor " + tname() + ": " + std::string(dtype) + " shape needs " +
                         std::to_string(static_cast<std::uint64_t>(total_bits / 8)) + " bytes but data_offsets span " +
                         std::to_string(end - begin));
      continue;
    }
    tensors.push_back({name, begin, end});
  }
  if (!c.finish()) {
    out.problems.push_back("header is not valid JSON: " + c.error());
    return out;
  }
  // Writers emit names in sorted order, and weight_map is sorted too: then one linear pass
  // finds duplicates and a merge walk finds missing tensors.
  const bool sorted = std::adjacent_find(names.begin(), names.end(), std::greater_equal<>()) == names.end();
  if (!sorted) {
    std::sort(names.begin(), names.end());
    for (auto it = names.begin(); (it = std::adjacent_find(it, names.end())) != names.end();) {
      problems.push_back("duplicate tensor " + std::string(*it));
      it = std::upper_bound(it, names.end(), *it);
    }
  }
  if (std::is_sorted(expected.begin(), expected.end())) {
    auto it = names.begin();
    for (const auto& t : expected) {
      while (it != names.end() && *it < t) ++it;
      if (it == names.end() || *it != t) out.missing.emplace_back(t);
    }
  } else {
    for (const auto& t : expected) {
      if (!std::binary_search(names.begin(), names.end(), t)) out.missing.emplace_back(t);
    }
  }
  if (!problems.empty()) {
    out.problems = std::move(problems);  // offsets of broken entries would only add noise
    return out;
  }
  std::sort(tensors.begin(), tensors.end(), [](const Tensor& a, const Tensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected_end = 0;
  for (const auto& t : tensors) {
    if (t.begin != expected_end) {
      out.problems.push_back("data_offsets not contiguous at tensor " + std::string(t.name) + ": starts at " +
                             std::to_string(t.begin) + ", expected " + std::to_string(expected_end));
      return out;
    }
    expected_end = t.end;
  }
  const unsigned __int128 want = static_cast<unsigned __int128>(8) + n + expected_end;
  if (want != file.size()) {
    out.problems.push_back("file size mismatch: expected " + std::to_string(static_cast<std::uint64_t>(want)) +
                           ", got " + std::to_string(file.size()));
  }
  return out;
}

bool shard_name_is_contained(std::string_view name) {
  if (name.empty() || name.front() == '/') return false;
  if (name.find('\\') != std::string_view::npos || name.find('\0') != std::string_view::npos) return false;
  if (name.size() >= 2 && name[1] == ':') return false;  // drive letter
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t end = name.find('/', start);
    if (end == std::string_view::npos) end = name.size();
    const std::string_view seg = name.substr(start, end - start);
    if (seg.empty() || seg == "." || seg == "..") return false;
    start = end + 1;
  }
  return true;
}

void parse_index(const std::string& text, Index& out) {
  json::Cursor c(text);
  if (c.peek() != json::Type::Object) {
    if (c.ok() && c.skip_value() && c.finish()) {
      out.problems.push_back("weight_map missing or not an object");
    } else {
      out.problems.push_back(c.error());
    }
    return;
  }
  c.begin_object();
  std::size_t members = 0;
  std::string_view key;
  bool found = false, is_object = false, empty = true;
  std::vector<std::string> problems;
  std::unordered_map<std::string_view, std::size_t> slot;
  std::unordered_set<std::string_view> escaping;
  while (c.next_member(members, key)) {
    if (key != "weight_map") {
      c.skip_value();
      continue;
    }
    found = true;
    if (c.peek() != json::Type::Object) {
      c.skip_value();
      continue;
    }
    is_object = true;
    c.begin_object();
    std::size_t entries = 0;
    std::string_view tensor, shard;
    std::size_t last = SIZE_MAX;  // consecutive entries usually name the same shard
    while (c.next_member(entries, tensor, &out.arena)) {
      empty = false;
      if (c.peek() != json::Type::String) {
        c.skip_value();
        problems.push_back("weight_map entry for tensor " + std::string(tensor) + " is not a file name");
        continue;
      }
      c.read_string(shard, &out.arena);
      if (last != SIZE_MAX && out.shards[last].name == shard) {
        out.shards[last].tensors.push_back(tensor);
        continue;
      }
      auto it = slot.find(shard);
      if (it == slot.end()) {
        if (!shard_name_is_contained(shard)) {
          if (escaping.insert(shard).second) {
            problems.push_back("shard path escapes model directory: " + std::string(shard));
          }
          continue;
        }
        it = slot.emplace(shard, out.shards.size()).first;
        out.shards.push_back({std::string(shard), {}});
      }
      last = it->second;
      out.shards[last].tensors.push_back(tensor);
    }
  }
  if (!c.finish()) {
    out.problems.push_back(c.error());
    out.shards.clear();
    return;
  }
  if (!found || !is_object) {
    out.problems.push_back("weight_map missing or not an object");
  } else if (empty) {
    out.problems.push_back("weight_map is empty");
  }
  for (auto& p : problems) out.problems.push_back(std::move(p));
}

}  // namespace llmlb::safetensors
