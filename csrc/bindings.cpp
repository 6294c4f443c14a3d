// pybind11 module relflat_ext._C: build information only (the ops register through TORCH_LIBRARY).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#ifndef RELFLAT_VERSION
#error "RELFLAT_VERSION must be defined by the build"
#endif
#ifndef RELFLAT_TORCH_VERSION
#error "RELFLAT_TORCH_VERSION must be defined by the build"
#endif
#ifndef RELFLAT_CUDA_ARCH_LIST
#define RELFLAT_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

static std::vector<std::string> split_arch_list(const std::string& list) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : list + ";") {
    if (c == ';' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  return out;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "relflat_ext compiled kernels (ops live under torch.ops.relflat)";
  m.def("build_info", []() {
    py::dict info;
    info["version"] = RELFLAT_VERSION;
    info["torch_version"] = RELFLAT_TORCH_VERSION;
#ifdef RELFLAT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_arch_list"] = split_arch_list(RELFLAT_CUDA_ARCH_LIST);
#else
    info["cuda"] = false;
    info["cuda_arch_list"] = std::vector<std::string>{};
#endif
    return info;
  });
}
