# Tests of the model layer (GGUF reader, tokenizer, forward pass, CLI). The forward-pass tests are registered only
# when kvq_model is built (OpenBLAS found). Model-dependent tests exit 77 (ctest: skipped) when models/ has no model.
set(KVQ_TEST_MODEL ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf)
set(KVQ_TEST_CORPUS /usr/share/debian-reference/debian-reference.en.txt.gz)
if(NOT TARGET kvq_gguf)  # -DKVQ_BUILD_MODEL=OFF: no model layer to test
  return()
endif()
# GGUF reader hardening: crafted corrupt files, every truncation and seeded mutations through the fuzz entry point.
add_executable(test_gguf_corrupt ${PROJECT_SOURCE_DIR}/tests/test_gguf_corrupt.c ${PROJECT_SOURCE_DIR}/tests/fuzz_gguf.c)
target_link_libraries(test_gguf_corrupt PRIVATE kvq_gguf kvq)
add_test(NAME model_gguf_corrupt COMMAND test_gguf_corrupt ${KVQ_TEST_MODEL})
# Dequantization of every weight type (legacy and K-quants) against the gguf Python package's, bit for bit
# (tests/data/make_quant_golden.py writes the golden file at test time: no GGUF is kept in the tree; exit 77 without
# the gguf package).
add_executable(test_gguf_quants ${PROJECT_SOURCE_DIR}/tests/test_gguf_quants.c)
target_link_libraries(test_gguf_quants PRIVATE kvq_gguf kvq)
add_test(NAME model_gguf_quants COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_gguf_quants.sh $<TARGET_FILE:test_gguf_quants>
         ${PROJECT_SOURCE_DIR}/tests/data/make_quant_golden.py)
set_tests_properties(model_gguf_quants PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 120)
# Tokenizer without a model: merge order on a small hand-checked vocabulary (tests/tok_tiny.h), special tokens,
# round trip, and a time bound per input byte on long inputs (also on SmolLM2's vocabulary when models/ has it).
add_executable(test_tokenizer ${PROJECT_SOURCE_DIR}/tests/test_tokenizer.c)
target_include_directories(test_tokenizer PRIVATE ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(test_tokenizer PRIVATE kvq_gguf kvq)
add_test(NAME model_tokenizer COMMAND test_tokenizer ${KVQ_TEST_MODEL})
set_tests_properties(model_tokenizer PROPERTIES TIMEOUT 600)

if(NOT KVQ_HAVE_MODEL)
  return()
endif()

# Quantized weight products: every weight type x every kernel table vs dequantize-then-multiply, then slices of
# the real matrices of the models in models/ (those present).
add_executable(test_qmat ${PROJECT_SOURCE_DIR}/tests/test_qmat.c)
target_link_libraries(test_qmat PRIVATE kvq_model m)
add_test(NAME model_qmat COMMAND test_qmat ${KVQ_TEST_MODEL} ${PROJECT_SOURCE_DIR}/models/gemma-3-270m-q4_k_m.gguf)
set_tests_properties(model_qmat PROPERTIES ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)

add_executable(test_model_golden ${PROJECT_SOURCE_DIR}/tests/test_model_golden.c)
target_link_libraries(test_model_golden PRIVATE kvq_model m)
add_test(NAME model_golden COMMAND test_model_golden ${KVQ_TEST_MODEL} ${PROJECT_SOURCE_DIR}/tests/data/tok_golden.txt
         ${PROJECT_SOURCE_DIR}/tests/data/logits_golden.txt ${KVQ_TEST_CORPUS})
set_tests_properties(model_golden PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)

# Perplexity of each KV type on a corpus excerpt, with each kvq kernel table the CPU has: F16 against transformers'
# fp32 value, every type against a numpy emulation of kvq's formats (tests/data/make_ppl_reference.py) within bands
# measured over kernel tables x OpenBLAS cores (tests/data/ppl_reference.txt says how).
add_test(NAME model_ppl COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_model_ppl.sh $<TARGET_FILE:kvq_cli> ${KVQ_TEST_MODEL}
         ${PROJECT_SOURCE_DIR}/tests/data/ppl_excerpt.txt ${PROJECT_SOURCE_DIR}/tests/data/ppl_reference.txt)
set_tests_properties(model_ppl PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900)

# Gemma 3 270M (scripts/fetch-model.sh gemma3; skipped without it): the same golden test on its own reference files
# (tests/data/make_golden.py --model gemma3: tokenizer over the whole corpus, logits), and its perplexity on the
# excerpt against transformers' (tests/test_model_ppl_gemma.sh; bands in tests/data/ppl_reference_gemma3.txt).
set(KVQ_TEST_GEMMA ${PROJECT_SOURCE_DIR}/models/gemma-3-270m-q4_k_m.gguf)
add_test(NAME model_golden_gemma3 COMMAND test_model_golden ${KVQ_TEST_GEMMA} ${PROJECT_SOURCE_DIR}/tests/data/tok_golden_gemma3.txt
         ${PROJECT_SOURCE_DIR}/tests/data/logits_golden_gemma3.txt ${KVQ_TEST_CORPUS})
set_tests_properties(model_golden_gemma3 PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 600 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
add_test(NAME model_ppl_gemma3 COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_model_ppl_gemma.sh $<TARGET_FILE:kvq_cli> ${KVQ_TEST_GEMMA}
         ${PROJECT_SOURCE_DIR}/tests/data/ppl_excerpt.txt ${PROJECT_SOURCE_DIR}/tests/data/ppl_reference_gemma3.txt)
set_tests_properties(model_ppl_gemma3 PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900)
# kvq gen-model's quantizers (src/model/gguf_write.c) byte for byte against the gguf Python package (skips without it).
add_executable(test_gguf_quant ${PROJECT_SOURCE_DIR}/tests/test_gguf_quant.c)
target_link_libraries(test_gguf_quant PRIVATE kvq_gguf kvq m)
add_test(NAME model_gguf_quant COMMAND python3 ${PROJECT_SOURCE_DIR}/tests/test_gguf_quant.py $<TARGET_FILE:test_gguf_quant>)
set_tests_properties(model_gguf_quant PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 120)
# kvq gen-model end to end: synthetic GGUFs load and run in the CPU engine (no real model needed).
add_test(NAME model_gen_model COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_gen_model.sh $<TARGET_FILE:kvq_cli>)
set_tests_properties(model_gen_model PROPERTIES TIMEOUT 300 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
# The GPU engine against the CPU engine on generated models, each KV type (CUDA builds; exit 77 without a GPU).
if(TARGET kvq_model_gpu AND TARGET kvq_cuda)
  add_executable(test_model_gpu ${PROJECT_SOURCE_DIR}/tests/test_model_gpu.c)
  target_link_libraries(test_model_gpu PRIVATE kvq_model_gpu m)
  add_test(NAME model_gpu COMMAND bash ${PROJECT_SOURCE_DIR}/tests/test_model_gpu.sh $<TARGET_FILE:kvq_cli>
           $<TARGET_FILE:test_model_gpu>)
  set_tests_properties(model_gpu PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900)
  # The engine's decode GEMV (src/model/gemv_gpu.h) against cuBLAS and a double reference (exit 77 without a GPU).
  add_executable(test_gemv_gpu ${PROJECT_SOURCE_DIR}/tests/test_gemv_gpu.c)
  target_link_libraries(test_gemv_gpu PRIVATE kvq_model_gpu m)
  add_test(NAME gemv_gpu COMMAND test_gemv_gpu)
  set_tests_properties(gemv_gpu PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 300)
endif()
