/* CCT's kernels on a CPU, for cct/models/cpu_kernels.py. The memory-bound passes of its tokenizer: the tile
   transforms of a Winograd F(4x4, 3x3) convolution (stride 1, padding 1), whose matrix products torch.bmm does,
   a 3 x 3 max-pool (stride 2, padding 1) fused with the ReLU after it, and in inference the first convolution of an
   RGB image with its pool. All work on channels-last bf16 tensors in vectors of 16 channels (AVX-512 with bf16
   conversions); the arithmetic is fp32. Each pass reads and writes every value once. And its multi-head attention,
   forward and backward, one head at a time in the cache, its products on the AVX-512 bf16 dot-product instruction
   (see `attention`), and the bias + GELU of its MLP (see `bias_gelu`).
   Every function works on the images (for bias_gelu the rows) [n0, n1) of a batch of n, so that callers can split a
   batch across threads.

   Shapes: a tensor "[n][h][w][c]" is an image batch in channels-last order; "[36][t][c]" holds one row of t x c
   values for each of the 36 points of a 6 x 6 Winograd tile, t = n * ceil(h / 4) * ceil(w / 4) tiles, in the
   order (image, tile row, tile column). Channel counts are multiples of 16. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

typedef uint16_t bf16;

static inline __m512 load(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store(bf16 *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

/* Winograd's F(4x4, 3x3): 36 products per 16 outputs, 4x fewer than the direct convolution (F(2x2, 3x3): 2.25x),
   with the points 0, 1, -1, 1/2, -2 and infinity. Their bf16 error on CCT's trained tokenizer, relative to an fp64
   convolution, is 6.7e-3: 0.7x that of the usual 0, +-1, +-2, against 3.2e-3 for F(2x2, 3x3) and 1.7e-3 for
   oneDNN's direct convolution (F(4x4)'s larger transforms amplify bf16's rounding). */
static const float BT4[6][6] = {{1, -1.5f, -2, 1.5f, 1, 0},  {0, -1, 0.5f, 2.5f, 1, 0}, {0, 1, -2.5f, 0.5f, 1, 0},
                                {0, -2, -1, 2, 1, 0},        {0, 0.5f, -1, -0.5f, 1, 0}, {0, 1, -1.5f, -2, 1.5f, 1}};
static const float AT4[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0},
                                {0, 1, -1, 0.125f, -8, 1}};
static const float A4[6][4] = {{1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1}, {1, 0.5f, 0.25f, 0.125f}, {1, -2, 4, -8},
                               {0, 0, 0, 1}};  /* AT4 transposed */

/* sum over j < len of row[j] * in[j], the zero terms left out (the loops unroll over the constant tables) */
static inline __attribute__((always_inline)) __m512 combine(const float *row, const __m512 *in, int len) {
    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int j = 0; j < len; j++)
        if (row[j] != 0.0f) sum = _mm512_fmadd_ps(_mm512_set1_ps(row[j]), in[j], sum);
    return sum;
}

/* B^T d B of every overlapping 6 x 6 input tile (zero outside the image): x [n][h][w][c] -> v [36][t][c]. */
void winograd_input(const bf16 *restrict x, bf16 *restrict v, int64_t n0, int64_t n1, int64_t n, int64_t h,
                    int64_t w, int64_t c) {
    const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, plane = n * th * tw * c;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const bf16 *src[6][6];
                for (int r = 0; r < 6; r++)
                    for (int s = 0; s < 6; s++) {
                        int64_t i = 4 * ti - 1 + r, j = 4 * tj - 1 + s;
                        src[r][s] = i >= 0 && i < h && j >= 0 && j < w ? x + ((b * h + i) * w + j) * c : 0;
                    }
                bf16 *dst = v + ((b * th + ti) * tw + tj) * c;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 e[6][6];  /* in memory (the cache): 72 live vectors would spill anyway */
#pragma GCC unroll 6
                    for (int s = 0; s < 6; s++) {  /* B^T on the rows, column by column */
                        __m512 d[6];
                        for (int r = 0; r < 6; r++) d[r] = src[r][s] ? load(src[r][s] + k) : zero;
                        for (int r = 0; r < 6; r++) e[r][s] = combine(BT4[r], d, 6);
                    }
#pragma GCC unroll 6
                    for (int r = 0; r < 6; r++)  /* B on the columns */
                        for (int s = 0; s < 6; s++) store(dst + (6 * r + s) * plane + k, combine(BT4[s], e[r], 6));
                }
            }
}

