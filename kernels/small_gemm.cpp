// Grouped fp32 GEMMs for experts with few rows: each expert's weight is streamed from memory once.
//
// At low consult rates an expert sees a few dozen rows against a 1024 x 1024 weight: the GEMM is bound by
// reading the weight, not by its FLOPs, and a BLAS call packs the weight into its own layout first (a read
// and a write of every element) before streaming it again. These kernels read the weight in place, in
// column panels that stay in L2 while every row of the expert passes over them. Built at run time for the
// running CPU (``-march=native``) by ``kernels/small_gemm.py``; portable C++ with GCC vector types, so the
// same source gives AVX-512, AVX2 or SSE code.
//
// Three entry points, all over experts e = 0..E-1 whose rows are [ends[e-1], ends[e]) of the row operands;
// experts with more than ``max_rows`` rows are skipped (the caller runs them on a BLAS):
//   pr_grouped_nn:    out[r, :] = x[r, :] @ w[e]          w[e]: [K, N], unit stride along N
//   pr_grouped_nt:    out[r, :] = x[r, :] @ wt[e]ᵀ        wt[e]: [N, K], unit stride along K
//   pr_grouped_wgrad: out[e]    = a[rows]ᵀ @ b[rows]      out: [E, K, N] contiguous, zero for empty experts
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int VL = 16;                       // floats per vector register
constexpr int NN_RB = 6, NN_NB = 4;          // rows x vectors of the NN tile: 24 accumulators of 32 registers
constexpr int NT_RB = 4, NT_OB = 4;          // rows x outputs of the NT tile: 16 accumulators
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int NN_RB = 4, NN_NB = 3;          // 12 accumulators of 16 registers
constexpr int NT_RB = 3, NT_OB = 3;
#else
constexpr int VL = 4;
constexpr int NN_RB = 4, NN_NB = 3;
constexpr int NT_RB = 3, NT_OB = 3;
#endif

#define UNROLL _Pragma("GCC unroll 16")

// Unaligned and allowed to alias float: loads and stores are plain (unaligned) vector moves.
typedef float vec __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float)), may_alias));

static inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
static inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
// A store that bypasses the caches where the ISA has one and p is aligned: for results written once and not read
// again soon (a weight gradient), it saves reading each line in before writing it. Callers fence (``fence``).
static inline void store_stream(float* p, vec v) {
#if defined(__AVX512F__)
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#endif
    store(p, v);
}
static inline void fence() {
#if defined(__AVX512F__) || defined(__AVX__)
    _mm_sfence();
#endif
}

// How a tile writes C: overwrite, add to what is there, or overwrite with streaming stores.
enum Write { SET = 0, ADD = 1, STREAM = 2 };
// x - (+0) is x for every float (-0 included), so this folds into one broadcast load; x + 0 would not (-0 + 0 = +0).
static inline vec splat(float s) { return s - vec{}; }
typedef int ivec __attribute__((vector_size(VL * sizeof(int))));
// Sum of the lanes by halving (log2(VL) shuffles and adds, in a fixed order).
static inline float hsum(vec v) {
    UNROLL
    for (int w = VL / 2; w >= 1; w /= 2) {
        ivec rotate;
        UNROLL
        for (int i = 0; i < VL; ++i) rotate[i] = (i + w) % VL;
        v += __builtin_shuffle(v, rotate);
    }
    return v[0];
}

