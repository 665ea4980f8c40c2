/* Matrix-vector products for MoE decode on CPU: y = x W^T (+ b) for a few rows of x, W streamed once.
 *
 * Built by moekit/experts/native_gemv.py with the system compiler (cc -O3 -march=native -fopenmp) and
 * called through ctypes. Weights W [O, I] row-major (rows ldw apart), fp32, bf16 or fp16 (F16C builds);
 * x [M, I] and y [M, O] in the weight's dtype; fp32 accumulation. bf16 -> fp32 is a 16-bit shift (exact),
 * fp16 -> fp32 the F16C conversion (exact); fp32 -> bf16 / fp16 rounds to nearest even, as torch does.
 * fp16 runs the dot tiles and (AVX2, on panel copies) the broadcast tiles over widened panels, as bf16 does.
 *
 * Loop order: blocks of ROWS weight rows; inside a block, chunks of MCHUNK rows of x, each chunk
 * reading the block again (from L1/L2: ROWS * I values), so W is read from memory once whatever M is.
 * Every thread (OpenMP, `threads` of them) takes a contiguous range of row blocks: distinct memory.
 * Paths: AVX-512F, AVX2+FMA, and portable C, chosen at compile time by the -march=native macros; per
 * product (product_path) the dot tiles above, AMX tiles for bf16 products of AMX_MIN_ROWS or more rows
 * where the build has them and the kernel grants the tile state (amx_rows), on AMD EPYC pair tiles for
 * 5-8 rows (pair_rows) and quad tiles for 9-12 (quad_rows), and broadcast tiles from BC_MIN_ROWS rows
 * (bc_rows; AVX-512: up to 64 rows a pass, AVX2: 16; past 16 rows the 1-12 rows beyond a multiple of 16 on
 * the dot or quad tiles, bc_tail). AVX2: moekit_moe_ffn's broadcast-tile products (8 rows on) read panel
 * copies of the weights where the caller passes them (moekit_pack_panels, PATH_PANEL).
 * AVX2 below the broadcast tiles: bf16 products of 4-15 rows and fp32 of 5-6 on two-row dot tiles (dot2_rows);
 * fp16 from 4 rows on them, and from 8 on panel copies where the caller passes them.
 * The broadcast tiles also run SMEAR's merged products (moekit_merged_*, AVX-512, fp32): per-example
 * merged weights made block by block right before the tiles read them.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define ROWS 4
#define WIDE_ROWS 8 /* blocks of one or two rows of x on AMD EPYC: 8 streams (amd_tuned) */
#define MCHUNK 4
#define UNROLL 4

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The dtype codes of the entry points (and of the functions below that take `dtype`). */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
#if defined(__F16C__)
#define F16 1 /* fp16 served: the F16C conversions */
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#endif

static inline float load_value(const void *p, long at, int dtype) {
#ifdef F16
    if (dtype == DT_F16) return f16_to_f32(((const uint16_t *)p)[at]);
#endif
    return dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)p)[at]) : ((const float *)p)[at];
}

static inline void store_value(void *p, long at, float v, int dtype) {
#ifdef F16
    if (dtype == DT_F16) { ((uint16_t *)p)[at] = f32_to_f16(v); return; }
#endif
    if (dtype == DT_BF16) ((uint16_t *)p)[at] = f32_to_bf16(v);
    else ((float *)p)[at] = v;
}

/* v rounded to the nearest value of dtype (as a stored hidden value is). */
static inline float rounded(float v, int dtype) {
#ifdef F16
    if (dtype == DT_F16) return f16_to_f32(f32_to_f16(v));
#endif
    return dtype == DT_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

/* Bytes of one value of dtype. */
static inline size_t value_bytes(int dtype) { return dtype == DT_F32 ? sizeof(float) : sizeof(uint16_t); }

/* ---- one block: acc[r][m] = sum_i w[r][i] * x[m][i] for r < nr (<= ROWS), m < nm (<= MCHUNK) ---- */
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vec;
static inline vec vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec vload_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec _add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vec;
static inline vec vload_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#ifdef F16
static inline vec vload_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec _add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One tile: acc[r][m] = sum_i w[r][i] * x[m][i], r < NR, m < NM. NR and NM are constants at every call
 * (always_inline), so the compiler unrolls both loops and keeps the NR x NM accumulators in registers.
 * pf (elements, 0: none): with each weight vector, prefetch the one pf values further into L2 -- for one or two
 * rows of x only with the vector that starts a cache line (a vector of fp16, or on AVX2 of any dtype, is part of
 * one). Measured on AMD EPYC Zen 4, fp16 layers, interleaved, flushed caches: once a line 1.07-1.14x the read
 * rate at T=1-4 (1-2 rows an expert), but for every tile 0.90-0.98x on Mixtral at T=8-32 (2-8 rows), so tiles of
 * more rows keep a prefetch per vector. */
#define DEFINE_TILE(NAME, WT, LOAD_W)                                                                   \
    static inline __attribute__((always_inline)) void NAME(const WT *w, long ldw, const float *x, long ldx, \
                                                           long I, long pf, const int NR, const int NM, const int U, \
                                                           float acc[WIDE_ROWS][MCHUNK]) {              \
        long iv = 0;                                                                                    \
        VECTOR_PART(LOAD_W)                                                                             \
        for (int r = 0; r < NR; r++)                                                                    \
            for (int m = 0; m < NM; m++) {                                                              \
                float s = iv ? acc[r][m] : 0.0f;                                                        \
                for (long i = iv; i < I; i++) s += SCALAR_##WT(w[r * ldw + i]) * x[m * ldx + i];        \
                acc[r][m] = s;                                                                          \
            }                                                                                           \
    }
#ifdef VW
#define VECTOR_PART(LOAD_W)                                                                             \
    vec a[WIDE_ROWS][MCHUNK][UNROLL];                                                                   \
    iv = I - I % (VW * U);                                                                              \
    for (int r = 0; r < NR; r++)                                                                        \
        for (int m = 0; m < NM; m++)                                                                    \
            for (int u = 0; u < U; u++) a[r][m][u] = vzero();                                           \
    for (long i = 0; i < iv; i += VW * U)                                                               \
        for (int u = 0; u < U; u++) {                                                                   \
            vec xv[MCHUNK]; /* in registers: one load of x per NR weight vectors */                     \
            for (int m = 0; m < NM; m++) xv[m] = vload_f32(x + m * ldx + i + u * VW);                   \
            for (int r = 0; r < NR; r++) {                                                              \
                vec wr = LOAD_W(w + r * ldw + i + u * VW);                                              \
                if (pf && (NM > 2 || ((i + u * VW) * (long)sizeof(*w)) % 64 == 0))                        \
                    PREFETCH(w + r * ldw + i + u * VW + pf);                                            \
                for (int m = 0; m < NM; m++) a[r][m][u] = vfma(wr, xv[m], a[r][m][u]);                  \
            }                                                                                           \
        }                                                                                               \
    for (int r = 0; r < NR; r++)                                                                        \
        for (int m = 0; m < NM; m++) {                                                                  \
            for (int u = 1; u < U; u++) a[r][m][0] = _add(a[r][m][0], a[r][m][u]);                      \
            acc[r][m] = vsum(a[r][m][0]);                                                               \
        }
#else
#define VECTOR_PART(LOAD_W)
#endif
#define SCALAR_float(v) (v)
#define SCALAR_uint16_t(v) bf16_to_f32(v)
DEFINE_TILE(tile_f32, float, vload_f32)
DEFINE_TILE(tile_bf16, uint16_t, vload_bf16)
#ifdef F16
typedef uint16_t half_t; /* fp16 bits: the tile's scalar tail converts them as fp16, not bf16 */
#define SCALAR_half_t(v) f16_to_f32(v)
DEFINE_TILE(tile_f16, half_t, vload_f16)
#endif

/* A block of nr <= ROWS weight rows against nm <= MCHUNK rows of x. One row of x: row by row, four
 * vectors per step (one sequential stream, which the prefetcher follows best); more rows: a ROWS x nm
 * tile (each x vector loaded once for ROWS weight vectors, the FMA units busy); a partial block row by row. */
#define DEFINE_BLOCK(NAME, WT, TILE)                                                                    \
    static void NAME(const WT *w, long ldw, int nr, const float *x, long ldx, int nm, long I, long pf,  \
                     float acc[WIDE_ROWS][MCHUNK]) {                                                    \
        if (nr == WIDE_ROWS) { /* one or two rows of x only */                                          \
            if (nm == 1) TILE(w, ldw, x, ldx, I, pf, WIDE_ROWS, 1, 1, acc);                             \
            else TILE(w, ldw, x, ldx, I, pf, WIDE_ROWS, 2, 1, acc);                                     \
            return;                                                                                     \
        }                                                                                               \
        if (nr == ROWS) {                                                                               \
            switch (nm) {                                                                               \
            case 1: TILE(w, ldw, x, ldx, I, pf, ROWS, 1, 1, acc); return;                               \
            case 2: TILE(w, ldw, x, ldx, I, pf, ROWS, 2, 1, acc); return;                               \
            case 3: TILE(w, ldw, x, ldx, I, pf, ROWS, 3, 1, acc); return;                               \
            default: TILE(w, ldw, x, ldx, I, pf, ROWS, 4, 1, acc); return;                              \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < nr; r++) {                                                                  \
            float one[WIDE_ROWS][MCHUNK];                                                               \
            for (int m = 0; m < nm; m++) {                                                              \
                TILE(w + r * ldw, ldw, x + m * ldx, ldx, I, pf, 1, 1, UNROLL, one);                     \
                acc[r][m] = one[0][0];                                                                  \
            }                                                                                           \
        }                                                                                               \
    }
DEFINE_BLOCK(block_f32, float, tile_f32)
#ifdef F16
DEFINE_BLOCK(block_f16, half_t, tile_f16)
#endif
#if defined(__AVX512BF16__)
/* bf16 weights with AVX512_BF16: vdpbf16ps multiplies 32 bf16 pairs of W and x (x kept in bf16, exact)
 * and adds each pair's sum into 16 fp32 lanes -- half the instructions of widening W first. xb: x in
 * bf16, xf: the same in fp32 (the scalar tail). */
static inline __attribute__((always_inline)) void tile_dp(const uint16_t *w, long ldw, const uint16_t *xb,
                                                          const float *xf, long ldx, long I, long pf, const int NR,
                                                          const int NM, const int U, float acc[WIDE_ROWS][MCHUNK]) {
    __m512 a[WIDE_ROWS][MCHUNK][UNROLL];
    long iv = I - I % (32 * U);
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < NM; m++)
            for (int u = 0; u < U; u++) a[r][m][u] = _mm512_setzero_ps();
    for (long i = 0; i < iv; i += 32 * U)
        for (int u = 0; u < U; u++) {
            __m512bh xv[MCHUNK];
            for (int m = 0; m < NM; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xb + m * ldx + i + u * 32);
            for (int r = 0; r < NR; r++) {
                __m512bh wr = (__m512bh)_mm512_loadu_si512(w + r * ldw + i + u * 32);
                if (pf) PREFETCH(w + r * ldw + i + u * 32 + pf);
                for (int m = 0; m < NM; m++) a[r][m][u] = _mm512_dpbf16_ps(a[r][m][u], wr, xv[m]);
            }
        }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < NM; m++) {
            for (int u = 1; u < U; u++) a[r][m][0] = _mm512_add_ps(a[r][m][0], a[r][m][u]);
            float s = _mm512_reduce_add_ps(a[r][m][0]);
            for (long i = iv; i < I; i++) s += bf16_to_f32(w[r * ldw + i]) * xf[m * ldx + i];
            acc[r][m] = s;
        }
}

static void block_bf16(const uint16_t *w, long ldw, int nr, const uint16_t *xb, const float *x, long ldx, int nm,
                       long I, long pf, float acc[WIDE_ROWS][MCHUNK]) {
    if (nr == WIDE_ROWS) { /* one or two rows of x only */
        if (nm == 1) tile_dp(w, ldw, xb, x, ldx, I, pf, WIDE_ROWS, 1, 1, acc);
        else tile_dp(w, ldw, xb, x, ldx, I, pf, WIDE_ROWS, 2, 1, acc);
        return;
    }
    if (nr == ROWS) {
        switch (nm) {
        case 1: tile_dp(w, ldw, xb, x, ldx, I, pf, ROWS, 1, 1, acc); return;
        case 2: tile_dp(w, ldw, xb, x, ldx, I, pf, ROWS, 2, 1, acc); return;
        case 3: tile_dp(w, ldw, xb, x, ldx, I, pf, ROWS, 3, 1, acc); return;
        default: tile_dp(w, ldw, xb, x, ldx, I, pf, ROWS, 4, 1, acc); return;
        }
    }
    for (int r = 0; r < nr; r++) {
        float one[WIDE_ROWS][MCHUNK];
        for (int m = 0; m < nm; m++) {
            tile_dp(w + r * ldw, ldw, xb + m * ldx, x + m * ldx, ldx, I, pf, 1, 1, 2, one);
            acc[r][m] = one[0][0];
        }
    }
}
#else
DEFINE_BLOCK(block_bf16_widen, uint16_t, tile_bf16)
static void block_bf16(const uint16_t *w, long ldw, int nr, const uint16_t *xb, const float *x, long ldx, int nm,
                       long I, long pf, float acc[WIDE_ROWS][MCHUNK]) {
    (void)xb;
    block_bf16_widen(w, ldw, nr, x, ldx, nm, I, pf, acc);
}
#endif

/* ---- activations of the fused GLU: 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 relu ---- */
static inline float activate(float g, int act) {
    switch (act) {
    case 0: return g / (1.0f + expf(-g));
    case 1: return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    case 2: return 0.5f * g * (1.0f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f;
    }
}

/* A hidden value from its gate (or only) sum g and up sum u: act(g) * u (glu) or act(g); act 4: identity. */
static inline float finish_hidden(float g, float u, int glu, int act) {
    if (glu) return activate(g, act) * u;
    return act == 4 ? g : activate(g, act);
}

#if defined(__AVX2__) && defined(__FMA__)
/* e^x in 8 lanes, x clamped to [-87.3, 88] (results normal, finite): x = n ln2 + r with ln2 in two parts
 * (Cody-Waite), e^r a degree-7 polynomial on |r| <= ln2 / 2 (Cephes' expf coefficients), 2^n put into the
 * exponent bits. SiLU through it is within 1.5e-7 of float64 from g = -80 up (torch's fp32 silu: 1.2e-7); below,
 * where silu(g) < 1e-33, its clamp leaves an absolute error under 1e-36. */
static inline __m256 vexp(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

/* g[j] = finish_hidden(g[j], u[j], glu, act) for j < n (u unread without glu). SiLU (act 0) 8 lanes at a time
 * on AVX2 (g / (1 + e^-g), vexp; a NaN g stays NaN) instead of an expf call per hidden value: whole layers
 * 1.00-1.05x, median 1.02x (AVX2 AMD EPYC, the three bench_infer layers, fp32 and bf16, T=1-256, in one process). */
static void finish_hidden_row(float *g, const float *u, long n, int glu, int act) {
    long j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (act == 0)
        for (; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(g + j);
            __m256 h = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), vexp(_mm256_sub_ps(_mm256_setzero_ps(), v))));
            if (glu) h = _mm256_mul_ps(h, _mm256_loadu_ps(u + j));
            _mm256_storeu_ps(g + j, h);
        }
