/* Swarm BMT chunk addresses in C, loaded by common/swarm.py through ctypes.
 *
 * Why C: a Swarm chunk address costs 128 Keccak-f[1600] permutations per 4 KiB
 * (127 inner BMT nodes + the span hash). Through pycryptodome's Python API that is
 * ~5.7 us per hash, i.e. ~6 MB/s, far below what a LAN Bee node delivers. This file is
 * plain C (no Python.h), so ctypes releases the GIL while it runs and worker threads
 * hash chunks in parallel. swarm.py falls back to pycryptodome when it is not built.
 *
 * Keccak here is the original (pre-FIPS-202) padding used by Ethereum and Swarm:
 * domain byte 0x01, not SHA3's 0x06.
 *
 * Speed: W chunks are hashed side by side ("lane-sliced": Keccak lane i of chunk j's
 * current node is element j of vector i), so every BMT level of every chunk, the top
 * nodes and the span hash included, runs W-wide and nothing is transposed between
 * levels. W is 8 with AVX-512 (32 zmm registers hold the state), 4 with AVX2 (ymm) and
 * 2 in the portable build (SSE2 / NEON): wider vectors than the registers only spill.
 * The variant the CPU and OS support is chosen at load time (cpuid via libgcc, which
 * also checks the OS saves the vector state); bmt_set_impl lets the tests run each one
 * against the vectors.
 */
#include <stdint.h>
#include <string.h>

#define ROL64(x, n) (((x) << (n)) | ((x) >> (64 - (n))))

static const uint64_t RC[24] = {
    0x0000000000000001ULL, 0x0000000000008082ULL, 0x800000000000808aULL,
    0x8000000080008000ULL, 0x000000000000808bULL, 0x0000000080000001ULL,
    0x8000000080008081ULL, 0x8000000000008009ULL, 0x000000000000008aULL,
    0x0000000000000088ULL, 0x0000000080008009ULL, 0x000000008000000aULL,
    0x000000008000808bULL, 0x800000000000008bULL, 0x8000000000008089ULL,
    0x8000000000008003ULL, 0x8000000000008002ULL, 0x8000000000000080ULL,
    0x000000000000800aULL, 0x800000008000000aULL, 0x8000000080008081ULL,
    0x8000000000008080ULL, 0x0000000080000001ULL, 0x8000000080008008ULL,
};

/* Keccak-f[1600] round on 25 lanes of type T (uint64_t, or a vector of them), lane
 * index = x + 5*y: theta, rho+pi (b[y + 5*((2x+3y) mod 5)] = rol(a[x+5y] ^ d[x], r)),
 * chi, iota. Written out lane by lane so the compiler keeps the state in registers;
 * with AVX-512 the xor-of-three and chi become one vpternlogq each. */
