#include "store.hpp"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>

#include "fs_util.hpp"
#include "gguf.hpp"
#include "json.hpp"
#include "model_id.hpp"
#include "safetensors.hpp"

namespace llmlb {
namespace {

constexpr std::uint64_t kMaxJsonFileBytes = 512ull << 20;
constexpr const char* kMetalFile = "model.metal.bin";

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// One selectable GGUF model in a directory: a single file or a complete-or-not split set.
struct Variant {
  std::string label;                      // file name, or split prefix + ".gguf"
  bool split = false;
  std::uint32_t count = 1;                // splits named by the file names
  std::map<std::uint32_t, std::string> parts;  // split number (1-based) -> file name
};

// What a model directory holds at its top level.
struct DirScan {
  bool exists = false;
  bool is_dir = false;
  std::vector<Variant> variants;       // GGUF models (mmproj files excluded)
  std::vector<std::string> mmproj;     // vision projectors (*.gguf starting with "mmproj")
  std::vector<std::string> safetensors;
  std::vector<std::string> indexes;    // *.safetensors.index.json
  std::vector<std::string> files;      // every regular, non-hidden file
  bool has_config = false;
  bool has_tokenizer = false;
  bool has_metal = false;
  bool has_subdirs = false;

  bool has_safetensors() const { return !safetensors.empty() || !indexes.empty(); }
  bool is_model_dir() const {
    return !variants.empty() || !mmproj.empty() || has_safetensors() || has_config || has_tokenizer || has_metal;
  }
};

std::string split_file_name(const std::string& prefix, std::uint32_t no, std::uint32_t count) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "-%05u-of-%05u.gguf", no, count);
  return prefix + buf;
}

DirScan scan_dir(const std::string& dir) {
  DirScan scan;
  const auto st = fs::stat_path(dir);
  scan.exists = st.kind != fs::Kind::Missing;
  scan.is_dir = st.kind == fs::Kind::Dir;
  if (!scan.is_dir) return scan;
  std::vector<fs::Entry> entries;
  fs::list_dir(dir, entries);
  std::sort(entries.begin(), entries.end(), [](const fs::Entry& a, const fs::Entry& b) { return a.name < b.name; });
  std::map<std::string, std::size_t> split_slots;  // prefix + count -> variant index
  for (const auto& e : entries) {
    if (e.name[0] == '.') continue;
    if (e.kind == fs::Kind::Dir) {
      scan.has_subdirs = true;
      continue;
    }
    if (e.kind != fs::Kind::File) continue;
    scan.files.push_back(e.name);
    const std::string l = lower(e.name);
    if (ends_with(l, ".gguf")) {
      if (l.rfind("mmproj", 0) == 0) {
        scan.mmproj.push_back(e.name);
        continue;
      }
      std::string prefix;
      std::uint32_t no = 0, count = 0;
      if (parse_split_name(e.name, prefix, no, count)) {
        const std::string key = prefix + "\n" + std::to_string(count);
        auto it = split_slots.find(key);
        if (it == split_slots.end()) {
          it = split_slots.emplace(key, scan.variants.size()).first;
          Variant v;
          v.label = prefix + ".gguf";
          v.split = true;
          v.count = count;
          scan.variants.push_back(v);
        }
        scan.variants[it->second].parts[no] = e.name;
      } else {
        Variant v;
        v.label = e.name;
        v.parts[1] = e.name;
        scan.variants.push_back(v);
      }
    } else if (ends_with(l, ".safetensors.index.json")) {
      scan.indexes.push_back(e.name);
    } else if (ends_with(l, ".safetensors")) {
      scan.safetensors.push_back(e.name);
    } else if (e.name == "config.json") {
      scan.has_config = true;
    } else if (e.name == "tokenizer.json") {
      scan.has_tokenizer = true;
    } else if (e.name == kMetalFile) {
      scan.has_metal = true;
    }
  }
  return scan;
}

std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::string variant_first_file(const Variant& v) {
  return v.parts.empty() ? v.label : v.parts.begin()->second;
}

// Quantisation label of a variant: from its file name, else its header.
std::string variant_quant(const std::string& dir, const Variant& v) {
  std::string q = gguf::quantization_from_file_name(v.label);
  if (q.empty()) q = gguf::read(fs::join(dir, variant_first_file(v))).quantization;
  return q;
}

