/// @file detail/eigen.hpp
/// Eigen's Tensor module, as every prefloss header includes it. GCC 12 with AVX-512 reports
/// -Wmaybe-uninitialized inside its own intrinsic headers (their `__m512 __Y = __Y;` idiom) for
/// Eigen code instantiated anywhere in a translation unit, which breaks -Werror builds. Included
/// through here, those headers sit inside PREFLOSS_KERNELS_BEGIN/END, so the false positives are
/// off whichever prefloss header comes first. A program that includes Eigen itself before
/// prefloss keeps GCC's behaviour for its own Eigen code; prefloss's kernels are covered either
/// way (the pragmas apply at every frame of their inlining chains).
#pragma once

#include "../config.hpp"

PREFLOSS_KERNELS_BEGIN
#include <unsupported/Eigen/CXX11/Tensor>
PREFLOSS_KERNELS_END
