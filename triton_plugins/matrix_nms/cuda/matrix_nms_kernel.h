// Launch API of the Matrix NMS CUDA kernels, used by the TensorRT plugin (plugin/MatrixNMSPlugin.cpp).
// The math lives in matrix_nms_math.h; matrix_nms_host.cpp runs the same thread bodies on the CPU for tests.
#pragma once

#include "matrix_nms_math.h"

#include <cuda_runtime_api.h>

namespace freesolo
{

//! Enqueues the three kernels (pairwise IoU tiles, compensation, decay) on `stream`.
//! `p.decayIou` and `p.compensation` must point into a workspace of matrixNmsWorkspaceSize(batch, n) bytes
//! (see matrixNmsBindWorkspace). Returns the launch status; B = 0 or N = 0 launches nothing.
cudaError_t matrixNmsLaunch(MatrixNmsParams const& p, cudaStream_t stream);

} // namespace freesolo
