# Install test (issue 16): installs this build into a temporary prefix and builds the README's C snippet
# (tests/install/readme_snippet.c, checked to be the README's block) against it with pkg-config and with
# find_package(kvq), and against the source tree with add_subdirectory; runs each binary, shared and static.
# Not in sanitizer builds: the instrumented libraries cannot be linked by a plain compiler command.
if(NOT KVQ_SANITIZE AND KVQ_INSTALL)
  set(_kvq_cuda_built 0)
  if(TARGET kvq_cuda)
    set(_kvq_cuda_built 1)
  endif()
  add_test(NAME install_consumers
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/install/test_install.sh ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR}
                   ${CMAKE_COMMAND} ${CMAKE_C_COMPILER} ${_kvq_cuda_built})
  set_tests_properties(install_consumers PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900
                                                   ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
endif()
