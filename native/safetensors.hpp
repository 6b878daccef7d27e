// safetensors file and sharded-index validation, naming each failure precisely.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

namespace llmlb::safetensors {

inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

struct FileCheck {
  bool not_found = false;             // the file does not exist (or is not a regular file)
  std::vector<std::string> problems;  // phrased without the file name
  std::vector<std::string> missing;   // expected tensors absent from the header
  std::uint64_t file_size = 0;
};

// Validate one .safetensors file: header length, JSON, dtypes/shapes, contiguous
// data_offsets and total size; and report which of `expected` tensors it lacks.
FileCheck check_file(const std::string& path, const std::vector<std::string_view>& expected = {});

struct Shard {
  std::string name;                       // as written in weight_map
  std::vector<std::string_view> tensors;  // tensors weight_map places in this shard
};

struct Index {
  std::vector<std::string> problems;  // phrased without the index file name
  std::vector<Shard> shards;          // in first-mention order; escaping names excluded
  std::deque<std::string> arena;      // tensor names that held JSON escapes
};

// Parse a model.safetensors.index.json text and group weight_map by shard. The tensor
// names in `out` are views into `text` (or `out.arena`): keep `text` alive while using them.
void parse_index(const std::string& text, Index& out);

// True when a relative file name stays inside the model directory (not empty, no absolute
// path or drive letter, no empty, "." or ".." segment, no backslash or NUL). The store's one
// rule for file names: shard names here, manifest file names through the binding
// (llmlb.model_storage.is_safe_relative_path).
bool shard_name_is_contained(std::string_view name);

}  // namespace llmlb::safetensors