// C[r, j] (+)= sum_k A[r * a_rs + k * a_ks] * B[k * b_ks + j] for r < RB, j < NB * VL, written as ``how`` says.
// ``P``: where the rows of B KB rows further down start (the next block, fetched into L2 while this one is
// computed), or null; ``pk``: how many of them exist.
template <int RB, int NB>
static inline void tile_nn(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks, int64_t K,
                           float* C, int64_t c_rs, Write how, const float* P = nullptr, int64_t pk = 0) {
    vec acc[RB][NB];
    UNROLL
    for (int r = 0; r < RB; ++r)
        UNROLL
        for (int n = 0; n < NB; ++n) acc[r][n] = how == ADD ? load(C + r * c_rs + n * VL) : vec{};
    for (int64_t k = 0; k < K; ++k) {
        if (P != nullptr && k < pk) {
            UNROLL
            for (int n = 0; n < NB; ++n) __builtin_prefetch(P + k * b_ks + n * VL, 0, 2);
        }
        vec b[NB];
        UNROLL
        for (int n = 0; n < NB; ++n) b[n] = load(B + k * b_ks + n * VL);
        UNROLL
        for (int r = 0; r < RB; ++r) {
            const vec a = splat(A[r * a_rs + k * a_ks]);
            UNROLL
            for (int n = 0; n < NB; ++n) acc[r][n] += a * b[n];
        }
    }
    UNROLL
    for (int r = 0; r < RB; ++r)
        UNROLL
        for (int n = 0; n < NB; ++n) {
            if (how == STREAM) store_stream(C + r * c_rs + n * VL, acc[r][n]);
            else store(C + r * c_rs + n * VL, acc[r][n]);
        }
}

// The same for one column at a time (the N % VL tail).
template <int RB>
static inline void tile_nn_col(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks,
                               int64_t K, float* C, int64_t c_rs, Write how) {
    float acc[RB];
    UNROLL
    for (int r = 0; r < RB; ++r) acc[r] = how == ADD ? C[r * c_rs] : 0.f;
    for (int64_t k = 0; k < K; ++k)
        UNROLL
        for (int r = 0; r < RB; ++r) acc[r] += A[r * a_rs + k * a_ks] * B[k * b_ks];
    UNROLL
    for (int r = 0; r < RB; ++r) C[r * c_rs] = acc[r];
}

// RB rows of C, columns [n0, n1): full tiles, then one vector, then single columns.
template <int RB>
static void rows_nn(const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks, int64_t K,
                    float* C, int64_t c_rs, int64_t n0, int64_t n1, Write how, const float* P, int64_t pk) {
    int64_t n = n0;
    for (; n + NN_NB * VL <= n1; n += NN_NB * VL)
        tile_nn<RB, NN_NB>(A, a_rs, a_ks, B + n, b_ks, K, C + n, c_rs, how, P ? P + n : nullptr, pk);
    for (; n + VL <= n1; n += VL) tile_nn<RB, 1>(A, a_rs, a_ks, B + n, b_ks, K, C + n, c_rs, how);
    for (; n < n1; ++n) tile_nn_col<RB>(A, a_rs, a_ks, B + n, b_ks, K, C + n, c_rs, how);
}

template <int RB>
static void rows_nn_dispatch(int rows, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks,
                             int64_t K, float* C, int64_t c_rs, int64_t n0, int64_t n1, Write how,
                             const float* P = nullptr, int64_t pk = 0) {
    if constexpr (RB > 1) {
        if (rows < RB)
            return rows_nn_dispatch<RB - 1>(rows, A, a_rs, a_ks, B, b_ks, K, C, c_rs, n0, n1, how, P, pk);
    }
    rows_nn<RB>(A, a_rs, a_ks, B, b_ks, K, C, c_rs, n0, n1, how, P, pk);
}

// Rows of B per block of the NN product: a block reads KB rows of B (one 4 KB page each for a 1024-wide fp32
// weight) a panel at a time, so the hardware prefetcher follows KB sequential streams, and C (M x the columns,
// in L1/L2) is read and written once per block.
#ifndef PR_KB  // overridable at build time (-DPR_KB=...) for tuning
#define PR_KB 32
#endif
constexpr int64_t KB = PR_KB;
#ifndef PR_PREFETCH
#define PR_PREFETCH 1
#endif

