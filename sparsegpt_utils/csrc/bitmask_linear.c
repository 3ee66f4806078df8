/* Linear layers stored as a bitmask of kept weights plus their 16-bit values (IEEE fp16),
 * computed in float32. Row r keeps the weights whose bits are set in masks[r * words ...]
 * (bit b of word w = column 32 w + b); their values follow one another from values[offsets[r]].
 * The values array is padded by 32 entries so that a 64-byte load never leaves it.
 *
 *   bitmask_gemv:       y[r] = sum_j W[r, j] x[j] (+ bias[r])     one token (decode)
 *   bitmask_decompress: W as a dense float32 [rows, cols] matrix    for many tokens (prefill)
 *   half_gemv:          y = W x for a dense fp16 matrix W [rows, cols] (e.g. lm_head)
 *
 * A second format for low densities, "csr16": row r keeps the weights at the columns
 * idx[offsets[r] .. offsets[r + 1]) (uint16), with their fp16 values at the same positions in
 * vals; both arrays are padded by 16 entries. 4 bytes per kept weight and no work per pruned one,
 * where the bitmask costs 2 bytes per kept weight + 1/8 byte per weight and work per 32 weights.
 *
 *   csr16_gemv:         y[r] = sum_k vals[k] x[idx[k]] (+ bias[r])   one token (decode)
 *   csr16_decompress:   W as a dense float32 [rows, cols] matrix      for many tokens (prefill)
 *
 * x is padded by the caller to words * 32 floats (bitmask). Built with -march=native: the AVX-512
 * (BW + BITALG) path where the CPU has it, else the AVX2 (+ F16C + FMA) path, else portable loops;
 * sgpt_isa() says which. */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BITALG__)
#include <immintrin.h>
#define SGPT_AVX512 1
/* Expand 32 fp16 values into the lanes of a 32-bit mask with a permutation: lane i takes the value
 * at index popcount(mask & ((1 << i) - 1)). vpexpandw does the same in one instruction, but runs
 * several times slower on some CPUs (AMD Zen 4, measured); popcounts and vpermw are cheap. */
static inline __m512i expand16(uint32_t mw, const uint16_t *v) {
    const __m512i prefix = _mm512_set_epi16(
        0x7fff, 0x3fff, 0x1fff, 0xfff, 0x7ff, 0x3ff, 0x1ff, 0xff, 0x7f, 0x3f, 0x1f, 0xf, 7, 3, 1, 0,
        0x7fff, 0x3fff, 0x1fff, 0xfff, 0x7ff, 0x3ff, 0x1ff, 0xff, 0x7f, 0x3f, 0x1f, 0xf, 7, 3, 1, 0);
    uint16_t lo = (uint16_t)mw, hi = (uint16_t)(mw >> 16);
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)lo)),
                                      _mm256_set1_epi16((short)hi), 1);
    __m512i idx = _mm512_popcnt_epi16(_mm512_and_si512(both, prefix));
    idx = _mm512_add_epi16(idx, _mm512_inserti64x4(_mm512_setzero_si512(),
                                                   _mm256_set1_epi16((short)__builtin_popcount(lo)), 1));
    return _mm512_maskz_permutexvar_epi16(mw, idx, _mm512_loadu_si512((const void *)v));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SGPT_AVX2 1
/* Expand the fp16 values of one mask byte (8 columns) into 8 float lanes: lane i takes value
 * popcount(byte & ((1 << i) - 1)) through a permutation from a table, then the lanes whose bit is
 * clear are zeroed. Tables: 256 bytes x 8 lanes, filled once when the library loads. */
static int32_t sgpt_perm[256][8] __attribute__((aligned(32)));
static int32_t sgpt_keep[256][8] __attribute__((aligned(32)));
__attribute__((constructor)) static void sgpt_fill_tables(void) {
    for (int m = 0; m < 256; ++m)
        for (int i = 0, k = 0; i < 8; ++i) {
            sgpt_perm[m][i] = k;
            sgpt_keep[m][i] = (m >> i) & 1 ? -1 : 0;
            k += (m >> i) & 1;
        }
}
static inline __m256 expand8(unsigned m, const uint16_t *v) {
    __m256 vals = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
    __m256 perm = _mm256_permutevar8x32_ps(vals, _mm256_load_si256((const __m256i *)sgpt_perm[m]));
    return _mm256_and_ps(perm, _mm256_castsi256_ps(_mm256_load_si256((const __m256i *)sgpt_keep[m])));
}
static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Ask for [p, p + bytes) to be brought into the cache ahead of use. Decoding reads each layer's
 * arrays once, from memory, and the hardware prefetcher does not follow four interleaved rows
 * this short, so the kernels fetch the next rows themselves (measured on smollm2-135m at density
 * 0.5: decoding 1.5x instead of 0.9x dense). SGPT_AHEAD 0 turns it off. */
