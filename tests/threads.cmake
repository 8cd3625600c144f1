# The threading contract of kvq.h (concurrent const calls, one writer then readers, independent caches). Runs in
# every tier; the tsan tier (scripts/test.sh) is where it matters: built with -fsanitize=thread, a race fails it.
if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/test_threads.c)
  find_package(Threads REQUIRED)
  add_executable(test_threads ${CMAKE_CURRENT_LIST_DIR}/test_threads.c)
  target_link_libraries(test_threads PRIVATE kvq Threads::Threads m)
  add_test(NAME core_threads COMMAND test_threads)
  set_tests_properties(core_threads PROPERTIES TIMEOUT 600 ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
endif()
