#include "gguf.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <unordered_set>

#include "fs_util.hpp"
#include "model_id.hpp"

namespace llmlb::gguf {
namespace {

// Value types of GGUF metadata.
enum ValueType : std::uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

std::uint64_t scalar_size(std::uint32_t type) {
  switch (type) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: return 8;
    default: return 0;
  }
}

struct GgmlType {
  const char* name;
  std::uint32_t block_size;  // elements per block; 0 = unknown / removed type
  std::uint32_t type_size;   // bytes per block
};

// ggml_type -> (block size, bytes per block), as in ggml.c's type_traits.
const GgmlType kGgmlTypes[] = {
    {"F32", 1, 4},        {"F16", 1, 2},       {"Q4_0", 32, 18},     {"Q4_1", 32, 20},
    {"Q4_2", 0, 0},       {"Q4_3", 0, 0},      {"Q5_0", 32, 22},     {"Q5_1", 32, 24},
    {"Q8_0", 32, 34},     {"Q8_1", 32, 40},    {"Q2_K", 256, 84},    {"Q3_K", 256, 110},
    {"Q4_K", 256, 144},   {"Q5_K", 256, 176},  {"Q6_K", 256, 210},   {"Q8_K", 256, 292},
    {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74}, {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50},
    {"IQ4_NL", 32, 18},   {"IQ3_S", 256, 110}, {"IQ2_S", 256, 82},   {"IQ4_XS", 256, 136},
    {"I8", 1, 1},         {"I16", 1, 2},       {"I32", 1, 4},        {"I64", 1, 8},
    {"F64", 1, 8},        {"IQ1_M", 256, 56},  {"BF16", 1, 2},
    // 31-33 (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) were removed from ggml.
    {"Q4_0_4_4", 0, 0},   {"Q4_0_4_8", 0, 0},  {"Q4_0_8_8", 0, 0},   {"TQ1_0", 256, 54},
    {"TQ2_0", 256, 66},
    // 36-38 (IQ4_NL_4_4, IQ4_NL_4_8, IQ4_NL_8_8) were removed from ggml.
    {"IQ4_NL_4_4", 0, 0}, {"IQ4_NL_4_8", 0, 0}, {"IQ4_NL_8_8", 0, 0}, {"MXFP4", 32, 17},
    {"NVFP4", 64, 36},    {"Q1_0", 128, 18},
};
constexpr std::uint32_t kGgmlTypeCount = sizeof(kGgmlTypes) / sizeof(kGgmlTypes[0]);

// llama_ftype names, indexed by value ("" for gaps).
const char* const kFileTypes[] = {
    "F32",      "F16",      "Q4_0",     "Q4_1",    "Q4_1_SOME_F16", "",       "",       "Q8_0",
    "Q5_0",     "Q5_1",     "Q2_K",     "Q3_K_S",  "Q3_K_M",        "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S",   "Q5_K_M",   "Q6_K",     "IQ2_XXS", "IQ2_XS",        "Q2_K_S", "IQ3_XS", "IQ3_XXS",
    "IQ1_S",    "IQ4_NL",   "IQ3_S",    "IQ3_M",   "IQ2_S",         "IQ2_M",  "IQ4_XS", "IQ1_M",
    "BF16",     "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",        "TQ2_0",  "MXFP4_MOE", "NVFP4",
    "Q1_0",
};
constexpr std::uint32_t kFileTypeCount = sizeof(kFileTypes) / sizeof(kFileTypes[0]);

struct Truncated {};
struct Corrupt {
  std::string why;
};

// Sequential reader over a file with a large buffer; throws Truncated at end of file.
class Reader {
 public:
  // The buffer holds at most 1 MiB and never more than the file (left uninitialised).
  explicit Reader(const fs::File& file)
      : file_(file),
        cap_(static_cast<std::size_t>(std::min<std::uint64_t>(file.size(), 1 << 20))),
        buf_(new char[cap_]) {}

  std::uint64_t pos() const { return pos_; }
  std::uint64_t remaining() const { return file_.size() - pos_; }

  void read(void* dst, std::size_t n) {
    auto* out = static_cast<char*>(dst);
    while (n > 0) {
      if (pos_ < buf_start_ || pos_ >= buf_start_ + buf_len_) fill();
      const std::size_t off = static_cast<std::size_t>(pos_ - buf_start_);
      const std::size_t take = std::min(n, buf_len_ - off);
      std::memcpy(out, buf_.get() + off, take);
      out += take;
      n -= take;
      pos_ += take;
    }
  }