/* A^T m A of every tile's 36 products, the 4 x 4 outputs inside the image: m [36][t][c] -> y [n][h][w][c]. */
void winograd_output(const bf16 *restrict m, bf16 *restrict y, int64_t n0, int64_t n1, int64_t n, int64_t h,
                     int64_t w, int64_t c) {
    const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, plane = n * th * tw * c;
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const bf16 *src = m + ((b * th + ti) * tw + tj) * c;
                const int rows = h - 4 * ti < 4 ? (int)(h - 4 * ti) : 4, cols = w - 4 * tj < 4 ? (int)(w - 4 * tj) : 4;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 e[4][6];
#pragma GCC unroll 6
                    for (int s = 0; s < 6; s++) {  /* A^T on the rows, column by column */
                        __m512 a[6];
                        for (int r = 0; r < 6; r++) a[r] = load(src + (6 * r + s) * plane + k);
                        for (int r = 0; r < 4; r++) e[r][s] = combine(AT4[r], a, 6);
                    }
                    for (int r = 0; r < rows; r++) {  /* A on the columns */
                        bf16 *out = y + ((b * h + 4 * ti + r) * w + 4 * tj) * c + k;
                        __m512 o[4];
#pragma GCC unroll 4
                        for (int s = 0; s < 4; s++) o[s] = combine(AT4[s], e[r], 6);
                        for (int s = 0; s < cols; s++) store(out + s * c, o[s]);
                    }
                }
            }
}

/* A g A^T of every tile's 4 x 4 output gradients (zero outside the image), the output transform's transpose, for
   the weight gradient: g [n][h][w][c] -> z [36][t][c]. */
void winograd_output_grad(const bf16 *restrict g, bf16 *restrict z, int64_t n0, int64_t n1, int64_t n, int64_t h,
                          int64_t w, int64_t c) {
    const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, plane = n * th * tw * c;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const int rows = h - 4 * ti < 4 ? (int)(h - 4 * ti) : 4, cols = w - 4 * tj < 4 ? (int)(w - 4 * tj) : 4;
                const bf16 *src = g + ((b * h + 4 * ti) * w + 4 * tj) * c;
                bf16 *dst = z + ((b * th + ti) * tw + tj) * c;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 e[6][4];
#pragma GCC unroll 4
                    for (int s = 0; s < 4; s++) {  /* A on the rows, column by column */
                        __m512 d[4];
                        for (int r = 0; r < 4; r++) d[r] = r < rows && s < cols ? load(src + (r * w + s) * c + k) : zero;
                        for (int r = 0; r < 6; r++) e[r][s] = combine(A4[r], d, 4);
                    }
#pragma GCC unroll 6
                    for (int r = 0; r < 6; r++)  /* A^T on the columns */
                        for (int s = 0; s < 6; s++) store(dst + (6 * r + s) * plane + k, combine(A4[s], e[r], 4));
                }
            }
}

/* 3 x 3 max-pool, stride 2, padding 1, followed by ReLU: x [n][h][w][c] -> y [n][ceil(h/2)][ceil(w/2)][c]. The
   window position of each output's maximum is kept in arg as one byte (0-8, row-major; 255 where the output is not
   positive and gets no gradient), instead of PyTorch's 8-byte index; arg may be NULL (inference). As in PyTorch,
   the first maximum wins, and NaN propagates. */