std::vector<std::size_t> match_quant(const std::string& dir, const DirScan& scan, const std::string& quant) {
  std::vector<std::size_t> matches;
  for (std::size_t i = 0; i < scan.variants.size(); ++i) {
    if (quant_matches_file_name(quant, scan.variants[i].label)) matches.push_back(i);
  }
  if (!matches.empty()) return matches;
  for (std::size_t i = 0; i < scan.variants.size(); ++i) {
    const auto info = gguf::read(fs::join(dir, variant_first_file(scan.variants[i])));
    if (!info.quantization.empty() && lower(info.quantization) == lower(quant)) matches.push_back(i);
  }
  return matches;
}

std::uint64_t total_size(const std::vector<std::string>& paths) {
  std::uint64_t sum = 0;
  for (const auto& p : paths) sum += fs::stat_path(p).size;
  return sum;
}

Inspection inspect_gguf_variant(const std::string& dir, const DirScan& scan, const Variant& v,
                                const std::string& id) {
  Inspection out;
  std::vector<std::string> files;
  gguf::Info first;
  std::uint64_t tensors = 0;
  bool complete = true;
  for (std::uint32_t k = 1; k <= v.count; ++k) {
    const auto it = v.parts.find(k);
    if (it == v.parts.end()) {
      const std::string prefix = v.label.substr(0, v.label.size() - 5);
      out.problems.push_back("missing split " + std::to_string(k) + " of " + std::to_string(v.count) + ": " +
                             split_file_name(prefix, k, v.count));
      complete = false;
      continue;
    }
    const std::string& name = it->second;
    const std::string path = fs::join(dir, name);
    gguf::Info info = gguf::read(path);
    for (const auto& p : info.problems) out.problems.push_back(name + ": " + p);
    if (v.split && info.header_ok) {
      if (!info.split_count) {
        out.problems.push_back(name + ": split count mismatch: header has no split.count, file name says " +
                               std::to_string(v.count));
      } else if (*info.split_count != v.count) {
        out.problems.push_back(name + ": split count mismatch: header says split.count=" +
                               std::to_string(*info.split_count) + ", file name says " + std::to_string(v.count));
      }
      if (info.split_no && *info.split_no != k - 1) {
        out.problems.push_back(name + ": split number mismatch: header says split.no=" +
                               std::to_string(*info.split_no) + ", file name says split " + std::to_string(k) +
                               " (split.no " + std::to_string(k - 1) + ")");
      }
    } else if (!v.split && info.header_ok && info.split_count && *info.split_count > 1) {
      out.problems.push_back(name + ": header says split.count=" + std::to_string(*info.split_count) +
                             " but the file name has no -0000k-of-0000N suffix");
    }
    tensors += info.tensor_count;
    if (k == 1) first = std::move(info);
    files.push_back(path);
  }
  if (v.split && complete && first.split_tensors_count && out.problems.empty() &&
      static_cast<std::uint64_t>(*first.split_tensors_count) != tensors) {
    out.problems.push_back(variant_first_file(v) + ": split.tensors.count says " +
                           std::to_string(*first.split_tensors_count) + " but the splits hold " +
                           std::to_string(tensors) + " tensors");
  }
  if (!out.problems.empty()) return out;
  for (const auto& m : scan.mmproj) files.push_back(fs::join(dir, m));
  if (scan.has_metal) files.push_back(fs::join(dir, kMetalFile));
  ModelDescriptor d;
  d.id = id;
  d.format = "gguf";
  d.primary_path = files.front();
  std::string quant = first.quantization;
  if (quant.empty()) quant = gguf::quantization_from_file_name(v.label);
  if (!quant.empty()) d.quantization = quant;
  if (!first.architecture.empty()) d.architecture = first.architecture;
  d.context_length = first.context_length;
  d.size_bytes = total_size(files);
  d.files = std::move(files);
  out.descriptor = std::move(d);
  return out;
}

void check_json_file(const std::string& dir, const std::string& name, std::vector<std::string>& problems) {
  std::string text, error;
  const std::string path = fs::join(dir, name);
  if (fs::stat_path(path).kind != fs::Kind::File) {
    problems.push_back(name + " missing");
    return;
  }
  if (!fs::read_file(path, text, kMaxJsonFileBytes, error) || !json::check(text, error)) {
    problems.push_back(name + ": " + error);
  }
}

