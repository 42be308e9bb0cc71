/* Mixed-batch LoRA rows, read in place: y[row] += (x[row] @ A_b[slot]) @ B_b[slot] for each (row, b, slot).

   The batched-GEMV kernel of Punica (Chen et al., 2023, arXiv:2310.18547, "BGMV") for CPUs: every row of a
   decode batch reads its own adapter's factors straight from the layer's stack (no gather, no copy), factors
   in fp32, bf16 or int8 (bf16 halves what a step with many distinct adapters reads, int8 quarters it; widened
   to fp32 in registers), accumulating in fp32 into y. One call serves all of a layer's rank buckets: `buckets`
   holds each bucket's A (slots, in, r) and B (slots, r, out) addresses, r, and for int8 the addresses of the
   per-rank scales of A's columns and B's rows (slots, r) (0 otherwise), `entries` each row's (row, bucket,
   slot). An int8 row's x @ A is multiplied by both scales once, so B's loop is the same for every dtype. Threads
   (OpenMP: the process's libgomp, which torch loads too) take entries in turn, heaviest rank first as the
   caller orders them, so they finish together; one call per bucket left a thread idle at the end of each
   (1.2x slower per layer with 26 rows over four buckets). x is (rows, tokens, in) and y (rows, tokens, out).

   The arithmetic is written with GCC vector types (clang has them too) rather than left to the
   auto-vectorizer, which vectorized some (dtype, rank) pairs and left others scalar (4x slower). x @ A keeps
   16 (or 8) ranks x 4 input features of accumulators in registers, so no add waits on the previous one, for up
   to 4 tokens at once (prefill: each load of A serves every token); (x A) @ B streams B[slot] front to back,
   4 ranks per pass over y's row, which stays in L1. */
#include <stdint.h>
#include <string.h>

/* 32 vector registers (AVX-512) hold 16 accumulators of 16 floats; with 16 (AVX2 and older) they would spill,
   so there a row reads 16 ranks per pass and one token at a time (measured: the wide paths ran 1.2-1.5x slower
   than that when built for AVX2) */
#ifdef __AVX512F__
#define WIDE 1
#define TOKEN_BLOCK 4
#else
#define WIDE 0
#define TOKEN_BLOCK 1
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u16 __attribute__((vector_size(64)));
typedef uint32_t u8 __attribute__((vector_size(32)));

/* unaligned loads, widened to fp32: bf16 is the top half of an fp32 */
static inline v16 ld16_f32(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline v8 ld8_f32(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
/* widened lane by lane (compilers turn it into one zero-extend and shift; __builtin_convertvector needs gcc 9) */
static inline v16 ld16_bf16(const uint16_t *p) {
    u16 w;
    for (int i = 0; i < 16; i++) w[i] = (uint32_t)p[i] << 16;
    v16 v; memcpy(&v, &w, sizeof v); return v;
}
static inline v8 ld8_bf16(const uint16_t *p) {
    u8 w;
    for (int i = 0; i < 8; i++) w[i] = (uint32_t)p[i] << 16;
    v8 v; memcpy(&v, &w, sizeof v); return v;
}
/* int8 (an int8 store: one fp32 scale per rank, applied to x @ A afterwards), sign-extended and converted. The
   x86 intrinsics are one widening load and one conversion each; gcc 12 turns __builtin_convertvector from int8
   into a byte-by-byte loop (5x slower than the bf16 path), so it is not used */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
static inline v16 ld16_i8(const int8_t *p) {
#if defined(__AVX512F__)
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    v16 v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
    return v;
#endif
}
static inline v8 ld8_i8(const int8_t *p) {
#if defined(__AVX2__)
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8 v;
    for (int i = 0; i < 8; i++) v[i] = (float)p[i];
    return v;
#endif
}
static inline float ld1_i8(const int8_t *p) { return (float)*p; }
static inline float ld1_f32(const float *p) { return *p; }
static inline float ld1_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f; memcpy(&f, &bits, sizeof f); return f;
}

/* xa[t][k0 .. k0+WW) = x[t] @ A[:, k0 .. k0+WW) for NT tokens (x rows `in` apart, xa rows `r` apart) */
#define XA_BLOCK(SUF, TYPE, VT, WW, NT)                                                                 \
static inline void xa_##SUF##_##WW##_##NT(const float *x, const TYPE *a, int64_t in, int64_t r,        \
                                          int64_t k0, float *xa) {                                      \
    VT acc[NT][4];                                                                                      \
    memset(acc, 0, sizeof acc);                                                                         \
    int64_t i = 0;                                                                                      \
    for (; i + 4 <= in; i += 4)                                                                         \
        for (int u = 0; u < 4; u++) {                                                                   \
            const VT av = ld##WW##_##SUF(a + (i + u) * r + k0);                                         \
            for (int t = 0; t < NT; t++) acc[t][u] += x[t * in + i + u] * av;                           \
        }                                                                                               \
    for (; i < in; i++) {                                                                               \
        const VT av = ld##WW##_##SUF(a + i * r + k0);                                                   \
        for (int t = 0; t < NT; t++) acc[t][0] += x[t * in + i] * av;                                   \
    }                                                                                                   \
    for (int t = 0; t < NT; t++) {                                                                      \
        VT s = (acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3]);                                       \
        memcpy(xa + t * r + k0, &s, sizeof s);                                                          \
    }                                                                                                   \
}