#define KECCAK_ROUNDS(T, ROL, s, RCV, UNROLL)                                   \
    UNROLL for (int round = 0; round < 24; round++) {                           \
        T c0 = s[0] ^ s[5] ^ s[10] ^ s[15] ^ s[20];                             \
        T c1 = s[1] ^ s[6] ^ s[11] ^ s[16] ^ s[21];                             \
        T c2 = s[2] ^ s[7] ^ s[12] ^ s[17] ^ s[22];                             \
        T c3 = s[3] ^ s[8] ^ s[13] ^ s[18] ^ s[23];                             \
        T c4 = s[4] ^ s[9] ^ s[14] ^ s[19] ^ s[24];                             \
        T d0 = c4 ^ ROL(c1, 1);                                                 \
        T d1 = c0 ^ ROL(c2, 1);                                                 \
        T d2 = c1 ^ ROL(c3, 1);                                                 \
        T d3 = c2 ^ ROL(c4, 1);                                                 \
        T d4 = c3 ^ ROL(c0, 1);                                                 \
        T b[25];                                                                \
        b[0] = s[0] ^ d0;                                                       \
        b[10] = ROL(s[1] ^ d1, 1);                                              \
        b[20] = ROL(s[2] ^ d2, 62);                                             \
        b[5] = ROL(s[3] ^ d3, 28);                                              \
        b[15] = ROL(s[4] ^ d4, 27);                                             \
        b[16] = ROL(s[5] ^ d0, 36);                                             \
        b[1] = ROL(s[6] ^ d1, 44);                                              \
        b[11] = ROL(s[7] ^ d2, 6);                                              \
        b[21] = ROL(s[8] ^ d3, 55);                                             \
        b[6] = ROL(s[9] ^ d4, 20);                                              \
        b[7] = ROL(s[10] ^ d0, 3);                                              \
        b[17] = ROL(s[11] ^ d1, 10);                                            \
        b[2] = ROL(s[12] ^ d2, 43);                                             \
        b[12] = ROL(s[13] ^ d3, 25);                                            \
        b[22] = ROL(s[14] ^ d4, 39);                                            \
        b[23] = ROL(s[15] ^ d0, 41);                                            \
        b[8] = ROL(s[16] ^ d1, 45);                                             \
        b[18] = ROL(s[17] ^ d2, 15);                                            \
        b[3] = ROL(s[18] ^ d3, 21);                                             \
        b[13] = ROL(s[19] ^ d4, 8);                                             \
        b[14] = ROL(s[20] ^ d0, 18);                                            \
        b[24] = ROL(s[21] ^ d1, 2);                                             \
        b[9] = ROL(s[22] ^ d2, 61);                                             \
        b[19] = ROL(s[23] ^ d3, 56);                                            \
        b[4] = ROL(s[24] ^ d4, 14);                                             \
        for (int y = 0; y < 25; y += 5) {                                       \
            T t0 = b[y], t1 = b[y + 1], t2 = b[y + 2], t3 = b[y + 3], t4 = b[y + 4]; \
            s[y] = t0 ^ (~t1 & t2);                                             \
            s[y + 1] = t1 ^ (~t2 & t3);                                         \
            s[y + 2] = t2 ^ (~t3 & t4);                                         \
            s[y + 3] = t3 ^ (~t4 & t0);                                         \
            s[y + 4] = t4 ^ (~t0 & t1);                                         \
        }                                                                       \
        s[0] ^= RCV(RC[round]);                                                 \
    }

#define SCALAR_RC(x) (x)
#define NO_UNROLL
static void keccakf(uint64_t s[25]) { KECCAK_ROUNDS(uint64_t, ROL64, s, SCALAR_RC, NO_UNROLL) }

static uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* x86-64 and aarch64 Linux are little-endian, like Keccak lanes */
    return v;
}

#define RATE 136 /* bytes, Keccak-256 */

/* keccak256 of an arbitrary message. */
void bmt_keccak256(const uint8_t *in, size_t len, uint8_t out[32]) {
    uint64_t s[25] = {0};
    while (len >= RATE) {
        for (int i = 0; i < RATE / 8; i++) s[i] ^= load64(in + 8 * i);
        keccakf(s);
        in += RATE;
        len -= RATE;
    }
    uint8_t last[RATE] = {0};
    memcpy(last, in, len);
    last[len] ^= 0x01;
    last[RATE - 1] ^= 0x80;
    for (int i = 0; i < RATE / 8; i++) s[i] ^= load64(last + 8 * i);
    keccakf(s);
    memcpy(out, s, 32);
}

/* ---- W chunks at once ------------------------------------------------------------ */
typedef uint64_t v8u64 __attribute__((vector_size(64)));
typedef uint64_t v4u64 __attribute__((vector_size(32)));
typedef uint64_t v2u64 __attribute__((vector_size(16)));
#define VROL(x, n) (((x) << (n)) | ((x) >> (64 - (n))))
#define SPLAT(V, x) ((V){0} + (x))

/* Two-vector shuffle with constant indices: clang and GCC >= 12 spell it
 * __builtin_shufflevector, older GCC __builtin_shuffle with a mask vector. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif
#endif
#ifndef SHUF8
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8u64){__VA_ARGS__})
#endif

/* Eight 64-byte rows (row j at p[j] + off) -> eight vectors, vector k = 64-bit word k of
 * every row: an 8x8 transpose in three shuffle stages (vpermt2q with AVX-512). */
