// TensorRT IPluginV3 wrapper of the Matrix NMS CUDA kernels (../cuda). Kept thin: shape and type plumbing
// only; all math is in matrix_nms_math.h, tested on the host against training/ops/matrix_nms.py.
#include "MatrixNMSPlugin.h"

#include "matrix_nms_kernel.h"

#include <cstring>
#include <exception>
#include <new>

namespace freesolo
{
namespace
{

constexpr char const* kPluginName = "MatrixNMS";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";
constexpr int32_t kNbInputs = 4;
constexpr int32_t kNbOutputs = 1;
enum InputIndex : int32_t
{
    kMasks = 0,
    kLabels = 1,
    kScores = 2,
    kAreas = 3,
};

//! -1 for an unknown kernel name, so that createPlugin can refuse it.
int32_t kernelTypeFromName(std::string const& name)
{
    if (name == "gaussian")
    {
        return kMatrixNmsGaussian;
    }
    if (name == "linear")
    {
        return kMatrixNmsLinear;
    }
    return -1;
}

//! Expected data type of input/output `pos` (inputs 0..3, then the output).
nvinfer1::DataType expectedType(int32_t pos)
{
    return pos == kLabels ? nvinfer1::DataType::kINT32 : nvinfer1::DataType::kFLOAT;
}

} // namespace

MatrixNMSPlugin::MatrixNMSPlugin(std::string kernel, float sigma)
    : mKernel(std::move(kernel))
    , mKernelType(kernelTypeFromName(mKernel))
    , mSigma(sigma)
{
    // kCHAR data is sent with its terminating NUL so that readers may treat it as a C string.
    mSerializedFields.emplace_back(
        "kernel", mKernel.c_str(), nvinfer1::PluginFieldType::kCHAR, static_cast<int32_t>(mKernel.size() + 1));
    mSerializedFields.emplace_back("sigma", &mSigma, nvinfer1::PluginFieldType::kFLOAT32, 1);
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
}

nvinfer1::IPluginCapability* MatrixNMSPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* MatrixNMSPlugin::clone() noexcept
{
    try
    {
        return new MatrixNMSPlugin(mKernel, mSigma);
    }
    catch (std::exception const&)
    {
        return nullptr;
    }
}

char const* MatrixNMSPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MatrixNMSPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MatrixNMSPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t MatrixNMSPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t MatrixNMSPlugin::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* /*inputTypes*/, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    outputTypes[0] = nvinfer1::DataType::kFLOAT;
    return 0;
}

int32_t MatrixNMSPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kMasks].nbDims != 4 || inputs[kScores].nbDims != 2)
    {
        return -1;
    }
    outputs[0] = inputs[kScores]; // decayed_scores has the shape of scores: [B, N]
    return 0;
}

bool MatrixNMSPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    return desc.format == nvinfer1::TensorFormat::kLINEAR && desc.type == expectedType(pos);
}

int32_t MatrixNMSPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[kMasks].desc.dims.nbDims != 4)
    {
        return -1;
    }
    for (int32_t i = kLabels; i <= kAreas; ++i)
    {
        if (in[i].desc.dims.nbDims != 2)
        {
            return -1;
        }
    }
    return mKernelType < 0 ? -1 : 0;
}

size_t MatrixNMSPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNbInputs || inputs[kMasks].max.nbDims != 4)
    {
        return 0;
    }
    return matrixNmsWorkspaceSize(inputs[kMasks].max.d[0], inputs[kMasks].max.d[1]);
}

int32_t MatrixNMSPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[kMasks].dims.nbDims != 4)
    {
        return -1;
    }
    for (int32_t i = kLabels; i <= kAreas; ++i)
    {
        if (in[i].dims.nbDims != 2 || in[i].dims.d[0] != in[kMasks].dims.d[0]
            || in[i].dims.d[1] != in[kMasks].dims.d[1])
        {
            return -1;
        }
    }
    return 0;
}

int32_t MatrixNMSPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& masks = inputDesc[kMasks].dims;
    MatrixNmsParams p{};
    p.masks = static_cast<float const*>(inputs[kMasks]);
    p.labels = static_cast<int32_t const*>(inputs[kLabels]);
    p.scores = static_cast<float const*>(inputs[kScores]);
    p.areas = static_cast<float const*>(inputs[kAreas]);
    p.decayedScores = static_cast<float*>(outputs[0]);
    p.batch = static_cast<int32_t>(masks.d[0]);
    p.n = static_cast<int32_t>(masks.d[1]);
    p.pixels = static_cast<int64_t>(masks.d[2]) * static_cast<int64_t>(masks.d[3]);
    p.kernel = mKernelType;
    p.sigma = mSigma;
    if (p.batch == 0 || p.n == 0)
    {
        return 0;
    }
    matrixNmsBindWorkspace(p, workspace);
    return matrixNmsLaunch(p, stream) == cudaSuccess ? 0 : -1;
}

nvinfer1::IPluginV3* MatrixNMSPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

nvinfer1::PluginFieldCollection const* MatrixNMSPlugin::getFieldsToSerialize() noexcept
{
    return &mSerializedCollection;
}

MatrixNMSPluginCreator::MatrixNMSPluginCreator()
{
    mFieldNames.emplace_back("kernel", nullptr, nvinfer1::PluginFieldType::kCHAR, 0);
    mFieldNames.emplace_back("sigma", nullptr, nvinfer1::PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* MatrixNMSPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* MatrixNMSPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* MatrixNMSPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

nvinfer1::PluginFieldCollection const* MatrixNMSPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* MatrixNMSPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::string kernel = "gaussian";
        float sigma = kDefaultSigma;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            nvinfer1::PluginField const& field = fc->fields[i];
            if (field.name == nullptr || field.data == nullptr)
            {
                continue;
            }
            if (std::strcmp(field.name, "kernel") == 0 && field.type == nvinfer1::PluginFieldType::kCHAR)
            {
                // The ONNX parser appends a NUL to string attributes, the Python API does not: accept both.
                char const* text = static_cast<char const*>(field.data);
                kernel.assign(text, strnlen(text, static_cast<size_t>(field.length)));
            }
            else if (std::strcmp(field.name, "sigma") == 0 && field.type == nvinfer1::PluginFieldType::kFLOAT32)
            {
                sigma = *static_cast<float const*>(field.data);
            }
            else if (std::strcmp(field.name, "sigma") == 0 && field.type == nvinfer1::PluginFieldType::kFLOAT64)
            {
                sigma = static_cast<float>(*static_cast<double const*>(field.data));
            }
        }
        if (kernelTypeFromName(kernel) < 0)
        {
            return nullptr; // unknown kernel name: refuse rather than guess
        }
        return new MatrixNMSPlugin(kernel, sigma);
    }
    catch (std::exception const&)
    {
        return nullptr;
    }
}

REGISTER_TENSORRT_PLUGIN(MatrixNMSPluginCreator);

} // namespace freesolo
