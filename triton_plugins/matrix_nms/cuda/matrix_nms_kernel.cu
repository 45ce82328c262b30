// Matrix NMS on the GPU: three small kernels over the math of matrix_nms_math.h.
//   1. decayIouKernel: I = X X^T by 16 x 16 shared-memory tiles (upper-triangle tiles only), then IoU of
//      same-label pairs i < j into the workspace.
//   2. compensationKernel: per mask i, the max of column i (how much i itself was overlapped).
//   3. decayKernel: per mask j, min over rows of the kernel ratio, times the score.
#include "matrix_nms_kernel.h"

namespace freesolo
{
namespace
{

__global__ void decayIouKernel(MatrixNmsParams p)
{
    int32_t const colTile = static_cast<int32_t>(blockIdx.x);
    int32_t const rowTile = static_cast<int32_t>(blockIdx.y);
    int32_t const b = static_cast<int32_t>(blockIdx.z);
    if (!matrixNmsTileNeeded(rowTile, colTile))
    {
        return; // the whole block leaves before any barrier
    }
    __shared__ float rowsTile[kTile][kTile + 1];
    __shared__ float colsTile[kTile][kTile + 1];
    int32_t const ty = static_cast<int32_t>(threadIdx.y);
    int32_t const tx = static_cast<int32_t>(threadIdx.x);
    int32_t const rowBase = rowTile * kTile;
    int32_t const colBase = colTile * kTile;
    float intersection = 0.F;
    for (int64_t k0 = 0; k0 < p.pixels; k0 += kTile)
    {
        matrixNmsLoadTiles(p, b, rowBase, colBase, k0, ty, tx, rowsTile, colsTile);
        __syncthreads();
        intersection += matrixNmsTileDot(rowsTile, colsTile, ty, tx);
        __syncthreads();
    }
    matrixNmsStoreDecayIou(p, b, rowBase, colBase, ty, tx, intersection);
}

__global__ void compensationKernel(MatrixNmsParams p)
{
    int32_t const i = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < p.n)
    {
        matrixNmsCompensation(p, static_cast<int32_t>(blockIdx.y), i);
    }
}

__global__ void decayKernel(MatrixNmsParams p)
{
    int32_t const j = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
    if (j < p.n)
    {
        matrixNmsDecay(p, static_cast<int32_t>(blockIdx.y), j);
    }
}

} // namespace

cudaError_t matrixNmsLaunch(MatrixNmsParams const& p, cudaStream_t stream)
{
    if (p.batch <= 0 || p.n <= 0)
    {
        return cudaSuccess;
    }
    unsigned const tiles = static_cast<unsigned>((p.n + kTile - 1) / kTile);
    unsigned const batch = static_cast<unsigned>(p.batch);
    decayIouKernel<<<dim3(tiles, tiles, batch), dim3(kTile, kTile), 0, stream>>>(p);
    unsigned const maskBlocks = static_cast<unsigned>((p.n + kMaskThreads - 1) / kMaskThreads);
    compensationKernel<<<dim3(maskBlocks, batch), dim3(kMaskThreads), 0, stream>>>(p);
    decayKernel<<<dim3(maskBlocks, batch), dim3(kMaskThreads), 0, stream>>>(p);
    return cudaGetLastError();
}

} // namespace freesolo