// C[0:M, n0:n1] = A[0:M, :] B[:, n0:n1] (strides as in tile_nn): B streamed in blocks of KB rows, each block
// panel by panel, every row block of A passing over a panel while it is in L1.
static void block_nn(int64_t M, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks,
                     int64_t K, float* C, int64_t c_rs, int64_t n0, int64_t n1) {
    constexpr int64_t PANEL = NN_NB * VL;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kn = K - k0 < KB ? K - k0 : KB;
        for (int64_t p = n0; p < n1; p += PANEL) {
            const int64_t p1 = p + PANEL < n1 ? p + PANEL : n1;
            // The first row block fetches the next block's rows of this panel (PR_PREFETCH=0 turns it off).
            const int64_t pk = PR_PREFETCH && K - k0 - KB > 0 ? (K - k0 - KB < KB ? K - k0 - KB : KB) : 0;
            for (int64_t m = 0; m < M; m += NN_RB) {
                const int rows = static_cast<int>(M - m < NN_RB ? M - m : NN_RB);
                const float* P = m == 0 && pk > 0 ? B + (k0 + KB) * b_ks : nullptr;
                rows_nn_dispatch<NN_RB>(rows, A + m * a_rs + k0 * a_ks, a_rs, a_ks, B + k0 * b_ks, b_ks, kn,
                                        C + m * c_rs, c_rs, p, p1, k0 > 0 ? ADD : SET, P, pk);
            }
        }
    }
}

// C[0:M, 0:N] = A B with K small (a weight gradient: K = the expert's rows): row block by row block, so C is
// written row after row, once (streaming stores), while B (K x N) stays in L1/L2.
static void block_nn_rows(int64_t M, const float* A, int64_t a_rs, int64_t a_ks, const float* B, int64_t b_ks,
                          int64_t K, float* C, int64_t c_rs, int64_t N) {
    for (int64_t m = 0; m < M; m += NN_RB) {
        const int rows = static_cast<int>(M - m < NN_RB ? M - m : NN_RB);
        rows_nn_dispatch<NN_RB>(rows, A + m * a_rs, a_rs, a_ks, B, b_ks, K, C + m * c_rs, c_rs, 0, N, STREAM);
    }
}

// C[r, o] = sum_k A[r * a_rs + k] * Bt[o * bt_rs + k] for r < RB, o < OB.
template <int RB, int OB>
static inline void tile_nt(const float* A, int64_t a_rs, const float* Bt, int64_t bt_rs, int64_t K, float* C,
                           int64_t c_rs) {
    vec acc[RB][OB];
    UNROLL
    for (int r = 0; r < RB; ++r)
        UNROLL
        for (int o = 0; o < OB; ++o) acc[r][o] = vec{};
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vec b[OB];
        UNROLL
        for (int o = 0; o < OB; ++o) b[o] = load(Bt + o * bt_rs + k);
        UNROLL
        for (int r = 0; r < RB; ++r) {
            const vec a = load(A + r * a_rs + k);
            UNROLL
            for (int o = 0; o < OB; ++o) acc[r][o] += a * b[o];
        }
    }
    UNROLL
    for (int r = 0; r < RB; ++r)
        UNROLL
        for (int o = 0; o < OB; ++o) {
            float s = hsum(acc[r][o]);
            for (int64_t t = k; t < K; ++t) s += A[r * a_rs + t] * Bt[o * bt_rs + t];
            C[r * c_rs + o] = s;
        }
}

template <int RB, int OB>
static void tile_nt_dispatch(int rows, int outs, const float* A, int64_t a_rs, const float* Bt, int64_t bt_rs,
                             int64_t K, float* C, int64_t c_rs) {
    if constexpr (RB > 1) {
        if (rows < RB) return tile_nt_dispatch<RB - 1, OB>(rows, outs, A, a_rs, Bt, bt_rs, K, C, c_rs);
    }
    if constexpr (OB > 1) {
        if (outs < OB) return tile_nt_dispatch<RB, OB - 1>(rows, outs, A, a_rs, Bt, bt_rs, K, C, c_rs);
    }
    tile_nt<RB, OB>(A, a_rs, Bt, bt_rs, K, C, c_rs);
}

static void block_nt(int64_t M, const float* A, int64_t a_rs, const float* Bt, int64_t bt_rs, int64_t K, float* C,
                     int64_t c_rs, int64_t n0, int64_t n1) {
    for (int64_t o = n0; o < n1; o += NT_OB) {
        const int outs = static_cast<int>(n1 - o < NT_OB ? n1 - o : NT_OB);
        for (int64_t m = 0; m < M; m += NT_RB) {
            const int rows = static_cast<int>(M - m < NT_RB ? M - m : NT_RB);
            tile_nt_dispatch<NT_RB, NT_OB>(rows, outs, A + m * a_rs, a_rs, Bt + o * bt_rs, bt_rs, K,
                                           C + m * c_rs + o, c_rs);
        }
    }
}

