/*
 * vec.c -- the per-dtype loops over whole vectors that a step needs besides
 * the kernel: the fused finiteness + norm pass, scaling and clamping (for
 * clipping), accumulation, the mean of an accumulation, and conversions
 * to and from the 16-bit wire formats.  Written once here; every layer
 * above calls these.
 *
 * Reductions are blocked: a vector is cut into OPTIM_VEC_BLOCK-element
 * blocks, each block reduced in OPTIM_VEC_LANES independent partial sums
 * (the lanes let the compiler vectorise without reassociating anything),
 * the lanes combined in a fixed tree order, and the blocks' partials
 * combined in block order.  The result is therefore the same bit for bit
 * whether one thread walks every block or several threads take a share of
 * the blocks each, and on every CPU and in every clone.
 */
#include "optim/optim.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_THREAD__)
#define VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VEC_CLONES
#endif

#define LANES OPTIM_VEC_LANES

static double lanes_sum(const double *acc)
{
    double s[LANES];
    memcpy(s, acc, sizeof s);
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int k = 0; k < w; k++)
            s[k] = s[k] + s[k + w];
    return s[0];
}

static double lanes_max(const double *acc)
{
    double m = acc[0];
    for (int k = 1; k < LANES; k++)
        m = acc[k] > m ? acc[k] : m;
    return m;
}

/* Each loop also sums x - x per lane: 0 for finite elements, NaN as soon as
 * one is NaN or Inf, so finiteness costs no extra pass.  The max-magnitude
 * loop's vector max passes over NaN; when the bad sum says something is not
 * finite, a scalar pass decides between NaN (torch's max propagates it) and
 * Inf. */
#define DEFINE_NORM_LOOPS(T, SUFFIX)                                                    \
    VEC_CLONES static double sumsq_##SUFFIX(const T *restrict g, size_t n, double *bad) \
    {                                                                                   \
        double acc[LANES] = {0}, nf[LANES] = {0};                                       \
        size_t i = 0;                                                                   \
        for (; i + LANES <= n; i += LANES) {                                            \
            for (int k = 0; k < LANES; k++) {                                           \
                double x = (double)g[i + k];                                            \
                acc[k] = acc[k] + x * x;                                                \
                nf[k] = nf[k] + (x - x);                                                \
            }                                                                           \
        }                                                                               \
        for (int k = 0; i < n; i++, k++) {                                              \
            double x = (double)g[i];                                                    \
            acc[k] = acc[k] + x * x;                                                    \
            nf[k] = nf[k] + (x - x);                                                    \
        }                                                                               \
        *bad = lanes_sum(nf);                                                           \
        return lanes_sum(acc);                                                          \
    }                                                                                   \
    VEC_CLONES static double sumabs_##SUFFIX(const T *restrict g, size_t n, double *bad) \
    {                                                                                   \
        double acc[LANES] = {0}, nf[LANES] = {0};                                       \
        size_t i = 0;                                                                   \
        for (; i + LANES <= n; i += LANES) {                                            \
            for (int k = 0; k < LANES; k++) {                                           \
                double x = (double)g[i + k];                                            \
                acc[k] = acc[k] + fabs(x);                                              \
                nf[k] = nf[k] + (x - x);                                                \
            }                                                                           \
        }                                                                               \
        for (int k = 0; i < n; i++, k++) {                                              \
            double x = (double)g[i];                                                    \
            acc[k] = acc[k] + fabs(x);                                                  \
            nf[k] = nf[k] + (x - x);                                                    \
        }                                                                               \
        *bad = lanes_sum(nf);                                                           \
        return lanes_sum(acc);                                                          \
    }                                                                                   \
    static double nan_or_##SUFFIX(double m, const T *g, size_t n)                      \
    {                                                                                   \
        for (size_t i = 0; i < n; i++)                                                  \
            if (isnan(g[i]))                                                            \
                return NAN;                                                             \
        return m;                                                                       \
    }                                                                                   \
    VEC_CLONES static double maxabs_##SUFFIX(const T *restrict g, size_t n, double *bad) \
    {                                                                                   \
        double acc[LANES] = {0}, nf[LANES] = {0};                                       \
        size_t i = 0;                                                                   \
        for (; i + LANES <= n; i += LANES) {                                            \
            for (int k = 0; k < LANES; k++) {                                           \
                double a = fabs((double)g[i + k]);                                      \
                acc[k] = a > acc[k] ? a : acc[k];                                       \
                nf[k] = nf[k] + (a - a);                                                \
            }                                                                           \
        }                                                                               \
        for (int k = 0; i < n; i++, k++) {                                              \
            double a = fabs((double)g[i]);                                              \
            acc[k] = a > acc[k] ? a : acc[k];                                           \
            nf[k] = nf[k] + (a - a);                                                    \
        }                                                                               \
        double m = lanes_max(acc);                                                      \
        *bad = lanes_sum(nf);                                                           \
        return *bad == 0 ? m : nan_or_##SUFFIX(m, g, n);                               \
    }

DEFINE_NORM_LOOPS(float, f32)
DEFINE_NORM_LOOPS(double, f64)