void maxpool_relu(const bf16 *restrict x, bf16 *restrict y, uint8_t *restrict arg, int64_t n0, int64_t n1,
                  int64_t n, int64_t h, int64_t w, int64_t c) {
    (void)n;
    const int64_t oh = (h + 1) / 2, ow = (w + 1) / 2;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = n0; b < n1; b++)
        for (int64_t i = 0; i < oh; i++)
            for (int64_t j = 0; j < ow; j++) {
                const bf16 *src[9];
                for (int r = 0; r < 3; r++)
                    for (int s = 0; s < 3; s++) {
                        int64_t ii = 2 * i - 1 + r, jj = 2 * j - 1 + s;
                        int inside = ii >= 0 && ii < h && jj >= 0 && jj < w;
                        src[3 * r + s] = inside ? x + ((b * h + ii) * w + jj) * c : 0;
                    }
                bf16 *dst = y + ((b * oh + i) * ow + j) * c;
                uint8_t *where = arg ? arg + ((b * oh + i) * ow + j) * c : 0;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 best = _mm512_set1_ps(-__builtin_inff());
                    __m128i pos = _mm_set1_epi8(0);
                    for (int q = 0; q < 9; q++) {
                        if (!src[q]) continue;
                        __m512 v = load(src[q] + k);
                        __mmask16 wins = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ)
                                         | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  /* greater, or NaN */
                        best = _mm512_mask_mov_ps(best, wins, v);
                        pos = _mm_mask_mov_epi8(pos, wins, _mm_set1_epi8((char)q));
                    }
                    /* > 0 or NaN: where PyTorch's ReLU passes the gradient */
                    __mmask16 positive = _mm512_cmp_ps_mask(best, zero, _CMP_NLE_UQ);
                    store(dst + k, _mm512_max_ps(zero, best));  /* NaN stays NaN */
                    __m128i none = _mm_set1_epi8((char)255);
                    if (arg) _mm_storeu_si128((__m128i *)(where + k), _mm_mask_mov_epi8(none, positive, pos));
                }
            }
}

/* Gradient of maxpool_relu: each input pixel gathers from the (up to 2 x 2) windows that hold it. */
void maxpool_relu_grad(const bf16 *restrict gy, const uint8_t *restrict arg, bf16 *restrict gx, int64_t n0, int64_t n1,
                       int64_t n, int64_t h, int64_t w, int64_t c) {
    (void)n;
    const int64_t oh = (h + 1) / 2, ow = (w + 1) / 2;
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ii = 0; ii < h; ii++)
            for (int64_t jj = 0; jj < w; jj++) {
                const bf16 *g[4]; const uint8_t *a[4]; char idx[4]; int count = 0;
                for (int64_t i = ii / 2; i <= (ii + 1) / 2 && i < oh; i++)
                    for (int64_t j = jj / 2; j <= (jj + 1) / 2 && j < ow; j++) {
                        int64_t o = (b * oh + i) * ow + j;
                        g[count] = gy + o * c; a[count] = arg + o * c;
                        idx[count++] = (char)(3 * (ii - 2 * i + 1) + (jj - 2 * j + 1));
                    }
                bf16 *dst = gx + ((b * h + ii) * w + jj) * c;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 sum = _mm512_setzero_ps();
                    for (int q = 0; q < count; q++) {
                        __m128i from = _mm_loadu_si128((const __m128i *)(a[q] + k));
                        __mmask16 mine = _mm_cmpeq_epi8_mask(from, _mm_set1_epi8(idx[q]));
                        sum = _mm512_mask_add_ps(sum, mine, sum, load(g[q] + k));
                    }
                    store(dst + k, sum);
                }
            }
}

/* 2^x for 16 floats: 2^round(x) times a degree-4 fit of 2^f on [-1/2, 1/2] (relative error 3e-6, far below
   bf16's 4e-3, in half the instructions of a full-precision exp); arguments below -126 give 2^-126, NaN stays NaN. */
static inline __m512 exp2_16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  /* a NaN x is the second operand: kept */
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00956052f), f, _mm512_set1_ps(0.05591712f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024981f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312197f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999917f));
    return _mm512_scalef_ps(p, n);
}

/* Two bf16 read or written as one 32-bit lane: the unit of the bf16 dot-product instructions. */
typedef int32_t __attribute__((may_alias)) bf16_pair;

/* One 8-row x 16w-column block of c = a . b (w = 1 or 2), in fp32 over kp pairs of the product's dimension: row
   r's pair q of a at a + r * a_row + q * a_pair, b packed by pairs (pair q of columns j at b + q * b_pair + 2 * j). */
static inline __attribute__((always_inline)) void block8(int w, int64_t kp, const bf16 *a, int64_t a_row,
                                                         int64_t a_pair, const bf16 *b, int64_t b_pair, float *c,
                                                         int64_t ldc) {
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < w; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t q = 0; q < kp; q++) {
        __m512bh bv[2];
        for (int v = 0; v < w; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + q * b_pair + 32 * v);
        for (int r = 0; r < 8; r++) {
            __m512bh av = (__m512bh)_mm512_set1_epi32(*(const bf16_pair *)(a + r * a_row + q * a_pair));
            for (int v = 0; v < w; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
        }
    }
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < w; v++) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

