/// @file prefloss.hpp
/// Umbrella header: everything public in prefloss.
#pragma once

#include "config.hpp"
#include "errors.hpp"
#include "math/log1mexp.hpp"
#include "math/log_sigmoid.hpp"
#include "math/sigmoid.hpp"
#include "math/softplus.hpp"
#include "reduce/masked.hpp"
#include "reduce/sequence.hpp"
#include "loss/bradley_terry.hpp"
#include "loss/dpo.hpp"
#include "loss/kto.hpp"
#include "reduce/aggregation.hpp"
#include "rl/kl.hpp"
#include "loss/ppo_clip.hpp"
#include "loss/value.hpp"
#include "rl/gae.hpp"
#include "rl/whiten.hpp"
#include "rl/group_advantages.hpp"
#include "loss/sft.hpp"