#endif
    for (; j < n; j++) g[j] = finish_hidden(g[j], glu ? u[j] : 0.0f, glu, act);
}

/* out[m * CHUNK + (r - r0)] = x_m . W_r for rows r in [r0, r1) (r1 - r0 <= CHUNK) and all M rows of x.
 * The range is cut into ROWS quarters of `sub` rows; a block takes row j of every quarter (rows sub * ldw
 * apart), so ROWS streams run through distant pages at once -- on 4 KiB pages a single stream waits on
 * its TLB misses one at a time (measured on AMD EPYC: 4 distant streams read at the rate of torch.sum, one
 * at ~0.75x of it). The rows left over (fewer than ROWS) go one block after. Each block is read from
 * memory once for every chunk of MCHUNK rows of x; while the first chunk reads it, it prefetches the next
 * block (the row after each of its rows) into L2, so the next block's memory reads overlap the other
 * chunks' work (measured on an Intel Xeon: 1.05-1.25x the read rate at 2-4 rows, 1.0-1.1x at 1 and 8).
 * Every chunk starts its streams cold (its first block is not prefetched), so longer chunks stream longer:
 * AVX-512 builds take 256 rows (AMD EPYC Zen 4, whole layers against 64, interleaved: decode 0.99-1.06x the
 * read rate with flushed caches, 1.01-1.11x warm, 1.00-1.06x at 2 threads, prefill level at 0.98-1.03x; 1024
 * rows level with 256); AVX2 builds keep the 64 they were tuned with (not re-measured; their panel products
 * split rows by chunk). */
#if defined(__AVX512F__)
#define CHUNK 256
#else
#define CHUNK 64
#endif
#define PAIR_MAX_ROWS 8 /* rows of x the pair tiles take at most (8 lane pairs) */
#define QUAD_MAX_ROWS 12 /* and the quad tiles (3 vectors of 4 rows) */
/* Whether this is an AMD EPYC with AVX-512 (Zen 4), where two choices were measured (interleaved A/B, fp32
 * and bf16, Qwen3, OLMoE and Mixtral expert matrices) and are taken: blocks of one or two rows of x take
 * WIDE_ROWS weight rows (8 streams through distant pages) rather than ROWS, 1.03-1.14x the read rate -- but
 * not 16-bit rows of at most 2048 values (4 KiB: Qwen3's and OLMoE's experts), which read fastest on ROWS
 * streams with no software prefetch, the hardware's alone (whole layers, flushed caches: bf16 / fp16 at T=1-4
 * 0.97-1.07x, median 1.04x, on 4 KiB pages, bf16 1.06-1.12x on huge pages; fp32 rows of 3-4 KiB 0.97-0.98x, so
 * not fp32); and
 * 5-8 rows run on the pair tiles, 1.01-1.26x (fp32) and 1.16-1.58x (bf16) the dot tiles' rate. Not measured
 * elsewhere (an Intel Xeon keeps its measured paths). Set once when the library loads. */
static int amd_tuned = 0;
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__)) /* AVX2's 16 registers: 8 x 2 would spill */
__attribute__((constructor)) static void detect_cpu(void) {
    __builtin_cpu_init();
    amd_tuned = __builtin_cpu_is("amd");
}
#endif
static void dot_block(const void *W, int dtype, long ldw, long r, long stride, int nr, const float *xf,
                      const uint16_t *xb, long M, long I, long ahead, float acc[WIDE_ROWS][MCHUNK], float *out, long at,
                      long step) {
    for (long m = 0; m < M; m += MCHUNK) {
        int nm = (int)(M - m < MCHUNK ? M - m : MCHUNK);
        long pf = m == 0 ? ahead : 0; /* the first chunk prefetches the next block into L2 */
        if (dtype == DT_BF16) block_bf16((const uint16_t *)W + r * ldw, stride, nr, xb + m * I, xf + m * I, I, nm, I, pf, acc);
#ifdef F16
        else if (dtype == DT_F16) block_f16((const half_t *)W + r * ldw, stride, nr, xf + m * I, I, nm, I, pf, acc);
#endif
        else block_f32((const float *)W + r * ldw, stride, nr, xf + m * I, I, nm, I, pf, acc);
        for (int q = 0; q < nr; q++)
            for (int k = 0; k < nm; k++) out[(m + k) * CHUNK + at + q * step] = acc[q][k];
    }
}

/* ---- AMX (Intel Xeon from Sapphire Rapids): bf16 products of AMX_MIN_ROWS or more rows of x on the tile unit ----
 * y^T = W x^T in 16 x 16 tiles: A = 16 weight rows x 32 inputs, loaded straight from W (16 rows, each
 * read once); B = 32 inputs x 16 rows of x in the pair-interleaved layout TDPBF16PS takes, packed once per
 * product (amx_pack, zero rows past M); C = up to four fp32 accumulator tiles (16 rows of x each). The
 * vector tiles run out of FMA throughput at these sizes (bf16, 8 rows: 0.55-0.75x the read rate of one
 * row); the tile unit keeps streaming. Used when the build has AMX, the kernel granted the tile state
 * (arch_prctl, asked once per process) and the inputs are a multiple of 32. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_MIN_ROWS 5
int moekit_amx_usable(void) {
    static int state = -1; /* unknown, then 0 refused / 1 granted */
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
}

static int amx_applies(int bf16, long M, long I) {
    return bf16 && M >= AMX_MIN_ROWS && I % 32 == 0 && moekit_amx_usable();
}

/* Elements of x packed for amx_rows: one 16 x 32 block per 32 inputs and 16 rows of x. */
static size_t amx_packed_size(long M, long I) { return (size_t)(I / 32) * (size_t)((M + 15) / 16) * 512; }

static void amx_pack(const uint16_t *xb, long M, long I, uint16_t *xp) {
    long parts = (M + 15) / 16;
    for (long s = 0; s < I / 32; s++)
        for (long p = 0; p < parts; p++) {
            uint16_t *block = xp + (s * parts + p) * 512;
            for (long kp = 0; kp < 16; kp++)
                for (long c = 0; c < 16; c++) {
                    long m = 16 * p + c;
                    const uint16_t *src = xb + m * I + 32 * s + 2 * kp;
                    block[kp * 32 + 2 * c] = m < M ? src[0] : 0;
                    block[kp * 32 + 2 * c + 1] = m < M ? src[1] : 0;
                }
        }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* out[m * CHUNK + (r - r0)] for rows r in [r0, r0 + 16 * nb) of bf16 W and M rows of x (packed: xp). Each
 * 16-row block of W takes the rows of x 64 at a time: tiles 0-3 accumulate 16 rows of x each, tile 4 is the
 * block's A, tiles 5 and 6 take turns with B (so a load does not wait on the product before it); past the
 * first 64 rows the block comes from L2. */
static void amx_rows(const uint16_t *W, long ldw, long r0, long nb, const uint16_t *xp, long M, long I, float *out) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    const long parts = (M + 15) / 16;
    float c[4][16][16];
    for (long b = 0; b < nb; b++) {
        const uint16_t *w = W + (r0 + 16 * b) * ldw;
        for (long p = 0; p < parts; p += 4) {
            const long n = parts - p < 4 ? parts - p : 4; /* accumulator tiles in this pass */
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long s = 0; s < I / 32; s++) {
                const uint16_t *xs = xp + (s * parts + p) * 512;
                _tile_loadd(4, w + 32 * s, ldw * 2);
                _tile_loadd(5, xs, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (n > 1) {
                    _tile_loadd(6, xs + 512, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (n > 2) {
                    _tile_loadd(5, xs + 1024, 64);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (n > 3) {
                    _tile_loadd(6, xs + 1536, 64);
                    _tile_dpbf16ps(3, 4, 6);
                }
            }
            _tile_stored(0, c[0], 64);
            if (n > 1) _tile_stored(1, c[1], 64);
            if (n > 2) _tile_stored(2, c[2], 64);
            if (n > 3) _tile_stored(3, c[3], 64);
            long m1 = 16 * (p + n) < M ? 16 * (p + n) : M;
            for (long m = 16 * p; m < m1; m++)
                for (int i = 0; i < 16; i++) out[m * CHUNK + 16 * b + i] = c[m / 16 - p][i][m % 16];
        }
    }
    _tile_release();
}
#else
int moekit_amx_usable(void) { return 0; }
static int amx_applies(int bf16, long M, long I) { (void)bf16, (void)M, (void)I; return 0; }
static size_t amx_packed_size(long M, long I) { (void)M, (void)I; return 0; }
static void amx_pack(const uint16_t *xb, long M, long I, uint16_t *xp) { (void)xb, (void)M, (void)I, (void)xp; }
#endif

/* ---- broadcast tiles (AVX-512): products of BC_MIN_ROWS or more rows of x ----
 * y^T = W x^T with the rows of x across the vector lanes: x^T is packed once per product (bc_pack: input i
 * holds the M rows, zero-padded to NV vectors of 16), and every weight value is broadcast against those NV
 * vectors, so each weight row is read once, in order, and each load of x serves BR weight rows. The dot
 * tiles above load a W vector and an x vector per 16 x MCHUNK products and reduce across lanes at the end;
 * at these row counts they run out of load slots (AMD EPYC fp32: 16 rows at 4.5-5.3 GB/s) while this
 * shape keeps the FMA units busy. bf16 with AVX512_BF16: x^T packed in input pairs, a weight pair broadcast
 * as one 32-bit value, vdpbf16ps (32 products per instruction); fp32 accumulation. */
#if defined(__AVX512F__)
#define BC_MIN_ROWS 9
#if defined(__AVX512BF16__)
#define BC_BF16 1
#else
#define BC_BF16 0
#endif

static int bc_applies(int bf16, long M, long I) { return M >= BC_MIN_ROWS && (!bf16 || (BC_BF16 && I % 2 == 0)); }

/* Elements of x packed for bc_rows (fp32 values, or bf16 values as 32-bit pairs: the same count). */
static size_t bc_packed_size(long M, long I) { return (size_t)I * (size_t)(16 * ((M + 15) / 16)); }

static void bc_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) {
    const long P = 16 * ((M + 15) / 16);
    if (!bf16) {
        float *t = (float *)xp;
        for (long i = 0; i < I; i++)
            for (long m = 0; m < P; m++) t[i * P + m] = m < M ? xf[m * I + i] : 0.0f;
        return;
    }
    uint16_t *t = (uint16_t *)xp;
    for (long q = 0; q < I / 2; q++)
        for (long m = 0; m < P; m++) {
            t[(q * P + m) * 2] = m < M ? xb[m * I + 2 * q] : 0;
            t[(q * P + m) * 2 + 1] = m < M ? xb[m * I + 2 * q + 1] : 0;
        }
}

/* BR weight rows (rows ldw apart) x NV vectors of 16 rows of x and, with H, a half vector of 8 more (xt: the
 * first of them in the packed x^T, P rows of x per input): acc[r][v] lane l = W_r . x_{16 v + l}, half[r]
 * lane l = W_r . x_{16 NV + l}. The half vector keeps a group of 16 a + (1 to 8) rows from paying for a
 * full vector of empty lanes (AMD EPYC runs 512-bit FMAs as two 256-bit halves: a half vector costs half). */
static inline __attribute__((always_inline)) void bc_tile_f32(const float *w, long ldw, const float *xt, long P, long I,
                                                              const int BR, const int NV, const int H,
                                                              __m512 acc[16][4], __m256 half[16]) {
    for (int r = 0; r < BR; r++) {
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
        if (H) half[r] = _mm256_setzero_ps();
    }
    for (long i = 0; i < I; i++) {
        if (i % 16 == 0) /* a new cache line of every row: fetch the next tile's into L2 */
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + i);
        __m512 xv[4];
        __m256 xh = _mm256_setzero_ps();
        for (int v = 0; v < NV; v++) xv[v] = _mm512_loadu_ps(xt + i * P + 16 * v);
        if (H) xh = _mm256_loadu_ps(xt + i * P + 16 * NV);
        for (int r = 0; r < BR; r++) {
            __m512 wr = _mm512_set1_ps(w[r * ldw + i]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(wr, xv[v], acc[r][v]);
            if (H) half[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(wr), xh, half[r]);
        }
    }
}

#if BC_BF16
static inline __attribute__((always_inline)) void bc_tile_bf16(const uint16_t *w, long ldw, const uint16_t *xt, long P,
                                                               long I, const int BR, const int NV, const int H,
                                                               __m512 acc[16][4], __m256 half[16]) {
    for (int r = 0; r < BR; r++) {
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
        if (H) half[r] = _mm256_setzero_ps();
    }
    for (long q = 0; q < I / 2; q++) {
        if (q % 16 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 2 * q);
        __m512bh xv[4];
        __m256bh xh = (__m256bh)_mm256_setzero_si256();
        for (int v = 0; v < NV; v++) xv[v] = (__m512bh)_mm512_loadu_si512(xt + 2 * (q * P + 16 * v));
        if (H) xh = (__m256bh)_mm256_loadu_si256((const __m256i *)(xt + 2 * (q * P + 16 * NV)));
        for (int r = 0; r < BR; r++) {
            int32_t pair;
            memcpy(&pair, w + r * ldw + 2 * q, sizeof pair);
            __m512i wi = _mm512_set1_epi32(pair);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)wi, xv[v]);
            if (H) half[r] = _mm256_dpbf16_ps(half[r], (__m256bh)_mm512_castsi512_si256(wi), xh);
        }
    }
}
#endif

/* Weight rows per tile for N vectors of x (a half vector counts as one): BR * N accumulators, at most 24 of
 * them (the rest of the 32 registers hold x and the broadcast weight); 8 rows where that fits (measured on
 * AMD EPYC: 8 rows x 1 vector 1.1-1.4x faster than 16 x 1, 8 x 3 and 6 x 4 1.1-1.4x faster than 4 x 3 or 4). */
#define BC_BR(N) ((N) <= 3 ? 8 : 6)
#define BC_MAX_ACC 24 /* accumulators of the largest tile, BC_BR(N) * N */

/* The lanes of mask m at p, loaded (zero elsewhere) or stored: plain moves when all 16 are wanted (AMD EPYC
 * runs masked moves to memory several times slower). */
static inline __m512 load_lanes(__mmask16 m, const float *p) { return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p); }
static inline void store_lanes(float *p, __mmask16 m, __m512 v) {
    if (m == 0xFFFF) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, m, v);
}

/* acc[r][v] lane l (and half[r] lane l, as vector NV) -- row 16 v + l of x against weight row r -- into
 * out[(16 v + l) * ldm + r * ldr] for the first `rows` rows of x, added to what is there with `add`. ldm 1
 * (the rows of x are the output's columns: the merged products) stores whole vectors. */
