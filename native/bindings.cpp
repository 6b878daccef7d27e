// The only pybind11 file: exposes the C++ store to Python as llmlb._model_storage.
// Every call that touches the disk releases the GIL.
#include <algorithm>
#include <string>
#include <string_view>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gguf.hpp"
#include "model_id.hpp"
#include "prefix_item.hpp"
#include "safetensors.hpp"
#include "store.hpp"

namespace py = pybind11;
using release_gil = py::call_guard<py::gil_scoped_release>;

namespace {

// Python class raised for llmlb::InvalidModelIdError (set by llmlb.model_storage at import).
PyObject* invalid_model_id_type = nullptr;

py::dict descriptor_dict(const llmlb::ModelDescriptor& d) {
  py::dict out;
  out["id"] = d.id;
  out["format"] = d.format;
  out["primary_path"] = d.primary_path;
  out["files"] = d.files;
  out["quantization"] = d.quantization;
  out["size_bytes"] = d.size_bytes;
  out["architecture"] = d.architecture;
  out["context_length"] = d.context_length;
  return out;
}

// Interned dict keys: a lookup by them hashes nothing.
struct MessageKeys {
  PyObject* role = PyUnicode_InternFromString("role");
  PyObject* content = PyUnicode_InternFromString("content");
  PyObject* tool_calls = PyUnicode_InternFromString("tool_calls");
  PyObject* text = PyUnicode_InternFromString("text");
};

const MessageKeys& message_keys() {
  static const MessageKeys keys;  // kept for the life of the process
  return keys;
}

// The UTF-8 and code point length of an exact str; false (error cleared) if it has none.
bool utf8_of(PyObject* s, std::string_view& out, std::size_t& chars) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(s, &size);
  if (data == nullptr) {
    PyErr_Clear();
    return false;
  }
  out = std::string_view(data, static_cast<std::size_t>(size));
  chars = static_cast<std::size_t>(PyUnicode_GET_LENGTH(s));
  return true;
}

