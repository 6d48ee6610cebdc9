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

/* Keccak-f[1600] on 25 little-endian lanes, lane index = x + 5*y. Each round is
 * theta, rho+pi (combined, written out lane by lane so the compiler keeps the state
 * in registers), chi and iota. */
static void keccakf(uint64_t s[25]) {
    for (int round = 0; round < 24; round++) {
        uint64_t c0 = s[0] ^ s[5] ^ s[10] ^ s[15] ^ s[20];
        uint64_t c1 = s[1] ^ s[6] ^ s[11] ^ s[16] ^ s[21];
        uint64_t c2 = s[2] ^ s[7] ^ s[12] ^ s[17] ^ s[22];
        uint64_t c3 = s[3] ^ s[8] ^ s[13] ^ s[18] ^ s[23];
        uint64_t c4 = s[4] ^ s[9] ^ s[14] ^ s[19] ^ s[24];
        uint64_t d0 = c4 ^ ROL64(c1, 1);
        uint64_t d1 = c0 ^ ROL64(c2, 1);
        uint64_t d2 = c1 ^ ROL64(c3, 1);
        uint64_t d3 = c2 ^ ROL64(c4, 1);
        uint64_t d4 = c3 ^ ROL64(c0, 1);

        /* b[y + 5*((2x+3y) mod 5)] = rol(a[x + 5y] ^ d[x], r[x][y]) */
        uint64_t b[25];
        b[0] = s[0] ^ d0;
        b[10] = ROL64(s[1] ^ d1, 1);
        b[20] = ROL64(s[2] ^ d2, 62);
        b[5] = ROL64(s[3] ^ d3, 28);
        b[15] = ROL64(s[4] ^ d4, 27);
        b[16] = ROL64(s[5] ^ d0, 36);
        b[1] = ROL64(s[6] ^ d1, 44);
        b[11] = ROL64(s[7] ^ d2, 6);
        b[21] = ROL64(s[8] ^ d3, 55);
        b[6] = ROL64(s[9] ^ d4, 20);
        b[7] = ROL64(s[10] ^ d0, 3);
        b[17] = ROL64(s[11] ^ d1, 10);
        b[2] = ROL64(s[12] ^ d2, 43);
        b[12] = ROL64(s[13] ^ d3, 25);
        b[22] = ROL64(s[14] ^ d4, 39);
        b[23] = ROL64(s[15] ^ d0, 41);
        b[8] = ROL64(s[16] ^ d1, 45);
        b[18] = ROL64(s[17] ^ d2, 15);
        b[3] = ROL64(s[18] ^ d3, 21);
        b[13] = ROL64(s[19] ^ d4, 8);
        b[14] = ROL64(s[20] ^ d0, 18);
        b[24] = ROL64(s[21] ^ d1, 2);
        b[9] = ROL64(s[22] ^ d2, 61);
        b[19] = ROL64(s[23] ^ d3, 56);
        b[4] = ROL64(s[24] ^ d4, 14);

        for (int y = 0; y < 25; y += 5) {
            uint64_t t0 = b[y], t1 = b[y + 1], t2 = b[y + 2], t3 = b[y + 3], t4 = b[y + 4];
            s[y] = t0 ^ (~t1 & t2);
            s[y + 1] = t1 ^ (~t2 & t3);
            s[y + 2] = t2 ^ (~t3 & t4);
            s[y + 3] = t3 ^ (~t4 & t0);
            s[y + 4] = t4 ^ (~t0 & t1);
        }
        s[0] ^= RC[round];
    }
}

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

/* keccak256 of exactly 64 bytes (one BMT node: two child hashes). */
static void keccak64(const uint8_t in[64], uint8_t out[32]) {
    uint64_t s[25] = {0};
    for (int i = 0; i < 8; i++) s[i] = load64(in + 8 * i);
    s[8] = 0x01;
    s[16] = 0x8000000000000000ULL;
    keccakf(s);
    memcpy(out, s, 32);
}

/* ---- 8 BMT nodes at once -------------------------------------------------------
 * The lower BMT levels hash 64, 32, 16 and 8 independent 64-byte messages: ideal for
 * SIMD. keccakf_x8 runs eight Keccak-f[1600] states side by side, lane i of state j in
 * element j of vector i. GCC's vector extensions compile this for AVX-512 (vprolq,
 * vpternlogq), AVX2 or plain SSE2; target_clones picks the best one the CPU has at
 * load time, so the library stays portable. */
