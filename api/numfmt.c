/*
 * numfmt.c -- printing float32 as "%.9g" and float64 as "%.17g", byte for
 * byte what glibc's printf prints, without printf for almost every value.
 *
 * Both formats round-trip exactly (9 significant digits for float32, 17 for
 * float64).  %.Pg needs D = the value's P significant digits, rounded to
 * nearest with ties to even on the exact binary value, and X = the decimal
 * exponent of the rounded value; the rest is layout (C11 7.21.6.1: fixed
 * notation when -4 <= X < P, else d.ddd e+XX; trailing zeros and a bare
 * decimal point dropped).
 *
 * D comes from one multiplication t = |x| * 10^k, k = P-1-X, chosen so
 * that 10^(P-1) <= t < 10^P:
 *   float32 in double: |x| is exact in a double, 10^k is the correctly
 *     rounded literal (relative error <= 2^-53), the product adds one more
 *     rounding, so the computed y = t (1 + e) with |e| <= 2^-52 + 2^-106,
 *     and |y - t| < |y| 2^-51 =: eta.
 *   float64 in x87 long double (64-bit significand): the same argument
 *     with 2^-64 per rounding gives |y - t| < |y| 2^-62 =: eta.
 * The rounding of t to an integer is decided from y only when no
 * half-integer lies within eta of y (then round(y) = round(t), ties
 * included: an exact tie is within eta of itself); likewise the choice of
 * k only when y is farther than eta from 10^(P-1) and 10^P.  Everything
 * else -- near-ties, values near a power of ten, float64 beyond 1e+-40,
 * NaN/Inf -- goes to snprintf.  Integers below 10^P print as integers
 * (they would sit exactly on the boundaries).  y < 2^30 (float32) and
 * y < 2^57 (float64) leave the fraction y - floor(y) exact, and floor
 * is the conversion to uint64_t.
 *
 * tests/test_api_vector.c compares against snprintf for millions of
 * values of every class; build/bench/json --exhaustive-f32 compares all
 * 2^32 float32 bit patterns (bench/README.md).
 */
#include "api/api.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

bool api_ld64_exact(void)
{
    /* The compiler's long double is x87 extended (LDBL_MANT_DIG 64), but
     * an emulator may still compute it with a double's 53 bits (valgrind
     * does): then 1 + 2^-63 rounds to 1 and the long double fast paths
     * below would be wrong, so every value takes the exact slow path.
     * Checked once; 0 unknown, 1 exact, 2 not. */
    static int known;
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k == 0) {
#if LDBL_MANT_DIG == 64
        volatile long double one = 1.0L, tiny = 0x1p-63L;
        k = one + tiny != one ? 1 : 2;
#else
        k = 2;
#endif
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k == 1;
}

/* 10^k for k = -32..55 (float32 needs -31..54), correctly rounded by the
 * compiler. */
#define P10_MIN (-32)
static const double P10[] = {
    1e-32, 1e-31, 1e-30, 1e-29, 1e-28, 1e-27, 1e-26, 1e-25,
    1e-24, 1e-23, 1e-22, 1e-21, 1e-20, 1e-19, 1e-18, 1e-17,
    1e-16, 1e-15, 1e-14, 1e-13, 1e-12, 1e-11, 1e-10, 1e-9,
    1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1,
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7,
    1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22, 1e23,
    1e24, 1e25, 1e26, 1e27, 1e28, 1e29, 1e30, 1e31,
    1e32, 1e33, 1e34, 1e35, 1e36, 1e37, 1e38, 1e39,
    1e40, 1e41, 1e42, 1e43, 1e44, 1e45, 1e46, 1e47,
    1e48, 1e49, 1e50, 1e51, 1e52, 1e53, 1e54, 1e55,
};
#define P10_MAX (P10_MIN + (int)(sizeof P10 / sizeof P10[0]) - 1)

