// Host build of the Matrix NMS CUDA kernels: runs the thread bodies of matrix_nms_math.h block by block and
// thread by thread, with the barrier of decayIouKernel emulated by finishing each phase for all threads of the
// block before the next. Compiled into a small shared library (g++ -shared -fPIC) that the tests load with
// ctypes and compare to training/ops/matrix_nms.py; it is not part of the TensorRT plugin.
#include "matrix_nms_math.h"

#include <vector>

namespace
{

using namespace freesolo;

void emulateDecayIouKernel(MatrixNmsParams const& p)
{
    int32_t const tiles = (p.n + kTile - 1) / kTile;
    float rowsTile[kTile][kTile + 1];
    float colsTile[kTile][kTile + 1];
    float intersection[kTile][kTile];
    for (int32_t b = 0; b < p.batch; ++b)
    {
        for (int32_t rowTile = 0; rowTile < tiles; ++rowTile)
        {
            for (int32_t colTile = 0; colTile < tiles; ++colTile)
            {
                if (!matrixNmsTileNeeded(rowTile, colTile))
                {
                    continue;
                }
                int32_t const rowBase = rowTile * kTile;
                int32_t const colBase = colTile * kTile;
                for (auto& row : intersection)
                {
                    for (float& value : row)
                    {
                        value = 0.F;
                    }
                }
                for (int64_t k0 = 0; k0 < p.pixels; k0 += kTile)
                {
                    for (int32_t ty = 0; ty < kTile; ++ty)
                    {
                        for (int32_t tx = 0; tx < kTile; ++tx)
                        {
                            matrixNmsLoadTiles(p, b, rowBase, colBase, k0, ty, tx, rowsTile, colsTile);
                        }
                    }
                    for (int32_t ty = 0; ty < kTile; ++ty)
                    {
                        for (int32_t tx = 0; tx < kTile; ++tx)
                        {
                            intersection[ty][tx] += matrixNmsTileDot(rowsTile, colsTile, ty, tx);
                        }
                    }
                }
                for (int32_t ty = 0; ty < kTile; ++ty)
                {
                    for (int32_t tx = 0; tx < kTile; ++tx)
                    {
                        matrixNmsStoreDecayIou(p, b, rowBase, colBase, ty, tx, intersection[ty][tx]);
                    }
                }
            }
        }
    }
}

} // namespace

//! Decayed scores of B images of N masks (see matrix_nms_math.h for the layout); kernel 0 = gaussian,
//! 1 = linear. Returns 0 on success, 1 on invalid arguments.
extern "C" int freesolo_matrix_nms_host(float const* masks, int32_t const* labels, float const* scores,
    float const* areas, float* decayedScores, int32_t batch, int32_t n, int64_t pixels, int32_t kernel, float sigma)
{
    if (batch < 0 || n < 0 || pixels < 0 || (kernel != kMatrixNmsGaussian && kernel != kMatrixNmsLinear))
    {
        return 1;
    }
    if (batch == 0 || n == 0)
    {
        return 0;
    }
    std::vector<float> workspace(matrixNmsWorkspaceSize(batch, n) / sizeof(float));
    MatrixNmsParams p{masks, labels, scores, areas, nullptr, nullptr, decayedScores, batch, n, pixels, kernel, sigma};
    matrixNmsBindWorkspace(p, workspace.data());
    emulateDecayIouKernel(p);
    for (int32_t b = 0; b < batch; ++b)
    {
        for (int32_t i = 0; i < n; ++i)
        {
            matrixNmsCompensation(p, b, i);
        }
    }
    for (int32_t b = 0; b < batch; ++b)
    {
        for (int32_t j = 0; j < n; ++j)
        {
            matrixNmsDecay(p, b, j);
        }
    }
    return 0;
}