// Appends code points [from, to) of a non-ASCII str as UTF-8; false on a lone surrogate
// (which has no UTF-8: the message takes the slow path, which refuses it as Python does).
bool append_code_points(PyObject* s, Py_ssize_t from, Py_ssize_t to, std::string& out) {
  const int kind = PyUnicode_KIND(s);
  const void* data = PyUnicode_DATA(s);
  const std::size_t start = out.size();
  out.resize(start + 4 * static_cast<std::size_t>(to - from));
  char* p = out.data() + start;
  for (Py_ssize_t i = from; i < to; ++i) {
    const Py_UCS4 c = PyUnicode_READ(kind, data, i);
    if (c < 0x80) {
      *p++ = static_cast<char>(c);
    } else if (c < 0x800) {
      *p++ = static_cast<char>(0xC0 | (c >> 6));
      *p++ = static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      if (c >= 0xD800 && c <= 0xDFFF) return false;
      *p++ = static_cast<char>(0xE0 | (c >> 12));
      *p++ = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      *p++ = static_cast<char>(0x80 | (c & 0x3F));
    } else {
      *p++ = static_cast<char>(0xF0 | (c >> 18));
      *p++ = static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      *p++ = static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      *p++ = static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  out.resize(static_cast<std::size_t>(p - out.data()));
  return true;
}

// The edges of an exact str. A long non-ASCII text has only its edges encoded (into
// `scratch`): encoding all of a 100 KB text would cost more than the rest of the walk.
bool str_edges(PyObject* s, std::size_t edge_chars, std::string& scratch,
               llmlb::prefix::Edges& out, std::size_t& chars) {
  chars = static_cast<std::size_t>(PyUnicode_GET_LENGTH(s));
  if (PyUnicode_IS_ASCII(s) || chars <= 2 * edge_chars) {
    std::string_view utf8;
    if (!utf8_of(s, utf8, chars)) return false;
    out = llmlb::prefix::split_utf8(utf8, chars, edge_chars);
    return true;
  }
  const auto n = static_cast<Py_ssize_t>(chars), edge = static_cast<Py_ssize_t>(edge_chars);
  scratch.clear();
  if (!append_code_points(s, 0, edge, scratch)) return false;
  const std::size_t head = scratch.size();
  if (!append_code_points(s, n - edge, n, scratch)) return false;
  const std::string_view both = scratch;
  out = {both.substr(0, head), both.substr(head)};
  return true;
}

// The text of a message's content as prefix_keys._text makes it, for the shapes it takes
// without a second look (None, a str, a list of str or {"text": str} parts); false otherwise.
bool simple_text(PyObject* content, std::size_t edge_chars, std::string& scratch,
                 llmlb::prefix::Edges& out, std::size_t& chars) {
  if (content != nullptr && PyUnicode_CheckExact(content)) {
    return str_edges(content, edge_chars, scratch, out, chars);
  }
  out = {};
  chars = 0;
  if (content == nullptr || !PyList_CheckExact(content)) return true;  // no text
  scratch.clear();
  const Py_ssize_t n = PyList_GET_SIZE(content);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* part = PyList_GET_ITEM(content, i);
    if (PyDict_CheckExact(part)) part = PyDict_GetItem(part, message_keys().text);
    if (part == nullptr || !PyUnicode_CheckExact(part)) return false;
    std::string_view piece;
    std::size_t piece_chars = 0;
    if (!utf8_of(part, piece, piece_chars)) return false;
    if (i > 0) {
      scratch.push_back('\n');
      ++chars;
    }
    scratch.append(piece);
    chars += piece_chars;
  }
  out = llmlb::prefix::split_utf8(scratch, chars, edge_chars);
  return true;
}

// prefix_keys' chain over chat `messages`: the common messages keyed here, the others by
// `slow_item(message) -> (bytes, covered)`, which holds the one definition of an item.
py::list chat_prefix_keys(std::uint32_t seed, py::list messages, std::size_t max_items,
                          std::size_t edge_chars, py::object slow_item) {
  PyObject* list = messages.ptr();
  const std::size_t n = std::min(static_cast<std::size_t>(PyList_GET_SIZE(list)), max_items);
  const MessageKeys& names = message_keys();
  py::list keys(static_cast<py::ssize_t>(n));
  std::size_t made = 0;
  std::string item, scratch;
  std::uint32_t key = seed;
  std::size_t length = 0;
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* message = PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i));
    if (!PyDict_CheckExact(message)) break;
    PyObject* role = PyDict_GetItem(message, names.role);
    PyObject* calls = PyDict_GetItem(message, names.tool_calls);
    std::string_view role_text;
    llmlb::prefix::Edges text;
    std::size_t role_chars = 0, chars = 0;
    const bool has_calls =
        calls != nullptr && PyList_CheckExact(calls) && PyList_GET_SIZE(calls) > 0;
    const bool simple =
        role != nullptr && PyUnicode_CheckExact(role) && utf8_of(role, role_text, role_chars) &&
        !has_calls &&
        simple_text(PyDict_GetItem(message, names.content), edge_chars, scratch, text, chars);
    if (simple) {
      if (role_text == "developer") role_text = "system";
      length += llmlb::prefix::message_item(item, role_text, text, chars, edge_chars);
      key = llmlb::prefix::crc32(item, key);
    } else {
      py::tuple slow = slow_item(py::handle(message));
      py::bytes bytes = slow[0];
      char* data = nullptr;
      Py_ssize_t size = 0;
      if (PyBytes_AsStringAndSize(bytes.ptr(), &data, &size) != 0) throw py::error_already_set();
      key = llmlb::prefix::crc32(std::string_view(data, static_cast<std::size_t>(size)), key);
      length += slow[1].cast<std::size_t>();
    }
    PyObject* pair = PyTuple_New(2);
    if (pair == nullptr) throw py::error_already_set();
    PyTuple_SET_ITEM(pair, 0, PyLong_FromUnsignedLong(key));
    PyTuple_SET_ITEM(pair, 1, PyLong_FromSize_t(length));
    PyList_SET_ITEM(keys.ptr(), static_cast<Py_ssize_t>(made++), pair);
  }
  if (made < n && PyList_SetSlice(keys.ptr(), static_cast<Py_ssize_t>(made),
                                  static_cast<Py_ssize_t>(n), nullptr) != 0) {
    throw py::error_already_set();
  }
  return keys;
}

}  // namespace