static inline void bc_store(__m512 acc[16][4], __m256 half[16], int BR, int NV, int H, long rows, float *out, long ldm,
                            long ldr, int add) {
    if (ldm == 1) {
        for (int r = 0; r < BR; r++)
            for (int v = 0; v < NV + H && 16 * v < rows; v++) {
                long n = rows - 16 * v < 16 ? rows - 16 * v : 16;
                __mmask16 k = (__mmask16)((1u << n) - 1u);
                float *o = out + r * ldr + 16 * v;
                __m512 a = v < NV ? acc[r][v] : _mm512_castps256_ps512(half[r]);
                if (add) a = _mm512_add_ps(a, load_lanes(k, o));
                store_lanes(o, k, a);
            }
        return;
    }
    float lanes[16];
    for (int r = 0; r < BR; r++)
        for (int v = 0; v < NV + H; v++) {
            if (v < NV) _mm512_storeu_ps(lanes, acc[r][v]);
            else _mm256_storeu_ps(lanes, half[r]);
            for (int l = 0; l < (v < NV ? 16 : 8) && 16 * v + l < rows; l++) {
                float *o = out + (16 * v + l) * ldm + r * ldr;
                *o = add ? *o + lanes[l] : lanes[l];
            }
        }
}

#define BC_CASE(TILE, NV, H)                                                                            \
    for (; r + BC_BR(NV + H) <= nr; r += BC_BR(NV + H)) {                                               \
        TILE(w + (r0 + r) * ldw, ldw, xt, P, I, BC_BR(NV + H), NV, H, acc, half);                       \
        bc_store(acc, half, BC_BR(NV + H), NV, H, rows, out + r * ldr, ldm, ldr, add);                  \
    }                                                                                                   \
    for (; r < nr; r++) {                                                                               \
        TILE(w + (r0 + r) * ldw, ldw, xt, P, I, 1, NV, H, acc, half);                                   \
        bc_store(acc, half, 1, NV, H, rows, out + r * ldr, ldm, ldr, add);                              \
    }                                                                                                   \
    break;

/* Every (full vectors, half vector) shape of up to 64 rows of x: 16 v + 8 h rows. */
#define BC_SHAPES(TILE)                                                                                 \
    switch (2 * nv + h) {                                                                               \
    case 1: BC_CASE(TILE, 0, 1)                                                                         \
    case 2: BC_CASE(TILE, 1, 0)                                                                         \
    case 3: BC_CASE(TILE, 1, 1)                                                                         \
    case 4: BC_CASE(TILE, 2, 0)                                                                         \
    case 5: BC_CASE(TILE, 2, 1)                                                                         \
    case 6: BC_CASE(TILE, 3, 0)                                                                         \
    case 7: BC_CASE(TILE, 3, 1)                                                                         \
    default: BC_CASE(TILE, 4, 0)                                                                        \
    }

/* Rows [r0, r0 + nr) of W against the M rows of x packed in xp into out[m * ldm + (r - r0) * ldr] (added
 * to it with `add`): the rows of x 64 at a time (up to four vectors, the last one half when it holds 8 rows
 * or fewer), each pass reading the block's weight rows again (from L2 past the first). */
static void bc_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out,
                    long ldm, long ldr, int add) {
    __m512 acc[16][4];
    __m256 half[16];
    const long P = 16 * ((M + 15) / 16);
    for (long m0 = 0; m0 < M; m0 += 64, out += 64 * ldm) {
        const long rows = M - m0 < 64 ? M - m0 : 64;
        const int nv = (int)(rows / 16) + (rows % 16 > 8), h = rows % 16 > 0 && rows % 16 <= 8;
        long r = 0;
#if BC_BF16
        if (bf16) {
            const uint16_t *w = (const uint16_t *)W, *xt = (const uint16_t *)xp + 2 * m0;
            BC_SHAPES(bc_tile_bf16)
            continue;
        }
#endif
        (void)bf16;
        const float *w = (const float *)W, *xt = (const float *)xp + m0;
        BC_SHAPES(bc_tile_f32)
    }
}

/* ---- pair tiles (AVX-512): 5 to 8 rows of x ----
 * The broadcast tiles with two inputs per vector: lane 2 m + j holds row m of x at input 2 q + j (x^T packed
 * in input pairs, rows past M zero), and each weight pair (64 bits) is broadcast to all eight lane pairs, so
 * one FMA does 16 products for up to 8 rows, with no lane left empty; the two lanes of a row are summed at
 * the end. bf16 (AVX512_BF16): four inputs per lane pair, a weight quad broadcast, vdpbf16ps. The dot tiles
 * read a 4-row block twice at these sizes (two chunks of x). */
#define PAIR_MIN_ROWS 5
#define PAIR_BR 8

static int pair_applies(int bf16, long M, long I) {
    return amd_tuned && M >= PAIR_MIN_ROWS && M <= PAIR_MAX_ROWS && (bf16 ? BC_BF16 && I % 4 == 0 : I % 2 == 0);
}

/* Elements of x packed for pair_rows: 8 rows per input (fp32 values or bf16 values). */
static size_t pair_packed_size(long I) { return (size_t)(8 * I); }

static void pair_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) {
    if (!bf16) {
        float *t = (float *)xp;
        for (long q = 0; q < I / 2; q++)
            for (long m = 0; m < 8; m++)
                for (long j = 0; j < 2; j++) t[16 * q + 2 * m + j] = m < M ? xf[m * I + 2 * q + j] : 0.0f;
        return;
    }
    uint16_t *t = (uint16_t *)xp;
    for (long q = 0; q < I / 4; q++)
        for (long m = 0; m < 8; m++)
            for (long j = 0; j < 4; j++) t[32 * q + 4 * m + j] = m < M ? xb[m * I + 4 * q + j] : 0;
}

/* BR weight rows against the packed rows of x: acc[r] lanes 2 m and 2 m + 1 sum to W_r . x_m. */
static inline __attribute__((always_inline)) void pair_tile_f32(const float *w, long ldw, const float *xt, long I,
                                                               const int BR, __m512 acc[16]) {
    for (int r = 0; r < BR; r++) acc[r] = _mm512_setzero_ps();
    for (long q = 0; q < I / 2; q++) {
        if (q % 8 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 2 * q);
        __m512 xv = _mm512_loadu_ps(xt + 16 * q);
        for (int r = 0; r < BR; r++) {
            double pair;
            memcpy(&pair, w + r * ldw + 2 * q, sizeof pair);
            acc[r] = _mm512_fmadd_ps(_mm512_castpd_ps(_mm512_set1_pd(pair)), xv, acc[r]);
        }
    }
}

#if BC_BF16
static inline __attribute__((always_inline)) void pair_tile_bf16(const uint16_t *w, long ldw, const uint16_t *xt, long I,
                                                                const int BR, __m512 acc[16]) {
    for (int r = 0; r < BR; r++) acc[r] = _mm512_setzero_ps();
    for (long q = 0; q < I / 4; q++) {
        if (q % 8 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 4 * q);
        __m512bh xv = (__m512bh)_mm512_loadu_si512(xt + 32 * q);
        for (int r = 0; r < BR; r++) {
            long long quad;
            memcpy(&quad, w + r * ldw + 4 * q, sizeof quad);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi64(quad), xv);
        }
    }
}
#endif

static inline void pair_store(__m512 acc[16], int BR, long M, float *out) {
    float lanes[16];
    for (int r = 0; r < BR; r++) {
        _mm512_storeu_ps(lanes, acc[r]);
        for (long m = 0; m < M; m++) out[m * CHUNK + r] = lanes[2 * m] + lanes[2 * m + 1];
    }
}

/* Whole tiles of PAIR_BR weight rows, then the rows left over one at a time. */
#define PAIR_TILES(TILE, WT)                                                                            \
    while (r < nr) {                                                                                    \
        const int br = r + PAIR_BR <= nr ? PAIR_BR : 1;                                                 \
        if (br == PAIR_BR) TILE((const WT *)W + (r0 + r) * ldw, ldw, (const WT *)xp, I, PAIR_BR, acc);  \
        else TILE((const WT *)W + (r0 + r) * ldw, ldw, (const WT *)xp, I, 1, acc);                      \
        pair_store(acc, br, M, out + r);                                                                \
        r += br;                                                                                        \
    }

/* Rows [r0, r0 + nr) of W against the M (5-8) rows of x packed in xp into out[m * CHUNK + (r - r0)]. */
static void pair_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out) {
    __m512 acc[16];
    long r = 0;
#if BC_BF16
    if (bf16) {
        PAIR_TILES(pair_tile_bf16, uint16_t)
        return;
    }
#endif
    (void)bf16;
    PAIR_TILES(pair_tile_f32, float)
}

/* ---- quad tiles (AVX-512): 9 to 12 rows of x ----
 * The pair tiles with four inputs per lane group: lane 4 m + j of vector v holds row 4 v + m of x at input
 * 4 q + j (x^T packed in input quads, 16 rows per quad, rows past M zero), and each weight quad (128 bits)
 * is broadcast to the four groups, so NV = ceil(M / 4) vectors cover the rows in steps of 4 (the broadcast
 * tiles pay for 16 lanes from 9 rows) and one broadcast serves NV FMAs; the four lanes of a row are summed
 * at the end. bf16 (AVX512_BF16): eight inputs per lane group (two per lane), a weight octet broadcast,
 * vdpbf16ps. Measured on AMD EPYC (Qwen3 layer, every expert given M rows) against the broadcast tiles they
 * replace: 9-12 rows fp32 0.76-0.78x the time, bf16 0.80-0.82x. Not taken: 13-16 rows (1.06-1.11x slower than
 * one broadcast vector); 4-8 rows, which ran fp32 0.85-0.91x the time of the dot / pair tiles on one thread
 * but 1.07x slower on two (Mixtral, 4-8 rows per expert: the tile's 8 adjacent weight rows against the dot
 * tiles' distant streams, where two cores are bound by memory), and bf16 1.02-1.12x slower on one. */
#define QUAD_MIN_ROWS 9
/* Whether M rows of I inputs fit the quad tiles (5-12 rows: a broadcast tile's tail, its weights in L2), and
 * whether a whole product of M rows takes them (9-12). */
static int quad_fits(int bf16, long M, long I) {
    return amd_tuned && M >= 5 && M <= QUAD_MAX_ROWS && (bf16 ? BC_BF16 && I % 8 == 0 : I % 4 == 0);
}

static int quad_applies(int bf16, long M, long I) { return M >= QUAD_MIN_ROWS && quad_fits(bf16, M, I); }

/* Elements of x packed for quad_rows: 16 rows per input (fp32 values, or bf16 values in pairs: 4 bytes each). */
static size_t quad_packed_size(long I) { return (size_t)(16 * I); }

static void quad_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) {
    const long J = bf16 ? 8 : 4; /* inputs per lane group */
    for (long q = 0; q < I / J; q++)
        for (long m = 0; m < 16; m++)
            for (long j = 0; j < J; j++) {
                long at = 16 * J * q + J * m + j, from = m * I + J * q + j;
                if (bf16) ((uint16_t *)xp)[at] = m < M ? xb[from] : 0;
                else ((float *)xp)[at] = m < M ? xf[from] : 0.0f;
            }
}

static inline __attribute__((always_inline)) void quad_tile_f32(const float *w, long ldw, const float *xt, long I,
                                                               const int BR, const int NV, __m512 acc[16][4]) {
    for (int r = 0; r < BR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (long q = 0; q < I / 4; q++) {
        if (q % 4 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 4 * q);
        __m512 xv[3];
        for (int v = 0; v < NV; v++) xv[v] = _mm512_loadu_ps(xt + 64 * q + 16 * v);
        for (int r = 0; r < BR; r++) {
            __m512 wq = _mm512_broadcast_f32x4(_mm_loadu_ps(w + r * ldw + 4 * q));
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(wq, xv[v], acc[r][v]);
        }
    }
}

#if BC_BF16
static inline __attribute__((always_inline)) void quad_tile_bf16(const uint16_t *w, long ldw, const uint16_t *xt,
                                                                long I, const int BR, const int NV, __m512 acc[16][4]) {
    for (int r = 0; r < BR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (long q = 0; q < I / 8; q++) {
        if (q % 4 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 8 * q);
        __m512bh xv[3];
        for (int v = 0; v < NV; v++) xv[v] = (__m512bh)_mm512_loadu_si512(xt + 128 * q + 32 * v);
        for (int r = 0; r < BR; r++) {
            __m512i wq = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(w + r * ldw + 8 * q)));
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)wq, xv[v]);
        }
    }
}
#endif

/* acc[r][v] lanes 4 m .. 4 m + 3 summed: row 4 v + m of x against weight row r, into out[m * CHUNK + r]. */
static inline void quad_store(__m512 acc[16][4], int BR, int NV, long M, float *out) {
    float lanes[16];
    for (int r = 0; r < BR; r++)
        for (int v = 0; v < NV; v++) {
            __m512 a = acc[r][v];
            a = _mm512_add_ps(a, _mm512_permute_ps(a, 0x4E)); /* lane j plus lane j ^ 2 */
            a = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1)); /* plus j ^ 1: each lane holds its group's sum */
            _mm512_storeu_ps(lanes, a);
            for (long m = 4 * v; m < 4 * v + 4 && m < M; m++) out[m * CHUNK + r] = lanes[4 * (m - 4 * v)];
        }
}

#define QUAD_CASE(TILE, WT, NV)                                                                         \
    for (; r < nr; r += br) {                                                                           \
        br = r + BC_BR(NV) <= nr ? BC_BR(NV) : 1;                                                       \
        if (br == 1) TILE((const WT *)W + (r0 + r) * ldw, ldw, (const WT *)xp, I, 1, NV, acc);          \
        else TILE((const WT *)W + (r0 + r) * ldw, ldw, (const WT *)xp, I, BC_BR(NV), NV, acc);          \
        quad_store(acc, br, NV, M, out + r);                                                            \
    }                                                                                                   \
    break;
#define QUAD_SHAPES(TILE, WT)                                                                           \
    switch ((M + 3) / 4) {                                                                              \
    case 2: QUAD_CASE(TILE, WT, 2)                                                                      \
    default: QUAD_CASE(TILE, WT, 3)                                                                     \
    }

/* Rows [r0, r0 + nr) of W against the M (5-12) rows of x packed in xp into out[m * CHUNK + (r - r0)]: tiles
 * of BC_BR(NV) weight rows, then the rows left over one at a time. */