/* c [m][n] (fp32, row stride ldc) = a [m][2 kp] . b [2 kp][n], with a read in pairs along the product's dimension
   (pair q of row i at a + i * a_row + q * a_pair: a_row = row stride and a_pair = 2 for a row-major a, a_row = 2 and
   a_pair = 2 m for one packed by pairs) and b packed by pairs, [kp][n][2] (see pack_row_pairs). m % 8 == 0,
   n % 16 == 0. The blocks of 8 x 32 keep 16 accumulators in registers; b's panel of 32 columns stays in L1. */
static void matmul(int64_t m, int64_t n, int64_t kp, const bf16 *a, int64_t a_row, int64_t a_pair, const bf16 *b,
                   float *c, int64_t ldc) {
    for (int64_t j = 0; j < n; j += 32)
        for (int64_t i = 0; i < m; i += 8) {
            const bf16 *ai = a + i * a_row;
            if (n - j >= 32) block8(2, kp, ai, a_row, a_pair, b + 2 * j, 2 * n, c + i * ldc + j, ldc);
            else block8(1, kp, ai, a_row, a_pair, b + 2 * j, 2 * n, c + i * ldc + j, ldc);
        }
}

/* x [rows][cols] (row stride ld; rows even, cols % 16 == 0) -> p [rows / 2][cols][2], each pair of rows interleaved:
   the packing of a matrix whose rows run along a product's dimension. */
static void pack_row_pairs(const bf16 *x, int64_t ld, int64_t rows, int64_t cols, bf16 *p) {
    static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_loadu_si512(order);
    for (int64_t i = 0; i < rows; i += 2)
        for (int64_t j = 0; j < cols; j += 16) {
            __m512i upper = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + i * ld + j)));
            __m512i lower = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + (i + 1) * ld + j)));
            _mm512_storeu_si512(p + (i / 2 * cols + j) * 2, _mm512_permutex2var_epi16(upper, idx, lower));
        }
}

/* x [rows][cols] (row stride ld, cols even) -> p [cols / 2][rows][2]: pairs of columns as the packed rows, the
   packing of a matrix whose columns run along a product's dimension (the right operand of x . y^T). */
static void pack_column_pairs(const bf16 *x, int64_t ld, int64_t rows, int64_t cols, bf16 *p) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t q = 0; q < cols / 2; q++)
            ((bf16_pair *)p)[q * rows + i] = *(const bf16_pair *)(x + i * ld + 2 * q);
}

/* fp32 c [rows][cols] -> bf16 y (row stride ld), cols % 16 == 0. */
static void round_rows(const float *c, int64_t rows, int64_t cols, bf16 *y, int64_t ld) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j += 16) store(y + i * ld + j, _mm512_loadu_ps(c + i * cols + j));
}

/* Which of the 16 values from k on lie before `valid`. */
static inline __mmask16 within(int64_t k, int64_t valid) {
    return valid - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (valid - k)) - 1);
}

/* Rows of softmax(scale * s) over their first `valid` values: fp32 s [rows][len] (overwritten) -> bf16 p [rows][len],
   zero after `valid` (padding keys), len % 16 == 0, len - valid < 16. A NaN makes its row NaN, as in PyTorch. */
static void softmax_rows(float *s, int64_t rows, int64_t len, int64_t valid, float scale, bf16 *p) {
    const float to_base2 = scale * 1.44269504088896341f;  /* e^(scale s) = 2^(scale log2(e) s) */
    const __m512 factor = _mm512_set1_ps(to_base2), none = _mm512_set1_ps(-__builtin_inff());
    for (int64_t i = 0; i < rows; i++) {
        float *row = s + i * len;
        __m512 top = none;
        for (int64_t k = 0; k < len; k += 16)
            top = _mm512_max_ps(_mm512_mask_mov_ps(none, within(k, valid), _mm512_loadu_ps(row + k)), top);
        __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top) * to_base2), sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < len; k += 16) {
            __m512 v = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(row + k), factor, shift));
            v = _mm512_maskz_mov_ps(within(k, valid), v);
            _mm512_storeu_ps(row + k, v);
            sum = _mm512_add_ps(sum, v);
        }
        __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t k = 0; k < len; k += 16) store(p + i * len + k, _mm512_mul_ps(_mm512_loadu_ps(row + k), inverse));
    }
}