Inspection inspect_safetensors(const std::string& dir, const DirScan& scan, const std::string& id,
                               std::size_t threads) {
  Inspection out;
  check_json_file(dir, "config.json", out.problems);
  check_json_file(dir, "tokenizer.json", out.problems);
  std::vector<std::string> files;
  std::string primary;
  if (!scan.indexes.empty()) {
    std::string index_name = "model.safetensors.index.json";
    if (std::find(scan.indexes.begin(), scan.indexes.end(), index_name) == scan.indexes.end()) {
      if (scan.indexes.size() > 1) {
        out.problems.push_back("several safetensors index files and none is model.safetensors.index.json: " +
                               join_names(scan.indexes));
        return out;
      }
      index_name = scan.indexes.front();
    }
    primary = fs::join(dir, index_name);
    std::string text, error;
    if (!fs::read_file(primary, text, kMaxJsonFileBytes, error)) {
      out.problems.push_back(index_name + ": " + error);
      return out;
    }
    safetensors::Index index;
    safetensors::parse_index(text, index);
    for (const auto& p : index.problems) out.problems.push_back(index_name + ": " + p);
    std::vector<std::vector<std::string>> shard_problems(index.shards.size());
    fs::parallel_for(index.shards.size(), threads, [&](std::size_t i) {
      const auto& shard = index.shards[i];
      auto& problems = shard_problems[i];
      const safetensors::FileCheck check = safetensors::check_file(fs::join(dir, shard.name), shard.tensors);
      if (check.not_found) {
        problems.push_back("missing shard " + shard.name + " (named in " + index_name + ")");
        return;
      }
      for (const auto& p : check.problems) problems.push_back(shard.name + ": " + p);
      if (!check.problems.empty()) return;
      const std::size_t shown = std::min<std::size_t>(check.missing.size(), 5);
      for (std::size_t k = 0; k < shown; ++k) {
        problems.push_back("tensor " + check.missing[k] + " named in weight_map missing from shard " + shard.name);
      }
      if (check.missing.size() > shown) {
        problems.push_back(std::to_string(check.missing.size() - shown) +
                           " more tensors named in weight_map missing from shard " + shard.name);
      }
    });
    for (auto& ps : shard_problems) {
      for (auto& p : ps) out.problems.push_back(std::move(p));
    }
    for (const auto& shard : index.shards) files.push_back(fs::join(dir, shard.name));
  } else {
    std::string name = "model.safetensors";
    if (std::find(scan.safetensors.begin(), scan.safetensors.end(), name) == scan.safetensors.end()) {
      if (scan.safetensors.size() > 1) {
        out.problems.push_back("several .safetensors files and no model.safetensors.index.json: " +
                               join_names(scan.safetensors));
        return out;
      }
      name = scan.safetensors.front();
    }
    primary = fs::join(dir, name);
    for (const auto& p : safetensors::check_file(primary).problems) out.problems.push_back(name + ": " + p);
  }
  if (!out.problems.empty()) return out;
  // Every top-level file is part of the model (configs, tokenizer, index, shards), GGUF aside.
  std::set<std::string> seen(files.begin(), files.end());
  for (const auto& f : scan.files) {
    if (ends_with(lower(f), ".gguf")) continue;
    const std::string path = fs::join(dir, f);
    if (seen.insert(path).second) files.push_back(path);
  }
  std::sort(files.begin(), files.end());
  ModelDescriptor d;
  d.id = id;
  d.format = "safetensors";
  d.primary_path = primary;
  d.size_bytes = total_size(files);
  d.files = std::move(files);
  // Architecture from config.json "architectures"[0] or "model_type".
  std::string text, error;
  json::Value config;
  if (fs::read_file(fs::join(dir, "config.json"), text, kMaxJsonFileBytes, error) &&
      json::parse(text, config, error) && config.type == json::Type::Object) {
    const json::Value* arch = config.find("model_type");
    if (arch && arch->type == json::Type::String) d.architecture = arch->string;
    const json::Value* ctx = config.find("max_position_embeddings");
    if (ctx && ctx->is_uint) d.context_length = ctx->uint_value;
  }
  out.descriptor = std::move(d);
  return out;
}