static void quad_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out) {
    __m512 acc[16][4];
    long r = 0;
    int br;
#if BC_BF16
    if (bf16) {
        QUAD_SHAPES(quad_tile_bf16, uint16_t)
        return;
    }
#endif
    (void)bf16;
    QUAD_SHAPES(quad_tile_f32, float)
}
#else
#if defined(__AVX2__) && defined(__FMA__)
/* ---- broadcast tiles (AVX2): products of BC_MIN_ROWS or more rows of x ----
 * The AVX-512 broadcast tiles above on 8-lane vectors: x^T packed once per product (input i holds the M rows
 * of x, zero-padded to a multiple of 8, as fp32 -- bf16 x widened, exact) and every weight value broadcast
 * against one or two vectors of rows. With 16 registers a tile holds at most 16 rows of x (two vectors, 6
 * weight rows: 12 accumulators), so more rows run in passes of 16, each reading the block's weight rows
 * again (from L2 past the first). bf16 weights: a weight pair broadcast as one 32-bit value, split into its
 * two fp32 values by a shift and a mask (AVX2 has no bf16 products). The dot tiles load a W vector and an x
 * vector per 8 x MCHUNK products and reduce across lanes at the end; at these row counts they use half the
 * FMA rate (AVX2 AMD EPYC, fp32: 16 rows at 5.3-5.9 GB/s, oneDNN-packed 6.0-6.9). */
#define BC_MIN_ROWS 8
#define BC_MIN_ROWS_BF16 16
#define BC_PASS 16 /* rows of x per pass: two vectors */
#define BC_BR 6     /* weight rows per tile: 12 sums, two vectors of x and the broadcast weight in 16 registers */
#define PANELS 1    /* the tiles read panel copies of the weights (moekit_pack_panels) */

static int bc_applies(int bf16, long M, long I) { return bf16 ? M >= BC_MIN_ROWS_BF16 && I % 2 == 0 : M >= BC_MIN_ROWS; }

static size_t bc_packed_size(long M, long I) { return (size_t)I * (size_t)(8 * ((M + 7) / 8)); }

/* x^T by passes: the pass of rows [m0, m0 + 16) at m0 * I, input-major, bc_pass_width(M - m0) rows an
 * input (zero past M); a pass reads one run of memory (input-major over all M rows, a pass of 1024-row
 * products read 16 values every 4 KiB: Mixtral fp32, 1024 rows, 5.7x the time of the loop on MKL). */
static long bc_pass_width(long rows) { return rows > 8 ? 16 : 8; }

static void bc_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) {
    float *t = (float *)xp;
    (void)bf16, (void)xb;
    for (long m0 = 0; m0 < M; m0 += BC_PASS) {
        const long W = bc_pass_width(M - m0);
        for (long i = 0; i < I; i++)
            for (long j = 0; j < W; j++) t[m0 * I + i * W + j] = m0 + j < M ? xf[(m0 + j) * I + i] : 0.0f;
    }
}

/* The weights ahead of a tile: plain rows (`row_bytes` apart from w), at a new cache line of each row (`line`),
 * the next tile's rows into L2; a panel, the line at `ahead` (one stream: PANEL_AHEAD bytes on in an fp32 panel;
 * AVX2 AMD EPYC, fp32 panel at 16 rows: 1536 bytes ahead 1.2x none, 3072 0.9x of 1536). A widened bf16 tile
 * is in L2 and takes none (pf NULL); its first pass prefetches the next tile's bf16 values as it widens them. */
#define PANEL_AHEAD 1536
static inline __attribute__((always_inline)) void bc_prefetch(const char *w, long row_bytes, const int BR, int line,
                                                              const char *ahead, const int panel) {
    if (panel) PREFETCH(ahead);
    else if (line)
        for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * row_bytes + (ahead - w));
}

/* dst[0..8) = src[0..8) (bf16 or fp16 values, dtype) as fp32 (exact). */
static inline __attribute__((always_inline)) void widen8(const uint16_t *src, float *dst, const int dtype) {
#ifdef F16
    if (dtype == DT_F16) {
        _mm256_storeu_ps(dst, vload_f16(src));
        return;
    }
#endif
    _mm256_storeu_ps(dst, vload_bf16(src));
}

/* dst[j] = src[j] as fp32 for j < n (exact). */
static void widen_half(const uint16_t *src, long n, float *dst, int dtype) {
    long j = 0;
    for (; j + 8 <= n; j += 8) widen8(src + j, dst + j, dtype);
    for (; j < n; j++) dst[j] = load_value(src, j, dtype);
}

/* BR weight rows x NV vectors of 8 rows of x (xt: their pass of the packed x^T, P values an input):
 * acc[r][v] lane l = W_r . x_{8 v + l}. The weights: plain (rows ldw apart) or, with `panel`, the
 * tile's BR rows input-major (BR values an input, one stream; moekit_pack_panels; bf16 / fp16 panels widened
 * first, PANEL_HALF). With one vector the even and odd inputs sum into
 * two accumulators (a[r][0], a[r][1]), so a tile has as many independent sums as with two and covers the
 * FMA latency. The sums live in a local array until the end (one the caller sees is stored to memory at
 * every step: GCC cannot prove the weight loads do not alias it; 1.5-2.5x slower). pf: bc_prefetch's `ahead`
 * (NULL: no prefetch). wn > 0: the tile also
 * widens the next bf16 / fp16 (wdt) panel tile (wsrc, wn values) into wdst as it goes, 8 values an input, in
 * the issue slots the FMA-bound loop leaves (and prefetches it), finishing what is left at the end. */
static inline __attribute__((always_inline)) void bc_tile_f32(const float *w, long ldw, const float *xt, long P, long I,
                                                              const int BR, const int NV, const int panel, const char *pf,
                                                              const uint16_t *wsrc, float *wdst, long wn, const int wdt,
                                                              __m256 acc[BC_BR][2]) {
    const long rs = panel ? 1 : ldw, is = panel ? BR : 1; /* weight (r, i) at w[r * rs + i * is] */
    __m256 a[BC_BR][2];
    for (int r = 0; r < BR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    long i = 0, j = 0; /* j: values of the next tile widened */
    if (NV == 1)
        for (; i + 1 < I; i += 2) {
            if (wn && j + 16 <= wn) {
                if (j % 32 == 0) PREFETCH((const char *)(wsrc + j) + PANEL_AHEAD);
                widen8(wsrc + j, wdst + j, wdt), widen8(wsrc + j + 8, wdst + j + 8, wdt), j += 16;
            } else if (!wn && pf)
                bc_prefetch((const char *)w, 4 * ldw, BR, i % 16 == 0, pf + 4 * i * is, panel);
            __m256 x0 = _mm256_loadu_ps(xt + i * P), x1 = _mm256_loadu_ps(xt + (i + 1) * P);
            for (int r = 0; r < BR; r++) {
                a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * rs + i * is), x0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * rs + (i + 1) * is), x1, a[r][1]);
            }
        }
    for (; i < I; i++) {
        if (wn && j + 8 <= wn) {
            if (j % 32 == 0) PREFETCH((const char *)(wsrc + j) + PANEL_AHEAD);
            widen8(wsrc + j, wdst + j, wdt), j += 8;
        } else if (!wn && pf && i % 2 == 0)
            bc_prefetch((const char *)w, 4 * ldw, BR, i % 16 == 0, pf + 4 * i * is, panel);
        __m256 xv[2];
        for (int v = 0; v < NV; v++) xv[v] = _mm256_loadu_ps(xt + i * P + 8 * v);
        for (int r = 0; r < BR; r++) {
            __m256 wr = _mm256_broadcast_ss(w + r * rs + i * is);
            for (int v = 0; v < NV; v++) a[r][v] = _mm256_fmadd_ps(wr, xv[v], a[r][v]);
        }
    }
    if (j < wn) widen_half(wsrc + j, wn - j, wdst + j, wdt);
    for (int r = 0; r < BR; r++) {
        acc[r][0] = NV == 1 ? _mm256_add_ps(a[r][0], a[r][1]) : a[r][0];
        acc[r][1] = a[r][1];
    }
}

static inline __attribute__((always_inline)) void bc_tile_bf16(const uint16_t *w, long ldw, const float *xt, long P,
                                                               long I, const int BR, const int NV, __m256 acc[BC_BR][2]) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a[BC_BR][2]; /* one vector: the odd inputs' sums in a[r][1] */
    for (int r = 0; r < BR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (long q = 0; q < I / 2; q++) {
        if (q % 32 == 0)
            for (int r = 0; r < BR; r++) PREFETCH(w + (BR + r) * ldw + 2 * q);
        __m256 xe[2], xo[2]; /* inputs 2 q and 2 q + 1 */
        for (int v = 0; v < NV; v++) {
            xe[v] = _mm256_loadu_ps(xt + 2 * q * P + 8 * v);
            xo[v] = _mm256_loadu_ps(xt + (2 * q + 1) * P + 8 * v);
        }
        for (int r = 0; r < BR; r++) {
            int32_t pair;
            memcpy(&pair, w + r * ldw + 2 * q, sizeof pair);
            __m256i wp = _mm256_set1_epi32(pair);
            __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wp, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(wp, high));
            if (NV == 1) {
                a[r][0] = _mm256_fmadd_ps(we, xe[0], a[r][0]);
                a[r][1] = _mm256_fmadd_ps(wo, xo[0], a[r][1]);
            } else
                for (int v = 0; v < NV; v++) a[r][v] = _mm256_fmadd_ps(wo, xo[v], _mm256_fmadd_ps(we, xe[v], a[r][v]));
        }
    }
    for (int r = 0; r < BR; r++) {
        acc[r][0] = NV == 1 ? _mm256_add_ps(a[r][0], a[r][1]) : a[r][0];
        acc[r][1] = a[r][1];
    }
}

/* acc[r][v] lane l -- row 8 v + l of x against weight row r -- into out[(8 v + l) * ldm + r * ldr] for the
 * first `rows` rows of x, added to what is there with `add`. */
static inline void bc_store(__m256 acc[BC_BR][2], int BR, int NV, long rows, float *out, long ldm, long ldr, int add) {
    float lanes[8];
    for (int r = 0; r < BR; r++)
        for (int v = 0; v < NV; v++) {
            _mm256_storeu_ps(lanes, acc[r][v]);
            for (int l = 0; l < 8 && 8 * v + l < rows; l++) {
                float *o = out + (8 * v + l) * ldm + r * ldr;
                *o = add ? *o + lanes[l] : lanes[l];
            }
        }
}

/* One tile of BR weight rows (W, the tile's first: rows ldw apart, or its panel) against every pass of
 * BC_PASS rows of x, so the tile's weights are read from memory once and from cache in the later passes; the
 * arguments after BR go to TILE (panel and prefetch). */
#define BC_PASSES(TILE, W, BR, ...)                                                                     \
    for (long m0 = 0; m0 < M; m0 += BC_PASS) {                                                          \
        const long pass_rows = M - m0 < BC_PASS ? M - m0 : BC_PASS;                                     \
        if (pass_rows > 8) TILE(W, ldw, xt + m0 * I, 16, I, BR, 2, __VA_ARGS__ acc);                    \
        else TILE(W, ldw, xt + m0 * I, 8, I, BR, 1, __VA_ARGS__ acc);                                   \
        bc_store(acc, BR, pass_rows > 8 ? 2 : 1, pass_rows, out + m0 * ldm + r * ldr, ldm, ldr, add);   \
    }
/* Tiles of BR weight rows, then the rest in tiles of 4, 2 and 1 (a tile of one row has too few accumulators
 * to cover the FMA latency: 64 rows as 10 x 6 + 4 x 1 ran 0.75x the dot tiles' rate, Mixtral fp32, 64 rows);
 * STEP(h) runs the tile of h rows at row r. */
#define BC_TILES(BR, STEP)                                                                              \
    for (; r + (BR) <= nr; r += (BR)) { STEP(BR) }                                                      \
    if (r + 4 <= nr) { STEP(4) r += 4; }                                                                \
    if (r + 2 <= nr) { STEP(2) r += 2; }                                                                \
    if (r < nr) { STEP(1) r++; }
/* The height of the tile BC_TILES starts at row r of a run of nr rows (what moekit_pack_panels lays out). */
static long bc_tile_height(long nr, long r) {
    if (r < nr / BC_BR * BC_BR) return BC_BR;
    return nr - r >= 4 ? 4 : nr - r >= 2 ? 2 : 1;
}
#define PLAIN_F32(h) BC_PASSES(bc_tile_f32, w + (r0 + r) * ldw, h, 0, (const char *)(w + (r0 + r) * ldw), NULL, NULL, 0, 0,)
#define PLAIN_BF16(h) BC_PASSES(bc_tile_bf16, w + (r0 + r) * ldw, h,)
#define PANEL_F32(h) {BC_PASSES(bc_tile_f32, w + (r0 + r) * I, h, 1, (const char *)(w + (r0 + r) * I) + PANEL_AHEAD, NULL, NULL, 0, 0,) PANEL_TAIL(w + (r0 + r) * I, h)}
/* bf16 / fp16 panel (the dtype in `dtype`): each tile's weights widened to fp32 (BC_BR * I values: in L2), which
 * the fp32 panel tile runs --
 * one shift per weight, where the bf16 tile pays a broadcast, a shift and a mask per weight and pass, and runs
 * out of registers for x (its 4 vectors: even and odd inputs). Two buffers: the first pass of a tile widens the
 * next tile into the other one as it runs (bc_tile_f32's wn; a tile widened before its passes ran 0.80x the
 * fp32 rate at 16 rows, AVX2 AMD EPYC, 2048 inputs). */
#define PANEL_HALF(h)                                                                                   \
    {                                                                                                   \
        const long next_r = r + (h), next_n = next_r < nr ? bc_tile_height(nr, next_r) * I : 0;         \
        float *now = wide[parity], *next = wide[1 - parity];                                            \
        BC_PASSES(bc_tile_f32, now, h, 1, NULL, w + (r0 + next_r) * I, next, m0 == 0 ? next_n : 0, dtype,) \
        PANEL_TAIL(now, h)                                                                              \
        parity = 1 - parity;                                                                            \
    }

/* Rows [r0, r0 + nr) of W against the M rows of x packed in xp into out[m * ldm + (r - r0) * ldr] (added
 * to it with `add`). */
static void bc_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out,
                    long ldm, long ldr, int add) {
    __m256 acc[BC_BR][2];
    const float *xt = (const float *)xp;
    long r = 0;
    if (bf16) {
        const uint16_t *w = (const uint16_t *)W;
        BC_TILES(BC_BR, PLAIN_BF16)
    } else {
        const float *w = (const float *)W;
        BC_TILES(BC_BR, PLAIN_F32)
    }
}

/* The rows of x past a panel product's passes: the 1-4 past a multiple of 16 (from 17 rows), which a pass of 8
 * would pay as 8, and the ninth of 9, 25, 41, ... rows, which would widen a pass of 8 to 16; 2-4 rows that
 * would only widen one ran slower on the tail (AVX2 AMD EPYC, fp32, 2048 inputs: 17 rows ran at 0.68x the rate
 * of 16 on passes, 0.87x with the tail; 12 rows 0.80x of passes). */
#define PANEL_TAIL_MAX 4
static long panel_tail(long M) {
    const long q = M % 16;
    return M > 16 && q >= 1 && q <= PANEL_TAIL_MAX ? q : q == 9 ? 1 : 0;
}

/* R rows of x (row-major, I apart) against a panel tile of BR weight rows (BR values an input: one masked
 * vector load), each row's value of x broadcast; U inputs in flight so U * R sums cover the FMA latency.
 * out[h * ldm + r * ldr] = W_r . x_h (added to it with `add`). */