  void skip(std::uint64_t n) {
    if (n > remaining()) throw Truncated{};
    pos_ += n;
  }

  template <typename T>
  T get() {
    T v;
    read(&v, sizeof(T));  // GGUF is little-endian, as are the hosts we build for
    return v;
  }

  std::string get_string(std::uint64_t max_len) {
    const auto len = get<std::uint64_t>();
    if (len > remaining()) throw Truncated{};
    if (len > max_len) throw Corrupt{"string of " + std::to_string(len) + " bytes at offset " +
                                     std::to_string(pos_ - 8) + " is implausibly long"};
    std::string s(static_cast<std::size_t>(len), '\0');
    read(s.data(), s.size());
    return s;
  }

  void skip_string() {
    const auto len = get<std::uint64_t>();
    skip(len);
  }

 private:
  void fill() {
    if (pos_ >= file_.size()) throw Truncated{};
    buf_start_ = pos_;
    buf_len_ = static_cast<std::size_t>(std::min<std::uint64_t>(cap_, file_.size() - pos_));
    if (!file_.read_at(buf_start_, buf_.get(), buf_len_)) throw Corrupt{"read error"};
  }

  const fs::File& file_;
  std::size_t cap_;
  std::unique_ptr<char[]> buf_;
  std::uint64_t buf_start_ = 0;
  std::size_t buf_len_ = 0;
  std::uint64_t pos_ = 0;
};

std::string printable(const unsigned char* p, std::size_t n) {
  std::string out;
  static const char* hex = "0123456789abcdef";
  for (std::size_t i = 0; i < n; ++i) {
    if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\') {
      out += static_cast<char>(p[i]);
    } else {
      out += "\\x";
      out += hex[p[i] >> 4];
      out += hex[p[i] & 15];
    }
  }
  return out;
}

const char* type_name(std::uint32_t t) {
  static const char* names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                "bool", "string", "array", "uint64", "int64", "float64"};
  return t <= kF64 ? names[t] : "unknown";
}

// Read an integer of any integer type; nullopt for other types (value skipped).
std::optional<std::int64_t> read_int(Reader& r, std::uint32_t type) {
  switch (type) {
    case kU8: return r.get<std::uint8_t>();
    case kI8: return r.get<std::int8_t>();
    case kU16: return r.get<std::uint16_t>();
    case kI16: return r.get<std::int16_t>();
    case kU32: return r.get<std::uint32_t>();
    case kI32: return r.get<std::int32_t>();
    case kU64: return static_cast<std::int64_t>(r.get<std::uint64_t>());
    case kI64: return r.get<std::int64_t>();
    default: return std::nullopt;
  }
}

void skip_value(Reader& r, std::uint32_t type, int depth) {
  if (type == kString) {
    r.skip_string();
    return;
  }
  if (type == kArray) {
    if (depth > 4) throw Corrupt{"arrays nested too deeply"};
    const auto elem = r.get<std::uint32_t>();
    const auto n = r.get<std::uint64_t>();
    if (const auto size = scalar_size(elem)) {
      if (n > r.remaining() / size) throw Truncated{};
      r.skip(n * size);
      return;
    }
    if (elem != kString && elem != kArray) {
      throw Corrupt{"array of unknown value type " + std::to_string(elem)};
    }
    // Every string or array element takes at least 8 bytes.
    if (n > r.remaining() / 8) throw Truncated{};
    for (std::uint64_t i = 0; i < n; ++i) skip_value(r, elem, depth + 1);
    return;
  }
  const auto size = scalar_size(type);
  if (size == 0) throw Corrupt{"unknown metadata value type " + std::to_string(type)};
  r.skip(size);
}

struct TensorInfo {
  std::string name;
  std::uint64_t offset;
  std::uint64_t nbytes;
};

