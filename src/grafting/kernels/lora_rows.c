/* Mixed-batch LoRA rows, read in place: y[row] += (x[row] @ A[slot]) @ B[slot] for each (row, slot).

   The batched-GEMV kernel of Punica (Chen et al., 2023, arXiv:2310.18547, "BGMV") for CPUs: every row of a
   decode batch reads its own adapter's factors straight from the layer's stack (no gather, no copy), factors
   in fp32 or bf16 (bf16 halves what a step with many distinct adapters reads; widened to fp32 in registers),
   accumulating in fp32 into y. Rows run in parallel (OpenMP: the process's libgomp, which torch loads too).
   A is (slots, in, r) and B (slots, r, out), row-major; x is (rows, tokens, in) and y (rows, tokens, out);
   slot 0 means no adapter. x @ A keeps 16 ranks x 4 input features of accumulators in registers, so the loop
   never waits on one; (x A) @ B streams B[slot] front to back (one contiguous block) into y's row, which
   stays in L1. */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_f32(v)
#define W 16

#define LORA_ROWS(NAME, TYPE, LOAD)                                                                     \
static void NAME##_one(const float *xv, float *yv, const TYPE *a, const TYPE *b, int64_t in, int64_t r,  \
                       int64_t out) {                                                                   \
    float xa[r];                                                                                        \
    int64_t k0 = 0;                                                                                     \
    for (; k0 + W <= r; k0 += W) {                                                                      \
        float acc[4][W] = {{0}};                                                                        \
        int64_t i = 0;                                                                                  \
        for (; i + 4 <= in; i += 4)                                                                     \
            for (int u = 0; u < 4; u++) {                                                               \
                const float xi = xv[i + u];                                                             \
                const TYPE *ai = a + (i + u) * r + k0;                                                  \
                for (int kk = 0; kk < W; kk++) acc[u][kk] += xi * LOAD(ai[kk]);                         \
            }                                                                                           \
        for (; i < in; i++)                                                                             \
            for (int kk = 0; kk < W; kk++) acc[0][kk] += xv[i] * LOAD(a[i * r + k0 + kk]);              \
        for (int kk = 0; kk < W; kk++) xa[k0 + kk] = (acc[0][kk] + acc[1][kk]) + (acc[2][kk] + acc[3][kk]); \
    }                                                                                                   \
    for (int64_t k = k0; k < r; k++) {                                                                  \
        float acc = 0.0f;                                                                               \
        for (int64_t i = 0; i < in; i++) acc += xv[i] * LOAD(a[i * r + k]);                             \
        xa[k] = acc;                                                                                    \
    }                                                                                                   \
    for (int64_t k = 0; k < r; k++) {                                                                   \
        const float c = xa[k];                                                                          \
        const TYPE *bk = b + k * out;                                                                   \
        for (int64_t j = 0; j < out; j++) yv[j] += c * LOAD(bk[j]);                                     \
    }                                                                                                   \
}                                                                                                       \
void NAME(const float *x, float *y, const TYPE *A, const TYPE *B, const int64_t *rows,                  \
          const int64_t *slots, int64_t m, int64_t tokens, int64_t in, int64_t r, int64_t out,          \
          int threads) {                                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                   \
    for (int64_t e = 0; e < m * tokens; e++) {                                                          \
        int64_t row = e / tokens, t = e % tokens, s = slots[row];                                       \
        if (s == 0) continue;                                                                           \
        NAME##_one(x + (rows[row] * tokens + t) * in, y + (rows[row] * tokens + t) * out,               \
                   A + s * in * r, B + s * r * out, in, r, out);                                        \
    }                                                                                                   \
}

LORA_ROWS(lora_rows_f32, float, LOAD_F32)
LORA_ROWS(lora_rows_bf16, uint16_t, LOAD_BF16)