#if LDBL_MANT_DIG == 64
#define HAVE_LD64 1
/* 10^k for k = -26..59 (float64 with |X| <= 40 needs -25..57). */
#define LP10_MIN (-26)
static const long double LP10[] = {
    1e-26L, 1e-25L, 1e-24L, 1e-23L, 1e-22L, 1e-21L, 1e-20L, 1e-19L,
    1e-18L, 1e-17L, 1e-16L, 1e-15L, 1e-14L, 1e-13L, 1e-12L, 1e-11L,
    1e-10L, 1e-9L, 1e-8L, 1e-7L, 1e-6L, 1e-5L, 1e-4L, 1e-3L,
    1e-2L, 1e-1L, 1e0L, 1e1L, 1e2L, 1e3L, 1e4L, 1e5L,
    1e6L, 1e7L, 1e8L, 1e9L, 1e10L, 1e11L, 1e12L, 1e13L,
    1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L, 1e20L, 1e21L,
    1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L, 1e28L, 1e29L,
    1e30L, 1e31L, 1e32L, 1e33L, 1e34L, 1e35L, 1e36L, 1e37L,
    1e38L, 1e39L, 1e40L, 1e41L, 1e42L, 1e43L, 1e44L, 1e45L,
    1e46L, 1e47L, 1e48L, 1e49L, 1e50L, 1e51L, 1e52L, 1e53L,
    1e54L, 1e55L, 1e56L, 1e57L, 1e58L, 1e59L,
};
#define LP10_MAX (LP10_MIN + (int)(sizeof LP10 / sizeof LP10[0]) - 1)
#else
#define HAVE_LD64 0
#endif

/* The float32 fast path needs double arithmetic without excess precision. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define HAVE_F32_FAST 1
#else
#define HAVE_F32_FAST 0
#endif

/* A first guess at floor(log10 a) for a finite a > 0, off by at most one
 * (the callers correct it): from the binary exponent, without libm. */
static int guess_exp10(double a)
{
    uint64_t bits;
    memcpy(&bits, &a, sizeof bits);
    int be = (int)(bits >> 52 & 0x7ff);
    if (be == 0) { /* float64 subnormal: rare, let frexp do it */
        int e2;
        (void)frexp(a, &e2);
        be = e2 + 1022;
    }
    /* a in [2^(be-1023), 2^(be-1022)); 78913 / 2^18 ~ log10(2); the
     * division truncates toward zero, so negatives come out one high. */
    return (be - 1023) * 78913 / 262144;
}

static const char DIGIT_PAIRS[] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899";

/* Writes exactly nd decimal digits of v (v < 10^nd), zero-padded. */
static void put_fixed(char *out, uint64_t v, int nd)
{
    int i = nd;
    while (i >= 2) {
        unsigned r = (unsigned)(v % 100);
        v /= 100;
        i -= 2;
        out[i] = DIGIT_PAIRS[2 * r];
        out[i + 1] = DIGIT_PAIRS[2 * r + 1];
    }
    if (i)
        out[0] = (char)('0' + v);
}

/* Writes the decimal digits of v (v > 0), most significant first; returns
 * their count. */
