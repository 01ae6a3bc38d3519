# Settings for prefloss's own tests, benchmarks and examples; never applied to consumers.
add_library(prefloss_dev INTERFACE)
target_link_libraries(prefloss_dev INTERFACE prefloss)
if(PREFLOSS_NATIVE)
  target_link_libraries(prefloss_dev INTERFACE prefloss_native)
endif()
target_compile_options(prefloss_dev INTERFACE -Wall -Wextra -Wpedantic -Wshadow -Wsign-conversion $<$<BOOL:${PREFLOSS_WERROR}>:-Werror>)
# No FMA contraction: GCC fuses a * b + c into one rounding by default where the target has FMA,
# at sites of its choosing, so two code paths of one formula (a fused call and its composition)
# could differ in the last bit on one CPU and not on another (test_ppo_from_logits' entropy_loss
# did on Sapphire Rapids). Kernels that want an FMA call it explicitly.
target_compile_options(prefloss_dev INTERFACE -ffp-contract=off)
if(PREFLOSS_SANITIZE)
  target_compile_options(prefloss_dev INTERFACE -fsanitize=${PREFLOSS_SANITIZE} -fno-omit-frame-pointer
                                                -fno-sanitize-recover=all)
  target_link_options(prefloss_dev INTERFACE -fsanitize=${PREFLOSS_SANITIZE})
endif()
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
