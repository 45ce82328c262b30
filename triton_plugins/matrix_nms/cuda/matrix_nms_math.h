// Matrix NMS math shared by the CUDA kernels (matrix_nms_kernel.cu) and their host emulation
// (matrix_nms_host.cpp). Every function here is the body of one GPU thread (or one step of it), written as
// __host__ __device__ so that the host build runs exactly the code the GPU runs and can be tested against
// training/ops/matrix_nms.py without a GPU.
//
// Layout (all row-major, contiguous):
//   masks [B, N, P] float 0/1 (P = H * W), labels [B, N] int32, scores [B, N] float (sorted descending),
//   areas [B, N] float, decayedScores [B, N] float.
// Workspace: decayIou [B, N, N] float, then compensation [B, N] float.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FREESOLO_HD __host__ __device__ __forceinline__
#else
#define FREESOLO_HD inline
#endif

namespace freesolo
{

//! Clamp for the IoU union and the linear kernel's compensation denominator (training.ops.matrix_nms.EPS).
constexpr float kMatrixNmsEps = 1e-6F;

//! Default gaussian strength (training.ops.matrix_nms.DEFAULT_SIGMA; a test asserts they agree).
constexpr float kDefaultSigma = 2.0F;

//! Side of the square intersection tile: one thread block of kTile x kTile threads computes a tile of I = X X^T.
constexpr int32_t kTile = 16;

//! Threads per block of the per-mask kernels (compensation, decay).
constexpr int32_t kMaskThreads = 256;

enum MatrixNmsKernelType : int32_t
{
    kMatrixNmsGaussian = 0,
    kMatrixNmsLinear = 1,
};

struct MatrixNmsParams
{
    float const* masks;
    int32_t const* labels;
    float const* scores;
    float const* areas;
    float* decayIou;     //!< workspace [B, N, N]; only the upper triangle (i < j) is written and read
    float* compensation; //!< workspace [B, N]
    float* decayedScores;
    int32_t batch;
    int32_t n;
    int64_t pixels;
    int32_t kernel; //!< MatrixNmsKernelType
    float sigma;
};

//! Bytes of workspace for B images of N masks, rounded up to 256 so a caller can carve it after other buffers.
inline size_t matrixNmsWorkspaceSize(int64_t batch, int64_t n)
{
    size_t const floats = static_cast<size_t>(batch) * static_cast<size_t>(n) * (static_cast<size_t>(n) + 1);
    return (floats * sizeof(float) + 255) / 256 * 256;
}

//! Points the workspace pointers of `p` into `workspace` (decayIou first, then compensation).
inline void matrixNmsBindWorkspace(MatrixNmsParams& p, void* workspace)
{
    p.decayIou = static_cast<float*>(workspace);
    p.compensation = p.decayIou + static_cast<size_t>(p.batch) * p.n * p.n;
}

//! IoU of two masks from their intersection and areas; an empty union gives 0 (as the reference does).
FREESOLO_HD float matrixNmsIou(float intersection, float areaI, float areaJ)
{
    float const unionArea = areaI + areaJ - intersection;
    return unionArea > 0.F ? intersection / fmaxf(unionArea, kMatrixNmsEps) : 0.F;
}

//! Decay of mask j caused by a higher-scored same-label mask i: f(IoU_ij) / f(compensation_i).
//! gaussian: exp(-sigma * (iou^2 - comp^2)); linear: (1 - iou) / max(1 - comp, eps).
FREESOLO_HD float matrixNmsRatio(int32_t kernel, float sigma, float iou, float compensation)
{
    if (kernel == kMatrixNmsLinear)
    {
        return (1.F - iou) / fmaxf(1.F - compensation, kMatrixNmsEps);
    }
    return expf(-sigma * (iou * iou - compensation * compensation));
}

//! A tile of rows [rowTile * kTile, ...) and columns [colTile * kTile, ...) holds a pair i < j only when
//! rowTile <= colTile; the other tiles are skipped (their entries are never read).
FREESOLO_HD bool matrixNmsTileNeeded(int32_t rowTile, int32_t colTile)
{
    return rowTile <= colTile;
}

//! Intersection kernel, phase 1 (before the barrier): thread (ty, tx) stages pixel k0 + tx of row mask
//! rowBase + ty and of column mask colBase + ty. Consecutive tx read consecutive pixels (coalesced).
FREESOLO_HD void matrixNmsLoadTiles(MatrixNmsParams const& p, int32_t b, int32_t rowBase, int32_t colBase, int64_t k0,
    int32_t ty, int32_t tx, float (*rowsTile)[kTile + 1], float (*colsTile)[kTile + 1])
{
    int64_t const k = k0 + tx;
    int32_t const row = rowBase + ty;
    int32_t const col = colBase + ty;
    bool const inPixels = k < p.pixels;
    float const* image = p.masks + static_cast<int64_t>(b) * p.n * p.pixels;
    rowsTile[ty][tx] = (row < p.n && inPixels) ? image[static_cast<int64_t>(row) * p.pixels + k] : 0.F;
    colsTile[ty][tx] = (col < p.n && inPixels) ? image[static_cast<int64_t>(col) * p.pixels + k] : 0.F;
}

//! Intersection kernel, phase 2 (after the barrier): thread (ty, tx) adds the staged pixels' contribution to
//! I[rowBase + ty, colBase + tx]. The +1 padding keeps colsTile[tx][*] reads free of bank conflicts.
FREESOLO_HD float matrixNmsTileDot(
    float const (*rowsTile)[kTile + 1], float const (*colsTile)[kTile + 1], int32_t ty, int32_t tx)
{
    float sum = 0.F;
    for (int32_t kk = 0; kk < kTile; ++kk)
    {
        sum += rowsTile[ty][kk] * colsTile[tx][kk];
    }
    return sum;
}

//! Intersection kernel, epilogue: writes IoU_ij for i < j of the same label, 0 for every other pair.
FREESOLO_HD void matrixNmsStoreDecayIou(
    MatrixNmsParams const& p, int32_t b, int32_t rowBase, int32_t colBase, int32_t ty, int32_t tx, float intersection)
{
    int32_t const i = rowBase + ty;
    int32_t const j = colBase + tx;
    if (i >= p.n || j >= p.n)
    {
        return;
    }
    int64_t const offset = static_cast<int64_t>(b) * p.n;
    float value = 0.F;
    if (i < j && p.labels[offset + i] == p.labels[offset + j])
    {
        value = matrixNmsIou(intersection, p.areas[offset + i], p.areas[offset + j]);
    }
    p.decayIou[(offset + i) * p.n + j] = value;
}

//! Compensation kernel (one thread per mask i): max over k < i of decayIou[k, i] (0 for the top mask).
//! decayIou is 0 for pairs of different labels, so this is the max over same-label higher-scored masks.
FREESOLO_HD void matrixNmsCompensation(MatrixNmsParams const& p, int32_t b, int32_t i)
{
    int64_t const offset = static_cast<int64_t>(b) * p.n;
    float const* column = p.decayIou + offset * p.n + i;
    float compensation = 0.F;
    for (int32_t k = 0; k < i; ++k)
    {
        compensation = fmaxf(compensation, column[static_cast<int64_t>(k) * p.n]);
    }
    p.compensation[offset + i] = compensation;
}

//! Decay kernel (one thread per mask j): decay_j = min(1, min over same-label i < j of the kernel ratio);
//! writes scores_j * decay_j. Pairs the reference also visits (other labels, i >= j) give ratios >= 1 and the
//! row i = 0 always gives a ratio <= 1, so starting from 1 yields the reference's column minimum exactly.
FREESOLO_HD void matrixNmsDecay(MatrixNmsParams const& p, int32_t b, int32_t j)
{
    int64_t const offset = static_cast<int64_t>(b) * p.n;
    float const* column = p.decayIou + offset * p.n + j;
    int32_t const label = p.labels[offset + j];
    float decay = 1.F;
    for (int32_t i = 0; i < j; ++i)
    {
        if (p.labels[offset + i] != label)
        {
            continue;
        }
        float const ratio
            = matrixNmsRatio(p.kernel, p.sigma, column[static_cast<int64_t>(i) * p.n], p.compensation[offset + i]);
        decay = fminf(decay, ratio);
    }
    p.decayedScores[offset + j] = p.scores[offset + j] * decay;
}

} // namespace freesolo
