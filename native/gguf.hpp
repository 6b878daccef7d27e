// GGUF header reader and validator (versions 2 and 3).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace llmlb::gguf {

struct Info {
  bool header_ok = false;  // magic, version and metadata were read
  std::uint32_t version = 0;
  std::uint64_t tensor_count = 0;
  std::uint64_t kv_count = 0;
  std::uint32_t alignment = 32;
  std::string architecture;
  std::string name;
  std::optional<std::uint32_t> file_type;
  std::string quantization;  // name of file_type, e.g. "Q4_K_M"; empty when unknown
  std::optional<std::uint32_t> split_no;
  std::optional<std::uint32_t> split_count;
  std::optional<std::int64_t> split_tensors_count;
  std::optional<std::uint64_t> context_length;
  std::uint64_t data_offset = 0;  // start of the tensor data section
  std::uint64_t file_size = 0;
  std::vector<std::string> problems;  // empty: the file is a valid GGUF
};

// Read and check one GGUF file; never throws. Problems are phrased without the file name.
Info read(const std::string& path);

// Name of a llama.cpp `general.file_type` (llama_ftype) value, e.g. 15 -> "Q4_K_M"; "" if unknown.
std::string file_type_name(std::uint32_t file_type);

// The quantisation named in a file name (e.g. "model-q4_k_m.gguf" -> "Q4_K_M"); "" if none.
std::string quantization_from_file_name(const std::string& file_name);

}  // namespace llmlb::gguf
