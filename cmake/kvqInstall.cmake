# Install rules (KVQ_INSTALL): headers, libkvq.a, libkvq.so with its soname, libkvq_cuda.a and kvq_cuda.h when the
# CUDA backend is built, the kvq CLI when built, lib/pkgconfig/kvq.pc and the CMake package (find_package(kvq):
# kvq::kvq, kvq::kvq_static, kvq::kvq_shared, kvq::kvq_cuda). Included from the top-level CMakeLists.txt after every
# target exists.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(KVQ_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/kvq)
set(KVQ_EXPORTED kvq kvq_shared)
set(KVQ_HEADERS ${PROJECT_SOURCE_DIR}/include/kvq.h)
set(KVQ_HAVE_CUDA OFF)
if(TARGET kvq_cuda)
  set(KVQ_HAVE_CUDA ON)
  list(APPEND KVQ_EXPORTED kvq_cuda)
  list(APPEND KVQ_HEADERS ${PROJECT_SOURCE_DIR}/include/kvq_cuda.h)
endif()

install(TARGETS ${KVQ_EXPORTED} EXPORT kvqTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT kvq_dev
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT kvq_runtime NAMELINK_COMPONENT kvq_dev
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT kvq_runtime)
install(FILES ${KVQ_HEADERS} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT kvq_dev)
if(TARGET kvq_cli)
  install(TARGETS kvq_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT kvq_runtime)
endif()

install(EXPORT kvqTargets NAMESPACE kvq:: DESTINATION ${KVQ_CMAKE_DIR} COMPONENT kvq_dev)
set(KVQ_HAVE_OPENMP ${OpenMP_C_FOUND})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/kvqConfig.cmake.in ${PROJECT_BINARY_DIR}/kvqConfig.cmake
                              INSTALL_DESTINATION ${KVQ_CMAKE_DIR})
# 0.x: a minor version may break the API (include/kvq.h, section 1), so only the same minor version is compatible
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvqConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvqConfig.cmake ${PROJECT_BINARY_DIR}/kvqConfigVersion.cmake
        DESTINATION ${KVQ_CMAKE_DIR} COMPONENT kvq_dev)

# kvq.pc finds the prefix from its own place (${pcfiledir}), so `cmake --install build --prefix DIR` works for any DIR.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(KVQ_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(KVQ_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
else()
  file(RELATIVE_PATH _kvq_up "/kvq-prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/kvq-prefix")
  string(REGEX REPLACE "/$" "" _kvq_up "${_kvq_up}")
  set(KVQ_PC_PREFIX "\${pcfiledir}/${_kvq_up}")
  set(KVQ_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(KVQ_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(KVQ_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
# what a static link of libkvq.a needs besides it (pkg-config --static)
set(KVQ_PC_LIBS_PRIVATE "")
if(OpenMP_C_FOUND)
  foreach(l ${OpenMP_C_LIB_NAMES})
    string(APPEND KVQ_PC_LIBS_PRIVATE " -l${l}")
  endforeach()
endif()
string(APPEND KVQ_PC_LIBS_PRIVATE " ${CMAKE_THREAD_LIBS_INIT} -lm")
string(REGEX REPLACE "  +" " " KVQ_PC_LIBS_PRIVATE "${KVQ_PC_LIBS_PRIVATE}")
string(STRIP "${KVQ_PC_LIBS_PRIVATE}" KVQ_PC_LIBS_PRIVATE)
configure_file(${CMAKE_CURRENT_LIST_DIR}/kvq.pc.in ${PROJECT_BINARY_DIR}/kvq.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvq.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT kvq_dev)
