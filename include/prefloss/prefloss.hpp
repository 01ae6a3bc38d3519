/// @file prefloss.hpp
/// Umbrella header: everything public in prefloss.
#pragma once

// detail/simd.hpp (via math/) comes first so its GCC 12 AVX-512 warning workaround covers
// the intrinsics headers before Eigen includes them.
#include "config.hpp"
#include "errors.hpp"
#include "math/log1mexp.hpp"
#include "math/log_sigmoid.hpp"
#include "math/sigmoid.hpp"
#include "math/softplus.hpp"
#include "reduce/aggregation.hpp"
#include "reduce/masked.hpp"
#include "reduce/sequence.hpp"
#include "loss/bradley_terry.hpp"
#include "loss/dpo.hpp"
#include "loss/ipo.hpp"
#include "loss/kto.hpp"
#include "loss/orpo.hpp"
#include "loss/ppo_clip.hpp"
#include "loss/sft.hpp"
#include "loss/simpo.hpp"
#include "loss/value.hpp"
#include "rl/gae.hpp"
#include "rl/group_advantages.hpp"
#include "rl/kl.hpp"
#include "rl/whiten.hpp"
