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
