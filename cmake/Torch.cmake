# Locate the torch that the build interpreter imports, without find_package(Torch):
# that config insists on a CUDA toolkit for CUDA wheels and injects its own -gencode flags.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "adaptdiff: 'import torch' failed in ${Python_EXECUTABLE}:\n${_torch_err}\n"
    "Install torch first (pip install torch==2.13.0) and build with "
    "'pip install --no-build-isolation .'")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_ROOT)
list(GET _torch_info 1 TORCH_VERSION)
list(GET _torch_info 2 TORCH_CUDA_VERSION)
list(GET _torch_info 3 TORCH_CXX11_ABI)
message(STATUS "adaptdiff: torch ${TORCH_VERSION} at ${TORCH_ROOT} (CUDA '${TORCH_CUDA_VERSION}', cxx11 abi ${TORCH_CXX11_ABI})")

set(TORCH_INCLUDE_DIRS "${TORCH_ROOT}/include" "${TORCH_ROOT}/include/torch/csrc/api/include")
# Plain paths, not find_library: cached results would leak between CPU and CUDA build folders.
set(TORCH_LIBS "${TORCH_ROOT}/lib/libc10.so" "${TORCH_ROOT}/lib/libtorch.so" "${TORCH_ROOT}/lib/libtorch_cpu.so")
set(TORCH_CUDA_LIBS "${TORCH_ROOT}/lib/libc10_cuda.so" "${TORCH_ROOT}/lib/libtorch_cuda.so")
set(TORCH_DEFINES "_GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}")