/* one token, 16·V ranks in one pass over A (whole rows of A read front to back: one stream, not V) */
#define XA_WIDE(SUF, TYPE, V)                                                                           \
static inline void xa_##SUF##_w##V(const float *x, const TYPE *a, int64_t in, int64_t r, int64_t k0,   \
                                   float *xa) {                                                         \
    v16 acc[4][V];                                                                                      \
    memset(acc, 0, sizeof acc);                                                                         \
    int64_t i = 0;                                                                                      \
    for (; i + 4 <= in; i += 4)                                                                         \
        for (int u = 0; u < 4; u++)                                                                     \
            for (int v = 0; v < V; v++) acc[u][v] += x[i + u] * ld16_##SUF(a + (i + u) * r + k0 + 16 * v); \
    for (; i < in; i++)                                                                                 \
        for (int v = 0; v < V; v++) acc[0][v] += x[i] * ld16_##SUF(a + i * r + k0 + 16 * v);            \
    for (int v = 0; v < V; v++) {                                                                       \
        v16 s = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);                                      \
        memcpy(xa + k0 + 16 * v, &s, sizeof s);                                                         \
    }                                                                                                   \
}

#define XA_TOKENS(SUF, TYPE, NT)                                                                        \
XA_BLOCK(SUF, TYPE, v16, 16, NT)                                                                        \
XA_BLOCK(SUF, TYPE, v8, 8, NT)                                                                          \
static inline void xa_##SUF##_##NT(const float *x, const TYPE *a, int64_t in, int64_t r, float *xa) {   \
    int64_t k0 = 0;                                                                                     \
    if (NT == 1 && WIDE) {                                                                              \
        for (; k0 + 64 <= r; k0 += 64) xa_##SUF##_w4(x, a, in, r, k0, xa);                              \
        for (; k0 + 32 <= r; k0 += 32) xa_##SUF##_w2(x, a, in, r, k0, xa);                              \
    }                                                                                                   \
    for (; k0 + 16 <= r; k0 += 16) xa_##SUF##_16_##NT(x, a, in, r, k0, xa);                            \
    for (; k0 + 8 <= r; k0 += 8) xa_##SUF##_8_##NT(x, a, in, r, k0, xa);                                \
    for (int t = 0; t < NT; t++)                                                                        \
        for (int64_t k = k0; k < r; k++) {                                                              \
            float s = 0.0f;                                                                             \
            for (int64_t i = 0; i < in; i++) s += x[t * in + i] * ld1_##SUF(a + i * r + k);             \
            xa[t * r + k] = s;                                                                          \
        }                                                                                               \
}

