/* SHA-256 of up to 16 messages side by side, for IPFS block checks (common/sha256_lanes.py).
 *
 * Why: a verified IPFS download hashes every block with SHA-256, one block after the
 * other. OpenSSL's SHA-NI code runs one message at ~1.7 GB/s per core here, and on the
 * 2 cores the gateway, the kernel and the client share, that hashing was what kept a
 * verified CAR download under half the speed of a plain one. SHA-256's rounds are a
 * serial chain within a message, but a CAR batch holds many blocks: with AVX-512 each
 * of 16 blocks takes one 32-bit lane of the zmm registers ("multi-buffer", as in
 * Intel's isa-l_crypto), the rotations become vprord and the three-input functions
 * (Ch, Maj, the xors of the sigmas) one vpternlogd each: ~2x OpenSSL's speed per core.
 *
 * Plain C (no Python.h) loaded through ctypes, which releases the GIL while it runs.
 * The 16-lane code runs only when cpuid (via libgcc, which also checks that the OS
 * saves the zmm state) reports AVX-512 F/VL/BW; elsewhere sha256_lanes_width() is 0
 * and Python hashes with hashlib. The tests compare every result with hashlib.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_LANES 16

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
};

static const uint32_t H0[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_LANES 1

typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef uint8_t v64u8 __attribute__((vector_size(64)));

#define LANES_ATTR __attribute__((target("avx512f,avx512vl,avx512bw")))
#define INLINE static inline __attribute__((always_inline))

/* FIPS 180-4 4.1.2; GCC turns the shift pairs into vprord and each xor/and chain of
 * three inputs into one vpternlogd. */
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define CH(e, f, g) (((e) & (f)) ^ (~(e) & (g)))
#define MAJ(a, b, c) (((a) & (b)) ^ ((a) & (c)) ^ ((b) & (c)))
#define BSIG0(x) (ROR(x, 2) ^ ROR(x, 13) ^ ROR(x, 22))
#define BSIG1(x) (ROR(x, 6) ^ ROR(x, 11) ^ ROR(x, 25))
#define SSIG0(x) (ROR(x, 7) ^ ROR(x, 18) ^ ((x) >> 3))
#define SSIG1(x) (ROR(x, 17) ^ ROR(x, 19) ^ ((x) >> 10))

/* Round t (0..63) with the working variables renamed instead of moved; from round 16
 * on the message schedule is computed in place in the 16-word ring w. */
#define RND(a, b, c, d, e, f, g, h, t)                                                   \
    do {                                                                                 \
        if ((t) >= 16)                                                                   \
            w[(t) & 15] += SSIG1(w[((t) - 2) & 15]) + w[((t) - 7) & 15] +                \
                           SSIG0(w[((t) - 15) & 15]);                                    \
        v16u32 t1 = h + BSIG1(e) + CH(e, f, g) + (K256[t] + w[(t) & 15]);                \
        d += t1;                                                                         \
        h = t1 + BSIG0(a) + MAJ(a, b, c);                                                \
    } while (0)

/* One 64-byte block of each of the 16 lanes: w[i] holds word i of every lane's block. */
INLINE void compress(v16u32 st[8], v16u32 w[16]) {
    v16u32 a = st[0], b = st[1], c = st[2], d = st[3];
    v16u32 e = st[4], f = st[5], g = st[6], h = st[7];
#pragma GCC unroll 8
    for (int t = 0; t < 64; t += 8) {
        RND(a, b, c, d, e, f, g, h, t);
        RND(h, a, b, c, d, e, f, g, t + 1);
        RND(g, h, a, b, c, d, e, f, t + 2);
        RND(f, g, h, a, b, c, d, e, t + 3);
        RND(e, f, g, h, a, b, c, d, t + 4);
        RND(d, e, f, g, h, a, b, c, t + 5);
        RND(c, d, e, f, g, h, a, b, t + 6);
        RND(b, c, d, e, f, g, h, a, t + 7);
    }
    st[0] += a, st[1] += b, st[2] += c, st[3] += d;
    st[4] += e, st[5] += f, st[6] += g, st[7] += h;
}

/* Rows j and j+s of a 16x16 matrix of words: swap the s x s blocks off the diagonal of
 * each 2s x 2s block. Doing it for s = 8, 4, 2, 1 transposes the matrix (each step
 * swaps one bit of the row index with the same bit of the column index). */
#define SWAP_BLOCKS(r, j, s, LO, HI)                       \
    do {                                                   \
        v16u32 lo_ = __builtin_shuffle(r[j], r[(j) + (s)], LO); \
        v16u32 hi_ = __builtin_shuffle(r[j], r[(j) + (s)], HI); \
        r[j] = lo_, r[(j) + (s)] = hi_;                    \
    } while (0)

