// safetensors file and sharded-index validation, naming each failure precisely.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>
#include <vector>

namespace llmlb::safetensors {

inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

struct FileCheck {
  std::vector<std::string> problems;       // phrased without the file name
  std::unordered_set<std::string> tensors;  // names found in the header
  std::uint64_t file_size = 0;
};

// Validate one .safetensors file: header length, JSON, dtypes/shapes, contiguous
// data_offsets and total size.
FileCheck check_file(const std::string& path);

struct Shard {
  std::string name;                  // as written in weight_map
  std::vector<std::string> tensors;  // tensors weight_map places in this shard
};

struct Index {
  std::vector<std::string> problems;  // phrased without the index file name
  std::vector<Shard> shards;          // in first-mention order; escaping names excluded
};

// Parse a model.safetensors.index.json text and group weight_map by shard.
Index parse_index(const std::string& text);

// True when a relative shard name stays inside the model directory (no absolute path,
// no ".." segment, no backslash or NUL).
bool shard_name_is_contained(const std::string& name);

}  // namespace llmlb::safetensors