static inline __attribute__((always_inline)) void panel_tail_tile(const float *w, const float *x, long I, const int BR,
                                                                  const int R, float *out, long ldm, long ldr, int add) {
    const int U = R <= 2 ? 4 : 2;
    const __m256i lanes_in = _mm256_cmpgt_epi32(_mm256_set1_epi32(BR), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 a[4][PANEL_TAIL_MAX];
    for (int u = 0; u < U; u++)
        for (int h = 0; h < R; h++) a[u][h] = _mm256_setzero_ps();
    long i = 0;
    for (; i + U <= I; i += U)
        for (int u = 0; u < U; u++) {
            __m256 wv = _mm256_maskload_ps(w + (i + u) * BR, lanes_in);
            for (int h = 0; h < R; h++) a[u][h] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + h * I + i + u), a[u][h]);
        }
    for (; i < I; i++) {
        __m256 wv = _mm256_maskload_ps(w + i * BR, lanes_in);
        for (int h = 0; h < R; h++) a[0][h] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + h * I + i), a[0][h]);
    }
    float lanes[8];
    for (int h = 0; h < R; h++) {
        __m256 sum = a[0][h];
        for (int u = 1; u < U; u++) sum = _mm256_add_ps(sum, a[u][h]);
        _mm256_storeu_ps(lanes, sum);
        for (int r = 0; r < BR; r++) {
            float *o = out + h * ldm + r * ldr;
            *o = add ? *o + lanes[r] : lanes[r];
        }
    }
}
#define PANEL_TAIL(W, h)                                                                                \
    if (tail == 1) panel_tail_tile(W, x_tail, I, h, 1, out + M * ldm + r * ldr, ldm, ldr, add);         \
    else if (tail == 2) panel_tail_tile(W, x_tail, I, h, 2, out + M * ldm + r * ldr, ldm, ldr, add);         \
    else if (tail == 3) panel_tail_tile(W, x_tail, I, h, 3, out + M * ldm + r * ldr, ldm, ldr, add);         \
    else if (tail == 4) panel_tail_tile(W, x_tail, I, h, 4, out + M * ldm + r * ldr, ldm, ldr, add);

/* Rows [r0, r0 + nr) of a panel copy (moekit_pack_panels; r0 the start of one of its chunks) against `rows`
 * rows of x into out[m * CHUNK + (r - r0)]: the broadcast tiles' passes over the first rows (packed in xp), then
 * the panel_tail rows from xf against each tile while its weights are in L2. bf16 and fp16 tiles are widened into
 * two buffers after the packed x (panel_bytes), the first before the passes, each next one during the passes of
 * the one before (PANEL_HALF). */
static void panel_rows(const void *W, int dtype, long r0, long nr, const void *xp, const float *xf, long rows, long I,
                       float *out) {
    const long tail = panel_tail(rows), M = rows - tail, ldw = I, ldm = CHUNK, ldr = 1;
    const int add = 0;
    const float *xt = (const float *)xp, *x_tail = xf + M * I;
    __m256 acc[BC_BR][2];
    long r = 0;
    if (dtype != DT_F32) {
        float *wide[2] = {(float *)xp + bc_packed_size(M, I), (float *)xp + bc_packed_size(M, I) + BC_BR * I};
        const uint16_t *w = (const uint16_t *)W;
        int parity = 0;
        widen_half(w + r0 * I, bc_tile_height(nr, 0) * I, wide[0], dtype);
        BC_TILES(BC_BR, PANEL_HALF)
    } else {
        const float *w = (const float *)W;
        BC_TILES(BC_BR, PANEL_F32)
    }
}

/* The panel copy of W [E, R, I] (experts se values apart, rows ld apart) that panel_rows reads, into
 * out, dense [E, R, I] in W's dtype: the rows in segments of `segment` (a GLU's gate and up rows: F each), each
 * cut into chunks of CHUNK rows (as moekit_moe_ffn cuts its products) and those into the tiles panel_rows takes
 * (bc_tile_height); a tile of h rows at the offset its rows have in a dense copy, its values input-major (h
 * values an input). */
int moekit_pack_panels(const void *W, long E, long se, long R, long ld, long I, long segment, void *out, int dtype) {
    const int half = dtype != DT_F32; /* bf16, fp16: 2-byte values */
    for (long e = 0; e < E; e++)
        for (long s0 = 0; s0 < R; s0 += segment) {
            const long s1 = s0 + segment < R ? s0 + segment : R;
            for (long c = s0; c < s1; c += CHUNK) {
                const long nr = s1 - c < CHUNK ? s1 - c : CHUNK;
                for (long r = 0, h; r < nr; r += h) {
                    h = bc_tile_height(nr, r);
                    for (long i = 0; i < I; i++)
                        for (long j = 0; j < h; j++) {
                            const long src = e * se + (c + r + j) * ld + i, dst = (e * R + c + r) * I + i * h + j;
                            if (half) ((uint16_t *)out)[dst] = ((const uint16_t *)W)[src];
                            else ((float *)out)[dst] = ((const float *)W)[src];
                        }
                }
            }
        }
    return 0;
}

/* ---- two-row dot tiles (AVX2): bf16 products of 4 to 15 rows of x, fp32 of 5 and 6 ----
 * The dot tiles' 4 weight rows x 4 rows of x need 21 of AVX2's 16 vector registers: GCC keeps sums on the
 * stack and reloads weight vectors from memory, and the tiles run at half the FMA peak even with W in L2
 * (AMD EPYC Zen 3: 24-27 GMAC/s of 51). Two weight rows x up to DOT2_MAX_X rows of x keep their sums and one
 * weight vector in registers (the rows of x too, up to 5; 6 are the FMAs' memory operands, from L1), each
 * weight vector loaded (bf16: widened) once for all the rows of x of a chunk. Measured in one process against
 * the dot tiles (Mixtral-sized rows of 4096 inputs read from memory, medians of 5 rounds): bf16 4 rows 24.7 ->
 * 27.9 GMAC/s, 5 23.8 -> 30.4, 6 25.7 -> 32.2, 8 26.2 -> 31.5, 12 26.6 -> 34.3; fp32 5 rows 16.2 -> 18.1 GB/s,
 * 6 15.0 -> 16.3; 2-4 fp32 rows and 2-3
 * bf16 are bound by memory streams, where the 4-row blocks' 8 streams (4 read, 4 prefetched) beat 4
 * (0.77-0.95x), and fp32 7 by the dot tiles' chunks of 4 and 3. What is left is streaming from memory while
 * the FMA units are busy: the same products with the weights in L2 or L3 run 37-39 GMAC/s (bf16, 3-4 rows;
 * fp32 36-42, 49 in L1), and a hand-scheduled 4 x 3 tile in inline assembly, at those rates in cache, read no
 * faster than these from memory (bf16 3 rows: 15-18 GB/s with and without software prefetch). */
#define DOT2 1
#define DOT2_MAX_X 6
/* bf16 chunks of x at most 5 rows: a chunk of 6 holds one fewer row of x in registers than the FMAs need, and
 * its widened weights wait on the loads of x (AVX2 AMD EPYC, Mixtral-sized experts, in one process: 6 rows as
 * 3 + 3 1.17x, 11 as 3 + 4 + 4 1.08x, 12 as 4 + 4 + 4 1.07-1.29x); fp32 6 rows keep one chunk (3 + 3: 0.91x). */
#define DOT2_MAX_X_BF16 5
/* fp16 (F16C widening; broadcast tiles only on panel copies) from 4 rows, in bf16's chunks: against the dot
 * tiles, Qwen3 / Mixtral expert matrices in one process, 4-6 rows 0.92-1.42x (median 1.10x), 8-16 rows
 * 1.13-1.27x (one 0.93x). */

static int dot2_applies(int dtype, long M) { return dtype != DT_F32 ? M >= 4 : M >= 5 && M <= 6; }

/* The 8 weights at `at` of W (fp32, or bf16 / fp16 widened) as fp32. */
static inline __attribute__((always_inline)) __m256 dot2_load(const void *w, const int dtype, long at) {
#ifdef F16
    if (dtype == DT_F16) return vload_f16((const uint16_t *)w + at);
#endif
    return dtype == DT_BF16 ? vload_bf16((const uint16_t *)w + at) : vload_f32((const float *)w + at);
}

/* out[m * CHUNK + at + r * step] = W_r . x_m for r < NR (1 or 2 weight rows, ldw apart), m < NM (rows of x,
 * I apart). A step covers one cache line of each weight row (16 fp32 / 32 bf16 inputs); pf (elements, 0:
 * none): with it, the line pf further on in each row is prefetched into L2. */
static inline __attribute__((always_inline)) void dot2_tile(const void *w, const int dtype, long ldw, const float *x,
                                                            long I, long pf, const int NR, const int NM, float *out,
                                                            long at, long step) {
    const int S = dtype != DT_F32 ? 32 : 16;
    const long iv = I - I % S;
    __m256 a[2][DOT2_MAX_X];
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < NM; m++) a[r][m] = _mm256_setzero_ps();
    for (long i = 0; i < iv; i += S) {
        if (pf)
            for (int r = 0; r < NR; r++) PREFETCH((const char *)w + value_bytes(dtype) * (r * ldw + i + pf));
        for (int u = 0; u < S; u += 8) {
            __m256 xv[DOT2_MAX_X];
            for (int m = 0; m < NM; m++) xv[m] = _mm256_loadu_ps(x + m * I + i + u);
            for (int r = 0; r < NR; r++) {
                const __m256 v = dot2_load(w, dtype, r * ldw + i + u);
                for (int m = 0; m < NM; m++) a[r][m] = _mm256_fmadd_ps(v, xv[m], a[r][m]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < NM; m++) {
            float sum = vsum(a[r][m]);
            for (long i = iv; i < I; i++) sum += load_value(w, r * ldw + i, dtype) * x[m * I + i];
            out[m * CHUNK + at + r * step] = sum;
        }
}

#define DOT2_CASES(NR)                                                                                  \
    switch (nm) {                                                                                       \
    case 1: dot2_tile(w, dtype, stride, x, I, pf, NR, 1, o, at, half); break;                           \
    case 2: dot2_tile(w, dtype, stride, x, I, pf, NR, 2, o, at, half); break;                           \
    case 3: dot2_tile(w, dtype, stride, x, I, pf, NR, 3, o, at, half); break;                           \
    case 4: dot2_tile(w, dtype, stride, x, I, pf, NR, 4, o, at, half); break;                           \
    case 5: dot2_tile(w, dtype, stride, x, I, pf, NR, 5, o, at, half); break;                           \
    default: dot2_tile(w, dtype, stride, x, I, pf, NR, DOT2_MAX_X, o, at, half); break;                 \
    }

/* Rows [r0, r1) of W (rows ldw apart) against M rows of x (fp32, I apart) into out[m * CHUNK + (r - r0)]: rows
 * j and j + half together (two streams through distant memory), x in near-equal chunks of at most DOT2_MAX_X
 * rows (bf16 DOT2_MAX_X_BF16); the first chunk of each pair prefetches the next pair (the row after each). An
 * odd last row alone. */
static void dot2_rows(const void *W, int dtype, long ldw, long r0, long r1, const float *xf, long M, long I, float *out) {
    const long half = (r1 - r0) / 2, stride = half * ldw, most = dtype != DT_F32 ? DOT2_MAX_X_BF16 : DOT2_MAX_X;
    const int chunks = (int)((M + most - 1) / most);
    for (long j = 0; j < half + (r1 - r0) % 2; j++) {
        const long at = j < half ? j : r1 - 1 - r0, row = r0 + at; /* output column of the first row */
        const void *w = (const char *)W + value_bytes(dtype) * row * ldw;
        for (int c = 0; c < chunks; c++) {
            const long m0 = c * M / chunks, nm = (c + 1) * M / chunks - m0, pf = c == 0 && j + 1 < half ? ldw : 0;
            const float *x = xf + m0 * I;
            float *o = out + m0 * CHUNK;
            if (j < half) { DOT2_CASES(2) }
            else { DOT2_CASES(1) }
        }
    }
}
#undef DOT2_CASES
#else
static int bc_applies(int bf16, long M, long I) { (void)bf16, (void)M, (void)I; return 0; }
static size_t bc_packed_size(long M, long I) { (void)M, (void)I; return 0; }
static void bc_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) { (void)bf16, (void)xf, (void)xb, (void)M, (void)I, (void)xp; }
static void bc_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out,
                    long ldm, long ldr, int add) {
    (void)W, (void)bf16, (void)ldw, (void)r0, (void)nr, (void)xp, (void)M, (void)I, (void)out, (void)ldm, (void)ldr, (void)add;
}
#endif
static int pair_applies(int bf16, long M, long I) { (void)bf16, (void)M, (void)I; return 0; }
static int quad_applies(int bf16, long M, long I) { (void)bf16, (void)M, (void)I; return 0; }
static int quad_fits(int bf16, long M, long I) { (void)bf16, (void)M, (void)I; return 0; }
static size_t quad_packed_size(long I) { (void)I; return 0; }
static void quad_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) { (void)bf16, (void)xf, (void)xb, (void)M, (void)I, (void)xp; }
static void quad_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out) {
    (void)W, (void)bf16, (void)ldw, (void)r0, (void)nr, (void)xp, (void)M, (void)I, (void)out;
}
static size_t pair_packed_size(long I) { (void)I; return 0; }
static void pair_pack(int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) { (void)bf16, (void)xf, (void)xb, (void)M, (void)I, (void)xp; }
static void pair_rows(const void *W, int bf16, long ldw, long r0, long nr, const void *xp, long M, long I, float *out) {
    (void)W, (void)bf16, (void)ldw, (void)r0, (void)nr, (void)xp, (void)M, (void)I, (void)out;
}
#endif

#ifdef PANELS
int moekit_panels_usable(void) { return 1; }
/* Whether a product of M rows runs on the broadcast tiles over panel copies (PATH_PANEL) where there are some:
 * fp32 from 6 rows, where a pass of 8 lanes with 2 empty beats the two-row dot tiles on plain rows (AVX2 AMD
 * EPYC, Mixtral-sized experts, in one process: 6 rows 1.15x, 7 rows 1.21x; 4-5 rows 0.85-0.97x); bf16 from 8
 * (its plain broadcast tiles start at 16; the widened panel tiles fill a vector of 8 rows as fp32's do) but for
 * 9 and 10, where the panels' tail tile for the ninth row and a pass of 16 lanes with 6 empty run slower than
 * the two-row dot tiles (0.78-0.88x, Mixtral and Qwen3 experts; 4-7 rows 0.51-0.85x, 11-13 0.97-1.17x). */
#define PANEL_MIN_ROWS_F32 6
static int panel_applies(int dtype, long M) {
    return dtype != DT_F32 ? M >= BC_MIN_ROWS && (M < 9 || M > 10) : M >= PANEL_MIN_ROWS_F32;
}
/* Bytes of x packed for a panel product of up to M rows of I inputs, and after it the scratch of panel_rows
 * (bf16, fp16: two widened tiles). */
