/*
 * gen.c -- deterministic test inputs shared with tests/ref/gen_optim.py.
 */
#include "tests/support/gen.h"

static inline uint64_t tgen_mix(uint64_t x)
{
    uint64_t z = x + UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

uint64_t tgen_splitmix64(uint64_t x)
{
    return tgen_mix(x);
}

uint64_t tgen_stream_key(uint64_t seed, uint64_t stream)
{
    return tgen_mix(tgen_mix(seed) ^ stream);
}

/* 2^-e for the eight binades (exact, cheaper than ldexp), and 0 for the
 * one value in sixteen that is zero: indexed without a branch. */
static const double tgen_scale[2][8] = {
    {1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125},
    {0, 0, 0, 0, 0, 0, 0, 0},
};

static inline double tgen_value_inline(uint64_t key, uint64_t index)
{
    uint64_t h = tgen_mix(key ^ index);
    /* h >> 11 < 2^53 converts exactly; the scalings by powers of two and
     * the subtraction of 1 are exact too, so no rounding happens here.
     * A zero is +0.0 (u * 0 could be -0.0). */
    double u = (double)(h >> 11) * 0x1p-52 - 1.0;
    double v = u * tgen_scale[(h & 15) == 0][(h >> 4) & 7];
    return v + 0.0;
}

double tgen_value(uint64_t key, uint64_t index)
{
    return tgen_value_inline(key, index);
}

void tgen_fill(optim_dtype dt, void *out, size_t n, uint64_t seed,
               uint64_t stream, double scale)
{
    uint64_t key = tgen_stream_key(seed, stream);
    if (dt == OPTIM_F32) {
        float *o = out;
        for (size_t i = 0; i < n; i++)
            o[i] = (float)(scale * tgen_value_inline(key, i));
    } else {
        double *o = out;
        for (size_t i = 0; i < n; i++)
            o[i] = scale * tgen_value_inline(key, i);
    }
}