void optim_vec_block_stats(optim_dtype dt, const void *g, size_t n, double norm_type,
                           optim_vec_partial *out)
{
    bool f32 = dt == OPTIM_F32;
    double bad = 0;
    if (isinf(norm_type) && norm_type > 0)
        out->norm = f32 ? maxabs_f32(g, n, &bad) : maxabs_f64(g, n, &bad);
    else if (norm_type == 1.0)
        out->norm = f32 ? sumabs_f32(g, n, &bad) : sumabs_f64(g, n, &bad);
    else if (norm_type == 2.0)
        out->norm = f32 ? sumsq_f32(g, n, &bad) : sumsq_f64(g, n, &bad);
    else
        out->norm = NAN;
    out->finite = bad == 0;
}

void optim_vec_stats_combine(double norm_type, const optim_vec_partial *parts, size_t nblocks,
                             double *norm, bool *finite)
{
    bool inf = isinf(norm_type) && norm_type > 0;
    double acc = 0.0;
    bool fin = true;
    for (size_t b = 0; b < nblocks; b++) {
        double x = parts[b].norm;
        if (inf)
            acc = (x != x || x > acc) ? x : acc; /* NaN sticks */
        else
            acc = acc + x;
        fin = fin && parts[b].finite;
    }
    if (norm_type == 2.0)
        acc = sqrt(acc);
    else if (!inf && norm_type != 1.0)
        acc = NAN;
    *norm = acc;
    *finite = fin;
}

size_t optim_vec_blocks(size_t n)
{
    return (n + OPTIM_VEC_BLOCK - 1) / OPTIM_VEC_BLOCK;
}

void optim_vec_stats(optim_dtype dt, const void *g, size_t n, double norm_type, double *norm,
                     bool *finite)
{
    size_t sz = optim_dtype_size(dt), nb = optim_vec_blocks(n);
    bool inf = isinf(norm_type) && norm_type > 0;
    double acc = 0.0;
    bool fin = true;
    for (size_t b = 0; b < nb; b++) {
        size_t off = b * OPTIM_VEC_BLOCK;
        size_t len = n - off < OPTIM_VEC_BLOCK ? n - off : OPTIM_VEC_BLOCK;
        optim_vec_partial p;
        optim_vec_block_stats(dt, (const char *)g + off * sz, len, norm_type, &p);
        if (inf)
            acc = (p.norm != p.norm || p.norm > acc) ? p.norm : acc;
        else
            acc = acc + p.norm;
        fin = fin && p.finite;
    }
    if (norm_type == 2.0)
        acc = sqrt(acc);
    else if (!inf && norm_type != 1.0)
        acc = NAN;
    *norm = acc;
    *finite = fin;
}

/* ------------------------------------------------------ elementwise */

VEC_CLONES static void scale_into_f32(float *restrict o, const float *restrict g, size_t n,
                                      float c)
{
    for (size_t i = 0; i < n; i++)
        o[i] = g[i] * c;
}

VEC_CLONES static void scale_into_f64(double *restrict o, const double *restrict g, size_t n,
                                      double c)
{
    for (size_t i = 0; i < n; i++)
        o[i] = g[i] * c;
}

/* The comparisons are written so that NaN fails both and stays NaN. */
VEC_CLONES static void clamp_into_f32(float *restrict o, const float *restrict g, size_t n,
                                      float lo, float hi)
{
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        x = x < lo ? lo : x;
        o[i] = x > hi ? hi : x;
    }
}

VEC_CLONES static void clamp_into_f64(double *restrict o, const double *restrict g, size_t n,
                                      double lo, double hi)
{
    for (size_t i = 0; i < n; i++) {
        double x = g[i];
        x = x < lo ? lo : x;
        o[i] = x > hi ? hi : x;
    }
}

void optim_vec_scale(optim_dtype dt, void *out, const void *g, size_t n, double c)
{
    if (dt == OPTIM_F32)
        scale_into_f32(out, g, n, (float)c);
    else
        scale_into_f64(out, g, n, c);
}

void optim_vec_clamp(optim_dtype dt, void *out, const void *g, size_t n, double max_value)
{
    if (dt == OPTIM_F32)
        clamp_into_f32(out, g, n, (float)-max_value, (float)max_value);
    else
        clamp_into_f64(out, g, n, -max_value, max_value);
}

VEC_CLONES static void add_f32(float *restrict a, const float *restrict g, size_t n)
{
    for (size_t i = 0; i < n; i++)
        a[i] = a[i] + g[i];
}

VEC_CLONES static void add_f64(double *restrict a, const double *restrict g, size_t n)
{
    for (size_t i = 0; i < n; i++)
        a[i] = a[i] + g[i];
}

void optim_vec_add(optim_dtype dt, void *acc, const void *g, size_t n)
{
    if (dt == OPTIM_F32)
        add_f32(acc, g, n);
    else
        add_f64(acc, g, n);
}

VEC_CLONES static void mean_f32(float *restrict a, size_t n, float k)
{
    for (size_t i = 0; i < n; i++)
        a[i] = a[i] / k;
}

