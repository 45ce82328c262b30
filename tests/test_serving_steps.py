"""The python models' logic without a server: guarded decoding (the one decoder, shared with ``read_rgb``), the
torch-free test resize (same pixels as torch's), original-size detections, and per-request errors (a stand-in for
Triton's ``triton_python_backend_utils``)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from export.onnx_inputs import check_image_sizes
from serving.contract import MAX_IMAGE_BYTES
from serving.detections import OutputError, image_outputs
from serving.imaging import ImageError, decode_image
from serving.python_models import RequestError, respond_each
from training.data.images import read_rgb
from training.data.transforms import to_tensor_image
from training.errors import UserError
from training.geometry import ImageGeometry, InputPolicy, prepare_image, resize_rgb
from training.results import masks_to_original


def encode(image: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, image_format)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header, CRC fixed)."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start : start + 17])))
    return bytes(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): [H, W] uint16 grey or [H, W, 3] uint16 RGB."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    scanlines = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(scanlines)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize("size", [(128, 128), (85, 128), (200, 300), (13, 7), (600, 517)])
def test_resize_gives_torchs_pixels(size: tuple[int, int]) -> None:
    for image in (skimage.data.astronaut(), skimage.data.coffee()):
        ours = resize_rgb(image, size).astype(int)
        tensor = to_tensor_image(image)[None].float()
        resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
        torch_pixels = resized[0].round().clamp(0, 255).permute(1, 2, 0).numpy().astype(int)
        difference = np.abs(ours - torch_pixels)
        assert difference.max() <= 1 and (difference > 0).mean() < 5e-3  # float rounding at .5 only


def test_prepare_fits_pads_and_records_geometry() -> None:
    image = skimage.data.coffee()  # 400 x 600 -> 128 x 192 by the test resize -> 85 x 128 to fit 128 x 128
    padded, geometry = prepare_image(image, InputPolicy(128, 128, False, 128, 224))
    assert padded.shape == (3, 128, 128) and padded.dtype == np.uint8
    assert geometry == ImageGeometry(400, 600, 85, 128)
    assert not padded[:, 85:].any() and padded[:, :85].any()


def test_decode_reads_png_jpeg_and_grey_as_rgb() -> None:
    photo = skimage.data.chelsea()
    assert np.array_equal(decode_image(encode(photo)), photo)
    assert decode_image(encode(photo, "JPEG")).shape == photo.shape
    assert decode_image(encode(skimage.data.camera())).shape == (*skimage.data.camera().shape, 3)


def test_16bit_png_keeps_its_high_byte_in_serving_and_predict(tmp_path: Path) -> None:
    """A 16-bit PNG is scaled to 8 bits (value >> 8), not saturated (PIL's convert("RGB") made every value above
    255 white); greyscale and RGB alike, served bytes and files alike."""
    ramp = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 40_000)], axis=-1)
    for samples in (ramp, rgb):
        data = png_16bit(samples)
        high = (samples >> 8).astype(np.uint8)
        expected = high if high.ndim == 3 else np.repeat(high[..., None], 3, axis=2)
        served = decode_image(data)
        (tmp_path / "deep.png").write_bytes(data)
        assert np.array_equal(served, expected) and np.array_equal(read_rgb(tmp_path / "deep.png"), expected)
    grey_as_pil_saves_it = io.BytesIO()
    Image.fromarray(ramp).save(grey_as_pil_saves_it, "PNG")  # PIL's own 16-bit greyscale writer (mode I;16)
    assert np.array_equal(decode_image(grey_as_pil_saves_it.getvalue())[..., 0], (ramp >> 8).astype(np.uint8))


def test_mpo_is_read_as_its_first_frame_by_serving_and_predict(tmp_path: Path) -> None:
    """An MPO (a camera's JPEG with more frames after it) is a JPEG to both entry points: its first frame."""
    first, second = skimage.data.astronaut()[:96, :128], 255 - skimage.data.astronaut()[:96, :128]
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, "MPO", save_all=True, append_images=[Image.fromarray(second)])
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as mpo:
        assert mpo.format == "MPO" and mpo.n_frames == 2
    frame = decode_image(data)
    (tmp_path / "camera.jpg").write_bytes(data)
    assert np.array_equal(read_rgb(tmp_path / "camera.jpg"), frame)
    first_jpeg = io.BytesIO()
    Image.fromarray(first).save(first_jpeg, "JPEG")  # the first frame alone, encoded as the MPO encodes it
    assert np.array_equal(frame, decode_image(first_jpeg.getvalue()))
    assert np.abs(frame.astype(int) - first).mean() < np.abs(frame.astype(int) - second).mean() / 10


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"not an image at all", "not a JPEG or PNG image"),
        (encode(skimage.data.astronaut())[:4000], "truncated"),
        (png_claiming(30_000, 30_000), "more than 40000000 pixels"),
        (png_claiming(10_000, 8_000), "more than 40000000 pixels"),
        (png_claiming(20_000, 10), "each side must be 1 to 16384"),
        (encode(np.zeros((8, 8, 3), np.uint8), "GIF"), "unsupported image format GIF"),
        (b"\x89PNG" + bytes(MAX_IMAGE_BYTES), "more than the limit"),
    ],
)
def test_bad_bytes_raise_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def contract_outputs(k: int = 5) -> dict[str, Any]:
    """Stride-4 masks of a 128 x 128 input: det 0 a block, det 1 empty, det 2 a single cell (vanishes when shrunk)."""
    masks = np.zeros((k, 32, 32), np.uint8)
    masks[0, 4:12, 8:20] = 1
    masks[2, 30, 30] = 1
    scores = np.array([0.9, 0.8, 0.7, 0, 0], np.float32)
    labels = np.array([2, 1, 3, 0, 0], np.int32)
    return {"num_dets": 3, "scores": scores, "labels": labels, "masks": masks}


