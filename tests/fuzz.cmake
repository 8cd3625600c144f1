# Fuzz targets (issue 17). For each tests/fuzz_<name>.c present:
#   - ctest fuzz_<name>_corpus: tests/corpus/<name>/ replayed through the entry point (fuzz_replay_main.c), in every
#     build; in the sanitizer tier that is the regression run of every input the fuzzers kept;
#   - with -DKVQ_FUZZ=ON (clang): the libFuzzer binary fuzz_<name>; scripts/fuzz.sh builds and runs them.
set(KVQ_FUZZ_NAMES gguf tokenizer cache cli)
foreach(name ${KVQ_FUZZ_NAMES})
  set(src ${CMAKE_CURRENT_LIST_DIR}/fuzz_${name}.c)
  if(NOT EXISTS ${src})
    continue()
  endif()
  if(name STREQUAL "gguf" OR name STREQUAL "tokenizer")
    if(NOT TARGET kvq_gguf)
      continue()
    endif()
    set(libs kvq_gguf kvq)
  elseif(name STREQUAL "cli")
    if(NOT TARGET kvq_cli_core OR NOT TARGET kvq_model)
      continue()
    endif()
    set(libs kvq_cli_core kvq_model)
  else()
    set(libs kvq)
  endif()
  set(corpus ${CMAKE_CURRENT_LIST_DIR}/corpus/${name})
  file(GLOB_RECURSE corpus_files ${corpus}/*)
  if(corpus_files)
    add_executable(fuzz_${name}_replay ${src} ${CMAKE_CURRENT_LIST_DIR}/fuzz_replay_main.c)
    target_link_libraries(fuzz_${name}_replay PRIVATE ${libs} m)
    add_test(NAME fuzz_${name}_corpus COMMAND fuzz_${name}_replay ${corpus})
    set_tests_properties(fuzz_${name}_corpus PROPERTIES TIMEOUT 900 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
  endif()
  if(KVQ_FUZZ)
    add_executable(fuzz_${name} ${src})
    target_link_libraries(fuzz_${name} PRIVATE ${libs} m)
    target_link_options(fuzz_${name} PRIVATE -fsanitize=fuzzer)
  endif()
endforeach()
if(KVQ_FUZZ)
  # clang at -O1 with ASan + UBSan + coverage spends over 10 min of CPU on each AVX kernel file (measured: avx512
  # 630 s, at -O0 19 s), which alone would exceed CI's budget. Those two files are built at -O0 in fuzz builds:
  # still instrumented, only slower to run (the fuzz targets spend their time in parsing, not in these kernels).
  set_property(SOURCE ${PROJECT_SOURCE_DIR}/src/core/attn_avx2.c ${PROJECT_SOURCE_DIR}/src/core/attn_avx512.c
               DIRECTORY ${PROJECT_SOURCE_DIR}/src/core APPEND PROPERTY COMPILE_OPTIONS -O0)
endif()