static size_t put_uint(char *out, uint64_t v)
{
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* %.Pg layout of the P digits dig[] (dig[0] != '0') with decimal exponent
 * X; returns the length written. */
static size_t layout(char *out, bool neg, const char *dig, int P, int X)
{
    char *p = out;
    if (neg)
        *p++ = '-';
    int nd = P; /* significant digits once trailing zeros are dropped */
    while (nd > 1 && dig[nd - 1] == '0')
        nd--;
    if (X < -4 || X >= P) {
        *p++ = dig[0];
        if (nd > 1) {
            *p++ = '.';
            memcpy(p, dig + 1, (size_t)nd - 1);
            p += nd - 1;
        }
        *p++ = 'e';
        *p++ = X < 0 ? '-' : '+';
        int a = X < 0 ? -X : X;
        if (a >= 100) {
            *p++ = (char)('0' + a / 100);
            a %= 100;
        }
        *p++ = (char)('0' + a / 10);
        *p++ = (char)('0' + a % 10);
    } else if (X >= 0) {
        memcpy(p, dig, (size_t)X + 1);
        p += X + 1;
        if (nd > X + 1) {
            *p++ = '.';
            memcpy(p, dig + X + 1, (size_t)(nd - X - 1));
            p += nd - X - 1;
        }
    } else {
        *p++ = '0';
        *p++ = '.';
        for (int i = 0; i < -X - 1; i++)
            *p++ = '0';
        memcpy(p, dig, (size_t)nd);
        p += nd;
    }
    return (size_t)(p - out);
}

/* An integer a < 10^P prints as itself under %.Pg. */
static size_t put_integer(char *out, bool neg, uint64_t a)
{
    size_t n = 0;
    if (neg)
        out[n++] = '-';
    return n + put_uint(out + n, a);
}

#if HAVE_F32_FAST
/* The 9 digits of a (finite, > 0) and their exponent; false when y is
 * too close to a rounding decision (see the top of the file). */
static bool digits_f32(double a, uint64_t *Dp, int *Xp)
{
    int X = guess_exp10(a);
    for (int tries = 0; tries < 3; tries++) {
        int k = 8 - X;
        if (k < P10_MIN || k > P10_MAX)
            return false;
        double y = a * P10[k - P10_MIN];
        double eta = y * 0x1p-51;
        if (fabs(y - 1e8) <= eta || fabs(y - 1e9) <= eta)
            return false;
        if (y < 1e8) {
            X--;
            continue;
        }
        if (y > 1e9) {
            X++;
            continue;
        }
        uint64_t D = (uint64_t)y; /* floor: y > 0 */
        double fr = y - (double)D;
        if (fabs(fr - 0.5) <= eta)
            return false;
        D += fr > 0.5;
        if (D == 1000000000u) {
            D = 100000000u;
            X++;
        }
        *Dp = D;
        *Xp = X;
        return true;
    }
    return false;
}
#endif

size_t api_fmt_f32_fast(char *out, float f)
{
#if HAVE_F32_FAST
    double x = (double)f;
    if (isfinite(x)) {
        bool neg = signbit(x);
        double a = fabs(x);
        if (a < 1e9 && a == (double)(uint64_t)a)
            return put_integer(out, neg, (uint64_t)a);
        uint64_t D;
        int X;
        if (digits_f32(a, &D, &X)) {
            char dig[24];
            put_fixed(dig, D, 9);
            return layout(out, neg, dig, 9, X);
        }
    }
#else
    (void)out;
    (void)f;
#endif
    return 0;
}

size_t api_fmt_f32(char *out, float f)
{
    size_t n = api_fmt_f32_fast(out, f);
    return n ? n : (size_t)snprintf(out, 32, "%.9g", (double)f);
}

#if HAVE_LD64
/* The 17 digits of a (finite, 1e-40 < a < 1e40) and their exponent, in
 * long double; false when too close to call. */
static bool digits_f64(double a, uint64_t *Dp, int *Xp)
{
    int X = guess_exp10(a);
    const long double lo = 1e16L, hi = 1e17L;
    for (int tries = 0; tries < 3; tries++) {
        int k = 16 - X;
        if (k < LP10_MIN || k > LP10_MAX)
            return false;
        long double y = (long double)a * LP10[k - LP10_MIN];
        long double eta = y * 0x1p-62L;
        if (fabsl(y - lo) <= eta || fabsl(y - hi) <= eta)
            return false;
        if (y < lo) {
            X--;
            continue;
        }
        if (y > hi) {
            X++;
            continue;
        }
        uint64_t D = (uint64_t)y;
        long double fr = y - (long double)D;
        if (fabsl(fr - 0.5L) <= eta)
            return false;
        D += fr > 0.5L;
        if (D == 100000000000000000u) {
            D = 10000000000000000u;
            X++;
        }
        *Dp = D;
        *Xp = X;
        return true;
    }
    return false;
}
#endif

size_t api_fmt_f64_fast(char *out, double x)
{
#if HAVE_LD64
    if (isfinite(x)) {
        bool neg = signbit(x);
        double a = fabs(x);
        if (a < 1e17 && a == (double)(uint64_t)a)
            return put_integer(out, neg, (uint64_t)a);
        uint64_t D;
        int X;
        if (a > 1e-40 && a < 1e40 && api_ld64_exact() && digits_f64(a, &D, &X)) {
            char dig[24];
            put_fixed(dig, D, 17);
            return layout(out, neg, dig, 17, X);
        }
    }
#else
    (void)out;
    (void)x;
#endif
    return 0;
}

size_t api_fmt_f64(char *out, double x)
{
    size_t n = api_fmt_f64_fast(out, x);
    return n ? n : (size_t)snprintf(out, 32, "%.17g", x);
}
