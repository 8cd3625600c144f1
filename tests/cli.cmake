# Tests of the kvq command (src/cli): the parser/sampler/help unit test and the end-to-end script. The parse-only
# part needs no model; the model part exits 77 (skipped) when models/ lacks SmolLM2-135M-Instruct.
if(NOT TARGET kvq_cli_core)
  return()
endif()
add_executable(test_cli_parse ${PROJECT_SOURCE_DIR}/tests/test_cli_parse.c)
target_link_libraries(test_cli_parse PRIVATE kvq_cli_core)
add_test(NAME cli_parse COMMAND test_cli_parse)

set(KVQ_CLI_TEST_ENV "ASAN_OPTIONS=detect_leaks=1:abort_on_error=1" "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
    "KVQ_CLI_SANITIZED=$<BOOL:${KVQ_SANITIZE}>")
foreach(part parse model)
  add_test(NAME cli_${part}_sh COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_cli.sh ${part} $<TARGET_FILE:kvq_cli>
           $<TARGET_FILE:test_cli_parse> ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf ${PROJECT_SOURCE_DIR})
  set_tests_properties(cli_${part}_sh PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900 ENVIRONMENT "${KVQ_CLI_TEST_ENV}")
endforeach()
