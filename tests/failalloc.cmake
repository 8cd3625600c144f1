# Allocation-failure tests (issue 17): the n-th allocation inside kvq's code fails (tests/failalloc.c, linked with
# ld --wrap) for every n the path reaches. Registered with KVQ_FAILALLOC (default: on in sanitizer builds, where
# LSan turns a forgotten free on an error path into a failure).
if(NOT KVQ_FAILALLOC)
  return()
endif()
set(KVQ_FAILALLOC_WRAP "LINKER:--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=aligned_alloc,--wrap=posix_memalign,--wrap=strdup,--wrap=strndup")
add_library(kvq_failalloc OBJECT ${CMAKE_CURRENT_LIST_DIR}/failalloc.c)
# An object library: its objects go on the link line itself, so the __wrap_* symbols are there for every archive.
function(kvq_failalloc_link target)
  target_link_libraries(${target} PRIVATE kvq_failalloc)
  target_link_options(${target} PRIVATE ${KVQ_FAILALLOC_WRAP})
endfunction()

add_executable(test_failalloc_cache ${CMAKE_CURRENT_LIST_DIR}/test_failalloc_cache.c)
target_link_libraries(test_failalloc_cache PRIVATE kvq m)
kvq_failalloc_link(test_failalloc_cache)
add_test(NAME failalloc_cache_create COMMAND test_failalloc_cache create)
add_test(NAME failalloc_cache_workload COMMAND test_failalloc_cache workload)
set_tests_properties(failalloc_cache_create failalloc_cache_workload PROPERTIES TIMEOUT 900)

# Engine load + prefill + decode, perplexity and tokenize through the kvq CLI on a tiny synthetic model
# (tests/make_tiny_gguf.py), failing each allocation in turn (scripts/failalloc.sh runs one process per n). The CLI
# itself gets the wrappers: with KVQ_FAILALLOC_N unset they only count.
find_package(Python3 COMPONENTS Interpreter)
if(TARGET kvq_cli AND Python3_Interpreter_FOUND)
  kvq_failalloc_link(kvq_cli)
  set(tiny ${CMAKE_CURRENT_BINARY_DIR}/tiny.gguf)
  add_custom_command(OUTPUT ${tiny} COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/make_tiny_gguf.py ${tiny}
                     DEPENDS ${CMAKE_CURRENT_LIST_DIR}/make_tiny_gguf.py VERBATIM)
  add_custom_target(kvq_tiny_gguf ALL DEPENDS ${tiny})
  set(txt ${CMAKE_CURRENT_LIST_DIR}/data/ppl_excerpt.txt)
  set(run ${PROJECT_SOURCE_DIR}/scripts/failalloc.sh)
  add_test(NAME failalloc_cli_run COMMAND bash ${run} -- $<TARGET_FILE:kvq_cli> run -m ${tiny} -p "hello world in"
           -n 4 --temp 0.5 --kv-type q4 --residual 16 --group 16 --batch 2)
  add_test(NAME failalloc_cli_perplexity COMMAND bash ${run} -- $<TARGET_FILE:kvq_cli> perplexity -m ${tiny} -f ${txt}
           --ctx 32 --chunks 2 --batch 8 --compare q8,q4:r16:g16 -q)
  add_test(NAME failalloc_cli_tokenize COMMAND bash ${run} -- $<TARGET_FILE:kvq_cli> tokenize -m ${tiny} --chat -p
           "hello world")
  set_tests_properties(failalloc_cli_run failalloc_cli_perplexity failalloc_cli_tokenize PROPERTIES TIMEOUT 1200)
endif()