Inspection inspect_metal(const std::string& dir, const std::string& id) {
  Inspection out;
  const std::string path = fs::join(dir, kMetalFile);
  const auto st = fs::stat_path(path);
  if (st.size == 0) {
    out.problems.push_back(std::string(kMetalFile) + " is empty");
    return out;
  }
  ModelDescriptor d;
  d.id = id;
  d.format = "metal";
  d.primary_path = path;
  d.files = {path};
  d.size_bytes = st.size;
  out.descriptor = std::move(d);
  return out;
}

std::string describe_variants(const std::string& dir, const DirScan& scan) {
  std::vector<std::string> names;
  for (const auto& v : scan.variants) {
    const std::string q = gguf::quantization_from_file_name(v.label);
    (void)dir;
    names.push_back(v.label + (q.empty() ? "" : " (:" + lower(q) + ")"));
  }
  return join_names(names);
}

Inspection inspect_scanned(const std::string& dir, const DirScan& scan, const std::string& id,
                           const std::optional<std::string>& quant, std::size_t threads) {
  Inspection out;
  if (!scan.exists) {
    out.problems.push_back("model directory not found: " + dir);
    return out;
  }
  if (!scan.is_dir) {
    out.problems.push_back("not a directory: " + dir);
    return out;
  }
  if (quant) {
    if (scan.variants.empty()) {
      out.problems.push_back("quantization ':" + *quant + "' selects a GGUF file but the model has none");
      return out;
    }
    const auto matches = match_quant(dir, scan, *quant);
    if (matches.empty()) {
      out.problems.push_back("no GGUF file matches quantization '" + *quant + "' (found: " +
                             describe_variants(dir, scan) + ")");
      return out;
    }
    if (matches.size() > 1) {
      std::vector<std::string> names;
      for (auto i : matches) names.push_back(scan.variants[i].label);
      out.problems.push_back("several GGUF files match quantization '" + *quant + "': " + join_names(names));
      return out;
    }
    return inspect_gguf_variant(dir, scan, scan.variants[matches.front()], id);
  }
  if (scan.variants.size() > 1) {
    out.problems.push_back("several GGUF files and no ':QUANT' suffix to choose among them: " +
                           describe_variants(dir, scan));
    return out;
  }
  if (scan.variants.size() == 1 && scan.has_safetensors()) {
    out.problems.push_back("both GGUF (" + scan.variants.front().label +
                           ") and safetensors files present and nothing to choose by; add ':QUANT' to "
                           "select the GGUF");
    return out;
  }
  if (scan.variants.size() == 1) return inspect_gguf_variant(dir, scan, scan.variants.front(), id);
  if (scan.has_safetensors()) return inspect_safetensors(dir, scan, id, threads);
  if (scan.has_metal) return inspect_metal(dir, id);
  if (!scan.mmproj.empty()) {
    out.problems.push_back("only multimodal projector GGUF files found: " + join_names(scan.mmproj));
    return out;
  }
  out.problems.push_back("no model files found (expected .gguf, .safetensors or " + std::string(kMetalFile) + ")");
  return out;
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) return "";
  return buf;
}

bool is_within(const std::string& child, const std::string& parent) {
  return child.size() > parent.size() && child.compare(0, parent.size(), parent) == 0 &&
         (parent.back() == '/' || child[parent.size()] == '/');
}

void remove_empty_parents(const std::string& root, std::string dir) {
  while (true) {
    const auto slash = dir.find_last_of('/');
    if (slash == std::string::npos) return;
    dir = dir.substr(0, slash);
    if (dir.size() <= root.size() || !is_within(dir, root)) return;
    if (::rmdir(dir.c_str()) != 0) return;  // not empty (or gone): stop
  }
}

std::string strip_trailing_slashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

// Ids a model directory offers: its id when it validates as it is, else one "id:quant" per
// selectable GGUF variant; empty when it holds no valid model.
std::vector<std::string> offered_ids(const std::string& dir, const DirScan& scan, const std::string& id) {
  if (inspect_scanned(dir, scan, id, std::nullopt, 1).descriptor) return {id};
  std::vector<std::string> ids;
  // Several GGUF variants (or GGUF beside safetensors): each selectable variant.
  if (scan.variants.empty() || (scan.variants.size() == 1 && !scan.has_safetensors())) return ids;
  std::vector<std::string> quants;
  for (const auto& v : scan.variants) quants.push_back(lower(variant_quant(dir, v)));
  for (const auto& q : quants) {
    if (q.empty() || std::count(quants.begin(), quants.end(), q) != 1) continue;
    const std::string variant_id = id + ":" + q;
    if (inspect_scanned(dir, scan, variant_id, q, 1).descriptor) ids.push_back(variant_id);
  }
  return ids;
}