/* y[j] += sum_k xa[k] * B[k, j], four ranks per pass over y */
#define XA_B(SUF, TYPE)                                                                                 \
static inline void xab_##SUF(const float *xa, const TYPE *b, float *y, int64_t r, int64_t out) {        \
    int64_t k = 0;                                                                                      \
    for (; k + 4 <= r; k += 4) {                                                                        \
        const float c0 = xa[k], c1 = xa[k + 1], c2 = xa[k + 2], c3 = xa[k + 3];                         \
        const TYPE *b0 = b + k * out, *b1 = b0 + out, *b2 = b1 + out, *b3 = b2 + out;                   \
        int64_t j = 0;                                                                                  \
        for (; j + 16 <= out; j += 16) {                                                                \
            v16 yv = ld16_f32(y + j);                                                                   \
            yv += (c0 * ld16_##SUF(b0 + j) + c1 * ld16_##SUF(b1 + j))                                   \
                + (c2 * ld16_##SUF(b2 + j) + c3 * ld16_##SUF(b3 + j));                                  \
            memcpy(y + j, &yv, sizeof yv);                                                              \
        }                                                                                               \
        for (; j < out; j++)                                                                            \
            y[j] += (c0 * ld1_##SUF(b0 + j) + c1 * ld1_##SUF(b1 + j))                                   \
                  + (c2 * ld1_##SUF(b2 + j) + c3 * ld1_##SUF(b3 + j));                                  \
    }                                                                                                   \
    for (; k < r; k++)                                                                                  \
        for (int64_t j = 0; j < out; j++) y[j] += xa[k] * ld1_##SUF(b + k * out + j);                   \
}

#define LORA_ROWS(NAME, SUF, TYPE)                                                                      \
XA_WIDE(SUF, TYPE, 2)                                                                                   \
XA_WIDE(SUF, TYPE, 4)                                                                                   \
XA_TOKENS(SUF, TYPE, 1)                                                                                 \
XA_TOKENS(SUF, TYPE, 4)                                                                                 \
XA_B(SUF, TYPE)                                                                                         \
void NAME(const float *x, float *y, const int64_t *buckets, const int64_t *entries, int64_t m,           \
          int64_t tokens, int64_t in, int64_t out, int threads) {                                       \
    const int64_t blocks = (tokens + TOKEN_BLOCK - 1) / TOKEN_BLOCK; /* decode: one token per row */      \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads)")                               \
    for (int64_t e = 0; e < m * blocks; e++) {                                                          \
        const int64_t *entry = entries + 3 * (e / blocks), *bucket = buckets + 5 * entry[1];            \
        const int64_t row = entry[0], s = entry[2], r = bucket[2], t0 = (e % blocks) * TOKEN_BLOCK;     \
        const int64_t nt = tokens - t0 < TOKEN_BLOCK ? tokens - t0 : TOKEN_BLOCK;                       \
        const float *xv = x + (row * tokens + t0) * in;                                                 \
        float *yv = y + (row * tokens + t0) * out;                                                      \
        const TYPE *a = (const TYPE *)(intptr_t)bucket[0] + s * in * r;                                 \
        const TYPE *b = (const TYPE *)(intptr_t)bucket[1] + s * r * out;                                \
        float xa[4 * r];                                                                                \
        if (nt == 4) xa_##SUF##_4(xv, a, in, r, xa);                                                    \
        else for (int64_t t = 0; t < nt; t++) xa_##SUF##_1(xv + t * in, a, in, r, xa + t * r);          \
        if (bucket[3]) { /* int8: A's column scales and B's row scales, both per rank, applied here once */  \
            const float *sa = (const float *)(intptr_t)bucket[3] + s * r;                               \
            const float *sb = (const float *)(intptr_t)bucket[4] + s * r;                               \
            for (int64_t t = 0; t < nt; t++)                                                            \
                for (int64_t k = 0; k < r; k++) xa[t * r + k] *= sa[k] * sb[k];                         \
        }                                                                                               \
        for (int64_t t = 0; t < nt; t++) xab_##SUF(xa + t * r, b, yv + t * out, r, out);                \
    }                                                                                                   \
}

LORA_ROWS(lora_rows_f32, f32, float)
LORA_ROWS(lora_rows_bf16, bf16, uint16_t)
LORA_ROWS(lora_rows_i8, i8, int8_t)
