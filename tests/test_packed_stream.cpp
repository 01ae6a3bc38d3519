// test_packed with every output written by streaming stores (threshold 0): packed rows start at
// any alignment, so fused token-loss rows take the aligned-streaming or the ordinary-store path
// row by row, and masked adjoints stream after a per-row head. Every check of test_packed must
// hold unchanged (the same bits against the padded layout, which streams too).
#define PREFLOSS_STREAMING_STORE_BYTES 0
#include "test_packed.cpp"