// Whether `dir` holds a valid model by itself (its subdirectories aside). A directory with
// model files that is no model alone (shards in a "weights/" folder) is part of its parent.
bool is_valid_model(const std::string& dir, const std::string& id) {
  const DirScan scan = scan_dir(dir);
  return scan.is_model_dir() && !offered_ids(dir, scan, id).empty();
}

// Whether `rel` (a path below the root) is spelled exactly as a model id: only such
// directories can hold models.
bool addressable(const std::string& rel) {
  try {
    return normalize_model_id(rel) == rel;
  } catch (const InvalidModelIdError&) {
    return false;
  }
}

// The id of the first valid model strictly below `dir` (whose id is `rel`), if any.
// The walk is bounded: each level lengthens `rel`, and ids are at most 256 characters.
std::optional<std::string> model_below(const std::string& dir, const std::string& rel) {
  std::vector<fs::Entry> entries;
  if (!fs::list_dir(dir, entries)) return std::nullopt;
  std::sort(entries.begin(), entries.end(), [](const fs::Entry& a, const fs::Entry& b) { return a.name < b.name; });
  for (const auto& e : entries) {
    if (e.kind != fs::Kind::Dir || e.name[0] == '.') continue;
    const std::string child_rel = rel + "/" + e.name;
    if (!addressable(child_rel)) continue;
    const std::string child = fs::join(dir, e.name);
    if (is_valid_model(child, child_rel)) return child_rel;
    if (auto deeper = model_below(child, child_rel)) return deeper;
  }
  return std::nullopt;
}

// Delete what `dir` (the model `rel`) holds, keeping every subdirectory that is or holds
// another model; then `dir` itself when left empty. True when anything was removed.
bool remove_model_files(const std::string& dir, const std::string& rel) {
  std::vector<fs::Entry> entries;
  fs::list_dir(dir, entries);
  bool removed = false;
  for (const auto& e : entries) {
    const std::string path = fs::join(dir, e.name);
    if (e.kind == fs::Kind::Dir && e.name[0] != '.') {
      const std::string child_rel = rel + "/" + e.name;
      if (addressable(child_rel) && (is_valid_model(path, child_rel) || model_below(path, child_rel))) continue;
    }
    std::error_code ec;
    removed = std::filesystem::remove_all(path, ec) > 0 || removed;
    if (ec) throw std::runtime_error("cannot delete " + path + ": " + ec.message());
  }
  return (::rmdir(dir.c_str()) == 0) || removed;
}

}  // namespace

ModelStore::ModelStore(std::string root, std::size_t threads)
    : root_(strip_trailing_slashes(std::move(root))), threads_(threads) {
  if (root_.empty()) throw std::invalid_argument("models_dir must not be empty");
}

std::size_t ModelStore::threads() const { return threads_ ? threads_ : fs::cpu_threads(); }

std::string ModelStore::model_dir(const std::string& model_id) const {
  return fs::join(root_, split_quant(model_id).first);
}

std::optional<std::string> ModelStore::conflicting_model(const std::string& model_id) const {
  const std::string base = split_quant(model_id).first;
  for (std::size_t slash = base.find('/'); slash != std::string::npos; slash = base.find('/', slash + 1)) {
    const std::string outer = base.substr(0, slash);
    if (is_valid_model(fs::join(root_, outer), outer)) return outer;
  }
  return model_below(fs::join(root_, base), base);
}

Inspection ModelStore::inspect(const std::string& model_id) const {
  const std::string id = normalize_model_id(model_id);
  const auto [base, quant] = split_quant(id);
  const std::string dir = fs::join(root_, base);
  DirScan scan = scan_dir(dir);
  if (scan.is_dir) {
    if (const auto other = conflicting_model(base)) {
      Inspection out;
      const bool inside = other->size() < base.size();
      out.problems.push_back("model id conflict: " + dir + (inside ? " lies inside" : " holds") + " model '" +
                             *other + "'; one model's directory may not contain another's");
      return out;
    }
  }
  return inspect_scanned(dir, scan, id, quant, threads());
}