/* The 16 lanes' blocks p[j] (64 bytes each) -> w[i] = big-endian word i of every lane. */
INLINE void load_transposed(const uint8_t *const p[16], v16u32 w[16]) {
    static const v16u32 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    static const v16u32 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    static const v16u32 lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    static const v16u32 hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    static const v16u32 lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    static const v16u32 hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    static const v16u32 lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    static const v16u32 hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    static const v64u8 bswap = {3,  2,  1,  0,  7,  6,  5,  4,  11, 10, 9,  8,  15, 14, 13, 12,
                                19, 18, 17, 16, 23, 22, 21, 20, 27, 26, 25, 24, 31, 30, 29, 28,
                                35, 34, 33, 32, 39, 38, 37, 36, 43, 42, 41, 40, 47, 46, 45, 44,
                                51, 50, 49, 48, 55, 54, 53, 52, 59, 58, 57, 56, 63, 62, 61, 60};
    for (int j = 0; j < 16; j++) memcpy(&w[j], p[j], 64);
    for (int j = 0; j < 16; j++) if (!(j & 8)) SWAP_BLOCKS(w, j, 8, lo8, hi8);
    for (int j = 0; j < 16; j++) if (!(j & 4)) SWAP_BLOCKS(w, j, 4, lo4, hi4);
    for (int j = 0; j < 16; j++) if (!(j & 2)) SWAP_BLOCKS(w, j, 2, lo2, hi2);
    for (int j = 0; j < 16; j++) if (!(j & 1)) SWAP_BLOCKS(w, j, 1, lo1, hi1);
    for (int j = 0; j < 16; j++) w[j] = (v16u32)__builtin_shuffle((v64u8)w[j], bswap);
}

/* A lane's message ends in one or two blocks built here: its last len % 64 bytes, the
 * 0x80 byte, zeros and the length in bits (big-endian), FIPS 180-4 5.1.1. */
typedef struct {
    const uint8_t *data;
    size_t full;   /* whole 64-byte blocks read in place */
    size_t blocks; /* full + 1 or 2 padding blocks */
    uint8_t tail[128];
} lane_t;

static void lane_init(lane_t *l, const uint8_t *data, size_t len) {
    size_t rest = len % 64;
    l->data = data;
    l->full = len / 64;
    l->blocks = l->full + (rest + 9 <= 64 ? 1 : 2);
    memset(l->tail, 0, sizeof l->tail);
    if (rest) memcpy(l->tail, data + 64 * l->full, rest);
    l->tail[rest] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    uint8_t *end = l->tail + 64 * (l->blocks - l->full);
    for (int i = 1; i <= 8; i++, bits >>= 8) end[-i] = (uint8_t)bits;
}

/* Out of line: one copy of the ~1700 instructions, whatever the caller's loops do. */
LANES_ATTR __attribute__((noinline)) static void block_x16(v16u32 st[8],
                                                          const uint8_t *const p[16]) {
    v16u32 w[16];
    load_transposed(p, w);
    compress(st, w);
}

LANES_ATTR static void sha256_x16(int n, const uint8_t *const *data, const size_t *len,
                                  uint8_t *out) {
    static const uint8_t idle[64]; /* what lanes without a block left take in */
    lane_t lanes[MAX_LANES];
    size_t most = 0;
    for (int j = 0; j < n; j++) {
        lane_init(&lanes[j], data[j], len[j]);
        if (lanes[j].blocks > most) most = lanes[j].blocks;
    }
    v16u32 st[8];
    for (int i = 0; i < 8; i++) st[i] = (v16u32){} + H0[i];
    for (size_t b = 0; b < most; b++) {
        const uint8_t *p[16];
        for (int j = 0; j < 16; j++) {
            if (j >= n || b >= lanes[j].blocks)
                p[j] = idle;
            else if (b < lanes[j].full)
                p[j] = lanes[j].data + 64 * b;
            else
                p[j] = lanes[j].tail + 64 * (b - lanes[j].full);
        }
        block_x16(st, p);
        for (int j = 0; j < n; j++) {
            if (lanes[j].blocks != b + 1) continue;
            for (int i = 0; i < 8; i++) { /* this lane is done: its digest, big-endian */
                uint32_t x = st[i][j];
                out[32 * j + 4 * i] = (uint8_t)(x >> 24);
                out[32 * j + 4 * i + 1] = (uint8_t)(x >> 16);
                out[32 * j + 4 * i + 2] = (uint8_t)(x >> 8);
                out[32 * j + 4 * i + 3] = (uint8_t)x;
            }
        }
    }
}
#endif

/* How many messages one sha256_lanes call hashes side by side here; 0: none (no
 * AVX-512 on this CPU or OS, or not x86-64): use hashlib. */
int sha256_lanes_width(void) {
#ifdef HAVE_LANES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))
        return MAX_LANES;
#endif
    return 0;
}

/* SHA-256 of the n messages data[j] (len[j] bytes each, any lengths) -> out[32 j ..].
 * Equal lengths use every lane to the end; a short message's lane idles once it is
 * done. 0 on success, -1 if n is out of range or the CPU cannot run it. */
int sha256_lanes(int n, const uint8_t *const *data, const size_t *len, uint8_t *out) {
    if (n < 1 || n > sha256_lanes_width()) return -1;
#ifdef HAVE_LANES
    sha256_x16(n, data, len, out);
    return 0;
#else
    (void)data, (void)len, (void)out;
    return -1;
#endif
}