VEC_CLONES static void mean_f64(double *restrict a, size_t n, double k)
{
    for (size_t i = 0; i < n; i++)
        a[i] = a[i] / k;
}

void optim_vec_div(optim_dtype dt, void *acc, size_t n, int64_t k)
{
    if (dt == OPTIM_F32)
        mean_f32(acc, n, (float)k);
    else
        mean_f64(acc, n, (double)k);
}

VEC_CLONES static double diffsq_f32(const float *restrict a, const float *restrict b, size_t n)
{
    double acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            double d = (double)a[i + k] - (double)b[i + k];
            acc[k] = acc[k] + d * d;
        }
    for (int k = 0; i < n; i++, k++) {
        double d = (double)a[i] - (double)b[i];
        acc[k] = acc[k] + d * d;
    }
    return lanes_sum(acc);
}

VEC_CLONES static double diffsq_f64(const double *restrict a, const double *restrict b, size_t n)
{
    double acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            double d = a[i + k] - b[i + k];
            acc[k] = acc[k] + d * d;
        }
    for (int k = 0; i < n; i++, k++) {
        double d = a[i] - b[i];
        acc[k] = acc[k] + d * d;
    }
    return lanes_sum(acc);
}

double optim_vec_diffsq(optim_dtype dt, const void *a, const void *b, size_t n)
{
    return dt == OPTIM_F32 ? diffsq_f32(a, b, n) : diffsq_f64(a, b, n);
}

/* ------------------------------------------------- 16-bit wire forms
 *
 * bfloat16 is the top half of a float32; float16 is IEEE binary16.  Both
 * widen to float32 (and float64) exactly.  Narrowing rounds to nearest,
 * ties to even, from float32; a float64 vector is first rounded to
 * float32.  NaN stays a (quiet) NaN; values beyond float16's range become
 * Inf, as a cast does.
 */

static uint32_t f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static uint16_t f32_to_bf16(float x)
{
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

static uint16_t f32_to_f16(float x)
{
    uint32_t u = f32_bits(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to >= 65520: Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {
        /* Subnormal or zero in float16: scale so that the integer part is
         * the float16 mantissa, rounding to nearest even by the FPU. */
        float f = bits_f32(a) * 16777216.0f; /* 2^24 */
        uint32_t m = (uint32_t)f;
        float rest = f - (float)m;
        if (rest > 0.5f || (rest == 0.5f && (m & 1u)))
            m++;
        return (uint16_t)(sign | m);
    }
    uint32_t mant = a & 0x7fffffu;
    uint32_t exp = (a >> 23) - 127 + 15;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* may carry into the exponent: still correct */
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        float f = (float)mant / 16777216.0f;
        return sign ? -f : f;
    }
    if (exp == 31)
        return bits_f32(sign | 0x7f800000u | (mant << 13));
    return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

int optim_wire_parse(const char *name, optim_wire *out)
{
    static const char *const names[] = {"float32", "float64", "bfloat16", "float16"};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0) {
            *out = (optim_wire)i;
            return OPTIM_OK;
        }
    return OPTIM_EINVAL;
}

const char *optim_wire_name(optim_wire w)
{
    static const char *const names[] = {"float32", "float64", "bfloat16", "float16"};
    return (unsigned)w < 4 ? names[w] : "?";
}

size_t optim_wire_size(optim_wire w)
{
    return w == OPTIM_WIRE_F64 ? 8 : w == OPTIM_WIRE_F32 ? 4 : 2;
}

void optim_vec_from_wire(optim_wire w, const void *src, optim_dtype dt, void *dst, size_t n)
{
    const unsigned char *s = src;
    for (size_t i = 0; i < n; i++) {
        double x;
        if (w == OPTIM_WIRE_F32 || w == OPTIM_WIRE_F64) {
            if (w == OPTIM_WIRE_F32) {
                float f;
                memcpy(&f, s + 4 * i, 4);
                x = f;
            } else {
                memcpy(&x, s + 8 * i, 8);
            }
        } else {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            x = w == OPTIM_WIRE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
        }
        if (dt == OPTIM_F32)
            ((float *)dst)[i] = (float)x;
        else
            ((double *)dst)[i] = x;
    }
}

void optim_vec_to_wire(optim_dtype dt, const void *src, optim_wire w, void *dst, size_t n)
{
    unsigned char *d = dst;
    for (size_t i = 0; i < n; i++) {
        float f = dt == OPTIM_F32 ? ((const float *)src)[i] : (float)((const double *)src)[i];
        if (w == OPTIM_WIRE_F32) {
            memcpy(d + 4 * i, &f, 4);
        } else if (w == OPTIM_WIRE_F64) {
            double x = dt == OPTIM_F32 ? (double)f : ((const double *)src)[i];
            memcpy(d + 8 * i, &x, 8);
        } else {
            uint16_t h = w == OPTIM_WIRE_BF16 ? f32_to_bf16(f) : f32_to_f16(f);
            memcpy(d + 2 * i, &h, 2);
        }
    }
}