void read_metadata(Reader& r, Info& info) {
  std::vector<std::pair<std::string, std::uint64_t>> context_lengths;
  for (std::uint64_t i = 0; i < info.kv_count; ++i) {
    const std::string key = r.get_string(1 << 16);
    const auto type = r.get<std::uint32_t>();
    if (key == "general.architecture" || key == "general.name") {
      if (type != kString) {
        info.problems.push_back(key + " has type " + type_name(type) + ", expected string");
        skip_value(r, type, 0);
        continue;
      }
      (key == "general.name" ? info.name : info.architecture) = r.get_string(1 << 20);
    } else if (key == "general.alignment") {
      if (type != kU32) {
        info.problems.push_back(std::string("general.alignment has type ") + type_name(type) +
                                ", expected uint32");
        skip_value(r, type, 0);
        continue;
      }
      const auto a = r.get<std::uint32_t>();
      if (a == 0 || (a & (a - 1)) != 0) {
        info.problems.push_back("general.alignment " + std::to_string(a) + " is not a power of two");
      } else {
        info.alignment = a;
      }
    } else if (key == "general.file_type" || key == "split.no" || key == "split.count" ||
               key == "split.tensors.count" ||
               (key.size() > 15 && key.compare(key.size() - 15, 15, ".context_length") == 0)) {
      const auto v = read_int(r, type);
      if (!v) {
        info.problems.push_back(key + " has type " + type_name(type) + ", expected an integer");
        skip_value(r, type, 0);
        continue;
      }
      if (key == "general.file_type") {
        info.file_type = static_cast<std::uint32_t>(*v);
      } else if (key == "split.no") {
        info.split_no = static_cast<std::uint32_t>(*v);
      } else if (key == "split.count") {
        info.split_count = static_cast<std::uint32_t>(*v);
      } else if (key == "split.tensors.count") {
        info.split_tensors_count = *v;
      } else if (*v >= 0) {
        context_lengths.emplace_back(key.substr(0, key.size() - 15), static_cast<std::uint64_t>(*v));
      }
    } else {
      skip_value(r, type, 0);
    }
  }
  for (const auto& [arch, n] : context_lengths) {
    if (arch == info.architecture) info.context_length = n;
  }
  if (info.file_type) info.quantization = file_type_name(*info.file_type);
}

void read_tensors(Reader& r, Info& info) {
  std::vector<TensorInfo> tensors;
  tensors.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(info.tensor_count, 1 << 16)));
  std::unordered_set<std::string> names;
  for (std::uint64_t i = 0; i < info.tensor_count; ++i) {
    TensorInfo t;
    t.name = r.get_string(1 << 16);
    const auto n_dims = r.get<std::uint32_t>();
    if (n_dims > 4) throw Corrupt{"tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions (max 4)"};
    std::uint64_t dims[4] = {1, 1, 1, 1};
    for (std::uint32_t d = 0; d < n_dims; ++d) dims[d] = r.get<std::uint64_t>();
    const auto type = r.get<std::uint32_t>();
    t.offset = r.get<std::uint64_t>();
    if (!names.insert(t.name).second) info.problems.push_back("duplicate tensor '" + t.name + "'");
    if (type >= kGgmlTypeCount || kGgmlTypes[type].block_size == 0) {
      info.problems.push_back("tensor '" + t.name + "' has unknown ggml type " + std::to_string(type));
      continue;
    }
    const GgmlType& gt = kGgmlTypes[type];
    if (dims[0] % gt.block_size != 0) {
      info.problems.push_back("tensor '" + t.name + "': row of " + std::to_string(dims[0]) +
                              " elements is not a multiple of the " + gt.name + " block size " +
                              std::to_string(gt.block_size));
      continue;
    }
    // nbytes = ne0/block * type_size * ne1 * ne2 * ne3, rejecting overflow.
    unsigned __int128 nbytes = static_cast<unsigned __int128>(dims[0] / gt.block_size) * gt.type_size;
    for (int d = 1; d < 4 && nbytes <= UINT64_MAX; ++d) nbytes *= dims[d];
    if (nbytes > UINT64_MAX) throw Corrupt{"tensor '" + t.name + "' has an impossible size"};
    t.nbytes = static_cast<std::uint64_t>(nbytes);
    tensors.push_back(std::move(t));
  }
  const std::uint64_t a = info.alignment;
  info.data_offset = (r.pos() + a - 1) / a * a;

  std::size_t misaligned = 0;
  const TensorInfo* first_misaligned = nullptr;
  const TensorInfo* last = nullptr;
  std::uint64_t end_max = 0;
  for (const auto& t : tensors) {
    if (t.offset % a != 0) {
      if (!first_misaligned) first_misaligned = &t;
      ++misaligned;
    }
    const unsigned __int128 end = static_cast<unsigned __int128>(info.data_offset) + t.offset + t.nbytes;
    if (end > end_max) {
      end_max = end > UINT64_MAX ? UINT64_MAX : static_cast<std::uint64_t>(end);
      last = &t;
    }
  }
  if (first_misaligned) {
    std::string msg = "tensor data not aligned for mmap: tensor '" + first_misaligned->name +
                      "' at offset " + std::to_string(first_misaligned->offset) +
                      " is not a multiple of general.alignment " + std::to_string(a);
    if (misaligned > 1) msg += " (" + std::to_string(misaligned - 1) + " more tensors misaligned)";
    info.problems.push_back(msg);
  }
  if (last && end_max > info.file_size) {
    info.problems.push_back("truncated tensor data: tensor '" + last->name + "' ends at byte " +
                            std::to_string(end_max) + " but the file has " +
                            std::to_string(info.file_size) + " bytes");
  }
  // Tensors must not overlap one another.
  std::vector<const TensorInfo*> order;
  order.reserve(tensors.size());
  for (const auto& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(),
            [](const TensorInfo* x, const TensorInfo* y) { return x->offset < y->offset; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (order[i - 1]->nbytes > 0 && order[i - 1]->offset + order[i - 1]->nbytes > order[i]->offset) {
      info.problems.push_back("tensor data of '" + order[i]->name + "' overlaps '" + order[i - 1]->name + "'");
      break;
    }
  }
}

}  // namespace

