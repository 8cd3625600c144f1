# Core library tests (ctest). Each is a plain C program that exits non-zero on failure.
foreach(t roundtrip attn cache)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.c)
    add_executable(test_${t} ${CMAKE_CURRENT_SOURCE_DIR}/test_${t}.c)
    target_link_libraries(test_${t} PRIVATE kvq m)
    add_test(NAME core_${t} COMMAND test_${t})
  endif()
endforeach()
