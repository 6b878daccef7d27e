#include "fs_util.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

namespace llmlb::fs {

Stat stat_path(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return {};
  Stat out;
  if (S_ISREG(st.st_mode)) {
    out.kind = Kind::File;
  } else if (S_ISDIR(st.st_mode)) {
    out.kind = Kind::Dir;
  } else {
    out.kind = Kind::Other;
  }
  out.size = static_cast<std::uint64_t>(st.st_size);
  return out;
}

bool list_dir(const std::string& dir, std::vector<Entry>& out) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return false;
  while (dirent* e = ::readdir(d)) {
    const char* name = e->d_name;
    if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) continue;
    Kind kind = Kind::Other;
#ifdef _DIRENT_HAVE_D_TYPE
    if (e->d_type == DT_REG) {
      kind = Kind::File;
    } else if (e->d_type == DT_DIR) {
      kind = Kind::Dir;
    } else if (e->d_type == DT_LNK || e->d_type == DT_UNKNOWN) {
      kind = stat_path(join(dir, name)).kind;
    }
#else
    kind = stat_path(join(dir, name)).kind;
#endif
    if (kind == Kind::Missing) continue;  // dangling symlink
    out.push_back({name, kind});
  }
  ::closedir(d);
  return true;
}

std::string join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (a.back() == '/') return a + b;
  return a + "/" + b;
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

bool File::open(const std::string& path, std::string& error) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    error = std::strerror(errno);
    return false;
  }
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    error = std::strerror(errno);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    error = "not a regular file";
    return false;
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
  return true;
}

bool File::read_at(std::uint64_t offset, void* dst, std::size_t n) const {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd_, p, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (got == 0) return false;
    p += got;
    n -= static_cast<std::size_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
  return true;
}

bool read_file(const std::string& path, std::string& out, std::uint64_t limit, std::string& error) {
  File f;
  if (!f.open(path, error)) return false;
  if (f.size() > limit) {
    error = "file too large (" + std::to_string(f.size()) + " bytes, limit " + std::to_string(limit) + ")";
    return false;
  }
  out.resize(static_cast<std::size_t>(f.size()));
  if (!out.empty() && !f.read_at(0, out.data(), out.size())) {
    error = "read failed";
    return false;
  }
  return true;
}

void parallel_for(std::size_t n, std::size_t max_threads, const std::function<void(std::size_t)>& fn) {
  // A thread only pays for itself with a few items to work on.
  constexpr std::size_t kMinItemsPerThread = 4;
  const std::size_t threads = std::min((n + kMinItemsPerThread - 1) / kMinItemsPerThread,
                                       std::max<std::size_t>(1, max_threads));
  if (threads <= 1) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::mutex error_lock;
  std::exception_ptr error;
  auto worker = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (std::size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

std::size_t cpu_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return std::clamp<std::size_t>(hw == 0 ? 2 : hw, 1, 16);
}

std::size_t io_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return std::clamp<std::size_t>(hw == 0 ? 4 : hw * 2, 2, 16);
}

}  // namespace llmlb::fs