// Column chunk of one task: wide enough to amortise a task, narrow enough to give every thread work.
constexpr int64_t CHUNK = 256;
// The forward's column chunk: whole weight rows (one task per expert) when there are experts enough to give every
// thread work; each task then reads its weight rows end to end, which the hardware prefetcher follows better than
// 1 KiB pieces of them (a sweep on a 2-core Intel Xeon, 64 experts of 1024 x 1024: 1.27x at 16 rows, 1.36x at 8);
// CHUNK columns otherwise.
static inline int64_t nn_chunk(int64_t E, int64_t N, int threads) { return E >= threads ? N : CHUNK; }

static inline int64_t start_of(const int64_t* ends, int64_t e) { return e == 0 ? 0 : ends[e - 1]; }

extern "C" {

void pr_grouped_nn(const float* x, int64_t ldx, const float* w, int64_t w_se, int64_t w_sk, float* out,
                   int64_t ldo, const int64_t* ends, int64_t E, int64_t K, int64_t N, int64_t max_rows,
                   int threads) {
    const int64_t chunk = nn_chunk(E, N, threads), chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t task = 0; task < E * chunks; ++task) {
        const int64_t e = task / chunks, c = task % chunks;
        const int64_t r0 = start_of(ends, e), M = ends[e] - r0;
        if (M == 0 || M > max_rows) continue;
        const int64_t n1 = (c + 1) * chunk < N ? (c + 1) * chunk : N;
        block_nn(M, x + r0 * ldx, ldx, 1, w + e * w_se, w_sk, K, out + r0 * ldo, ldo, c * chunk, n1);
    }
}

void pr_grouped_nt(const float* x, int64_t ldx, const float* wt, int64_t wt_se, int64_t wt_sn, float* out,
                   int64_t ldo, const int64_t* ends, int64_t E, int64_t K, int64_t N, int64_t max_rows,
                   int threads) {
    constexpr int64_t NT_CHUNK = 64;
    const int64_t chunks = (N + NT_CHUNK - 1) / NT_CHUNK;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t task = 0; task < E * chunks; ++task) {
        const int64_t e = task / chunks, c = task % chunks;
        const int64_t r0 = start_of(ends, e), M = ends[e] - r0;
        if (M == 0 || M > max_rows) continue;
        const int64_t n1 = (c + 1) * NT_CHUNK < N ? (c + 1) * NT_CHUNK : N;
        block_nt(M, x + r0 * ldx, ldx, wt + e * wt_se, wt_sn, K, out + r0 * ldo, ldo, c * NT_CHUNK, n1);
    }
}

void pr_grouped_wgrad(const float* a, int64_t lda, const float* b, int64_t ldb, float* out, const int64_t* ends,
                      int64_t E, int64_t K, int64_t N, int64_t max_rows, int threads) {
    // out[e] is [K, N]: its row k is sum over the expert's rows r of a[r, k] * b[r, :]. A task is a chunk of
    // out's rows (k), the expert's b rows stay in L1/L2 while the chunk is written once.
    const int64_t chunks = (K + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t task = 0; task < E * chunks; ++task) {
        const int64_t e = task / chunks, c = task % chunks;
        const int64_t r0 = start_of(ends, e), M = ends[e] - r0;
        if (M > max_rows) continue;
        const int64_t k0 = c * CHUNK, k1 = k0 + CHUNK < K ? k0 + CHUNK : K;
        float* dst = out + e * K * N + k0 * N;
        if (M == 0) {
            std::memset(dst, 0, sizeof(float) * (k1 - k0) * N);
            continue;
        }
        // As NN with A = aᵀ (row stride 1, inner stride lda), B = b (inner stride ldb), K = M rows.
        block_nn_rows(k1 - k0, a + r0 * lda + k0, 1, lda, b + r0 * ldb, ldb, M, dst, N, N);
        fence();  // the streaming stores are visible before the task ends
    }
}

}  // extern "C"
