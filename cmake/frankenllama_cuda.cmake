# CUDA builds (GGML_CUDA=ON): what ggml's own CMake leaves to chance. Included before llama.cpp's
# CMake (frankenllama_cuda_prepare) and after it (frankenllama_cuda_finish).
#
# - The toolkit may be a system install or NVIDIA's CUDA wheels (nvidia-cuda-nvcc, nvidia-cuda-crt,
#   nvidia-nvvm, nvidia-cuda-cccl, nvidia-cuda-runtime, nvidia-cublas: a toolkit layout under
#   site-packages/nvidia/cu13 whose libraries have only versioned names, libcublas.so.13). Name it
#   with -DCMAKE_CUDA_COMPILER=<toolkit>/bin/nvcc (or -DCUDAToolkit_ROOT=<toolkit>).
# - Missing pieces stop the configure with a message saying what to do: no toolkit, no cuBLAS,
#   no architecture.
# - Architectures: ggml defaults to `native` (the GPUs of the build machine); on a machine without
#   a GPU that resolves to garbage ("No CUDA devices found.-real"), so there
#   -DCMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable) is required.
# - Without a driver library to link (no GPU driver, no toolkit stub: the wheels have none),
#   GGML_CUDA_NO_VMM is switched on: ggml-cuda then needs no libcuda.so to link or to load.
# - The installed ggml-cuda finds the CUDA runtime libraries through its RUNPATH: the CUDA wheels
#   installed next to frankenllama ($ORIGIN/../../nvidia/cuNN/lib), then a system toolkit's folder.

function(_frankenllama_cuda_versioned_library var dir name)
    # a wheel toolkit's library: lib<name>.so.<N> only (find_library wants lib<name>.so)
    if (NOT ${var} AND NOT EXISTS "${dir}/lib${name}.so")
        file(GLOB candidates "${dir}/lib${name}.so.[0-9]*")
        if (candidates)
            list(SORT candidates)
            list(GET candidates 0 found)
            set(${var} "${found}" CACHE FILEPATH "frankenllama: lib${name} of the CUDA wheel toolkit" FORCE)
        endif()
    endif()
endfunction()