static inline __attribute__((always_inline)) void load_v8u64(const uint8_t *const p[8], size_t off,
                                                          v8u64 out[8]) {
    v8u64 r[8], t[8], u[8];
    for (int j = 0; j < 8; j++) memcpy(&r[j], p[j] + off, 64);
    for (int j = 0; j < 8; j += 2) {
        t[j] = SHUF8(r[j], r[j + 1], 0, 8, 2, 10, 4, 12, 6, 14);     /* words 0,2,4,6 */
        t[j + 1] = SHUF8(r[j], r[j + 1], 1, 9, 3, 11, 5, 13, 7, 15); /* words 1,3,5,7 */
    }
    for (int h = 0; h < 8; h += 4) {
        u[h] = SHUF8(t[h], t[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);         /* words 0,4 */
        u[h + 1] = SHUF8(t[h + 1], t[h + 3], 0, 1, 8, 9, 4, 5, 12, 13); /* words 1,5 */
        u[h + 2] = SHUF8(t[h], t[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);   /* words 2,6 */
        u[h + 3] = SHUF8(t[h + 1], t[h + 3], 2, 3, 10, 11, 6, 7, 14, 15); /* words 3,7 */
    }
    for (int k = 0; k < 4; k++) {
        out[k] = SHUF8(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        out[k + 4] = SHUF8(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* The same for 4 or 2 rows: word by word (a few inserts per ~3000-op permutation). */
static inline __attribute__((always_inline)) void load_v4u64(const uint8_t *const p[4],
                                                             size_t off, v4u64 out[8]) {
    for (size_t k = 0; k < 64; k += 8)
        out[k / 8] = (v4u64){load64(p[0] + off + k), load64(p[1] + off + k),
                             load64(p[2] + off + k), load64(p[3] + off + k)};
}
static inline __attribute__((always_inline)) void load_v2u64(const uint8_t *const p[2],
                                                             size_t off, v2u64 out[8]) {
    for (size_t k = 0; k < 64; k += 8)
        out[k / 8] = (v2u64){load64(p[0] + off + k), load64(p[1] + off + k)};
}

/* A BMT node is keccak256 of 64 bytes: lanes 0-7 hold it, padding 0x01 at byte 64 and
 * 0x80 at byte 135; the hash is lanes 0-3. */
#define NODE_PAD(V, s)                                               \
    do {                                                             \
        s[8] = SPLAT(V, 0x01);                                       \
        for (int i_ = 9; i_ < 25; i_++) s[i_] = SPLAT(V, 0);         \
        s[16] = SPLAT(V, 0x8000000000000000ULL);                     \
    } while (0)
#define PERMUTE(V, s) KECCAK_ROUNDS(V, VROL, s, RCV_##V, UNROLL_##V)
#define RCV_v8u64(x) SPLAT(v8u64, x)
#define RCV_v4u64(x) SPLAT(v4u64, x)
#define RCV_v2u64(x) SPLAT(v2u64, x)
/* With AVX-512 the fully unrolled rounds (~3000 instructions) keep the state in the 32
 * registers with no moves between rounds: +20%. With fewer registers it only spills
 * more, and the loop stays. Each function has one permutation site, for the i-cache.
 * This runs at ~35 cycles per 8-way round on the Zen 5 here (~1.1 GB/s of chunks per
 * core). Tried without gain: the round with intrinsics (two vpternlogq per theta column,
 * one per lane for A ^ C[x-1] ^ rol(C[x+1], 1), 90 instructions instead of ~113), and
 * a generated spill-free assembler round with fixed registers: both 35-38 cycles. */
#define UNROLL_v8u64 _Pragma("GCC unroll 24")
#define UNROLL_v4u64
#define UNROLL_v2u64

/* bmt_many_V: BMT chunk addresses of W zero-padded 4096-byte payloads p[j] with spans
 * span[j]; address j goes to out[j]. The nodes of a level are kept lane-sliced in h:
 * node m's hash is h[4m..4m+3], so the next level's node m is simply h[8m..8m+7], and
 * each level overwrites h in place (node m is written after nodes 2m and 2m+1 were read).
 *
 * level_V: one BMT level of one chunk, W nodes at a time: n (a multiple of W) 64-byte
 * nodes at in -> n 32-byte hashes at out. out may overlap in (out[32i] never runs ahead
 * of in[64i]): each group is fully loaded before its results are stored. */
#define DEFINE_WIDTH(V, W)                                                                \
    static inline __attribute__((always_inline)) void bmt_many_##V(                       \
        const uint8_t *const p[W], const uint64_t span[W], uint8_t *const out[W]) {       \
        V h[64 * 4];                                                                      \
        V s[25] = {0}; /* (GCC 12 warns falsely about s[0..7] otherwise) */               \
        /* 127 BMT nodes (64 leaves, then 32, 16 ... 1) and the span hash, in one loop */ \
        int m = 0, n = 64;                                                                \
        for (int step = 0; step < 128; step++) {                                          \
            if (step < 64) { /* leaves: 64-byte segment pairs of the payload */           \
                load_##V(p, 64 * (size_t)step, s);                                        \
                NODE_PAD(V, s);                                                           \
            } else if (step < 127) {                                                      \
                for (int i = 0; i < 8; i++) s[i] = h[8 * m + i];                          \
                NODE_PAD(V, s);                                                           \
            } else { /* keccak256(u64le span || root): 40 bytes, pad at 40 and 135 */    \
                memcpy(&s[0], span, sizeof(V));                                           \
                for (int i = 0; i < 4; i++) s[1 + i] = h[i];                              \
                s[5] = SPLAT(V, 0x01);                                                    \
                for (int i = 6; i < 25; i++) s[i] = SPLAT(V, 0);                          \
                s[16] = SPLAT(V, 0x8000000000000000ULL);                                  \
            }                                                                             \
            PERMUTE(V, s)                                                                 \
            for (int i = 0; i < 4; i++) h[4 * m + i] = s[i];                              \
            if (++m == n) { /* level done: the next one has half as many nodes */         \
                m = 0;                                                                    \
                n = n > 1 ? n / 2 : 1;                                                    \
            }                                                                             \
        }                                                                                 \
        for (int j = 0; j < W; j++)                                                       \
            for (int i = 0; i < 4; i++) memcpy(out[j] + 8 * i, &h[i][j], 8);              \
    }                                                                                     \
    static inline __attribute__((always_inline)) void level_##V(const uint8_t *in,        \
                                                                uint8_t *out, size_t n) { \
        for (size_t g = 0; g < n; g += W) {                                               \
            const uint8_t *p[W];                                                          \
            for (int j = 0; j < W; j++) p[j] = in + 64 * (g + j);                         \
            V s[25] = {0}; /* (GCC 12 warns falsely about s[0..7] otherwise) */           \
            load_##V(p, 0, s);                                                            \
            NODE_PAD(V, s);                                                               \
            PERMUTE(V, s)                                                                 \
            for (int j = 0; j < W; j++)                                                   \
                for (int i = 0; i < 4; i++) memcpy(out + 32 * (g + j) + 8 * i, &s[i][j], 8); \
        }                                                                                 \
    }
DEFINE_WIDTH(v8u64, 8)
DEFINE_WIDTH(v4u64, 4)
DEFINE_WIDTH(v2u64, 2)

/* keccak256 of exactly 64 bytes (one BMT node: two child hashes). */
static void keccak64(const uint8_t in[64], uint8_t out[32]) {
    uint64_t s[25] = {0};
    for (int i = 0; i < 8; i++) s[i] = load64(in + 8 * i);
    s[8] = 0x01;
    s[16] = 0x8000000000000000ULL;
    keccakf(s);
    memcpy(out, s, 32);
}

/* One implementation = the W-wide many-chunk function + the single-chunk level. */
typedef struct {
    const char *name;
    int width;
    void (*many)(const uint8_t *const *p, const uint64_t *span, uint8_t *const *out);
    void (*level)(const uint8_t *in, uint8_t *out, size_t n);
} bmt_impl_t;

#define DEFINE_IMPL(NAME, ATTR, V, W)                                                     \
    ATTR static void many_##NAME(const uint8_t *const *p, const uint64_t *span,           \
                                 uint8_t *const *out) {                                   \
        bmt_many_##V(p, span, out);                                                       \
    }                                                                                     \
    ATTR static void level_##NAME(const uint8_t *in, uint8_t *out, size_t n) {            \
        level_##V(in, out, n);                                                            \
    }                                                                                     \
    static const bmt_impl_t IMPL_##NAME = {#NAME, W, many_##NAME, level_##NAME};

DEFINE_IMPL(portable, , v2u64, 2)
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_VARIANTS 1
DEFINE_IMPL(avx2, __attribute__((target("avx2"))), v4u64, 4)
DEFINE_IMPL(avx512, __attribute__((target("avx512f,avx512vl"))), v8u64, 8)
#endif

enum { IMPL_AUTO = 0, IMPL_PORTABLE = 1, IMPL_AVX2 = 2, IMPL_AVX512 = 3 };
static const bmt_impl_t *impl = &IMPL_portable;
static int impl_id = IMPL_PORTABLE;

static const bmt_impl_t *impl_for(int which) {
    if (which == IMPL_PORTABLE) return &IMPL_portable;
#ifdef HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (which == IMPL_AVX2 && __builtin_cpu_supports("avx2")) return &IMPL_avx2;
    if (which == IMPL_AVX512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl"))
        return &IMPL_avx512;
#endif
    return NULL;
}

/* Choose the implementation: IMPL_AUTO picks the best this CPU supports. Returns the one
 * now in use, or -1 (nothing changed) if `which` is unknown or unsupported here. For load
 * time and tests: not to be called while other threads hash. */
int bmt_set_impl(int which) {
    if (which == IMPL_AUTO) {
        which = impl_for(IMPL_AVX512) ? IMPL_AVX512
                : impl_for(IMPL_AVX2) ? IMPL_AVX2
                                      : IMPL_PORTABLE;
    }
    const bmt_impl_t *chosen = impl_for(which);
    if (chosen == NULL) return -1;
    impl = chosen;
    impl_id = which;
    return which;
}

int bmt_get_impl(void) { return impl_id; }

const char *bmt_impl_name(void) { return impl->name; }

__attribute__((constructor)) static void bmt_init(void) { bmt_set_impl(IMPL_AUTO); }

/* Swarm content-addressed chunk: keccak256(span as u64 LE || BMT root of the payload
 * zero-padded to 4096 bytes). Returns 0, or -1 if the payload is over 4096 bytes.
 * One chunk alone: its lower levels go W nodes at a time, the top few run scalar. */
int bmt_chunk_address(uint64_t span, const uint8_t *payload, size_t len, uint8_t out[32]) {
    if (len > 4096) return -1;
    uint8_t buf[4096];
    memcpy(buf, payload, len);
    memset(buf + len, 0, 4096 - len);
    /* Level by level in place: 4096 bytes -> 2048 -> ... -> 32. */
    size_t width = 4096;
    for (; width / 64 >= (size_t)impl->width; width /= 2) impl->level(buf, buf, width / 64);
    for (; width > 32; width /= 2) {
        for (size_t i = 0; i < width / 64; i++) keccak64(buf + 64 * i, buf + 32 * i);
    }
    uint8_t tail[40];
    for (int i = 0; i < 8; i++) tail[i] = (uint8_t)(span >> (8 * i));
    memcpy(tail + 8, buf, 32);
    bmt_keccak256(tail, sizeof tail, out);
    return 0;
}

/* Addresses of the consecutive chunks whose payloads are `data` (4096 bytes each, the
 * last one possibly shorter): out gets 32 bytes per chunk. Chunk i spans
 * min(chunk_span, total - i * chunk_span) bytes of the file: data chunks have
 * chunk_span 4096 and total = len; a level of intermediate chunks has payloads of 128
 * child addresses, chunk_span 4096 * 128^k and total = the file bytes below the level.
 * One call per batch (W chunks side by side) keeps Python's per-call overhead out of
 * the streaming verifier and the tree rebuild. */
void bmt_chunk_addresses(const uint8_t *data, size_t len, uint64_t chunk_span, uint64_t total,
                         uint8_t *out) {
    static const uint8_t zeros[4096];
    uint8_t tail[4096], junk[32];
    const size_t w = (size_t)impl->width;
    size_t n = (len + 4095) / 4096;
    for (size_t g = 0; g < n; g += w) {
        if ((n - g) * 4 < w * 3) { /* mostly empty slots: one by one is cheaper */
            for (size_t i = g; i < n; i++) {
                size_t have = len - 4096 * i < 4096 ? len - 4096 * i : 4096;
                uint64_t left = total - i * chunk_span;
                bmt_chunk_address(left < chunk_span ? left : chunk_span, data + 4096 * i, have,
                                  out + 32 * i);
            }
            break;
        }
        const uint8_t *p[8];
        uint64_t span[8];
        uint8_t *o[8];
        for (size_t j = 0; j < w; j++) {
            size_t i = g + j;
            if (i >= n) { /* fewer than w left: hash zeros into a scratch output */
                p[j] = zeros;
                span[j] = 0;
                o[j] = junk;
                continue;
            }
            size_t have = len - 4096 * i < 4096 ? len - 4096 * i : 4096;
            if (have < 4096) { /* only the last chunk can be short */
                memcpy(tail, data + 4096 * i, have);
                memset(tail + have, 0, 4096 - have);
                p[j] = tail;
            } else {
                p[j] = data + 4096 * i;
            }
            uint64_t left = total - i * chunk_span;
            span[j] = left < chunk_span ? left : chunk_span;
            o[j] = out + 32 * i;
        }
        impl->many(p, span, o);
    }
}

/* Addresses of the consecutive data chunks of `data` (span = payload length). */
void bmt_leaf_addresses(const uint8_t *data, size_t len, uint8_t *out) {
    bmt_chunk_addresses(data, len, 4096, len, out);
}