static size_t panel_bytes(int dtype, long M, long I) {
    return sizeof(float) * (bc_packed_size(M, I) + (dtype != DT_F32 ? 2 * BC_BR * (size_t)I : 0));
}
#else
static int panel_applies(int dtype, long M) { (void)dtype, (void)M; return 0; }
static long panel_tail(long M) { (void)M; return 0; }
static void panel_rows(const void *W, int dtype, long r0, long nr, const void *xp, const float *xf, long rows, long I,
                       float *out) {
    (void)W, (void)dtype, (void)r0, (void)nr, (void)xp, (void)xf, (void)rows, (void)I, (void)out;
}
static size_t panel_bytes(int dtype, long M, long I) { (void)dtype, (void)M, (void)I; return 0; }
int moekit_panels_usable(void) { return 0; }
int moekit_pack_panels(const void *W, long E, long se, long R, long ld, long I, long segment, void *out, int dtype) {
    (void)W, (void)E, (void)se, (void)R, (void)ld, (void)I, (void)segment, (void)out, (void)dtype;
    return -1;
}
#endif

/* How a product of M rows of I inputs in dtype runs: on the tile unit, on broadcast tiles, or on dot tiles (no
 * packed copy of x; fp16 always, past the panel copies); the packed copy's size in bytes (upper bound over the
 * paths, for M rows) and its packing.
 * PATH_PANEL: the broadcast tiles over a panel copy of the weights, all M rows (no tail on the small tiles,
 * which read the plain layout). */
enum { PATH_DOT = 0, PATH_AMX = 1, PATH_BC = 2, PATH_PAIR = 3, PATH_QUAD = 4, PATH_PANEL = 5 };

static int product_path(int dtype, long M, long I) {
    if (dtype == DT_F16) return PATH_DOT;
    const int bf16 = dtype == DT_BF16;
    if (amx_applies(bf16, M, I)) return PATH_AMX;
    if (quad_applies(bf16, M, I)) return PATH_QUAD;
    if (pair_applies(bf16, M, I)) return PATH_PAIR;
    return bc_applies(bf16, M, I) ? PATH_BC : PATH_DOT;
}

/* The rows at the end of a broadcast-tile product (more than 16 rows) that run on the small-row tiles
 * instead, against the weight rows the broadcast tiles just brought into L2: the q = M % 16 rows past a
 * multiple of 16, where those run on the quad tiles or, for 1-4, on the dot tiles; and how they run. The
 * broadcast tiles pay for a half vector (8 lanes) or a vector whatever the rows fill, and a half vector
 * costs about 0.64x a full one (AMD EPYC, fp32: 17 rows ran 1.57x the time of 16, 1.16x with the tail). */
static long bc_tail(int bf16, long M, long I) {
    long q = M % 16;
    return M > 16 && (q <= 4 || quad_fits(bf16, q, I)) ? q : 0;
}

static int tail_path(int bf16, long M, long I) { return quad_fits(bf16, M, I) ? PATH_QUAD : PATH_DOT; }

/* Elements (4 bytes: fp32 values or bf16 pairs) of the small-row tiles' packed x for up to M rows. */
static size_t small_packed_size(int bf16, long M, long I) {
    size_t pair = pair_applies(bf16, M < PAIR_MAX_ROWS ? M : PAIR_MAX_ROWS, I) ? pair_packed_size(I) : 0;
    size_t quad = quad_fits(bf16, M < QUAD_MAX_ROWS ? M : QUAD_MAX_ROWS, I) ? quad_packed_size(I) : 0;
    return pair > quad ? pair : quad;
}

/* Bytes of x packed for any group of up to M rows in dtype (smaller groups and broadcast tails take the small
 * tiles; fp16: none). */
static size_t packed_bytes(int dtype, long M, long I) {
    if (dtype == DT_F16) return 0;
    const int bf16 = dtype == DT_BF16;
    size_t amx = amx_applies(bf16, M, I) ? sizeof(uint16_t) * amx_packed_size(M, I) : 0;
    size_t small = sizeof(float) * small_packed_size(bf16, M, I);
    size_t bc = bc_applies(bf16, M, I) ? sizeof(float) * bc_packed_size(M, I) + small : 0;
    size_t most = amx > bc ? amx : bc;
    return most > small ? most : small;
}

static void pack_x(int path, int bf16, const float *xf, const uint16_t *xb, long M, long I, void *xp) {
    if (path == PATH_AMX) amx_pack(xb, M, I, (uint16_t *)xp);
    else if (path == PATH_PAIR) pair_pack(bf16, xf, xb, M, I, xp);
    else if (path == PATH_QUAD) quad_pack(bf16, xf, xb, M, I, xp);
    else if (path == PATH_PANEL) bc_pack(bf16, xf, xb, M - panel_tail(M), I, xp);
    else if (path == PATH_BC) {
        long tail = bc_tail(bf16, M, I), head = M - tail;
        bc_pack(bf16, xf, xb, head, I, xp);
        pack_x(tail_path(bf16, tail, I), bf16, xf + head * I, xb + head * I, tail, I, (float *)xp + bc_packed_size(head, I));
    }
}

/* Rows [r0, r1) of W (r1 - r0 <= CHUNK) against M rows of x into out[m * CHUNK + (r - r0)]; path and xp:
 * product_path and x packed for it (pack_x), the dot tiles taking what the tile unit leaves. */
static void dot_rows(const void *W, int dtype, long ldw, long r0, long r1, const float *xf, const uint16_t *xb,
                     int path, const void *xp, long M, long I, float *out) {
    const int bf16 = dtype == DT_BF16; /* the packed paths: fp32 or bf16 */
    if (path == PATH_PANEL) {
        panel_rows(W, dtype, r0, r1 - r0, xp, xf, M, I, out);
        return;
    }
    if (path == PATH_BC) {
        long tail = bc_tail(bf16, M, I), head = M - tail;
        bc_rows(W, bf16, ldw, r0, r1 - r0, xp, head, I, out, CHUNK, 1, 0);
        if (tail)
            dot_rows(W, dtype, ldw, r0, r1, xf + head * I, xb + head * I, tail_path(bf16, tail, I),
                     (const float *)xp + bc_packed_size(head, I), tail, I, out + head * CHUNK);
        return;
    }
    if (path == PATH_PAIR) {
        pair_rows(W, bf16, ldw, r0, r1 - r0, xp, M, I, out);
        return;
    }
    if (path == PATH_QUAD) {
        quad_rows(W, bf16, ldw, r0, r1 - r0, xp, M, I, out);
        return;
    }
#ifdef DOT2
    if (dot2_applies(dtype, M)) {
        dot2_rows(W, dtype, ldw, r0, r1, xf, M, I, out);
        return;
    }
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (path == PATH_AMX && r1 - r0 >= 16) {
        long nb = (r1 - r0) / 16;
        amx_rows((const uint16_t *)W, ldw, r0, nb, (const uint16_t *)xp, M, I, out);
        r0 += 16 * nb, out += 16 * nb;
    }
#endif
    float acc[WIDE_ROWS][MCHUNK];
    const int short_rows = amd_tuned && M <= 2 && dtype != DT_F32 && I <= 2048; /* ROWS streams, no prefetch (amd_tuned) */
    const int br = amd_tuned && M <= 2 && !short_rows ? WIDE_ROWS : ROWS;
    long sub = (r1 - r0) / br, tail = r0 + br * sub;
    long ahead = sub > 1 && !short_rows ? ldw : 0; /* each stream's next row into L2 */
    for (long j = 0; j < sub; j++) dot_block(W, dtype, ldw, r0 + j, sub * ldw, br, xf, xb, M, I, ahead, acc, out, j, sub);
    if (tail < r1) dot_block(W, dtype, ldw, tail, ldw, (int)(r1 - tail), xf, xb, M, I, 0, acc, out, tail - r0, 1);
}

/* Output columns [r0, r1) for all M rows of x (fp32 copy xf, bf16 copy xb, M x I dense), CHUNK rows
 * of W at a time, their sums in `sums` (2 * CHUNK * M floats). GLU (glu_rows > 0): column o is
 * act(x . W[o] + b[o]) * (x . W[o + glu_rows] + b[o + glu_rows]); the gate chunk and then the up chunk are
 * each read as one run of memory. */
static void rows_range(const void *W, int dtype, long ldw, long r0, long r1, const float *xf, const uint16_t *xb,
                       int path, const void *xp, long M, long I, const void *bias, long glu_rows, int act, void *y,
                       long ldy, float *sums) {
    float *gate = sums, *up = sums + CHUNK * M;
    for (long c = r0; c < r1; c += CHUNK) {
        long c1 = r1 - c < CHUNK ? r1 : c + CHUNK;
        dot_rows(W, dtype, ldw, c, c1, xf, xb, path, xp, M, I, gate);
        if (glu_rows) dot_rows(W, dtype, ldw, c + glu_rows, c1 + glu_rows, xf, xb, path, xp, M, I, up);
        for (long m = 0; m < M; m++) {
            float *g = gate + m * CHUNK, *u = up + m * CHUNK; /* u: glu only */
            for (long o = c; bias && o < c1; o++) {
                g[o - c] += load_value(bias, o, dtype);
                if (glu_rows) u[o - c] += load_value(bias, o + glu_rows, dtype);
            }
            if (glu_rows) finish_hidden_row(g, u, c1 - c, 1, act);
            for (long o = c; o < c1; o++) store_value(y, m * ldy + o, g[o - c], dtype);
        }
    }
}

/* The working copies of rows of x: xf [n, I] in fp32 and (bf16) xb [n, I] the bf16 values, row r taken
 * from x row index[r] (rows ldx apart; index NULL: row r). */
static void working_rows(const void *x, long ldx, const long *index, long n, long I, int dtype, float *xf, uint16_t *xb) {
    for (long r = 0; r < n; r++) {
        long src = (index ? index[r] : r) * ldx;
        for (long i = 0; i < I; i++) {
            if (dtype == DT_BF16) xb[r * I + i] = ((const uint16_t *)x)[src + i];
            xf[r * I + i] = load_value(x, src + i, dtype);
        }
    }
}

/* A block run by n OpenMP threads (one without OpenMP), each knowing its number t of nt. */
#define PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#define PARALLEL_THREADS(n) PRAGMA(omp parallel num_threads(n) if ((n) > 1))
#define THREAD_NUM omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define PARALLEL_THREADS(n) (void)(n);
#define THREAD_NUM 0
#define THREAD_COUNT 1
#endif

/* Threads for `blocks` row blocks: at least 1, at most `threads` and `blocks`. */
static int thread_count(int threads, long blocks) {
    int n = threads < 1 ? 1 : threads;
    return n > blocks ? (int)(blocks > 0 ? blocks : 1) : n;
}

/* ---- scratch memory kept between calls ------------------------------------------------------------
 *
 * A call's working buffers (gathered rows of x, the hidden rows, the fp32 sums, every thread's tiles) are
 * carved from one block of the calling thread, kept for its next call while it is at most scratch_keep bytes
 * (moekit_scratch_keep). Fresh pages cost a page fault each when first written: a Qwen3-30B-A3B layer's
 * prefill of 256 tokens took 6.6-9.4K faults a call, 6-7% of its time, in the kernel's system time.
 * Freed when the thread exits (a pthread key's destructor). */
typedef struct { void *block; size_t size; } scratch_t;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static size_t scratch_keep = (size_t)256 << 20;

static void scratch_release(void *s) {
    if (!s) return;
    free(((scratch_t *)s)->block);
    free(s);
}
static void scratch_key_make(void) { (void)pthread_key_create(&scratch_key, scratch_release); }

/* bytes rounded up to whole cache lines: buffers carved one after another each start on a line */
static size_t lined(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* The calling thread's block of at least `bytes` (64-byte aligned), or NULL when it cannot be allocated. */
static char *scratch_take(size_t bytes) {
    (void)pthread_once(&scratch_once, scratch_key_make);
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof(scratch_t));
        if (!s || pthread_setspecific(scratch_key, s)) { free(s); return NULL; }
    }
    bytes = lined(bytes > 0 ? bytes : 1);
    if (s->size < bytes) {
        free(s->block);
        s->block = aligned_alloc(64, bytes);
        s->size = s->block ? bytes : 0;
    }
    return (char *)s->block;
}

/* After a call: the block goes back to the allocator when it is larger than scratch_keep. */
static void scratch_done(void) {
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (s && s->size > scratch_keep) free(s->block), s->block = NULL, s->size = 0;
}

/* Sets how many bytes of scratch a thread keeps between calls (bytes >= 0; the calling thread's block is
 * released now if it is larger) and returns the previous limit; bytes < 0 only reads it. */
long moekit_scratch_keep(long bytes) {
    long previous = (long)scratch_keep;
    if (bytes >= 0) {
        scratch_keep = (size_t)bytes;
        (void)pthread_once(&scratch_once, scratch_key_make);
        scratch_done();
    }
    return previous;
}

/* Whether this build serves dtype (DT_*): fp32 and bf16 always, fp16 with F16C. */
int moekit_dtype_usable(int dtype) {
#ifdef F16
    if (dtype == DT_F16) return 1;
#endif
    return dtype == DT_F32 || dtype == DT_BF16;
}

/* y [M, ldy] = x [M, ldx] W^T (+ bias), W [O, I] rows ldw apart; dtype DT_F32, DT_BF16 or (F16C builds)
 * DT_F16 (W, x, y, bias alike). glu = 1: W is [gate; up] (2 * out rows), y [M, out] = act(x Wg^T + bg) *
 * (x Wu^T + bu) with O = out. Returns 0, -1 when the scratch block (the copies of x, every thread's sums)
 * could not be allocated, -3 for a dtype this build does not serve. */
int moekit_gemv(const void *W, long O, long I, long ldw, const void *x, long M, long ldx, const void *bias,
                void *y, long ldy, int dtype, int glu, int act, int threads) {
    if (!moekit_dtype_usable(dtype)) return -3;
    size_t n_x = (size_t)(M * I > 0 ? M * I : 1);
    const int bf16 = dtype == DT_BF16;
    int path = product_path(dtype, M, I);
    /* x in fp32, (bf16) a dense copy, x packed for the path */
    size_t xf_bytes = lined(sizeof(float) * n_x), xb_bytes = bf16 ? lined(sizeof(uint16_t) * n_x) : 0;
    const long blocks = (O + ROWS - 1) / ROWS;
    const int n = thread_count(threads, blocks);
    const size_t xp_bytes = path != PATH_DOT ? lined(packed_bytes(dtype, M, I)) : 0;
    const size_t sums_bytes = lined(sizeof(float) * (size_t)(2 * CHUNK * (M > 0 ? M : 1)));
    char *block = scratch_take(xf_bytes + xb_bytes + xp_bytes + (size_t)n * sums_bytes);
    if (!block) return -1;
    float *xf = (float *)block;
    uint16_t *xb = (uint16_t *)(block + xf_bytes);
    void *xp = path != PATH_DOT ? block + xf_bytes + xb_bytes : NULL;
    char *sums = block + xf_bytes + xb_bytes + xp_bytes;
    working_rows(x, ldx, NULL, M, I, dtype, xf, xb);
    if (xp) pack_x(path, bf16, xf, xb, M, I, xp);
    PARALLEL_THREADS(n) {
        const int t = THREAD_NUM, nt = THREAD_COUNT;
        long b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        long r0 = b0 * ROWS, r1 = b1 * ROWS < O ? b1 * ROWS : O;
        if (r1 > r0)
            rows_range(W, dtype, ldw, r0, r1, xf, xb, path, xp, M, I, bias, glu ? O : 0, act, y, ldy,
                       (float *)(sums + (size_t)t * sums_bytes));
    }
    scratch_done();
    return 0;
}