/* The gradient of the scores from that of the probabilities: ds = scale * p * (dp - rowsum(p * dp)), bf16 p and ds,
   fp32 dp, all [rows][len]. */
static void softmax_rows_grad(const bf16 *p, const float *dp, int64_t rows, int64_t len, float scale, bf16 *ds) {
    for (int64_t i = 0; i < rows; i++) {
        const bf16 *pi = p + i * len;
        const float *gi = dp + i * len;
        __m512 dot = _mm512_setzero_ps();
        for (int64_t k = 0; k < len; k += 16) dot = _mm512_fmadd_ps(load(pi + k), _mm512_loadu_ps(gi + k), dot);
        __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), factor = _mm512_set1_ps(scale);
        for (int64_t k = 0; k < len; k += 16) {
            __m512 v = _mm512_mul_ps(load(pi + k), _mm512_sub_ps(_mm512_loadu_ps(gi + k), mean));
            store(ds + i * len + k, _mm512_mul_ps(v, factor));
        }
    }
}

/* Query rows per block in the forward: their scores (64 x t fp32) stay in L1 or L2. */
enum { QUERY_BLOCK = 64 };

/* Rows [0, t) of one head's x (row stride ld) as a [tp][d] matrix whose rows [t, tp) are zero (the products work in
   blocks of 16 rows): x itself where tp == t, else a copy into buf. *ld_out gets the row stride. */
static const bf16 *padded_rows(const bf16 *x, int64_t ld, int64_t t, int64_t tp, int64_t d, bf16 *buf,
                               int64_t *ld_out) {
    *ld_out = tp == t ? ld : d;
    if (tp == t) return x;
    for (int64_t i = 0; i < tp; i++)
        for (int64_t j = 0; j < d; j += 16)
            _mm256_storeu_si256((__m256i *)(buf + i * d + j),
                                i < t ? _mm256_loadu_si256((const __m256i *)(x + i * ld + j)) : _mm256_setzero_si256());
    return buf;
}

/* 1 / sqrt(d) rounded once to fp32, as timm's head_dim ** -0.5 (without libm). */
static inline float inverse_sqrt(int64_t d) {
    __m128d x = _mm_set_sd((double)d);
    return (float)(1.0 / _mm_cvtsd_f64(_mm_sqrt_sd(x, x)));
}

/* Multi-head self-attention, softmax(q k^T / sqrt(d)) v, of every image and head: qkv [n][t][3][heads][d] (the qkv
   projection's output as it comes) -> out [n][t][heads][d] (the input of the output projection as it goes), keeping
   the probabilities for the backward in probs [n][heads][tp][tp] (NULL in inference), tp = t rounded up to a
   multiple of 16 (padding queries and keys are zero, and padding keys get no probability). The scores of one head
   stay in the cache; the products run on the bf16 dot-product instructions with fp32 sums. d % 16 == 0. */