std::string file_type_name(std::uint32_t file_type) {
  return file_type < kFileTypeCount ? kFileTypes[file_type] : "";
}

std::string quantization_from_file_name(const std::string& file_name) {
  // Longest names first so "Q4_K_M" wins over "Q4_K".
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const char* n : kFileTypes) {
      if (*n) v.emplace_back(n);
    }
    for (const char* n : {"Q4_K", "Q5_K", "Q3_K", "MXFP4", "IQ1_M", "IQ2_M"}) v.emplace_back(n);
    std::sort(v.begin(), v.end(), [](const std::string& x, const std::string& y) {
      return x.size() != y.size() ? x.size() > y.size() : x < y;
    });
    return v;
  }();
  for (const auto& n : names) {
    if (quant_matches_file_name(n, file_name)) return n;
  }
  return "";
}

Info read(const std::string& path) {
  Info info;
  fs::File file;
  std::string error;
  if (!file.open(path, error)) {
    info.problems.push_back("cannot open: " + error);
    return info;
  }
  info.file_size = file.size();
  unsigned char head[24] = {};
  if (file.size() < 4) {
    info.problems.push_back("file too small to be GGUF (" + std::to_string(file.size()) + " bytes)");
    return info;
  }
  if (!file.read_at(0, head, static_cast<std::size_t>(std::min<std::uint64_t>(24, file.size())))) {
    info.problems.push_back("read error");
    return info;
  }
  if (std::memcmp(head, "GGUF", 4) != 0) {
    info.problems.push_back("bad magic: expected 'GGUF', got '" + printable(head, 4) + "'");
    return info;
  }
  if (file.size() < 24) {
    info.problems.push_back("truncated header: " + std::to_string(file.size()) + " bytes");
    return info;
  }
  std::memcpy(&info.version, head + 4, 4);
  if (info.version != 2 && info.version != 3) {
    std::string msg = "unsupported GGUF version " + std::to_string(info.version) + " (expected 2 or 3)";
    if (info.version > 0xFFFF) msg += "; big-endian file?";
    info.problems.push_back(msg);
    return info;
  }
  std::memcpy(&info.tensor_count, head + 8, 8);
  std::memcpy(&info.kv_count, head + 16, 8);
  // Each tensor info takes at least 24 bytes and each key/value at least 13.
  if (info.tensor_count > file.size() / 24) {
    info.problems.push_back("tensor count " + std::to_string(info.tensor_count) +
                            " is impossible for a file of " + std::to_string(file.size()) + " bytes");
    return info;
  }
  if (info.kv_count > file.size() / 13) {
    info.problems.push_back("metadata count " + std::to_string(info.kv_count) +
                            " is impossible for a file of " + std::to_string(file.size()) + " bytes");
    return info;
  }
  Reader r(file);
  r.skip(24);
  try {
    read_metadata(r, info);
    info.header_ok = true;
    read_tensors(r, info);
  } catch (const Truncated&) {
    info.problems.push_back(std::string("truncated header: ") +
                            (info.header_ok ? "tensor infos" : "metadata") + " run past the end of the file");
  } catch (const Corrupt& c) {
    info.problems.push_back("corrupt header: " + c.why);
  }
  return info;
}

}  // namespace llmlb::gguf
