# Tests of the model layer (GGUF reader, tokenizer, forward pass, CLI). Registered only when kvq_model is built
# (OpenBLAS found). Model-dependent tests exit 77 (ctest: skipped) when models/ has no model.
if(NOT KVQ_HAVE_MODEL)
  return()
endif()
set(KVQ_TEST_MODEL ${CMAKE_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
set(KVQ_TEST_CORPUS /usr/share/debian-reference/debian-reference.en.txt.gz)

add_executable(test_model_golden ${CMAKE_SOURCE_DIR}/tests/test_model_golden.c)
target_link_libraries(test_model_golden PRIVATE kvq_model m)
add_test(NAME model_golden COMMAND test_model_golden ${KVQ_TEST_MODEL} ${CMAKE_SOURCE_DIR}/tests/data/tok_golden.txt
         ${CMAKE_SOURCE_DIR}/tests/data/logits_golden.txt ${KVQ_TEST_CORPUS})
set_tests_properties(model_golden PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