/* ---- one MoE layer of two-matrix experts for a few tokens, in one call ------------------------------
 *
 * y[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t]) over kept slots, expert_e(x) = W2_e h + b2_e with
 * h = act(W1g_e x + b1g_e) * (W1u_e x + b1u_e) (glu; W1_e = [gate; up], 2 * F rows) or act(W1_e x + b1_e).
 * W1 [E, R1, I] (experts s1 values apart, rows ld1 apart), W2 [E, O, F] (s2, ld2); biases [E, R1] / [E, O]
 * (sb1 / sb2 apart) or NULL; x [T, I] (rows ldx apart), ids int64 [T, K], w fp32 [T, K], kept uint8
 * [T, K] or NULL; y [T, O] dense, written. One dtype for W, b, x, y (DT_*); act 0-3 as in `activate`,
 * 4 identity. P1 / P2: panel copies of W1 / W2 (moekit_pack_panels of W1 in segments of F rows and of W2 in
 * one; dense [E, R1, I] / [E, O, F]) or NULL; the products that run on the broadcast tiles read them
 * (PATH_PANEL), the smaller ones the plain W1 / W2, and phase 2's row ranges start at chunks. fp16 runs the
 * dot tiles, and the panel tiles where P1 / P2 are given.
 *
 * Slots are grouped by expert (a counting sort, experts ascending); each group's rows of x are gathered
 * once. Phase 1 splits the (expert, chunk of CHUNK hidden features) units over the threads, contiguously
 * (each thread streams distinct W1 memory), into h [N, F]; after one barrier phase 2 splits the output
 * rows of every touched W2 over the threads, so each thread accumulates its own columns of y (fp32) and
 * no two threads write the same value. bf16 / fp16: h is rounded to the dtype, as the expert-by-expert path does.
 * Returns 0, -1 when a buffer could not be allocated, -2 when an id is outside [0, E), -3 for a
 * dtype this build does not serve (moekit_dtype_usable). */
/* below this many weight bytes per thread, waking another thread costs more than it saves */
#define MIN_BYTES_PER_THREAD (1 << 20)

int moekit_moe_ffn(const void *W1, long s1, long ld1, const void *B1, long sb1, const void *W2, long s2, long ld2,
                   const void *B2, long sb2, const void *P1, const void *P2, long F, long I, long O, long E,
                   const void *x, long T, long ldx, const int64_t *ids, const float *w, const uint8_t *kept, long K,
                   void *y, int dtype, int glu, int act, int threads) {
    if (!moekit_dtype_usable(dtype)) return -3;
    const int bf16 = dtype == DT_BF16;
    const size_t es = value_bytes(dtype);
    long *count = (long *)calloc((size_t)(E + 1), sizeof(long));
    if (!count) return -1;
    long N = 0;
    for (long s = 0; s < T * K; s++) {
        if (kept && !kept[s]) continue;
        if (ids[s] < 0 || ids[s] >= E) { free(count); return -2; }
        count[ids[s] + 1]++;
        N++;
    }
    if (N == 0) { /* nothing routed: y = 0 */
        memset(y, 0, (size_t)(T * O) * es);
        free(count);
        return 0;
    }
    long G = 0, max_rows = 1;
    for (long e = 0; e < E; e++) {
        G += count[e + 1] > 0;
        if (count[e + 1] > max_rows) max_rows = count[e + 1];
        count[e + 1] += count[e]; /* count[e]: first slot of e */
    }
    const long chunks = (F + CHUNK - 1) / CHUNK, units = G * chunks, blocks = (O + ROWS - 1) / ROWS;
    const double bytes = (double)G * (double)((glu ? 2 : 1) * F * I + O * F) * (double)es;
    int n = thread_count(threads, blocks);
    if (n > 1 && bytes < (double)n * MIN_BYTES_PER_THREAD) n = bytes < 2.0 * MIN_BYTES_PER_THREAD ? 1 : (int)(bytes / MIN_BYTES_PER_THREAD);
    /* a group's rows of x (phase 1) or h (phase 2) packed for its product_path, where that packs */
    size_t packed_i = packed_bytes(dtype, max_rows, I), packed_f = packed_bytes(dtype, max_rows, F);
    if (P1 && panel_bytes(dtype, max_rows, I) > packed_i) packed_i = panel_bytes(dtype, max_rows, I);
    if (P2 && panel_bytes(dtype, max_rows, F) > packed_f) packed_f = panel_bytes(dtype, max_rows, F);
    const size_t packed_size = lined(packed_i > packed_f ? packed_i : packed_f); /* every group: m <= max_rows */
    const size_t buf_size = lined(sizeof(float) * (size_t)(2 * CHUNK * max_rows)); /* a thread's chunk of sums */
    /* one scratch block: groups (expert, first, end slot), slots' tokens and weights, the gathered rows of x
     * and the hidden rows (fp32; bf16 also as bf16), the fp32 sums of y, then every thread's chunk and packing */
    const size_t sizes[] = {lined(sizeof(long) * (size_t)(3 * G)), lined(sizeof(long) * (size_t)N),
                            lined(sizeof(float) * (size_t)N), lined(sizeof(float) * (size_t)(N * I)),
                            lined(sizeof(float) * (size_t)(N * F)), bf16 ? lined(sizeof(uint16_t) * (size_t)(N * I)) : 0,
                            bf16 ? lined(sizeof(uint16_t) * (size_t)(N * F)) : 0, lined(sizeof(float) * (size_t)(T * O)),
                            (size_t)n * (buf_size + packed_size)};
    size_t total = 0;
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) total += sizes[k];
    char *block = scratch_take(total);
    if (!block) { free(count); return -1; }
    char *cut = block;
    long *group = (long *)cut; cut += sizes[0];
    long *token = (long *)cut; cut += sizes[1];
    float *weight = (float *)cut; cut += sizes[2];
    float *xf = (float *)cut; cut += sizes[3];
    float *hf = (float *)cut; cut += sizes[4];
    uint16_t *xb = (uint16_t *)cut; cut += sizes[5];
    uint16_t *hb = (uint16_t *)cut; cut += sizes[6];
    float *acc = (float *)cut; cut += sizes[7];
    char *per_thread = cut;
    for (long s = 0; s < T * K; s++) { /* stable: slots of one expert in token order */
        if (kept && !kept[s]) continue;
        long slot = count[ids[s]]++;
        token[slot] = s / K, weight[slot] = w[s];
    }
    for (long e = E - 1; e >= 0; e--) count[e + 1] = count[e]; /* back to first slots */
    count[0] = 0;
    for (long e = 0, g = 0; e < E; e++)
        if (count[e + 1] > count[e]) group[3 * g] = e, group[3 * g + 1] = count[e], group[3 * g + 2] = count[e + 1], g++;
    free(count);
    working_rows(x, ldx, token, N, I, dtype, xf, xb);
    memset(acc, 0, sizeof(float) * (size_t)(T * O));
    PARALLEL_THREADS(n) {
        const int t = THREAD_NUM, nt = THREAD_COUNT;
        float *buf = (float *)(per_thread + (size_t)t * (buf_size + packed_size));
        void *packed = packed_i > 0 || packed_f > 0 ? (char *)buf + buf_size : NULL;
        long packed_group = -1;
        /* phase 1: h = hidden(W1 x) per group, units (group, chunk) split contiguously */
        long u0 = units * t / nt, u1 = units * (t + 1) / nt;
        for (long u = u0; u < u1; u++) {
            long g = u / chunks, c = (u % chunks) * CHUNK, c1 = c + CHUNK < F ? c + CHUNK : F;
            long e = group[3 * g], first = group[3 * g + 1], m = group[3 * g + 2] - first;
            const char *We = (const char *)W1 + (size_t)(e * s1) * es;
            long ld = ld1;
            int path = packed ? product_path(dtype, m, I) : PATH_DOT;
            if (P1 && packed && panel_applies(dtype, m)) path = PATH_PANEL, We = (const char *)P1 + (size_t)(e * (glu ? 2 : 1) * F * I) * es, ld = I;
            if (path != PATH_DOT && packed_group != g) pack_x(path, bf16, xf + first * I, xb + first * I, m, I, packed), packed_group = g;
            dot_rows(We, dtype, ld, c, c1, xf + first * I, xb + first * I, path, packed, m, I, buf);
            if (glu) dot_rows(We, dtype, ld, c + F, c1 + F, xf + first * I, xb + first * I, path, packed, m, I, buf + CHUNK * m);
            const char *Be = B1 ? (const char *)B1 + (size_t)(e * sb1) * es : NULL;
            for (long r = 0; r < m; r++) {
                float *gr = buf + r * CHUNK, *ur = buf + CHUNK * m + r * CHUNK; /* ur: glu only */
                for (long o = c; Be && o < c1; o++) {
                    gr[o - c] += load_value(Be, o, dtype);
                    if (glu) ur[o - c] += load_value(Be, o + F, dtype);
                }
                finish_hidden_row(gr, ur, c1 - c, glu, act);
                for (long o = c; o < c1; o++) {
                    const long at = (first + r) * F + o;
                    if (bf16) hb[at] = f32_to_bf16(gr[o - c]), hf[at] = bf16_to_f32(hb[at]);
                    else hf[at] = rounded(gr[o - c], dtype);
                }
            }
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        /* phase 2: this thread's output rows [r0, r1) of every group, accumulated into acc */
        const long rb = P2 ? CHUNK : ROWS, row_blocks = (O + rb - 1) / rb;
        long r0 = row_blocks * t / nt * rb, r1 = row_blocks * (t + 1) / nt * rb;
        if (r1 > O) r1 = O;
        for (long g = 0; g < G; g++) {
            long e = group[3 * g], first = group[3 * g + 1], m = group[3 * g + 2] - first;
            const char *We = (const char *)W2 + (size_t)(e * s2) * es;
            const char *Be = B2 ? (const char *)B2 + (size_t)(e * sb2) * es : NULL;
            long ld = ld2;
            int path = packed && r1 > r0 ? product_path(dtype, m, F) : PATH_DOT;
            if (P2 && packed && r1 > r0 && panel_applies(dtype, m)) path = PATH_PANEL, We = (const char *)P2 + (size_t)(e * O * F) * es, ld = F;
            if (path != PATH_DOT) pack_x(path, bf16, hf + first * F, hb + first * F, m, F, packed);
            for (long c = r0; c < r1; c += CHUNK) {
                long c1 = c + CHUNK < r1 ? c + CHUNK : r1;
                dot_rows(We, dtype, ld, c, c1, hf + first * F, hb + first * F, path, packed, m, F, buf);
                for (long r = 0; r < m; r++) {
                    float *row = acc + token[first + r] * O, wr = weight[first + r];
                    for (long o = c; o < c1; o++) {
                        float v = buf[r * CHUNK + (o - c)];
                        if (Be) v += load_value(Be, o, dtype);
                        row[o] += wr * v;
                    }
                }
            }
        }
        for (long tt = 0; tt < T; tt++)
            for (long o = r0; o < r1; o++) store_value(y, tt * O + o, acc[tt * O + o], dtype);
    }
    scratch_done();
    return 0;
}

/* ---- merged products for SMEAR (https://arxiv.org/abs/2306.03745): W_g = sum_e p[g, e] W_e ----------
 *
 * Every group g (example) of S rows runs its own merged weights; the three products of a linear layer's
 * forward and backward never hold the G merged copies (G * O * I values) in memory: the merge happens
 * block by block right before the broadcast tiles use it, and the backward's merge-sized sums (grad p,
 * grad W_e) are taken from each grad W_g tile while it is in L1 (no grad W_g is stored). fp32, AVX-512
 * (moekit_merged_usable).
 * Layouts: x [G, S, I], W [E, O, I], p [G, E], y and grad y [G, S, O], all dense. */
#if defined(__AVX512F__)
#ifndef MERGE_BLOCK_BYTES
#define MERGE_BLOCK_BYTES (8 << 20) /* merged values of a block of groups (64 columns each) */
#endif
#define MERGE_EXPERTS 8 /* experts summed per pass over the merged values (two vectors of each in registers) */

int moekit_merged_usable(void) { return 1; }

/* Lanes [j, j + 16) of a row of n values: the mask of those below n. */
static inline __mmask16 lanes_below(long n, long j) {
    const long k = n - j <= 0 ? 0 : n - j < 16 ? n - j : 16;
    return (__mmask16)((1u << k) - 1u);
}

/* The merge weights in chunks of MERGE_EXPERTS experts, zero-padded: out[(c * G + g) * MERGE_EXPERTS + e] =
 * p[g, c * MERGE_EXPERTS + e] (0 past E), so the loops over a chunk's experts have a fixed length. NULL when
 * it cannot be allocated. */
static float *padded_probs(const float *p, long G, long E) {
    const long chunks = (E + MERGE_EXPERTS - 1) / MERGE_EXPERTS;
    float *out = (float *)calloc((size_t)(chunks * G * MERGE_EXPERTS), sizeof(float));
    for (long g = 0; out && g < G; g++)
        for (long e = 0; e < E; e++) out[((e / MERGE_EXPERTS) * G + g) * MERGE_EXPERTS + e % MERGE_EXPERTS] = p[g * E + e];
    return out;
}

/* out[(g * nr + r) * P + j] = sum_e p[g, e] src[e * es + r * ld + j] for j < kb, zero for kb <= j < P: 32
 * lanes at a time, MERGE_EXPERTS experts' values in registers against every group. */
