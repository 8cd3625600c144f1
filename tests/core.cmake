# Core library tests (ctest). Each is a plain C program that exits non-zero on failure. Paths from
# PROJECT_SOURCE_DIR, never CMAKE_SOURCE_DIR: kvq may be built as another project's subdirectory.
foreach(t roundtrip attn cache softmax prerope squat prefill_exact)
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/test_${t}.c)
    add_executable(test_${t} ${PROJECT_SOURCE_DIR}/tests/test_${t}.c)
    target_link_libraries(test_${t} PRIVATE kvq m)
    add_test(NAME core_${t} COMMAND test_${t})
  endif()
endforeach()
# test_attn checks the kernel tables' 8-bit window expansion directly (src/core/attn.h)
target_include_directories(test_attn PRIVATE ${PROJECT_SOURCE_DIR}/src/core)

# The cache-operation fuzz target (tests/fuzz_cache.c) and its corpus replay are registered by tests/fuzz.cmake.

# The Hadamard rotation (kvq.h section 10): reads the sign bits through src/core/internal.h for its dense reference.
add_executable(test_rotate ${PROJECT_SOURCE_DIR}/tests/test_rotate.c)
target_include_directories(test_rotate PRIVATE ${PROJECT_SOURCE_DIR}/src/core)
target_link_libraries(test_rotate PRIVATE kvq m)
add_test(NAME core_rotate COMMAND test_rotate)
