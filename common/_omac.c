/* CBC-MAC chains of several messages side by side, for EAX's OMAC (common/eax.py).
 *
 * Why: EAX authenticates with OMAC (= CMAC), a CBC chain: every AES call waits for the
 * one before it, so one core computes it at ~1.5 GB/s through OpenSSL while AES-CTR,
 * whose blocks are independent, runs at ~11 GB/s. The boot stream is made of many
 * independently sealed frames, so the chains of up to 8 frames can be interleaved:
 * the AES rounds of one lane fill the pipeline slots the others leave idle, and the
 * MAC then costs about what CTR costs. The AES rounds are the CPU's AES-NI
 * instructions; this file only expands the key and chains the blocks. eax.py checks
 * the result equals cryptography's CMAC (tests do so on random keys and messages) and
 * keeps using OpenSSL for everything else: the CMAC start and end blocks, the CTR
 * decryption, keys other than AES-128.
 *
 * Plain C (no Python.h), loaded through ctypes, which releases the GIL while it runs.
 * Built for any x86-64; the AES-NI code runs only when cpuid says the CPU has it
 * (omac_available() == 1); elsewhere eax.py stays on OpenSSL's CBC.
 */
#include <stddef.h>
#include <stdint.h>

#define MAX_LANES 8

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define AESNI __attribute__((target("aes,sse2")))

/* AES-128 key expansion (FIPS-197 5.2) with AESKEYGENASSIST, as in Intel's AES-NI
 * white paper: word i = word i-4 xor (SubWord(RotWord(word i-1)) xor rcon, for the
 * first word of each round key; the shifts fold the running xor of the others. */
