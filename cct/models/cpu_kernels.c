/* The memory-bound passes of CCT's tokenizer on a CPU, for cct/models/cpu_kernels.py: the tile transforms of a
   Winograd F(2x2, 3x3) convolution (stride 1, padding 1), whose matrix products torch.bmm does, and a 3 x 3 max-pool
   (stride 2, padding 1) fused with the ReLU after it. All work on channels-last bf16 tensors in vectors of 16
   channels (AVX-512 with bf16 conversions); the arithmetic is fp32. Each pass reads and writes every value once.
   Every function works on the images [n0, n1) of a batch of n, so that callers can split a batch across threads.

   Shapes: a tensor "[n][h][w][c]" is an image batch in channels-last order; "[16][t][c]" holds one row of t x c
   values for each of the 16 points of a 4 x 4 Winograd tile, t = n * ceil(h / 2) * ceil(w / 2) tiles, in the
   order (image, tile row, tile column). Channel counts are multiples of 16. */
#include <immintrin.h>
#include <stdint.h>

typedef uint16_t bf16;

static inline __m512 load(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store(bf16 *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

/* B^T d B of every overlapping 4 x 4 input tile (zero outside the image): x [n][h][w][c] -> v [16][t][c]. */
void winograd_input(const bf16 *restrict x, bf16 *restrict v, int64_t n0, int64_t n1, int64_t n, int64_t h,
                    int64_t w, int64_t c) {
    const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, plane = n * th * tw * c;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const bf16 *src[4][4];
                for (int r = 0; r < 4; r++)
                    for (int s = 0; s < 4; s++) {
                        int64_t i = 2 * ti - 1 + r, j = 2 * tj - 1 + s;
                        src[r][s] = i >= 0 && i < h && j >= 0 && j < w ? x + ((b * h + i) * w + j) * c : 0;
                    }
                bf16 *dst = v + ((b * th + ti) * tw + tj) * c;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 d[4][4], e[4][4];
                    for (int r = 0; r < 4; r++)
                        for (int s = 0; s < 4; s++) d[r][s] = src[r][s] ? load(src[r][s] + k) : zero;
                    for (int s = 0; s < 4; s++) {  /* B^T on the rows */
                        e[0][s] = _mm512_sub_ps(d[0][s], d[2][s]);
                        e[1][s] = _mm512_add_ps(d[1][s], d[2][s]);
                        e[2][s] = _mm512_sub_ps(d[2][s], d[1][s]);
                        e[3][s] = _mm512_sub_ps(d[1][s], d[3][s]);
                    }
                    for (int r = 0; r < 4; r++) {  /* B on the columns */
                        bf16 *q = dst + 4 * r * plane + k;
                        store(q, _mm512_sub_ps(e[r][0], e[r][2]));
                        store(q + plane, _mm512_add_ps(e[r][1], e[r][2]));
                        store(q + 2 * plane, _mm512_sub_ps(e[r][2], e[r][1]));
                        store(q + 3 * plane, _mm512_sub_ps(e[r][1], e[r][3]));
                    }
                }
            }
}

/* A^T m A of every tile, the 2 x 2 outputs it owns: m [16][t][c] -> y [n][h][w][c]. */
void winograd_output(const bf16 *restrict m, bf16 *restrict y, int64_t n0, int64_t n1, int64_t n, int64_t h,
                     int64_t w, int64_t c) {
    const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, plane = n * th * tw * c;
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const bf16 *src = m + ((b * th + ti) * tw + tj) * c;
                bf16 *y00 = y + ((b * h + 2 * ti) * w + 2 * tj) * c, *y10 = y00 + w * c;
                const int last_row = 2 * ti + 1 < h, last_col = 2 * tj + 1 < w;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 s0[4], s1[4];
                    for (int q = 0; q < 4; q++) {  /* A^T on the rows */
                        __m512 a0 = load(src + q * plane + k), a1 = load(src + (4 + q) * plane + k);
                        __m512 a2 = load(src + (8 + q) * plane + k), a3 = load(src + (12 + q) * plane + k);
                        s0[q] = _mm512_add_ps(_mm512_add_ps(a0, a1), a2);
                        s1[q] = _mm512_sub_ps(_mm512_sub_ps(a1, a2), a3);
                    }
                    store(y00 + k, _mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]));  /* A on the columns */
                    if (last_col) store(y00 + c + k, _mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]));
                    if (last_row) {
                        store(y10 + k, _mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]));
                        if (last_col) store(y10 + c + k, _mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]));
                    }
                }
            }
}

