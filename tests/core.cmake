# Core library tests (ctest). Each is a plain C program that exits non-zero on failure. Paths from
# PROJECT_SOURCE_DIR, never CMAKE_SOURCE_DIR: kvq may be built as another project's subdirectory.
foreach(t roundtrip attn cache softmax)
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/test_${t}.c)
    add_executable(test_${t} ${PROJECT_SOURCE_DIR}/tests/test_${t}.c)
    target_link_libraries(test_${t} PRIVATE kvq m)
    add_test(NAME core_${t} COMMAND test_${t})
  endif()
endforeach()

# Cache-operation fuzz target (tests/fuzz_cache.c), replayed over its seed corpus by the standalone driver
# tests/fuzz_replay_main.c (any tests/fuzz_<name>.c can reuse it). It includes the core's internal.h for the fp16
# conversions. The libFuzzer build: clang -fsanitize=fuzzer,address,undefined (see the target's header).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/fuzz_cache.c AND EXISTS ${PROJECT_SOURCE_DIR}/tests/fuzz_replay_main.c)
  add_executable(fuzz_cache_replay ${PROJECT_SOURCE_DIR}/tests/fuzz_cache.c ${PROJECT_SOURCE_DIR}/tests/fuzz_replay_main.c)
  target_include_directories(fuzz_cache_replay PRIVATE ${PROJECT_SOURCE_DIR}/src/core)
  target_link_libraries(fuzz_cache_replay PRIVATE kvq m)
  add_test(NAME core_fuzz_cache_replay COMMAND fuzz_cache_replay ${PROJECT_SOURCE_DIR}/tests/corpus/cache)
endif()
