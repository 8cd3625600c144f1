# CUDA backend tests (built in src/cuda). Without a usable GPU the binary prints "SKIP: <reason>" and returns 77.
if(TARGET test_cuda)
  add_test(NAME cuda_all COMMAND test_cuda)
  set_tests_properties(cuda_all PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 1200)
endif()