#ifndef SGPT_AHEAD
#define SGPT_AHEAD 4 /* rows fetched ahead */
#endif
static inline void prefetch_range(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t off = 0; SGPT_AHEAD && off < bytes; off += 64) __builtin_prefetch(c + off, 0, 0);
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

int sgpt_has_avx512(void) {
#ifdef SGPT_AVX512
    return 1;
#else
    return 0;
#endif
}

/* The instruction set the kernels were built for: 2 AVX-512, 1 AVX2, 0 portable. */
int sgpt_isa(void) {
#if defined(SGPT_AVX512)
    return 2;
#elif defined(SGPT_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef SGPT_AVX512
/* Four rows at a time: each x slice is loaded once for all four, and the four independent
 * expand -> convert -> FMA chains keep the core busy (one row alone is latency-bound). */
static inline void gemv4(const float *x, const uint32_t *masks, const uint16_t *values,
                         const int64_t *offsets, const float *bias, float *y, int64_t r, int64_t words) {
    const uint32_t *m0 = masks + r * words, *m1 = m0 + words, *m2 = m1 + words, *m3 = m2 + words;
    const uint16_t *v0 = values + offsets[r], *v1 = values + offsets[r + 1];
    const uint16_t *v2 = values + offsets[r + 2], *v3 = values + offsets[r + 3];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    __m512 a3 = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        __m512 xl = _mm512_loadu_ps(x + 32 * w), xh = _mm512_loadu_ps(x + 32 * w + 16);
        uint32_t k0 = m0[w], k1 = m1[w], k2 = m2[w], k3 = m3[w];
        __m512i e0 = expand16(k0, v0), e1 = expand16(k1, v1), e2 = expand16(k2, v2), e3 = expand16(k3, v3);
        v0 += __builtin_popcount(k0); v1 += __builtin_popcount(k1);
        v2 += __builtin_popcount(k2); v3 += __builtin_popcount(k3);
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(e0)), xl, a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(e1)), xl, a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(e2)), xl, a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(e3)), xl, a3);
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(e0, 1)), xh, a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(e1, 1)), xh, a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(e2, 1)), xh, a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(e3, 1)), xh, a3);
    }
    float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (int k = 0; k < 4; ++k)
        y[r + k] = bias ? s[k] + bias[r + k] : s[k];
}
#endif

void bitmask_gemv(const float *x, const uint32_t *masks, const uint16_t *values, const int64_t *offsets,
                  const float *bias, float *y, int64_t rows, int64_t words, int threads) {
#ifdef SGPT_AVX512
    int64_t quads = rows / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t q = 0; q < quads; ++q) {
        if (q + 1 < quads) { /* the next four rows */
            prefetch_range(masks + (4 * q + 4) * words, 16 * words);
            prefetch_range(values + offsets[4 * q + 4], 2 * (offsets[4 * q + 8] - offsets[4 * q + 4]));
        }
        gemv4(x, masks, values, offsets, bias, y, 4 * q, words);
    }
    int64_t first = 4 * quads;
#else
    int64_t first = 0;
#endif
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = first; r < rows; ++r) {
        const uint32_t *m = masks + r * words;
        const uint16_t *v = values + offsets[r];
        float sum;
        if (r + SGPT_AHEAD < rows) {
            prefetch_range(m + SGPT_AHEAD * words, 4 * words);
            prefetch_range(values + offsets[r + SGPT_AHEAD],
                           2 * (offsets[r + SGPT_AHEAD + 1] - offsets[r + SGPT_AHEAD]));
        }
#ifdef SGPT_AVX512
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t w = 0; w < words; ++w) {
            uint32_t mw = m[w];
            __m512i ex = expand16(mw, v);
            __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(ex));
            __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(ex, 1));
            acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * w), acc0);
            acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * w + 16), acc1);
            v += __builtin_popcount(mw);
        }
        sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(SGPT_AVX2)
        /* byte B of a row's mask words covers columns 8 B .. 8 B + 7 (little-endian words) */
        const uint8_t *mb = (const uint8_t *)m;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t b = 0; b < 4 * words; b += 2) {
            unsigned k0 = mb[b], k1 = mb[b + 1];
            acc0 = _mm256_fmadd_ps(expand8(k0, v), _mm256_loadu_ps(x + 8 * b), acc0);
            v += __builtin_popcount(k0);
            acc1 = _mm256_fmadd_ps(expand8(k1, v), _mm256_loadu_ps(x + 8 * b + 8), acc1);
            v += __builtin_popcount(k1);
        }
        sum = hsum8(_mm256_add_ps(acc0, acc1));
#else
        sum = 0.0f;
        for (int64_t w = 0; w < words; ++w) {
            uint32_t mw = m[w];
            while (mw) {
                int b = __builtin_ctz(mw);
                sum += half_to_float(*v++) * x[32 * w + b];
                mw &= mw - 1;
            }
        }
#endif
        y[r] = bias ? sum + bias[r] : sum;
    }
}