std::string ModelStore::detect_format(const std::string& model_id) const {
  const auto [base, quant] = split_quant(model_id);
  const DirScan scan = scan_dir(fs::join(root_, base));
  if (!scan.variants.empty() && (quant || !scan.has_safetensors())) return "gguf";
  if (quant) return "unknown";
  if (scan.variants.empty() && scan.has_safetensors()) return "safetensors";
  if (scan.variants.empty() && scan.has_metal) return "metal";
  return "unknown";
}

std::vector<std::string> ModelStore::list_available() const {
  struct Candidate {
    std::string dir;
    std::string id;
    DirScan scan;
    std::vector<std::size_t> enclosing;  // candidates whose directories contain this one
  };
  std::vector<Candidate> candidates;
  std::set<std::pair<dev_t, ino_t>> visited;
  // Depth-first walk, into model directories too: one may hold another model (a conflict).
  std::vector<std::size_t> enclosing;
  std::function<void(const std::string&, const std::string&, int)> walk = [&](const std::string& dir,
                                                                              const std::string& rel, int depth) {
    struct stat st;
    if (depth > 128 || ::stat(dir.c_str(), &st) != 0 || !visited.insert({st.st_dev, st.st_ino}).second) return;
    bool is_candidate = false;
    if (!rel.empty()) {
      DirScan scan = scan_dir(dir);
      const bool has_subdirs = scan.has_subdirs;
      if (scan.is_model_dir()) {
        is_candidate = true;
        candidates.push_back({dir, rel, std::move(scan), enclosing});
      }
      if (!has_subdirs) return;
    }
    if (is_candidate) enclosing.push_back(candidates.size() - 1);
    std::vector<fs::Entry> entries;
    if (fs::list_dir(dir, entries)) {
      for (const auto& e : entries) {
        if (e.kind != fs::Kind::Dir || e.name[0] == '.') continue;
        const std::string child_rel = rel.empty() ? e.name : rel + "/" + e.name;
        if (addressable(child_rel)) walk(fs::join(dir, e.name), child_rel, depth + 1);
      }
    }
    if (is_candidate) enclosing.pop_back();
  };
  walk(root_, "", 0);

  std::vector<std::vector<std::string>> found(candidates.size());
  fs::parallel_for(candidates.size(), threads(), [&](std::size_t i) {
    found[i] = offered_ids(candidates[i].dir, candidates[i].scan, candidates[i].id);
  });
  // A valid model inside another valid model: neither can be served or deleted on its own.
  std::vector<bool> conflicted(candidates.size(), false);
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    if (found[i].empty()) continue;
    for (auto outer : candidates[i].enclosing) {
      if (!found[outer].empty()) conflicted[i] = conflicted[outer] = true;
    }
  }
  std::vector<std::string> ids;
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    if (conflicted[i]) continue;
    for (auto& id : found[i]) ids.push_back(std::move(id));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool ModelStore::delete_model(const std::string& model_id) const {
  const auto [base, quant] = split_quant(model_id);
  const std::string dir = fs::join(root_, base);
  struct stat lst;
  if (::lstat(dir.c_str(), &lst) != 0) return false;
  const std::string real_root = real_path(root_);
  // The directory that holds the model (its parent, when the model dir is a symlink).
  const std::string parent = dir.substr(0, dir.find_last_of('/'));
  const std::string real_parent = real_path(parent);
  if (real_root.empty() || real_parent.empty() ||
      (real_parent != real_root && !is_within(real_parent, real_root))) {
    throw std::runtime_error("refusing to delete " + dir + ": it resolves outside the models directory " + root_);
  }
  bool removed = false;
  if (S_ISLNK(lst.st_mode)) {
    if (quant) return false;  // never delete inside a linked directory's target
    removed = ::unlink(dir.c_str()) == 0;
  } else if (!S_ISDIR(lst.st_mode)) {
    return false;
  } else if (quant) {
    const DirScan scan = scan_dir(dir);
    for (auto i : match_quant(dir, scan, *quant)) {
      for (const auto& [k, name] : scan.variants[i].parts) {
        removed = (::unlink(fs::join(dir, name).c_str()) == 0) || removed;
      }
    }
    if (removed) ::rmdir(dir.c_str());  // only succeeds when nothing else is left
  } else {
    const DirScan scan = scan_dir(dir);
    if (!scan.is_model_dir() && scan.has_subdirs) return false;  // a namespace of other models
    removed = remove_model_files(dir, base);  // never another model nested inside
  }
  if (removed) remove_empty_parents(root_, dir);
  return removed;
}

