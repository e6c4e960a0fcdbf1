// The one Python module of the CPU kernels (built by bakallm/kernels/cpu_build.py): each source
// adds its functions to it.

#include <torch/extension.h>

void bind_scan(pybind11::module_& module);
void bind_fused(pybind11::module_& module);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  bind_scan(module);
  bind_fused(module);
}