void attention(const bf16 *restrict qkv, bf16 *restrict out, bf16 *restrict probs, int64_t n0, int64_t n1,
               int64_t n, int64_t t, int64_t heads, int64_t d) {
    (void)n;
    const int64_t row = 3 * heads * d, tp = (t + 15) / 16 * 16, rows = QUERY_BLOCK;
    const float scale = inverse_sqrt(d);
    float *s = aligned_alloc(64, rows * tp * sizeof(float)), *c = aligned_alloc(64, rows * d * sizeof(float));
    bf16 *keys = aligned_alloc(64, tp * d * sizeof(bf16)), *values = aligned_alloc(64, tp * d * sizeof(bf16));
    bf16 *padded = aligned_alloc(64, 3 * tp * d * sizeof(bf16));
    bf16 *own = probs ? NULL : aligned_alloc(64, rows * tp * sizeof(bf16));
    for (int64_t b = n0; b < n1; b++)
        for (int64_t h = 0; h < heads; h++) {
            const bf16 *head = qkv + b * t * row + h * d;
            int64_t lq, lk, lv;
            const bf16 *q = padded_rows(head, row, t, tp, d, padded, &lq);
            const bf16 *k = padded_rows(head + heads * d, row, t, tp, d, padded + tp * d, &lk);
            const bf16 *v = padded_rows(head + 2 * heads * d, row, t, tp, d, padded + 2 * tp * d, &lv);
            pack_column_pairs(k, lk, tp, d, keys);
            pack_row_pairs(v, lv, tp, d, values);
            for (int64_t i = 0; i < t; i += rows) {  /* a block of query rows at a time */
                const int64_t m = tp - i < rows ? tp - i : rows, kept = t - i < m ? t - i : m;
                bf16 *p = probs ? probs + ((b * heads + h) * tp + i) * tp : own;
                matmul(m, tp, d / 2, q + i * lq, lq, 2, keys, s, tp);  /* scores q k^T */
                softmax_rows(s, m, tp, t, scale, p);
                matmul(m, d, tp / 2, p, tp, 2, values, c, d);  /* p v */
                round_rows(c, kept, d, out + (b * t + i) * heads * d + h * d, heads * d);
            }
        }
    free(s); free(c); free(keys); free(values); free(padded); free(own);
}

/* The gradient of `attention` for its input qkv [n][t][3][heads][d], from that of its output, grad [n][t][heads][d],
   and the kept probabilities: dv = p^T g, dp = g v^T, ds = the softmax's gradient, dq = ds k, dk = ds^T q. The
   padding queries have a zero gradient g, hence zero ds; the padding keys a zero probability, hence zero ds too. */
void attention_grad(const bf16 *restrict grad, const bf16 *restrict qkv, const bf16 *restrict probs,
                    bf16 *restrict dqkv, int64_t n0, int64_t n1, int64_t n, int64_t t, int64_t heads, int64_t d) {
    (void)n;
    const int64_t row = 3 * heads * d, out_row = heads * d, tp = (t + 15) / 16 * 16;
    const float scale = inverse_sqrt(d);
    float *dp = aligned_alloc(64, tp * tp * sizeof(float)), *c = aligned_alloc(64, tp * d * sizeof(float));
    bf16 *ds = aligned_alloc(64, tp * tp * sizeof(bf16)), *pairs = aligned_alloc(64, tp * tp * sizeof(bf16));
    bf16 *packed = aligned_alloc(64, tp * d * sizeof(bf16)), *padded = aligned_alloc(64, 4 * tp * d * sizeof(bf16));
    for (int64_t b = n0; b < n1; b++)
        for (int64_t h = 0; h < heads; h++) {
            const bf16 *head = qkv + b * t * row + h * d, *p = probs + (b * heads + h) * tp * tp;
            int64_t lq, lk, lv, lg;
            const bf16 *q = padded_rows(head, row, t, tp, d, padded, &lq);
            const bf16 *k = padded_rows(head + heads * d, row, t, tp, d, padded + tp * d, &lk);
            const bf16 *v = padded_rows(head + 2 * heads * d, row, t, tp, d, padded + 2 * tp * d, &lv);
            const bf16 *g = padded_rows(grad + b * t * out_row + h * d, out_row, t, tp, d, padded + 3 * tp * d, &lg);
            bf16 *dq = dqkv + b * t * row + h * d, *dk = dq + heads * d, *dv = dq + 2 * heads * d;
            pack_column_pairs(v, lv, tp, d, packed);
            matmul(tp, tp, d / 2, g, lg, 2, packed, dp, tp);  /* dp = g v^T */
            softmax_rows_grad(p, dp, tp, tp, scale, ds);
            pack_row_pairs(k, lk, tp, d, packed);
            matmul(tp, d, tp / 2, ds, tp, 2, packed, c, d);  /* dq = ds k */
            round_rows(c, t, d, dq, row);
            pack_row_pairs(ds, tp, tp, tp, pairs);  /* ds^T, read by pairs of its columns */
            pack_row_pairs(q, lq, tp, d, packed);
            matmul(tp, d, tp / 2, pairs, 2, 2 * tp, packed, c, d);  /* dk = ds^T q */
            round_rows(c, t, d, dk, row);
            pack_row_pairs(p, tp, tp, tp, pairs);
            pack_row_pairs(g, lg, tp, d, packed);
            matmul(tp, d, tp / 2, pairs, 2, 2 * tp, packed, c, d);  /* dv = p^T g */
            round_rows(c, t, d, dv, row);
        }
    free(dp); free(c); free(ds); free(pairs); free(packed); free(padded);
}

