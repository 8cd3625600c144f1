# Python package tests (issue 6): pytest over tests/python against the libkvq.so just built. The numpy-only binding
# tests always run; the transformers tests skip themselves (pytest.importorskip) where torch is not installed.
# Not registered in sanitizer builds (an ASan libkvq.so cannot be loaded into an uninstrumented python).
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND AND TARGET kvq_shared AND NOT KVQ_SANITIZE)
  add_test(NAME python_pytest
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/python/run_pytest.py)
  set_tests_properties(python_pytest PROPERTIES
    SKIP_RETURN_CODE 77 TIMEOUT 1800
    ENVIRONMENT "KVQ_LIBRARY=$<TARGET_FILE:kvq_shared>;KVQ_CUDA_LIBRARY=/nonexistent;OMP_WAIT_POLICY=PASSIVE")
endif()