void bitmask_decompress(const uint32_t *masks, const uint16_t *values, const int64_t *offsets, float *out,
                        int64_t rows, int64_t cols, int64_t words, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint32_t *m = masks + r * words;
        const uint16_t *v = values + offsets[r];
        float *o = out + r * cols;
        for (int64_t w = 0; w < words; ++w) {
            uint32_t mw = m[w];
            int64_t base = 32 * w, n = cols - base < 32 ? cols - base : 32;
#ifdef SGPT_AVX512
            if (n == 32) {
                __m512i ex = expand16(mw, v);
                _mm512_storeu_ps(o + base, _mm512_cvtph_ps(_mm512_castsi512_si256(ex)));
                _mm512_storeu_ps(o + base + 16, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(ex, 1)));
                v += __builtin_popcount(mw);
                continue;
            }
#elif defined(SGPT_AVX2)
            if (n == 32) {
                for (int q = 0; q < 4; ++q) {
                    unsigned k = (mw >> (8 * q)) & 0xffu;
                    _mm256_storeu_ps(o + base + 8 * q, expand8(k, v));
                    v += __builtin_popcount(k);
                }
                continue;
            }
#endif
            for (int64_t b = 0; b < n; ++b) o[base + b] = ((mw >> b) & 1u) ? half_to_float(*v++) : 0.0f;
        }
    }
}

void half_gemv(const float *x, const uint16_t *w16, float *y, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *w = w16 + r * cols;
        int64_t j = 0;
        float sum = 0.0f;
#ifdef SGPT_AVX512
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; j + 32 <= cols; j += 32) {
            __m512i h = _mm512_loadu_si512((const void *)(w + j));
            acc0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), _mm512_loadu_ps(x + j), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), _mm512_loadu_ps(x + j + 16),
                                   acc1);
        }
        sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(SGPT_AVX2)
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; j + 16 <= cols; j += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))),
                                   _mm256_loadu_ps(x + j), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j + 8))),
                                   _mm256_loadu_ps(x + j + 8), acc1);
        }
        sum = hsum8(_mm256_add_ps(acc0, acc1));
#endif
        for (; j < cols; ++j) sum += half_to_float(w[j]) * x[j];
        y[r] = sum;
    }
}

/* One csr16 row: sum_k vals[k] x[idx[k]] over k in [beg, end). Lanes past the row's end gather
 * nothing (x taken as 0); their values, from the next row or the zero padding, are finite. */
static inline float csr16_row(const float *x, const uint16_t *idx, const uint16_t *vals, int64_t beg,
                              int64_t end) {
    int64_t k = beg;
#if defined(SGPT_AVX512)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= end; k += 32) {
        __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(idx + k)));
        __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(idx + k + 16)));
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vals + k))),
                             _mm512_i32gather_ps(i0, x, 4), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vals + k + 16))),
                             _mm512_i32gather_ps(i1, x, 4), a1);
    }
    for (; k < end; k += 16) {
        int64_t n = end - k < 16 ? end - k : 16;
        __mmask16 live = (__mmask16)((1u << n) - 1u);
        __m512i i0 = _mm512_maskz_cvtepu16_epi32(live, _mm256_loadu_si256((const __m256i *)(idx + k)));
        __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, i0, x, 4);
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vals + k))), g, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(SGPT_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= end; k += 16) {
        __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(idx + k)));
        __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(idx + k + 8)));
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vals + k))),
                             _mm256_i32gather_ps(x, i0, 4), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vals + k + 8))),
                             _mm256_i32gather_ps(x, i1, 4), a1);
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; k < end; k += 8) {
        __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(end - k)), lane);
        __m256i i0 = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(idx + k))), live);
        __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i0, _mm256_castsi256_ps(live), 4);
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vals + k))), g, a0);
    }
    return hsum8(_mm256_add_ps(a0, a1));
#else
    float sum = 0.0f;
    for (; k < end; ++k) sum += half_to_float(vals[k]) * x[idx[k]];
    return sum;
#endif
}

void csr16_gemv(const float *x, const uint16_t *idx, const uint16_t *vals, const int64_t *offsets,
                const float *bias, float *y, int64_t rows, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        if (r + SGPT_AHEAD < rows) {
            int64_t b = offsets[r + SGPT_AHEAD], n = 2 * (offsets[r + SGPT_AHEAD + 1] - b);
            prefetch_range(idx + b, n);
            prefetch_range(vals + b, n);
        }
        float sum = csr16_row(x, idx, vals, offsets[r], offsets[r + 1]);
        y[r] = bias ? sum + bias[r] : sum;
    }
}

void csr16_decompress(const uint16_t *idx, const uint16_t *vals, const int64_t *offsets, float *out,
                      int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        float *o = out + r * cols;
        memset(o, 0, (size_t)cols * sizeof(float));
        for (int64_t k = offsets[r]; k < offsets[r + 1]; ++k) o[idx[k]] = half_to_float(vals[k]);
    }
}
