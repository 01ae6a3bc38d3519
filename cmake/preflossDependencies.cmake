# Finds prefloss's dependencies; shared by the build and by the installed package config.
# Threads: prefloss/thread_pool.hpp starts std::threads (Eigen's pool); -pthread where the libc
# still needs it (glibc < 2.34), nothing elsewhere.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(xsimd 8.1)
find_dependency(Threads)

# Debian's xsimd 8.1 was built with xtl, so its exported target carries the bare name "xtl" in
# INTERFACE_LINK_LIBRARIES, yet its config never looks for xtl. Without an xtl target that name
# becomes a bogus -lxtl. The headers only include xtl under XSIMD_ENABLE_XTL_COMPLEX, which the
# target does not set, so an empty stand-in is enough; a real xtl package is preferred when there
# is one, so that the stand-in never shadows it. The name is resolved in this directory (where
# xsimd was imported), so a local IMPORTED target suffices and nothing global is defined.
get_target_property(_prefloss_xsimd_links xsimd INTERFACE_LINK_LIBRARIES)
list(FIND _prefloss_xsimd_links xtl _prefloss_xtl_index)  # list(FIND), not IN_LIST: any consumer policy
if(NOT _prefloss_xtl_index EQUAL -1 AND NOT TARGET xtl)
  find_package(xtl QUIET CONFIG)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
unset(_prefloss_xsimd_links)
unset(_prefloss_xtl_index)