PYBIND11_MODULE(_model_storage, m) {
  m.doc() = "Native core of llmlb.model_storage (use that module, not this one).";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llmlb::InvalidModelIdError& e) {
      PyErr_SetString(invalid_model_id_type ? invalid_model_id_type : PyExc_ValueError, e.what());
    }
  });

  m.def(
      "_set_invalid_model_id_type",
      [](py::object type) {
        Py_XDECREF(invalid_model_id_type);
        invalid_model_id_type = type.release().ptr();  // kept for the life of the process
      },
      py::arg("type"));

  m.def("normalize_model_id", &llmlb::normalize_model_id, py::arg("model_id"), release_gil());
  m.def("split_quant", &llmlb::split_quant, py::arg("model_id"), release_gil());
  m.def("quant_matches_file_name", &llmlb::quant_matches_file_name, py::arg("quant"), py::arg("file_name"),
        release_gil());
  m.def("validate_file", &llmlb::validate_file, py::arg("path"), release_gil());
  m.def("is_safe_relative_path", &llmlb::safetensors::shard_name_is_contained, py::arg("name"));
  m.def(
      "quantization_from_file_name",
      [](const std::string& name) -> py::object {
        const std::string q = llmlb::gguf::quantization_from_file_name(name);
        return q.empty() ? py::object(py::none()) : py::str(q);
      },
      py::arg("file_name"));
  m.def(
      "parse_split_name",
      [](const std::string& name) -> py::object {
        std::string prefix;
        std::uint32_t no = 0, count = 0;
        if (!llmlb::parse_split_name(name, prefix, no, count)) return py::none();
        return py::make_tuple(prefix, no, count);
      },
      py::arg("name"));
  m.def("chat_prefix_keys", &chat_prefix_keys, py::arg("seed"), py::arg("messages"),
        py::arg("max_items"), py::arg("edge_chars"), py::arg("slow_item"));
  m.def("prefetch_files", &llmlb::prefetch_files, py::arg("paths"), release_gil());
  m.def(
      "inspect_gguf",
      [](const std::string& path) {
        llmlb::gguf::Info s;
        {
          py::gil_scoped_release release;
          s = llmlb::gguf::read(path);
        }
        py::dict out;
        out["problems"] = s.problems;
        out["version"] = s.version;
        out["tensor_count"] = s.tensor_count;
        out["kv_count"] = s.kv_count;
        out["alignment"] = s.alignment;
        out["data_offset"] = s.data_offset;
        out["architecture"] = s.architecture.empty() ? py::object(py::none()) : py::str(s.architecture);
        out["name"] = s.name.empty() ? py::object(py::none()) : py::str(s.name);
        out["file_type"] = s.file_type;
        out["quantization"] = s.quantization.empty() ? py::object(py::none()) : py::str(s.quantization);
        out["split_no"] = s.split_no;
        out["split_count"] = s.split_count;
        out["context_length"] = s.context_length;
        return out;
      },
      py::arg("path"));

  py::class_<llmlb::ModelStore>(m, "ModelStore")
      .def(py::init<std::string, std::size_t>(), py::arg("models_dir"), py::arg("threads") = 0)
      .def_property_readonly("root", &llmlb::ModelStore::root)
      .def_property_readonly("threads", &llmlb::ModelStore::threads)
      .def("model_dir", &llmlb::ModelStore::model_dir, py::arg("model_id"), release_gil())
      .def("list_available", &llmlb::ModelStore::list_available, release_gil())
      .def("conflicting_model", &llmlb::ModelStore::conflicting_model, py::arg("model_id"), release_gil())
      .def(
          "inspect",
          [](const llmlb::ModelStore& store, const std::string& model_id) {
            llmlb::Inspection insp;
            {
              py::gil_scoped_release release;
              insp = store.inspect(model_id);
            }
            py::object descriptor = py::none();
            if (insp.descriptor) descriptor = descriptor_dict(*insp.descriptor);
            return py::make_tuple(descriptor, insp.problems);
          },
          py::arg("model_id"))
      .def("validate",
           [](const llmlb::ModelStore& store, const std::string& model_id) {
             return store.inspect(model_id).problems;
           },
           py::arg("model_id"), release_gil())
      .def("detect_format", &llmlb::ModelStore::detect_format, py::arg("model_id"), release_gil())
      .def("delete_model", &llmlb::ModelStore::delete_model, py::arg("model_id"), release_gil())
      .def("prefetch", &llmlb::ModelStore::prefetch, py::arg("model_id"), release_gil());
}