/* A g A^T of every tile's 2 x 2 output gradients (zero outside the image), the output transform's transpose,
   for the weight gradient: g [n][h][w][c] -> z [16][t][c]. */
void winograd_output_grad(const bf16 *restrict g, bf16 *restrict z, int64_t n0, int64_t n1, int64_t n, int64_t h,
                          int64_t w, int64_t c) {
    const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, plane = n * th * tw * c;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t b = n0; b < n1; b++)
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++) {
                const bf16 *g00 = g + ((b * h + 2 * ti) * w + 2 * tj) * c, *g10 = g00 + w * c;
                const int last_row = 2 * ti + 1 < h, last_col = 2 * tj + 1 < w;
                bf16 *dst = z + ((b * th + ti) * tw + tj) * c;
                for (int64_t k = 0; k < c; k += 16) {
                    __m512 a[2][2], e[4][2];
                    a[0][0] = load(g00 + k);
                    a[0][1] = last_col ? load(g00 + c + k) : zero;
                    a[1][0] = last_row ? load(g10 + k) : zero;
                    a[1][1] = last_row && last_col ? load(g10 + c + k) : zero;
                    for (int s = 0; s < 2; s++) {  /* A on the rows: (g0, g0 + g1, g0 - g1, -g1) */
                        e[0][s] = a[0][s];
                        e[1][s] = _mm512_add_ps(a[0][s], a[1][s]);
                        e[2][s] = _mm512_sub_ps(a[0][s], a[1][s]);
                        e[3][s] = _mm512_sub_ps(zero, a[1][s]);
                    }
                    for (int r = 0; r < 4; r++) {  /* A^T on the columns */
                        bf16 *q = dst + 4 * r * plane + k;
                        store(q, e[r][0]);
                        store(q + plane, _mm512_add_ps(e[r][0], e[r][1]));
                        store(q + 2 * plane, _mm512_sub_ps(e[r][0], e[r][1]));
                        store(q + 3 * plane, _mm512_sub_ps(zero, e[r][1]));
                    }
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

/* e^x for 16 floats, Cephes' expf: 2^n times a polynomial on [-ln2/2, ln2/2] (relative error ~1e-7); NaN stays
   NaN, and arguments are clamped to [-88, 88]. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-88.0f), _mm512_min_ps(_mm512_set1_ps(88.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Softmax over rows of `len` values (a multiple of 16): x [rows][len] -> y [rows][len], fp32 inside. A NaN makes
   its row NaN, as in PyTorch. */
void softmax_rows(const bf16 *restrict x, bf16 *restrict y, int64_t rows, int64_t len) {
    float e[len];
    for (int64_t i = 0; i < rows; i++) {
        const bf16 *src = x + i * len;
        __m512 top = _mm512_set1_ps(-__builtin_inff());
        for (int64_t k = 0; k < len; k += 16) top = _mm512_max_ps(load(src + k), top);
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top)), sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < len; k += 16) {
            __m512 v = exp16(_mm512_sub_ps(load(src + k), m));
            _mm512_storeu_ps(e + k, v);
            sum = _mm512_add_ps(sum, v);
        }
        __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t k = 0; k < len; k += 16) store(y + i * len + k, _mm512_mul_ps(_mm512_loadu_ps(e + k), scale));
    }
}