typedef uint64_t v8u64 __attribute__((vector_size(64)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define VROL(x, n) (((x) << (n)) | ((x) >> (64 - (n))))

static inline __attribute__((always_inline)) void keccakf_x8(v8u64 s[25]) {
    for (int round = 0; round < 24; round++) {
        v8u64 c0 = s[0] ^ s[5] ^ s[10] ^ s[15] ^ s[20];
        v8u64 c1 = s[1] ^ s[6] ^ s[11] ^ s[16] ^ s[21];
        v8u64 c2 = s[2] ^ s[7] ^ s[12] ^ s[17] ^ s[22];
        v8u64 c3 = s[3] ^ s[8] ^ s[13] ^ s[18] ^ s[23];
        v8u64 c4 = s[4] ^ s[9] ^ s[14] ^ s[19] ^ s[24];
        v8u64 d0 = c4 ^ VROL(c1, 1);
        v8u64 d1 = c0 ^ VROL(c2, 1);
        v8u64 d2 = c1 ^ VROL(c3, 1);
        v8u64 d3 = c2 ^ VROL(c4, 1);
        v8u64 d4 = c3 ^ VROL(c0, 1);
        v8u64 b[25];
        b[0] = s[0] ^ d0;
        b[10] = VROL(s[1] ^ d1, 1);
        b[20] = VROL(s[2] ^ d2, 62);
        b[5] = VROL(s[3] ^ d3, 28);
        b[15] = VROL(s[4] ^ d4, 27);
        b[16] = VROL(s[5] ^ d0, 36);
        b[1] = VROL(s[6] ^ d1, 44);
        b[11] = VROL(s[7] ^ d2, 6);
        b[21] = VROL(s[8] ^ d3, 55);
        b[6] = VROL(s[9] ^ d4, 20);
        b[7] = VROL(s[10] ^ d0, 3);
        b[17] = VROL(s[11] ^ d1, 10);
        b[2] = VROL(s[12] ^ d2, 43);
        b[12] = VROL(s[13] ^ d3, 25);
        b[22] = VROL(s[14] ^ d4, 39);
        b[23] = VROL(s[15] ^ d0, 41);
        b[8] = VROL(s[16] ^ d1, 45);
        b[18] = VROL(s[17] ^ d2, 15);
        b[3] = VROL(s[18] ^ d3, 21);
        b[13] = VROL(s[19] ^ d4, 8);
        b[14] = VROL(s[20] ^ d0, 18);
        b[24] = VROL(s[21] ^ d1, 2);
        b[9] = VROL(s[22] ^ d2, 61);
        b[19] = VROL(s[23] ^ d3, 56);
        b[4] = VROL(s[24] ^ d4, 14);
        for (int y = 0; y < 25; y += 5) {
            v8u64 t0 = b[y], t1 = b[y + 1], t2 = b[y + 2], t3 = b[y + 3], t4 = b[y + 4];
            s[y] = t0 ^ (~t1 & t2);
            s[y + 1] = t1 ^ (~t2 & t3);
            s[y + 2] = t2 ^ (~t3 & t4);
            s[y + 3] = t3 ^ (~t4 & t0);
            s[y + 4] = t4 ^ (~t0 & t1);
        }
        s[0] ^= (v8u64){RC[round], RC[round], RC[round], RC[round],
                        RC[round], RC[round], RC[round], RC[round]};
    }
}

/* One BMT level: n (a multiple of 8) 64-byte nodes at in -> n 32-byte hashes at out.
 * out may overlap in as in bmt_chunk_address (out[32i] never runs ahead of in[64i]):
 * each group of 8 is fully loaded before its results are stored. */
MULTIVERSION
static void keccak64_level_x8(const uint8_t *in, uint8_t *out, size_t n) {
    for (size_t g = 0; g < n; g += 8) {
        v8u64 s[25];
        uint64_t tmp[8];
        for (int lane = 0; lane < 8; lane++) {
            for (int j = 0; j < 8; j++) tmp[j] = load64(in + 64 * (g + j) + 8 * lane);
            memcpy(&s[lane], tmp, sizeof tmp);
        }
        v8u64 zero = {0};
        v8u64 pad1 = zero + 0x01;
        v8u64 pad2 = zero + 0x8000000000000000ULL;
        s[8] = pad1;
        for (int lane = 9; lane < 25; lane++) s[lane] = zero;
        s[16] = pad2;
        keccakf_x8(s);
        for (int lane = 0; lane < 4; lane++) {
            memcpy(tmp, &s[lane], sizeof tmp);
            for (int j = 0; j < 8; j++) memcpy(out + 32 * (g + j) + 8 * lane, &tmp[j], 8);
        }
    }
}

/* Swarm content-addressed chunk: keccak256(span as u64 LE || BMT root of the payload
 * zero-padded to 4096 bytes). Returns 0, or -1 if the payload is over 4096 bytes. */
int bmt_chunk_address(uint64_t span, const uint8_t *payload, size_t len, uint8_t out[32]) {
    if (len > 4096) return -1;
    uint8_t buf[4096];
    memcpy(buf, payload, len);
    memset(buf + len, 0, 4096 - len);
    /* Level by level in place: 4096 bytes -> 2048 -> ... -> 32. Node i of the next
     * level overwrites bytes [32i, 32i+32), which its inputs [64i, 64i+64) have
     * already been read from. 64, 32, 16 and 8 nodes go eight at a time. */
    size_t width = 4096;
    for (; width / 64 >= 8; width /= 2) keccak64_level_x8(buf, buf, width / 64);
    for (; width > 32; width /= 2) {
        for (size_t i = 0; i < width / 64; i++) keccak64(buf + 64 * i, buf + 32 * i);
    }
    uint8_t tail[40];
    for (int i = 0; i < 8; i++) tail[i] = (uint8_t)(span >> (8 * i));
    memcpy(tail + 8, buf, 32);
    bmt_keccak256(tail, sizeof tail, out);
    return 0;
}

/* Addresses of the consecutive data chunks of `data` (4096 bytes each, the last one
 * possibly shorter; span = payload length): out gets 32 bytes per chunk. One call per
 * batch keeps Python's per-call overhead out of the streaming verifier. */
void bmt_leaf_addresses(const uint8_t *data, size_t len, uint8_t *out) {
    for (size_t off = 0, i = 0; off < len; off += 4096, i++) {
        size_t n = len - off < 4096 ? len - off : 4096;
        bmt_chunk_address(n, data + off, n, out + 32 * i);
    }
}