AESNI static __m128i expand_step(__m128i key, __m128i assist) {
    assist = _mm_shuffle_epi32(assist, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

#define EXPAND(i, rcon) rk[i] = expand_step(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rcon))

AESNI static void expand_key128(const uint8_t key[16], __m128i rk[11]) {
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    EXPAND(1, 0x01);
    EXPAND(2, 0x02);
    EXPAND(3, 0x04);
    EXPAND(4, 0x08);
    EXPAND(5, 0x10);
    EXPAND(6, 0x20);
    EXPAND(7, 0x40);
    EXPAND(8, 0x80);
    EXPAND(9, 0x1b);
    EXPAND(10, 0x36);
}

/* `nblocks` CBC steps for `n` (<= MAX_LANES) lanes at once: x = AES(x xor block).
 * The round loop runs over lanes innermost, so n independent AESENCs are in flight. */
AESNI static void chain_lanes(const __m128i rk[11], int n, const uint8_t *const *data,
                              size_t offset, size_t nblocks, __m128i *x) {
    for (size_t b = 0; b < nblocks; b++) {
        size_t at = offset + 16 * b;
        for (int j = 0; j < n; j++)
            x[j] = _mm_xor_si128(_mm_xor_si128(x[j], _mm_loadu_si128((const __m128i *)(data[j] + at))),
                                 rk[0]);
        for (int r = 1; r < 10; r++)
            for (int j = 0; j < n; j++) x[j] = _mm_aesenc_si128(x[j], rk[r]);
        for (int j = 0; j < n; j++) x[j] = _mm_aesenclast_si128(x[j], rk[10]);
    }
}

/* Same, specialised for a full group of 8 so the compiler unrolls the lanes and keeps
 * all eight states in registers. */
AESNI static void chain_8(const __m128i rk[11], const uint8_t *const *data, size_t offset,
                          size_t nblocks, __m128i *x) {
    __m128i s0 = x[0], s1 = x[1], s2 = x[2], s3 = x[3], s4 = x[4], s5 = x[5], s6 = x[6],
            s7 = x[7];
    for (size_t b = 0; b < nblocks; b++) {
        size_t at = offset + 16 * b;
#define LOAD(j) s##j = _mm_xor_si128(_mm_xor_si128(s##j, _mm_loadu_si128((const __m128i *)(data[j] + at))), rk[0])
        LOAD(0); LOAD(1); LOAD(2); LOAD(3); LOAD(4); LOAD(5); LOAD(6); LOAD(7);
#undef LOAD
        for (int r = 1; r < 10; r++) {
            __m128i k = rk[r];
            s0 = _mm_aesenc_si128(s0, k); s1 = _mm_aesenc_si128(s1, k);
            s2 = _mm_aesenc_si128(s2, k); s3 = _mm_aesenc_si128(s3, k);
            s4 = _mm_aesenc_si128(s4, k); s5 = _mm_aesenc_si128(s5, k);
            s6 = _mm_aesenc_si128(s6, k); s7 = _mm_aesenc_si128(s7, k);
        }
        __m128i k = rk[10];
        s0 = _mm_aesenclast_si128(s0, k); s1 = _mm_aesenclast_si128(s1, k);
        s2 = _mm_aesenclast_si128(s2, k); s3 = _mm_aesenclast_si128(s3, k);
        s4 = _mm_aesenclast_si128(s4, k); s5 = _mm_aesenclast_si128(s5, k);
        s6 = _mm_aesenclast_si128(s6, k); s7 = _mm_aesenclast_si128(s7, k);
    }
    x[0] = s0; x[1] = s1; x[2] = s2; x[3] = s3; x[4] = s4; x[5] = s5; x[6] = s6; x[7] = s7;
}

int omac_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") ? 1 : 0;
}

/* For each lane j < n: state[j] = CBC-MAC under `key` (AES-128) of the nblocks[j]
 * 16-byte blocks at data[j], starting from the chain value in state[j] (16 bytes each,
 * updated in place). Lanes may differ in length: they run together until the shortest
 * ends, then the rest go on. Returns 0, or -1 if n is out of range or the CPU lacks
 * AES-NI (the caller then uses OpenSSL). */
AESNI int omac_cbc_lanes(const uint8_t *key, int n, const uint8_t *const *data,
                         const size_t *nblocks, uint8_t *state) {
    if (n < 1 || n > MAX_LANES || !omac_available()) return -1;
    __m128i rk[11];
    expand_key128(key, rk);
    __m128i x[MAX_LANES];
    const uint8_t *ptr[MAX_LANES];
    size_t left[MAX_LANES];
    int lane[MAX_LANES]; /* which caller lane each active slot holds */
    for (int j = 0; j < n; j++) {
        x[j] = _mm_loadu_si128((const __m128i *)(state + 16 * j));
        ptr[j] = data[j];
        left[j] = nblocks[j];
        lane[j] = j;
    }
    int active = n;
    size_t done = 0;
    while (active > 0) {
        size_t step = SIZE_MAX;
        for (int j = 0; j < active; j++)
            if (left[j] - done < step) step = left[j] - done;
        if (active == MAX_LANES)
            chain_8(rk, ptr, 16 * done, step, x);
        else
            chain_lanes(rk, active, ptr, 16 * done, step, x);
        done += step;
        /* retire the lanes that ended; keep the others packed at the front */
        int k = 0;
        for (int j = 0; j < active; j++) {
            if (left[j] == done) {
                _mm_storeu_si128((__m128i *)(state + 16 * lane[j]), x[j]);
            } else {
                x[k] = x[j];
                ptr[k] = ptr[j];
                left[k] = left[j];
                lane[k] = lane[j];
                k++;
            }
        }
        active = k;
    }
    /* round keys are key material: do not leave them on the stack */
    volatile __m128i *wipe = rk;
    for (int r = 0; r < 11; r++) wipe[r] = _mm_setzero_si128();
    return 0;
}

#else /* not x86: eax.py stays on OpenSSL's CBC */

int omac_available(void) { return 0; }

int omac_cbc_lanes(const uint8_t *key, int n, const uint8_t *const *data,
                   const size_t *nblocks, uint8_t *state) {
    (void)key; (void)n; (void)data; (void)nblocks; (void)state;
    return -1;
}

#endif
