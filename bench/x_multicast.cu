// What a decode projection's first step costs: every program copying the whole activation x (W's 64 rows x 896
// bf16 = 112 KiB, L2-resident) into its shared memory, alone or shared across a thread-block cluster by TMA multicast
// (each CTA of the cluster fetches 1/C of x and the copy lands in all C). Built and run by bench/x_multicast.py; the
// figures are in bench/RESULTS.md. Each configuration: a CUDA graph of LAUNCHES stream-ordered launches, replayed,
// µs per launch (the fastest replay); "empty" is the same launch without the copy.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (x);                                                             \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "x_multicast: %s: %s\n", #x, cudaGetErrorString(e_));         \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

constexpr int LAUNCHES = 200;
constexpr int CHUNK = 16384;  // one 64 x 128 bf16 TMA tile, as the projections load x

__device__ __forceinline__ unsigned smem(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// mode 0: no copy; 1: this CTA copies every chunk; 2: this CTA copies its 1/C of the chunks, into itself only
// (1/C of the bytes, as if the others came for free); 3: its 1/C of the chunks, multicast to the whole cluster;
// 4: mode 3's two cluster-wide barriers without a copy (what multicast's set-up and tear-down cost)
__global__ void load_x(const char* __restrict__ x, int bytes, int mode, int* out) {
    extern __shared__ __align__(128) char buf[];
    __shared__ __align__(8) unsigned long long bar;
    const int csize = mode >= 2 ? (int)cg::this_cluster().num_blocks() : 1;
    const int rank = mode >= 2 ? (int)cg::this_cluster().block_rank() : 0;
    const int nchunks = bytes / CHUNK;
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem(&bar)));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (mode >= 3) {
        cg::this_cluster().sync();  // every CTA's barrier exists before any copy can signal it
    } else {
        __syncthreads();
    }
    if (mode != 0 && mode != 4 && threadIdx.x == 0) {
        const int mine = mode == 1 ? nchunks : (nchunks - rank + csize - 1) / csize;
        const int expect = mode == 3 ? bytes : mine * CHUNK;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(&bar)), "r"(expect)
                     : "memory");
        const unsigned short mask = (unsigned short)((1u << csize) - 1);
        for (int c = (mode == 1 ? 0 : rank); c < nchunks; c += (mode == 1 ? 1 : csize)) {
            const unsigned dst = smem(buf + c * CHUNK);
            const char* src = x + (size_t)c * CHUNK;
            if (mode == 3) {
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                    " [%0], [%1], %2, [%3], %4;" ::"r"(dst),
                    "l"(src), "r"(CHUNK), "r"(smem(&bar)), "h"(mask)
                    : "memory");
            } else {
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                        dst),
                    "l"(src), "r"(CHUNK), "r"(smem(&bar))
                    : "memory");
            }
        }
    }
    if (mode != 0 && mode != 4) {
        unsigned done = 0;
        while (!done) {
            asm volatile(
                "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                : "=r"(done)
                : "r"(smem(&bar))
                : "memory");
        }
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[(blockIdx.x * 4096 + 64) % bytes];
    if (mode >= 3) cg::this_cluster().sync();  // no CTA leaves while a copy it issued may still land elsewhere
}

static float time_config(const char* x, int* out, int ctas, int cluster, int bytes, int mode, cudaStream_t s) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(128);
    cfg.dynamicSmemBytes = bytes;
    cfg.stream = s;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < LAUNCHES; ++i) CHECK(cudaLaunchKernelEx(&cfg, load_x, x, bytes, mode, out));
    CHECK(cudaStreamEndCapture(s, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    float best = 1e30f;
    for (int r = 0; r < 7; ++r) {
        CHECK(cudaEventRecord(a, s));
        CHECK(cudaGraphLaunch(exec, s));
        CHECK(cudaEventRecord(b, s));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (r > 0 && ms < best) best = ms;
    }
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    return best * 1000.0f / LAUNCHES;
}

// x is all 0x01 bytes: a CTA whose shared memory did not receive x (from its own copy or another CTA's multicast)
// reads something else
static void check_every_cta_read_x(const int* out, int ctas) {
    static int host[4096];
    CHECK(cudaMemcpy(host, out, ctas * sizeof(int), cudaMemcpyDeviceToHost));
    for (int i = 0; i < ctas; ++i) {
        if (host[i] != 1) {
            fprintf(stderr, "x_multicast: CTA %d did not receive x (read %d, expected 1)\n", i, host[i]);
            exit(1);
        }
    }
}

int main(int argc, char** argv) {
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        printf("usage: x_multicast [CTAS ...]  (default 36 132): µs per launch for each CTA count\n");
        return 0;
    }
    int counts[16] = {36, 132};
    int n = 2;
    if (argc > 1) {
        n = 0;
        for (int i = 1; i < argc && n < 16; ++i) counts[n++] = atoi(argv[i]);
        for (int i = 0; i < n; ++i) {
            if (counts[i] < 4 || counts[i] > 4096 || counts[i] % 4) {
                fprintf(stderr, "x_multicast: CTA counts are multiples of 4 from 4 to 4096, not %d\n", counts[i]);
                return 2;
            }
        }
    }
    const int bytes = 7 * CHUNK;  // 64 x 896 bf16
    char* x;
    int* out;
    CHECK(cudaMalloc(&x, bytes));
    CHECK(cudaMemset(x, 1, bytes));
    CHECK(cudaMalloc(&out, 4096 * sizeof(int)));
    CHECK(cudaFuncSetAttribute(load_x, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    CHECK(cudaFuncSetAttribute(load_x, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("ctas cluster mode us_per_launch\n");
    const char* names[] = {"empty", "whole", "share_only", "multicast", "syncs_only"};
    for (int i = 0; i < n; ++i) {
        const int ctas = counts[i];
        for (int cluster : {1, 2, 4}) {
            if (ctas % cluster) continue;
            for (int mode = 0; mode < 5; ++mode) {
                if (cluster == 1 && mode >= 2) continue;
                if (cluster > 1 && mode == 1) continue;
                const float us = time_config(x, out, ctas, cluster, bytes, mode, s);
                printf("%d %d %s %.3f\n", ctas, cluster, names[mode], us);
                fflush(stdout);
                if (mode == 1 || mode == 3) check_every_cta_read_x(out, ctas);
            }
        }
    }
    return 0;
}