macro(frankenllama_cuda_prepare)
    # 1. One toolkit: the compiler and CUDAToolkit_ROOT name the same folder
    if (NOT CMAKE_CUDA_COMPILER AND DEFINED ENV{CUDACXX})
        set(CMAKE_CUDA_COMPILER "$ENV{CUDACXX}")
    endif()
    if (NOT CMAKE_CUDA_COMPILER AND CUDAToolkit_ROOT AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
        set(CMAKE_CUDA_COMPILER "${CUDAToolkit_ROOT}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
    endif()
    set(FRANKENLLAMA_CUDA_WHEEL_TOOLKIT OFF)
    if (CMAKE_CUDA_COMPILER AND IS_ABSOLUTE "${CMAKE_CUDA_COMPILER}")
        get_filename_component(_fl_nvcc "${CMAKE_CUDA_COMPILER}" REALPATH)
        get_filename_component(_fl_root "${_fl_nvcc}" DIRECTORY)
        get_filename_component(_fl_root "${_fl_root}" DIRECTORY)
        # the wheel layout: <site-packages>/nvidia/cuNN/{bin,include,lib}, versioned libraries only
        if (_fl_root MATCHES "/nvidia/cu[0-9]+$" AND NOT EXISTS "${_fl_root}/lib/libcudart.so")
            set(FRANKENLLAMA_CUDA_WHEEL_TOOLKIT ON)
            if (NOT CUDAToolkit_ROOT)
                set(CUDAToolkit_ROOT "${_fl_root}")
            endif()
            # FindCUDAToolkit finds the toolkit by CUDA_CUDART, its imported targets by CUDA_<name>_LIBRARY
            _frankenllama_cuda_versioned_library(CUDA_CUDART "${_fl_root}/lib" cudart)
            foreach (_fl_lib cudart cublas cublasLt)
                _frankenllama_cuda_versioned_library(CUDA_${_fl_lib}_LIBRARY "${_fl_root}/lib" ${_fl_lib})
            endforeach()
            # the wheel's nvcc.profile links from <toolkit>/lib64, its libraries are in <toolkit>/lib
            if (NOT EXISTS "${_fl_root}/lib64")
                string(APPEND CMAKE_CUDA_FLAGS " -L${_fl_root}/lib")
            endif()
        endif()
    endif()

    # 2. The toolkit and cuBLAS
    find_package(CUDAToolkit QUIET)
    if (NOT CUDAToolkit_FOUND)
        message(FATAL_ERROR
            "frankenllama: GGML_CUDA=ON but no CUDA toolkit was found. Install one (nvcc on PATH or "
            "/usr/local/cuda), or install NVIDIA's CUDA wheels into a virtual environment and name its "
            "compiler: -DCMAKE_CUDA_COMPILER=<venv>/lib/python3.X/site-packages/nvidia/cu13/bin/nvcc "
            "(README, GPU builds).")
    endif()
    if (NOT TARGET CUDA::cublas OR NOT TARGET CUDA::cudart)
        message(FATAL_ERROR
            "frankenllama: the CUDA toolkit ${CUDAToolkit_VERSION} in ${CUDAToolkit_LIBRARY_DIR} (nvcc "
            "${CUDAToolkit_NVCC_EXECUTABLE}) has no cuBLAS or no CUDA runtime library (libcublas.so, "
            "libcudart.so), which ggml-cuda links. Install the toolkit's cuBLAS development files, or "
            "build with NVIDIA's CUDA wheels (nvidia-cuda-nvcc, nvidia-cuda-crt, nvidia-nvvm, "
            "nvidia-cuda-cccl, nvidia-cuda-runtime, nvidia-cublas) and "
            "-DCMAKE_CUDA_COMPILER=<site-packages>/nvidia/cu13/bin/nvcc (README, GPU builds).")
    endif()
    message(STATUS "frankenllama: CUDA toolkit ${CUDAToolkit_VERSION} in ${CUDAToolkit_LIBRARY_DIR}"
                   " (wheel layout: ${FRANKENLLAMA_CUDA_WHEEL_TOOLKIT})")

    # 3. Architectures: never `native` without a GPU
    if (NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT "$ENV{CUDAARCHS}" STREQUAL "")
        # ggml picks its default before enable_language(CUDA) would read CUDAARCHS
        set(CMAKE_CUDA_ARCHITECTURES "$ENV{CUDAARCHS}")
    endif()
    if (NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "native")
        # what `native` resolves to: CMake asks the toolkit's __nvcc_device_query
        set(_fl_gpus "")
        set(_fl_query "${CUDAToolkit_BIN_DIR}/__nvcc_device_query")
        if (EXISTS "${_fl_query}")
            execute_process(COMMAND "${_fl_query}" RESULT_VARIABLE _fl_rc
                            OUTPUT_VARIABLE _fl_gpus ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
            if (NOT _fl_rc EQUAL 0)
                set(_fl_gpus "")
            endif()
        endif()
        if (NOT _fl_gpus MATCHES "^[0-9]+[af]?(;[0-9]+[af]?)*$")
            message(FATAL_ERROR
                "frankenllama: no GPU is visible on this machine, so the CUDA architectures can't be "
                "`native`: name the GPUs' compute capabilities, e.g. -DCMAKE_CUDA_ARCHITECTURES=86 "
                "(RTX 30xx, A10), 89 (RTX 40xx, L4), 80 (A100), 90 (H100/H200), 120 (RTX 50xx); "
                "several: \"86;89\". Each one adds 15 to 40 minutes of compile time on 2 cores.")
        endif()
        message(STATUS "frankenllama: CUDA architectures of this machine's GPUs: ${_fl_gpus}")
    endif()

    # 4. VMM needs the driver library at link and load time
    if (NOT GGML_CUDA_NO_VMM AND NOT TARGET CUDA::cuda_driver)
        message(STATUS "frankenllama: no CUDA driver library (libcuda.so) to link: building with "
                       "GGML_CUDA_NO_VMM=ON (ggml's memory pool without virtual memory management)")
        set(GGML_CUDA_NO_VMM ON CACHE BOOL "ggml: do not try to use CUDA VMM" FORCE)
    endif()
endmacro()

macro(frankenllama_cuda_finish rpath_origin)
    # the CUDA wheels installed in the same site-packages (frankenllama/lib/../../nvidia/cuNN/lib),
    # then a system toolkit's own folder (not a wheel toolkit's: it was only there for the build)
    set(_fl_rpath "${rpath_origin}" "${rpath_origin}/../../nvidia/cu${CUDAToolkit_VERSION_MAJOR}/lib")
    if (NOT FRANKENLLAMA_CUDA_WHEEL_TOOLKIT)
        list(APPEND _fl_rpath "${CUDAToolkit_LIBRARY_DIR}")
    endif()
    set_target_properties(ggml-cuda PROPERTIES INSTALL_RPATH "${_fl_rpath}")

    # what frankenllama._native preloads when the RUNPATH does not reach the libraries
    set(FRANKENLLAMA_CUDA_MAJOR ${CUDAToolkit_VERSION_MAJOR})
    set(FRANKENLLAMA_CUDA_VERSION ${CUDAToolkit_VERSION})
    configure_file("${CMAKE_CURRENT_SOURCE_DIR}/cmake/cuda_runtime.json.in"
                   "${CMAKE_CURRENT_BINARY_DIR}/cuda_runtime.json" @ONLY)
    install(FILES "${CMAKE_CURRENT_BINARY_DIR}/cuda_runtime.json"
            DESTINATION frankenllama/lib COMPONENT frankenllama)
endmacro()