std::uint64_t ModelStore::prefetch(const std::string& model_id) const {
  const Inspection insp = inspect(model_id);
  if (!insp.descriptor) return 0;
  return prefetch_files(insp.descriptor->files);
}

std::vector<std::string> validate_file(const std::string& path) {
  const std::string name = fs::base_name(path);
  const std::string l = lower(name);
  std::vector<std::string> problems;
  auto add = [&](const std::vector<std::string>& ps) {
    for (const auto& p : ps) problems.push_back(name + ": " + p);
  };
  if (fs::stat_path(path).kind != fs::Kind::File) {
    problems.push_back(name + ": not found or not a regular file");
    return problems;
  }
  if (ends_with(l, ".gguf")) {
    add(gguf::read(path).problems);
  } else if (ends_with(l, ".safetensors")) {
    add(safetensors::check_file(path).problems);
  } else if (ends_with(l, ".json")) {
    std::string text, error;
    if (!fs::read_file(path, text, kMaxJsonFileBytes, error) || !json::check(text, error)) {
      problems.push_back(name + ": " + error);
    } else if (ends_with(l, ".safetensors.index.json")) {
      safetensors::Index index;
      safetensors::parse_index(text, index);
      add(index.problems);
    }
  } else {
    fs::File f;
    std::string error;
    char magic[4] = {};
    if (f.open(path, error) && f.size() >= 4 && f.read_at(0, magic, 4) && std::string(magic, 4) == "GGUF") {
      add(gguf::read(path).problems);
    } else if (name != kMetalFile) {
      problems.push_back(name + ": unsupported file type (expected .gguf, .safetensors or .json)");
    }
  }
  return problems;
}

bool parse_split_name(const std::string& name, std::string& prefix, std::uint32_t& no, std::uint32_t& count) {
  const std::string l = lower(name);
  if (!ends_with(l, ".gguf")) return false;
  const std::string stem = name.substr(0, name.size() - 5);
  const auto of = stem.rfind("-of-");
  if (of == std::string::npos) return false;
  const std::string count_s = stem.substr(of + 4);
  const auto dash = stem.rfind('-', of - 1);
  if (of == 0 || dash == std::string::npos) return false;
  const std::string no_s = stem.substr(dash + 1, of - dash - 1);
  if (!all_digits(no_s) || !all_digits(count_s) || no_s.size() > 9 || count_s.size() > 9) return false;
  no = static_cast<std::uint32_t>(std::stoul(no_s));
  count = static_cast<std::uint32_t>(std::stoul(count_s));
  if (no == 0 || count == 0 || no > count) return false;
  prefix = stem.substr(0, dash);
  return true;
}

std::uint64_t prefetch_files(const std::vector<std::string>& paths) {
  struct Range {
    std::size_t file;
    std::uint64_t offset;
    std::uint64_t length;
  };
  constexpr std::uint64_t kChunk = 64ull << 20;
  std::vector<Range> ranges;
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < paths.size(); ++i) {
    const auto st = fs::stat_path(paths[i]);
    if (st.kind != fs::Kind::File) continue;
    total += st.size;
    for (std::uint64_t off = 0; off < st.size; off += kChunk) {
      ranges.push_back({i, off, std::min(kChunk, st.size - off)});
    }
  }
  fs::parallel_for(ranges.size(), fs::io_threads(), [&](std::size_t i) {
    const Range& r = ranges[i];
    const int fd = ::open(paths[r.file].c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
#if defined(__linux__)
    ::posix_fadvise(fd, static_cast<off_t>(r.offset), static_cast<off_t>(r.length), POSIX_FADV_WILLNEED);
#elif defined(__APPLE__)
    struct radvisory adv;
    adv.ra_offset = static_cast<off_t>(r.offset);
    adv.ra_count = static_cast<int>(r.length);
    ::fcntl(fd, F_RDADVISE, &adv);
#endif
    ::close(fd);
  });
  return total;
}

}  // namespace llmlb
