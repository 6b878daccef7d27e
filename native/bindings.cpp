// The only pybind11 file: exposes the C++ store to Python as llmlb._model_storage.
// Every call that touches the disk releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gguf.hpp"
#include "model_id.hpp"
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