/* The rows of one image's 3 x 3 neighbourhoods (zero outside the image), the left operand of its convolution as a
   matrix product: x [h][w][c] (3 c <= 16) -> a [h w][ld], row i * w + j holding x[i - 1 .. i + 1][j - 1 .. j + 1][:]
   in that order (9 c values, then zeros up to ld, a multiple of 2). */
static void neighbourhoods(const bf16 *x, int64_t h, int64_t w, int64_t c, bf16 *a, int64_t ld) {
    const int64_t span = 3 * c;  /* one row of a neighbourhood: 3 pixels of c channels, contiguous in x */
    for (int64_t i = 0; i < h; i++)
        for (int64_t j = 0; j < w; j++) {
            bf16 *row = a + (i * w + j) * ld;
            /* the lanes of a span inside the image; x's start moves one pixel right at the left edge */
            const int64_t skip = j == 0 ? c : 0, keep = span - skip - (j == w - 1 ? c : 0);
            const __mmask16 inside = (__mmask16)(((1u << keep) - 1) << skip);
            for (int r = 0; r < 3; r++) {
                const int64_t ii = i - 1 + r;
                __m256i v = _mm256_setzero_si256();
                if (ii >= 0 && ii < h) v = _mm256_maskz_loadu_epi16(inside, x + ((ii * w + j - 1) * c));
                _mm256_mask_storeu_epi16(row + r * span, (__mmask16)((1u << span) - 1), v);
            }
            for (int64_t q = 9 * c; q < ld; q++) row[q] = 0;
        }
}