static void merge_block(const float *src, long es, long ld, long E, const float *p, long G, long nr, long kb, long P,
                        float *out) {
    for (long r = 0; r < nr; r++)
        for (long j = 0; j < P; j += 32) {
            const __mmask16 l0 = lanes_below(kb, j), l1 = lanes_below(kb, j + 16);
            const __mmask16 s0 = lanes_below(P, j), s1 = lanes_below(P, j + 16);
            for (long e0 = 0; e0 < E; e0 += MERGE_EXPERTS) {
                const int ne = E - e0 < MERGE_EXPERTS ? (int)(E - e0) : MERGE_EXPERTS;
                __m512 w0[MERGE_EXPERTS], w1[MERGE_EXPERTS];
                for (int e = 0; e < ne; e++) {
                    const float *v = src + (e0 + e) * es + r * ld + j;
                    w0[e] = load_lanes(l0, v);
                    w1[e] = load_lanes(l1, v + 16);
                }
                for (long g = 0; g < G; g++) {
                    float *o = out + (g * nr + r) * P + j;
                    const float *pg = p + g * E + e0;
                    __m512 a0 = e0 ? load_lanes(s0, o) : _mm512_setzero_ps();
                    __m512 a1 = e0 ? load_lanes(s1, o + 16) : _mm512_setzero_ps();
                    for (int e = 0; e < ne; e++) {
                        const __m512 pe = _mm512_set1_ps(pg[e]);
                        a0 = _mm512_fmadd_ps(pe, w0[e], a0);
                        a1 = _mm512_fmadd_ps(pe, w1[e], a1);
                    }
                    store_lanes(o, s0, a0);
                    store_lanes(o + 16, s1, a1);
                }
            }
        }
}

/* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: 16 x 16 blocks turned in registers (three
 * rounds of shuffles), the edges one value at a time. */
static void turn(const float *src, long lds, long rows, long cols, float *dst, long ldd) {
    long r0 = 0;
    for (; r0 + 16 <= rows; r0 += 16) {
        long c0 = 0;
        for (; c0 + 16 <= cols; c0 += 16) {
            __m512 v[16], t[16];
            for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_ps(src + (r0 + i) * lds + c0);
            for (int i = 0; i < 16; i += 2) { /* pairs of values of two rows */
                t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
                t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) { /* quads of four rows */
                v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
                v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
                v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
            }
            for (int q = 0; q < 4; q++) { /* v[4 b + q]: quads of rows 4b.. at columns q, q + 4, q + 8, q + 12 */
                const __m512 lo0 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0x88), lo1 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0x88);
                const __m512 hi0 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0xDD), hi1 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0xDD);
                _mm512_storeu_ps(dst + (c0 + q) * ldd + r0, _mm512_shuffle_f32x4(lo0, lo1, 0x88));
                _mm512_storeu_ps(dst + (c0 + q + 8) * ldd + r0, _mm512_shuffle_f32x4(lo0, lo1, 0xDD));
                _mm512_storeu_ps(dst + (c0 + q + 4) * ldd + r0, _mm512_shuffle_f32x4(hi0, hi1, 0x88));
                _mm512_storeu_ps(dst + (c0 + q + 12) * ldd + r0, _mm512_shuffle_f32x4(hi0, hi1, 0xDD));
            }
        }
        for (long r = r0; r < r0 + 16; r++)
            for (long c = c0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
    }
    for (long r = r0; r < rows; r++)
        for (long c = 0; c < cols; c++) dst[c * ldd + r] = src[r * lds + c];
}

/* Parts each of `blocks` column blocks splits into so that `threads` threads have work: 1 when the blocks
 * suffice, else enough to give every thread one (at most `most`). */
static long split_parts(int threads, long blocks, long most) {
    const long want = blocks >= threads ? 1 : (threads + blocks - 1) / blocks;
    return want < most ? want : (most > 0 ? most : 1);
}

/* out_g = a_g M_g (+ bias_g) with M_g = sum_e p[g, e] M_e, a [G, S, K], out [G, S, N], bias [G, N] or NULL.
 * M_e = W[e] [K, N], or (transposed) W[e]^T with W [E, N, K]. The lanes are output columns, 64 at a time
 * (one pass of the broadcast tiles; the blocks split over the threads): the block's K x 64 merged values
 * are made for a block of groups at once (each expert value read once per group block; transposed: the
 * experts' block turned first), then each group's rows run against its merged block on the tiles over the
 * whole of K, so every output is stored once. Returns 0 or -1. */
static int merged_product(const float *a, long G, long S, long K, const float *p, long E, const float *W, int transposed,
                          long N, const float *bias, float *out, int threads) {
    const long lane_blocks = (N + 63) / 64;
    const long gb_max = MERGE_BLOCK_BYTES / (long)(sizeof(float) * 64 * K);
    const long GB = gb_max < 1 ? 1 : gb_max > G ? G : gb_max;
    const long parts = split_parts(threads, lane_blocks, G); /* narrow products: the groups split too */
    int failed = 0;
    const int n = thread_count(threads, lane_blocks * parts);
    PARALLEL_THREADS(n) {
        const int t = THREAD_NUM, nt = THREAD_COUNT;
        const size_t merged_size = (size_t)(GB * K * 64);
        float *merged = (float *)malloc(sizeof(float) * (merged_size + (transposed ? (size_t)(E * K * 64) : 0)));
        float *turned = merged ? merged + merged_size : NULL;
        if (!merged) failed = 1;
        const long units = lane_blocks * parts;
        for (long u = units * t / nt; merged && u < units * (t + 1) / nt; u++) {
            const long lb = u / parts, k0 = lb * 64, kb = N - k0 < 64 ? N - k0 : 64, P = 16 * ((kb + 15) / 16);
            const long g_lo = G * (u % parts) / parts, g_hi = G * (u % parts + 1) / parts;
            for (long e = 0; transposed && e < E; e++) turn(W + (e * N + k0) * K, K, kb, K, turned + e * K * kb, kb);
            const float *src = transposed ? turned : W + k0;
            const long es = transposed ? K * kb : K * N, ld = transposed ? kb : N;
            for (long g0 = g_lo; g0 < g_hi; g0 += GB) {
                const long ng = g_hi - g0 < GB ? g_hi - g0 : GB;
                merge_block(src, es, ld, E, p + g0 * E, ng, K, kb, P, merged);
                for (long g = g0; g < g0 + ng; g++) {
                    float *og = out + g * S * N + k0;
                    bc_rows(a + g * S * K, 0, K, 0, S, merged + (g - g0) * K * P, kb, K, og, 1, N, 0);
                    for (long s = 0; bias && s < S; s++)
                        for (long j = 0; j < kb; j++) og[s * N + j] += bias[g * N + k0 + j];
                }
            }
        }
        free(merged);
    }
    return failed ? -1 : 0;
}

/* y_g = x_g W_g^T + b_g, W [E, O, I], b [E, O] or NULL (b_g = sum_e p[g, e] b_e). Returns 0 or -1. */
int moekit_merged_linear(const float *x, long G, long S, long I, const float *p, long E, const float *W, long O,
                         const float *b, float *y, int threads) {
    float *bias = b ? (float *)malloc(sizeof(float) * (size_t)(G * O)) : NULL;
    if (b && !bias) return -1;
    for (long g = 0; b && g < G; g++)
        for (long o = 0; o < O; o++) {
            float v = 0.0f;
            for (long e = 0; e < E; e++) v += p[g * E + e] * b[e * O + o];
            bias[g * O + o] = v;
        }
    const int done = merged_product(x, G, S, I, p, E, W, 1, O, bias, y, threads);
    free(bias);
    return done;
}

/* grad_x_g = grad_y_g W_g, grad_y [G, S, O], W [E, O, I]. Returns 0 or -1. */
int moekit_merged_linear_grad_x(const float *gy, long G, long S, long O, const float *p, long E, const float *W, long I,
                                float *gx, int threads) {
    return merged_product(gy, G, S, O, p, E, W, 0, I, NULL, gx, threads);
}

/* One tile of grad_W_g = grad_y_g^T x_g for every group g (BR output rows from o0, NV vectors of input
 * columns from i0; gyT [G, O, S]: grad_y transposed per group; xp [G, S, P]: the columns i0.. of x packed)
 * and what the merge's gradients take from it: the groups' tiles go to `stage` (L1), then gw[e] = sum_g
 * p[g, e] grad_W_g is stored once per tile and dots[g * E + e] += <grad_W_g, W_e> (lane sums, added up at
 * the end); either NULL: not wanted. (Summing into gw group by group instead, a load and a store per value
 * and group, measured the same.) */
static inline __attribute__((always_inline)) void grad_w_tiles(const float *gyT, const float *xp, long P, long G, long S,
                                                               long I, const float *pp, long E, const float *W, long O,
                                                               long o0, long i0, const int BR, const int NV, float *gw,
                                                               __m512 *dots, __m512 *stage) {
    __m512 acc[16][4];
    __m256 half[16];
    for (long g = 0; g < G; g++) {
        bc_tile_f32(gyT + (g * O + o0) * S, S, xp + g * S * P, P, S, BR, NV, 0, acc, half);
        for (int r = 0; r < BR; r++)
            for (int v = 0; v < NV; v++) stage[(g * BR + r) * NV + v] = acc[r][v];
    }
    const __mmask16 last = lanes_below(I - i0, 16 * (NV - 1));
    for (long e0 = 0; gw && e0 < E; e0 += MERGE_EXPERTS) {
        const float *pc = pp + (e0 / MERGE_EXPERTS) * G * MERGE_EXPERTS;
        for (int r = 0; r < BR; r++)
            for (int v = 0; v < NV; v++) {
                __m512 sum[MERGE_EXPERTS];
                for (int e = 0; e < MERGE_EXPERTS; e++) sum[e] = _mm512_setzero_ps();
                for (long g = 0; g < G; g++) {
                    const __m512 t = stage[(g * BR + r) * NV + v];
                    for (int e = 0; e < MERGE_EXPERTS; e++) sum[e] = _mm512_fmadd_ps(_mm512_set1_ps(pc[g * MERGE_EXPERTS + e]), t, sum[e]);
                }
                const __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;
                for (int e = 0; e < MERGE_EXPERTS && e0 + e < E; e++) store_lanes(gw + ((e0 + e) * O + o0 + r) * I + i0 + 16 * v, m, sum[e]);
            }
    }
    for (long e = 0; dots && e < E; e++) {
        __m512 w[16][4];
        for (int r = 0; r < BR; r++)
            for (int v = 0; v < NV; v++)
                w[r][v] = load_lanes(v == NV - 1 ? last : (__mmask16)0xFFFF, W + (e * O + o0 + r) * I + i0 + 16 * v);
        for (long g = 0; g < G; g++) {
            __m512 dot = dots[g * E + e];
            for (int r = 0; r < BR; r++)
                for (int v = 0; v < NV; v++) dot = _mm512_fmadd_ps(stage[(g * BR + r) * NV + v], w[r][v], dot);
            dots[g * E + e] = dot;
        }
    }
}

/* Every tile of a block of 64 (or fewer: NV vectors) input columns and output rows [o0, o_end): tiles of
 * BC_BR(NV) rows, then single rows. */
#define GRAD_W_TILES(NV)                                                                                \
    for (; o0 + BC_BR(NV) <= o_end; o0 += BC_BR(NV))                                                    \
        grad_w_tiles(gyT, xp, P, G, S, I, pp, E, W, O, o0, i0, BC_BR(NV), NV, gw, dots, stage);          \
    for (; o0 < o_end; o0++) grad_w_tiles(gyT, xp, P, G, S, I, pp, E, W, O, o0, i0, 1, NV, gw, dots, stage); \
    break;

/* The merge's gradients through grad_W_g = grad_y_g^T x_g, which is never stored: gp [G, E] += <grad_W_g,
 * W_e> and gw [E, O, I] = sum_g p[g, e] grad_W_g (either NULL: not wanted). The lanes are input columns
 * (blocks of 64 split over the threads, each block's columns of x packed for every group), the tiles'
 * weight rows grad_y_g's columns (transposed once). Returns 0 or -1 (allocation). */
int moekit_merged_linear_grad_w(const float *x, const float *gy, long G, long S, long I, long O, const float *p, long E,
                                const float *W, float *gw, float *gp, int threads) {
    float *gyT = (float *)malloc(sizeof(float) * (size_t)(G * O * S)), *pp = padded_probs(p, G, E);
    if (!gyT || !pp) {
        free(gyT);
        free(pp);
        return -1;
    }
    const long lane_blocks = (I + 63) / 64;
    const long parts = split_parts(threads, lane_blocks, (O + BC_BR(4) - 1) / BC_BR(4)); /* narrow layers: the output rows split too */
    int failed = 0;
    const int n = thread_count(threads, lane_blocks * parts);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n) if (n > 1)
#endif
    for (long g = 0; g < G; g++) turn(gy + g * S * O, O, S, O, gyT + g * O * S, S);
    PARALLEL_THREADS(n) {
        const int t = THREAD_NUM, nt = THREAD_COUNT;
        float *xp = (float *)malloc(sizeof(float) * (size_t)(G * S * 64));
        __m512 *dots = gp ? (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)(G * E)) : NULL; /* this thread's */
        __m512 *stage = (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)(G * BC_MAX_ACC)); /* a tile per group */
        if (!xp || !stage || (gp && !dots)) failed = 1;
        for (long k = 0; dots && k < G * E; k++) dots[k] = _mm512_setzero_ps();
        const long units = lane_blocks * parts;
        for (long u = units * t / nt; !failed && u < units * (t + 1) / nt; u++) {
            const long i0 = 64 * (u / parts), kb = I - i0 < 64 ? I - i0 : 64, P = 16 * ((kb + 15) / 16);
            const long o_end = O * (u % parts + 1) / parts;
            for (long r = 0; r < G * S; r++)
                for (long j = 0; j < P; j += 16)
                    _mm512_storeu_ps(xp + r * P + j, load_lanes(lanes_below(kb, j), x + r * I + i0 + j));
            long o0 = O * (u % parts) / parts;
            switch ((int)(P / 16)) {
            case 1: GRAD_W_TILES(1)
            case 2: GRAD_W_TILES(2)
            case 3: GRAD_W_TILES(3)
            default: GRAD_W_TILES(4)
            }
        }
        if (dots && !failed) {
#ifdef _OPENMP
#pragma omp critical
#endif
            for (long k = 0; k < G * E; k++) gp[k] += _mm512_reduce_add_ps(dots[k]);
        }
        free(xp);
        free(dots);
        free(stage);
    }
    free(gyT);
    free(pp);
    return failed ? -1 : 0;
}
#else
int moekit_merged_usable(void) { return 0; }
int moekit_merged_linear(const float *x, long G, long S, long I, const float *p, long E, const float *W, long O,
                         const float *b, float *y, int threads) {
    (void)x, (void)G, (void)S, (void)I, (void)p, (void)E, (void)W, (void)O, (void)b, (void)y, (void)threads;
    return -3;
}
int moekit_merged_linear_grad_x(const float *gy, long G, long S, long O, const float *p, long E, const float *W, long I,
                                float *gx, int threads) {
    (void)gy, (void)G, (void)S, (void)O, (void)p, (void)E, (void)W, (void)I, (void)gx, (void)threads;
    return -3;
}
int moekit_merged_linear_grad_w(const float *x, const float *gy, long G, long S, long I, long O, const float *p, long E,
                                const float *W, float *gw, float *gp, int threads) {
    (void)x, (void)gy, (void)G, (void)S, (void)I, (void)O, (void)p, (void)E, (void)W, (void)gw, (void)gp, (void)threads;
    return -3;
}
#endif

/* What this build vectorises with, for the cache key's sanity and the benchmark's report. */
const char *moekit_gemv_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return "avx512f+bf16";
#elif defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "portable";
#endif
}
