// Thin POSIX helpers used by the store: directory listing, whole/partial file reads,
// and a small parallel-for. Paths are plain UTF-8 strings.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace llmlb::fs {

enum class Kind { Missing, File, Dir, Other };

struct Stat {
  Kind kind = Kind::Missing;
  std::uint64_t size = 0;
};

// stat(2) following symlinks.
Stat stat_path(const std::string& path);

struct Entry {
  std::string name;
  Kind kind;  // symlinks are followed
};

// List `dir` (without "." and ".."), following symlinks for the kind. False if unreadable.
bool list_dir(const std::string& dir, std::vector<Entry>& out);

// "a" + "/" + "b", without doubling the separator.
std::string join(const std::string& a, const std::string& b);

// Final path component.
std::string base_name(const std::string& path);

// Read the whole file (at most `limit` bytes, else false with `error` set).
bool read_file(const std::string& path, std::string& out, std::uint64_t limit, std::string& error);

// An open read-only file descriptor, closed on destruction.
class File {
 public:
  File() = default;
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  // Open `path`; on failure returns false and sets `error` (strerror text).
  bool open(const std::string& path, std::string& error);
  int fd() const { return fd_; }
  std::uint64_t size() const { return size_; }
  // Read exactly `n` bytes at `offset`; false on short read or error.
  bool read_at(std::uint64_t offset, void* dst, std::size_t n) const;

 private:
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

// Run fn(i) for i in [0, n) on up to `max_threads` threads (the calling thread included).
void parallel_for(std::size_t n, std::size_t max_threads, const std::function<void(std::size_t)>& fn);

// A sensible worker count for I/O-bound work (readahead) on this machine.
std::size_t io_threads();

// A sensible worker count for CPU-bound work (parsing headers from the page cache).
std::size_t cpu_threads();

}  // namespace llmlb::fs