/* Whether any of count fp32 values is NaN. */
static int any_nan(const float *s, int64_t count) {
    __mmask16 nan = 0;
    for (int64_t i = 0; i < count; i += 16) {
        __m512 v = _mm512_loadu_ps(s + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    return nan != 0;
}

/* maxpool_relu without NaN, from fp32 values: s [h][w][k] -> y [ceil(h/2)][ceil(w/2)][k] in bf16, rounded after the
   maximum (the same as rounding first: rounding is monotone). */
static void maxpool_relu_finite(const float *s, bf16 *y, int64_t h, int64_t w, int64_t k) {
    const int64_t oh = (h + 1) / 2, ow = (w + 1) / 2;
    for (int64_t i = 0; i < oh; i++)
        for (int64_t j = 0; j < ow; j++) {
            const int64_t r0 = i > 0 ? 2 * i - 1 : 0, r1 = 2 * i + 1 < h ? 2 * i + 1 : h - 1;
            const int64_t c0 = j > 0 ? 2 * j - 1 : 0, c1 = 2 * j + 1 < w ? 2 * j + 1 : w - 1;
            for (int64_t kk = 0; kk < k; kk += 64) {  /* 4 vectors of channels at a time */
                const int vectors = k - kk < 64 ? (int)(k - kk) / 16 : 4;
                __m512 best[4];
                for (int v = 0; v < 4; v++) best[v] = _mm512_setzero_ps();  /* the ReLU */
                for (int64_t r = r0; r <= r1; r++)
                    for (int64_t q = c0; q <= c1; q++)
                        for (int v = 0; v < vectors; v++)
                            best[v] = _mm512_max_ps(best[v], _mm512_loadu_ps(s + (r * w + q) * k + kk + 16 * v));
                for (int v = 0; v < vectors; v++) store(y + (i * ow + j) * k + kk + 16 * v, best[v]);
            }
        }
}

/* Inference of the tokenizer's first layer on images of few channels (3 c <= 16: RGB): a 3 x 3 convolution (stride
   1, padding 1, no bias), its output rounded to bf16, then maxpool_relu: x [n][h][w][c] -> y [n][ceil(h/2)][ceil(w/2)][k],
   from the filters packed by pairs, wp [kp][k][2] (kp = ceil(9 c / 2), pair q holding the values 2q, 2q + 1 of a
   neighbourhood row). One image at a time, so that the convolution's output stays in the cache for the pool
   (PyTorch's convolution writes the whole batch's output to memory and the pool reads it back). k % 16 == 0. */
void conv3x3_pool_relu(const bf16 *restrict x, const bf16 *restrict wp, bf16 *restrict y, int64_t n0, int64_t n1,
                       int64_t n, int64_t h, int64_t w, int64_t c, int64_t k) {
    (void)n;
    const int64_t kp = (9 * c + 1) / 2, m = (h * w + 7) / 8 * 8, oh = (h + 1) / 2, ow = (w + 1) / 2;
    bf16 *a = aligned_alloc(64, m * 2 * kp * sizeof(bf16)), *conv = NULL;  /* conv: for the NaN fallback only */
    float *sums = aligned_alloc(64, m * k * sizeof(float));
    for (int64_t i = h * w; i < m; i++)
        for (int64_t q = 0; q < 2 * kp; q++) a[i * 2 * kp + q] = 0;
    for (int64_t b = n0; b < n1; b++) {
        neighbourhoods(x + b * h * w * c, h, w, c, a, 2 * kp);
        matmul(m, k, kp, a, 2 * kp, 2, wp, sums, k);
        if (!any_nan(sums, h * w * k)) {
            maxpool_relu_finite(sums, y + b * oh * ow * k, h, w, k);
        } else {  /* NaN propagates as in maxpool_relu */
            if (!conv) conv = aligned_alloc(64, m * k * sizeof(bf16));
            round_rows(sums, h * w, k, conv, k);
            maxpool_relu(conv, y + b * oh * ow * k, NULL, 0, 1, 1, h, w, k);
        }
    }
    free(a); free(conv); free(sums);
}

/* GELU, x Phi(x) with Phi the standard normal's distribution function, on 16 floats; with its derivative
   Phi(x) + x phi(x) in *slope where slope is not NULL. Phi from erfc by Abramowitz and Stegun's 7.1.26 (absolute
   error 1.5e-7, the formula of PyTorch's vectorised erf), its exponential shared with phi. */
static inline __attribute__((always_inline)) __m512 gelu16(__m512 x, __m512 *slope) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)), a = _mm512_abs_ps(z);
    const __m512 one = _mm512_set1_ps(1.0f), den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one);
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));  /* one Newton step: 2^-28 */
    __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 gauss = exp2_16(_mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.44269504088896341f)));
    const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(poly, gauss), _mm512_set1_ps(0.5f));  /* erfc(|z|) / 2 */
    const __m512 phi = _mm512_mask_sub_ps(tail, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), one, tail);
    if (slope) *slope = _mm512_fmadd_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f), phi);
    return _mm512_mul_ps(x, phi);
}

/* The MLP's first activation after its bias: y = gelu(h + bias), rows [n0, n1) of h and y [n][c], bias [c], all
   bf16, c % 16 == 0. The bias is added in fp32 (as in PyTorch's linear layer, before its output is rounded). */
void bias_gelu(const bf16 *restrict h, const bf16 *restrict bias, bf16 *restrict y, int64_t n0, int64_t n1,
               int64_t n, int64_t c) {
    (void)n;
    for (int64_t i = n0; i < n1; i++)
        for (int64_t k = 0; k < c; k += 16)
            store(y + i * c + k, gelu16(_mm512_add_ps(load(h + i * c + k), load(bias + k)), NULL));
}

/* The gradient of bias_gelu: gh = grad * gelu'(h + bias) [n][c] (bf16), and its sum over the rows [n0, n1) added
   to gbias [c] (fp32, from the unrounded values). */
void bias_gelu_grad(const bf16 *restrict grad, const bf16 *restrict h, const bf16 *restrict bias,
                    bf16 *restrict gh, float *restrict gbias, int64_t n0, int64_t n1, int64_t n, int64_t c) {
    (void)n;
    for (int64_t i = n0; i < n1; i++)
        for (int64_t k = 0; k < c; k += 16) {
            __m512 slope;
            gelu16(_mm512_add_ps(load(h + i * c + k), load(bias + k)), &slope);
            const __m512 g = _mm512_mul_ps(load(grad + i * c + k), slope);
            store(gh + i * c + k, g);
            _mm512_storeu_ps(gbias + k, _mm512_add_ps(_mm512_loadu_ps(gbias + k), g));
        }
}
