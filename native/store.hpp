// The node's on-disk model store: <root>/<model-id>/ holding a model's original files.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace llmlb {

struct ModelDescriptor {
  std::string id;            // normalised, with ":quant" when one was given
  std::string format;        // "gguf" | "safetensors" | "metal"
  std::string primary_path;  // the .gguf, first split, index or single .safetensors
  std::vector<std::string> files;
  std::optional<std::string> quantization;
  std::uint64_t size_bytes = 0;
  std::optional<std::string> architecture;
  std::optional<std::uint64_t> context_length;
};

struct Inspection {
  std::optional<ModelDescriptor> descriptor;  // set only when problems is empty
  std::vector<std::string> problems;
};

class ModelStore {
 public:
  // `threads`: workers for validating shards and listing models (0: chosen from the CPU count).
  explicit ModelStore(std::string root, std::size_t threads = 0);

  const std::string& root() const { return root_; }
  std::size_t threads() const;

  // <root>/<base id> (lexically; the id is validated so it cannot leave the root).
  std::string model_dir(const std::string& model_id) const;

  // Sorted ids of complete, valid models. A directory holding several GGUF variants
  // contributes one "id:quant" entry per variant. Model directories nested in one another
  // are listed neither of them.
  std::vector<std::string> list_available() const;

  // An existing valid model whose directory contains the directory of `model_id` or lies
  // inside it (e.g. "nest" for "nest/inner" and the other way round), or nullopt.
  std::optional<std::string> conflicting_model(const std::string& model_id) const;

  // Full check of one model: its descriptor when valid, else the problems found. A model
  // directory that contains another model's, or lies inside one, is a problem.
  Inspection inspect(const std::string& model_id) const;

  // "gguf" | "safetensors" | "metal" | "unknown" from the files present.
  std::string detect_format(const std::string& model_id) const;

  // Remove a model (or, with ":quant", that GGUF variant); removes parents left empty.
  // Subdirectories that are or hold another model are kept.
  bool delete_model(const std::string& model_id) const;

  // Schedule page-cache readahead for every file of the model; returns bytes scheduled.
  std::uint64_t prefetch(const std::string& model_id) const;

 private:
  std::string root_;
  std::size_t threads_;
};

// Check one file alone by its kind (.gguf, .safetensors, .json); problems name the file.
std::vector<std::string> validate_file(const std::string& path);

// Parse "<prefix>-00001-of-00003.gguf" (the split-GGUF naming rule of router and node alike);
// false when `name` is not a split name.
bool parse_split_name(const std::string& name, std::string& prefix, std::uint32_t& no, std::uint32_t& count);

// Schedule page-cache readahead for `paths`; returns bytes scheduled.
std::uint64_t prefetch_files(const std::vector<std::string>& paths);

}  // namespace llmlb
