# The threading contract of kvq.h (concurrent const calls, one writer then readers, independent caches). Runs in
# every tier; the tsan tier (scripts/test.sh) is where it matters: built with -fsanitize=thread, a race fails it.
if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/test_threads.c)
  find_package(Threads REQUIRED)
  add_executable(test_threads ${CMAKE_CURRENT_LIST_DIR}/test_threads.c)
  target_link_libraries(test_threads PRIVATE kvq Threads::Threads m)
  add_test(NAME core_threads COMMAND test_threads)
  set_tests_properties(core_threads PROPERTIES TIMEOUT 600 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
endif()

# The engine's thread pool (src/model/tpool.c) and kvq_cache_set_thread_pool: here so that the tsan tier races it too
# (tpool.c needs no BLAS, so it builds without the model library).
if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/test_tpool.c)
  find_package(Threads REQUIRED)
  add_executable(test_tpool ${CMAKE_CURRENT_LIST_DIR}/test_tpool.c ${PROJECT_SOURCE_DIR}/src/model/tpool.c
                            ${PROJECT_SOURCE_DIR}/src/model/model_err.c)
  target_include_directories(test_tpool PRIVATE ${CMAKE_CURRENT_LIST_DIR} ${PROJECT_SOURCE_DIR}/src/model)
  target_link_libraries(test_tpool PRIVATE kvq Threads::Threads m)
  add_test(NAME core_tpool COMMAND test_tpool)
  set_tests_properties(core_tpool PROPERTIES TIMEOUT 300)
endif()
