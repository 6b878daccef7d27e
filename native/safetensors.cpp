#include "safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "fs_util.hpp"
#include "json.hpp"

namespace llmlb::safetensors {
namespace {

// dtype -> size in bits.
int dtype_bits(const std::string& dtype) {
  static const std::unordered_map<std::string, int> bits = {
      {"BOOL", 8},     {"U8", 8},       {"I8", 8},       {"F8_E5M2", 8}, {"F8_E4M3", 8},
      {"F8_E8M0", 8},  {"I16", 16},     {"U16", 16},     {"F16", 16},    {"BF16", 16},
      {"I32", 32},     {"U32", 32},     {"F32", 32},     {"F64", 64},    {"I64", 64},
      {"U64", 64},     {"C64", 64},     {"F4", 4},       {"F6_E2M3", 6}, {"F6_E3M2", 6},
  };
  const auto it = bits.find(dtype);
  return it == bits.end() ? 0 : it->second;
}

struct Tensor {
  const std::string* name;
  std::uint64_t begin;
  std::uint64_t end;
};

bool as_uint(const json::Value& v, std::uint64_t& out) {
  if (v.type != json::Type::Number || !v.is_uint) return false;
  out = v.uint_value;
  return true;
}

}  // namespace

FileCheck check_file(const std::string& path) {
  FileCheck out;
  fs::File file;
  std::string error;
  if (!file.open(path, error)) {
    out.problems.push_back("cannot open: " + error);
    return out;
  }
  out.file_size = file.size();
  if (file.size() < 8) {
    out.problems.push_back("file too small for a safetensors header (" + std::to_string(file.size()) + " bytes)");
    return out;
  }
  std::uint64_t n = 0;
  if (!file.read_at(0, &n, 8)) {
    out.problems.push_back("read error");
    return out;
  }
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
  std::string text(static_cast<std::size_t>(n), '\0');
  if (n > 0 && !file.read_at(8, text.data(), text.size())) {
    out.problems.push_back("read error");
    return out;
  }
  json::Value header;
  if (!json::parse(text, header, error)) {
    out.problems.push_back("header is not valid JSON: " + error);
    return out;
  }
  if (header.type != json::Type::Object) {
    out.problems.push_back("header is not a JSON object");
    return out;
  }
  std::vector<Tensor> tensors;
  tensors.reserve(header.object.size());
  for (const auto& [name, info] : header.object) {
    if (name == "__metadata__") {
      bool ok = info.type == json::Type::Object;
      for (const auto& m : info.object) ok = ok && m.second.type == json::Type::String;
      if (!ok) out.problems.push_back("__metadata__ must map strings to strings");
      continue;
    }
    if (!out.tensors.insert(name).second) {
      out.problems.push_back("duplicate tensor " + name);
      continue;
    }
    if (info.type != json::Type::Object) {
      out.problems.push_back("tensor " + name + ": entry is not an object");
      continue;
    }
    const json::Value* dtype = info.find("dtype");
    const json::Value* shape = info.find("shape");
    const json::Value* offsets = info.find("data_offsets");
    if (!dtype || dtype->type != json::Type::String) {
      out.problems.push_back("tensor " + name + ": missing dtype");
      continue;
    }
    const int bits = dtype_bits(dtype->string);
    if (bits == 0) {
      out.problems.push_back("tensor " + name + ": unknown dtype " + dtype->string);
      continue;
    }
    if (!shape || shape->type != json::Type::Array) {
      out.problems.push_back("tensor " + name + ": missing shape");
      continue;
    }
    unsigned __int128 elements = 1;
    bool shape_ok = true;
    for (const auto& d : shape->array) {
      std::uint64_t dim;
      if (!as_uint(d, dim)) {
        shape_ok = false;
        break;
      }
      elements *= dim;
      if (elements > UINT64_MAX) {
        shape_ok = false;
        break;
      }
    }
    if (!shape_ok) {
      out.problems.push_back("tensor " + name + ": invalid shape");
      continue;
    }
    std::uint64_t begin, end;
    if (!offsets || offsets->type != json::Type::Array || offsets->array.size() != 2 ||
        !as_uint(offsets->array[0], begin) || !as_uint(offsets->array[1], end)) {
      out.problems.push_back("tensor " + name + ": data_offsets must be two non-negative integers");
      continue;
    }
    if (end < begin) {
      out.problems.push_back("tensor " + name + ": data_offsets end " + std::to_string(end) +
                             " before begin " + std::to_string(begin));
      continue;
    }
    const unsigned __int128 total_bits = elements * static_cast<unsigned>(bits);
    if (total_bits % 8 != 0 || total_bits / 8 != end - begin) {
      out.problems.push_back("tensor " + name + ": " + dtype->string + " shape needs " +
                             std::to_string(static_cast<std::uint64_t>(total_bits / 8)) +
                             " bytes but data_offsets span " + std::to_string(end - begin));
      continue;
    }
    tensors.push_back({&name, begin, end});
  }
  std::sort(tensors.begin(), tensors.end(), [](const Tensor& a, const Tensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected = 0;
  for (const auto& t : tensors) {
    if (t.begin != expected) {
      out.problems.push_back("data_offsets not contiguous at tensor " + *t.name + ": starts at " +
                             std::to_string(t.begin) + ", expected " + std::to_string(expected));
      return out;
    }
    expected = t.end;
  }
  const unsigned __int128 want = static_cast<unsigned __int128>(8) + n + expected;
  if (want != file.size()) {
    out.problems.push_back("file size mismatch: expected " +
                           std::to_string(static_cast<std::uint64_t>(want)) + ", got " +
                           std::to_string(file.size()));
  }
  return out;
}

bool shard_name_is_contained(const std::string& name) {
  if (name.empty() || name.front() == '/') return false;
  if (name.find('\\') != std::string::npos || name.find('\0') != std::string::npos) return false;
  if (name.size() >= 2 && name[1] == ':') return false;  // drive letter
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    const std::string_view seg(name.data() + start, end - start);
    if (seg.empty() || seg == "." || seg == "..") return false;
    start = end + 1;
  }
  return true;
}

Index parse_index(const std::string& text) {
  Index out;
  json::Value doc;
  std::string error;
  if (!json::parse(text, doc, error)) {
    out.problems.push_back(error);
    return out;
  }
  const json::Value* map = doc.type == json::Type::Object ? doc.find("weight_map") : nullptr;
  if (!map || map->type != json::Type::Object) {
    out.problems.push_back("weight_map missing or not an object");
    return out;
  }
  if (map->object.empty()) {
    out.problems.push_back("weight_map is empty");
    return out;
  }
  std::unordered_map<std::string, std::size_t> slot;
  std::unordered_set<std::string> escaping;
  for (const auto& [tensor, shard] : map->object) {
    if (shard.type != json::Type::String) {
      out.problems.push_back("weight_map entry for tensor " + tensor + " is not a file name");
      continue;
    }
    const std::string& name = shard.string;
    auto it = slot.find(name);
    if (it == slot.end()) {
      if (!shard_name_is_contained(name)) {
        if (escaping.insert(name).second) out.problems.push_back("shard path escapes model directory: " + name);
        continue;
      }
      it = slot.emplace(name, out.shards.size()).first;
      out.shards.push_back({name, {}});
    }
    out.shards[it->second].tensors.push_back(tensor);
  }
  return out;
}

}  // namespace llmlb::safetensors