def test_detections_at_original_size_drop_empty_masks() -> None:
    out = contract_outputs()
    geometry = np.array([200, 300, 64, 96], np.int32)  # the image was shrunk to 64 x 96 of the 128 x 128 input
    result = image_outputs(out["num_dets"], out["scores"], out["labels"], out["masks"], geometry)
    assert result["num_dets"].tolist() == [1] and result["image_size"].tolist() == [200, 300]
    assert result["scores"][0] == pytest.approx(0.9) and result["labels"][0] == 2 and not result["scores"][1:].any()
    assert list(result["masks_rle"][1:]) == [b""] * 4 and not result["boxes"][1:].any()
    decoded = mask_utils.decode({"size": [200, 300], "counts": result["masks_rle"][0]})
    expected = masks_to_original(out["masks"][:1], ImageGeometry(200, 300, 64, 96))[0]
    assert np.array_equal(decoded.astype(bool), expected)
    rows, cols = np.nonzero(expected)
    assert result["boxes"][0].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]  # the mask's box


def test_detections_refuse_inconsistent_outputs() -> None:
    out = contract_outputs()
    with pytest.raises(OutputError, match="disagree"):
        image_outputs(3, out["scores"], out["labels"][:4], out["masks"], np.array([8, 8, 8, 8]))
    with pytest.raises(OutputError, match="does not fit"):
        image_outputs(3, out["scores"], out["labels"], out["masks"], np.array([8, 8, 200, 8]))


class FakeTritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        self.message, self.code = message, code


def fake_pb() -> SimpleNamespace:
    """The parts of triton_python_backend_utils the models use."""
    return SimpleNamespace(
        TritonError=FakeTritonError,
        InferenceResponse=lambda output_tensors, error=None: SimpleNamespace(outputs=output_tensors, error=error),
        Tensor=lambda name, array: (name, array),
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )


def test_each_request_gets_its_own_answer_or_error() -> None:
    def handle(request: dict[str, Any]) -> dict[str, np.ndarray]:
        if request["kind"] == "bad":
            raise RequestError("image 1 of 2: empty image (0 bytes)")
        if request["kind"] == "bug":
            raise KeyError("oops")
        return {"num_dets": np.array([[1]], np.int32)}

    requests = [{"kind": "ok"}, {"kind": "bad"}, {"kind": "bug"}, {"kind": "ok"}]
    responses = respond_each(fake_pb(), "preprocess", requests, handle)
    assert [r.error is None for r in responses] == [True, False, False, True]
    assert responses[1].error.code == "INVALID_ARG"
    assert responses[1].error.message == "preprocess: image 1 of 2: empty image (0 bytes)"
    assert responses[2].error.code == "INTERNAL" and "KeyError" in responses[2].error.message
    assert responses[0].outputs[0][0] == "num_dets"


def test_image_sizes_must_lie_inside_their_canvas() -> None:
    """The model step's (and every runtime's) check of a ``pad_normalized`` model's ``image_sizes``: integers
    [B, 2], each height 1 to H and width 1 to W of the images' canvas; anything else is one clear error."""
    images = np.zeros((2, 3, 64, 96), np.uint8)
    sizes = check_image_sizes(np.array([[64, 96], [1, 50]], np.int64), images)
    assert sizes.dtype == np.int32 and sizes.tolist() == [[64, 96], [1, 50]]
    for bad in ([[65, 96], [10, 10]], [[10, 10], [10, 97]], [[0, 5], [10, 10]], [[10, 10]], [[10.0, 10.0]] * 2):
        with pytest.raises(UserError, match="image_sizes") as error:
            check_image_sizes(np.array(bad), images)
        assert "\n" not in str(error.value)
