/*
 * gen.h -- deterministic, index-addressable test inputs.
 *
 * tests/ref/gen_optim.py computes exactly the same values (its values()
 * and stream_key()), so a reference generated in Python for a few sampled
 * indices of a long vector matches what a C test computes for the whole
 * vector.  Change both together or not at all.
 */
#ifndef TGEN_H
#define TGEN_H

#include <stddef.h>
#include <stdint.h>

#include "optim/optim.h"

/* splitmix64's output function applied to x + the golden gamma. */
uint64_t tgen_splitmix64(uint64_t x);

/* The key of one stream of values (stream 0: initial params, stream t:
 * the gradient of update t). */
uint64_t tgen_stream_key(uint64_t seed, uint64_t stream);

/* Value i of a stream: a double in [-1, 1) spread over eight binades,
 * exactly 0 one time in sixteen.  Exact arithmetic only. */
double tgen_value(uint64_t key, uint64_t index);

/* out[i] = (T)(scale * tgen_value(key, i)) for i in [0, n), T the dtype.
 * scale should be a power of two so the product is exact. */
void tgen_fill(optim_dtype dt, void *out, size_t n, uint64_t seed,
               uint64_t stream, double scale);

#endif /* TGEN_H */
