// The Python module arq._C: importing it registers the torch.ops.arq operators
// declared with TORCH_LIBRARY_FRAGMENT in the other sources.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(arq, m) {
  m.def("built_with_cuda() -> bool");
}

TORCH_LIBRARY_IMPL(arq, CompositeExplicitAutograd, m) {
  m.impl("built_with_cuda", []() -> bool {
#ifdef ARQ_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

static struct PyModuleDef arq_c_module = {PyModuleDef_HEAD_INIT, "_C", "arq compiled ops (torch.ops.arq)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&arq_c_module); }
