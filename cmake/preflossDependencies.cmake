# Finds prefloss's two dependencies; shared by the build and by the installed package config.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
# Debian's xsimd 8.1 config lists the header-only "xtl" as a link library without shipping a
# target for it, which would turn into a bogus -lxtl. xsimd builds without xtl unless
# XSIMD_ENABLE_XTL_COMPLEX is set, so an empty stand-in target is enough.
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
find_dependency(xsimd 8.1)
