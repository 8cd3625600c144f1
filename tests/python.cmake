# Python package tests: pytest over tests/python against the libkvq.so just built, in three ctest tests so that a
# group that cannot run here shows as SKIP (exit 77) instead of hiding inside a pass (tests/python/run_pytest.py):
#   python_pytest    the numpy-only binding and validation tests: must all run (SKIP only without numpy/pytest)
#   python_hf        the transformers tests on the CPU: SKIP without torch/transformers, FAIL instead when
#                    KVQ_REQUIRE_HF=1 (CI); every test must run once torch is there
#   python_hf_oldest the same tests with the oldest transformers pyproject.toml claims (>= 5.17), in the environment
#                    scripts/setup.sh makes (KVQ_HF_OLDEST_PYTHON, default .venv-hf-oldest/bin/python: a venv that
#                    reuses the system's torch); SKIP / FAIL like python_hf when that environment is missing, FAIL
#                    when its transformers is not the claimed lower bound
#   python_cuda      the GPU tests: SKIP without a CUDA device and kvq's CUDA library (KVQ_REQUIRE_CUDA=1: FAIL)
# A skipped test inside a group that runs fails the group. Not registered in sanitizer builds (an ASan libkvq.so
# cannot be loaded into an uninstrumented python).
find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND AND TARGET kvq_shared AND NOT KVQ_SANITIZE)
  set(_kvq_py_env "KVQ_LIBRARY=$<TARGET_FILE:kvq_shared>;OMP_WAIT_POLICY=PASSIVE")
  add_test(NAME python_pytest
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/python/run_pytest.py --group bindings)
  add_test(NAME python_hf
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/python/run_pytest.py --group hf)
  set(KVQ_HF_OLDEST_PYTHON "${PROJECT_SOURCE_DIR}/.venv-hf-oldest/bin/python" CACHE FILEPATH
      "Python of the environment with the oldest supported transformers (scripts/setup.sh makes it)")
  add_test(NAME python_hf_oldest
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/python/run_pytest.py --group hf
                   --python ${KVQ_HF_OLDEST_PYTHON} --transformers oldest)
  # the CPU tests never load the CUDA library (the build's libkvq has none next to it)
  set_tests_properties(python_pytest python_hf python_hf_oldest PROPERTIES
    SKIP_RETURN_CODE 77 TIMEOUT 1800 ENVIRONMENT "${_kvq_py_env};KVQ_CUDA_LIBRARY=/nonexistent")
  add_test(NAME python_cuda
           COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_LIST_DIR}/python/run_pytest.py --group cuda)
  set_tests_properties(python_cuda PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 1800 ENVIRONMENT "${_kvq_py_env}")
  # the HF tests run torch on the 2 cores: not at the same time as the other heavy tests
  set_tests_properties(python_hf python_hf_oldest PROPERTIES RUN_SERIAL TRUE)
endif()
