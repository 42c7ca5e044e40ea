"""Training image crops at the cost of the crop, not of the file (``data.image_decode``).

A library's training transform that begins with torchvision's ``RandomResizedCrop`` (open_clip's
does) draws its crop box from the image's size alone, so the box can be drawn from the JPEG's
header before anything is decoded. Three modes:

- ``exact``: the library's transform on the fully decoded image (PIL), as it is.
- ``fast`` (default): the same box from the same random draws (the crops' scale/aspect distribution
  is the library's, draw for draw), then libjpeg-turbo's DCT scaling (simplejpeg) decodes the JPEG at
  the smallest of its 1/8, 1/4, 1/2, 1 scales at which the box still covers at least the output size,
  and one antialiased resample with the transform's interpolation maps the box to the output: torch's
  uint8 kernels straight to the ``uint8 [3, H, W]`` tensor when the transform's later steps only make
  that tensor (open_clip's, timm's, as the towers use them), else PIL. Pixels differ from ``exact`` by
  the reduced decode, the box's edges rounded to the reduced grid and filtering at the box's edge
  (README, NOTES.md). Non-JPEG files and CMYK JPEGs decode with PIL at full size, then take the same
  single resample.
- ``gpu``: the worker draws the box and sends the JPEG's bytes (:class:`EncodedImage`); the batch is
  decoded on its device by ``torchvision.io.decode_jpeg`` (nvJPEG), cropped and resized there
  (:func:`decode_on_device`). Rows that are not plain JPEGs are cropped in the worker as in ``fast``.
  Without CUDA it falls back to ``fast`` with a message (:func:`resolve_mode`).

A transform that does not begin with ``RandomResizedCrop`` (timm's, evaluation's resize + centre
crop) is left as it is in every mode.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

MODES = ("exact", "fast", "gpu")
#: what ``gpu`` allows after the crop: conversions to RGB and to a uint8 tensor (open_clip's, timm's)
_DEVICE_SAFE_STEPS = {"MaybeConvertMode", "_convert_to_rgb", "MaybePILToTensor", "PILToTensor"}
_TO_TENSOR_STEPS = {"MaybePILToTensor", "PILToTensor"}
_JPEG_MAGIC = b"\xff\xd8"
_DCT_COLORSPACES = {"Gray", "YCbCr", "RGB"}  # what libjpeg-turbo turns into RGB (not CMYK/YCCK)


def resolve_mode(mode: str | None, cuda: bool | None = None) -> str:
    """``mode`` checked; ``gpu`` without CUDA becomes ``fast``, with a warning saying so."""
    mode = mode or "fast"
    if mode not in MODES:
        raise ValueError(f"data.image_decode must be one of {', '.join(MODES)}, not '{mode}'")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mode == "gpu" and not cuda:
        warnings.warn(
            "data.image_decode=gpu: CUDA is not available, so images are decoded in the data workers "
            "instead (data.image_decode=fast)",
            stacklevel=2,
        )
        return "fast"
    return mode


def training_image_transform(transform: Callable[[Any], Any], mode: str) -> Callable[[Any], Any]:
    """``transform`` (a training image transform) for ``mode`` (see the module docstring): unchanged
    for ``exact`` or when it does not begin with torchvision's ``RandomResizedCrop``."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if mode == "exact" or not steps or type(steps[0]) is not T.RandomResizedCrop:
        return transform
    crop, rest = steps[0], steps[1:]
    if mode == "fast":
        return FastResizedCrop(crop, T.Compose(rest) if rest else None)
    unsafe = [type(s).__name__ for s in rest if type(s).__name__ not in _DEVICE_SAFE_STEPS]
    if unsafe:
        raise ValueError(
            f"data.image_decode=gpu crops and resizes on the device, but this image transform also runs "
            f"{', '.join(unsafe)} after its crop: use data.image_decode=fast for it"
        )
    return DeviceResizedCrop(crop)


def _crop_box(crop: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``: the library's own draw (same calls on the same RNG) for this size."""
    size = torch.empty((1, 1, 1)).expand(1, height, width)  # what get_params reads: a size, no pixels
    return crop.get_params(size, crop.scale, crop.ratio)


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG libjpeg-turbo can decode to RGB, else None."""
    import simplejpeg

    if not data.startswith(_JPEG_MAGIC):
        return None
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    return (height, width) if colorspace in _DCT_COLORSPACES else None


def _resample(crop: Any) -> int:
    from torchvision.transforms import functional as F

    return F.pil_modes_mapping[crop.interpolation]


def _dct_scale(box_h: int, box_w: int, out_h: int, out_w: int) -> int:
    """The denominator d of the DCT scale 1/d (1, 2, 4 or 8) to decode at: the smallest scale at which
    the box still covers at least the output size. Only these scales: libjpeg-turbo has SIMD inverse
    DCTs for them, while its other n/8 scales decode slower than the full size (benchmarks/NOTES.md)."""
    for d in (8, 4, 2):
        if box_h >= out_h * d and box_w >= out_w * d:
            return d
    return 1


def decoded_box(
    data: bytes | Image.Image, crop: Any, box: tuple[int, int, int, int] | None = None
) -> tuple[Any, tuple[int, int, int, int]]:
    """``(pixels, (top, left, h, w))``: the image decoded for ``crop`` (an ``H x W x 3`` uint8 array
    from libjpeg-turbo, at the DCT scale of :func:`_dct_scale`, for a JPEG it can decode to RGB;
    else the RGB PIL image at full size) and the box drawn by ``crop`` (or ``box``) on that grid.
    At a reduced scale 1/d the box's edges are rounded to the nearest decoded pixel (less than one
    pixel at 1/d); it still covers at least the output size."""
    out_h, out_w = crop.size
    header = _jpeg_header(data) if isinstance(data, bytes) else None
    if header is None:
        img = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
        img.load()  # truncated files fail here (a counted skip)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img, box or _crop_box(crop, img.height, img.width)
    import simplejpeg

    height, width = header
    top, left, h, w = box or _crop_box(crop, height, width)
    d = _dct_scale(h, w, out_h, out_w)
    if d == 1:
        return simplejpeg.decode_jpeg(data, colorspace="RGB"), (top, left, h, w)
    min_h, min_w = -(-height // d), -(-width // d)  # the 1/d decode's size (libjpeg rounds up)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w)
    y0, y1 = (top + d // 2) // d, (top + h + d // 2) // d  # each edge: floor(edge / d + 1/2)
    x0, x1 = (left + d // 2) // d, (left + w + d // 2) // d
    return pixels, (y0, x0, y1 - y0, x1 - x0)


def fast_crop(
    data: bytes | Image.Image, crop: Any, box: tuple[int, int, int, int] | None = None
) -> Image.Image:
    """``crop``'s output as an RGB PIL image for ``data`` (encoded bytes or an image): the box drawn by
    ``crop`` (or ``box``), the decode of :func:`decoded_box`, one PIL resample (the crop's
    interpolation). For a transform whose later steps need a PIL image; see :func:`fast_crop_tensor`."""
    out_h, out_w = crop.size
    img, (top, left, h, w) = decoded_box(data, crop, box)
    if not isinstance(img, Image.Image):
        img = Image.fromarray(img)
    return img.resize((out_w, out_h), _resample(crop), box=(left, top, left + w, top + h))


#: interpolations torch resizes uint8 images in natively (antialiased, PIL's filters); others use PIL
_TORCH_MODES = {"bilinear", "bicubic"}


def fast_crop_tensor(
    data: bytes | Image.Image, crop: Any, box: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """``crop``'s output as a ``uint8 [3, H, W]`` tensor (channels-last strides, as torchvision's
    ``pil_to_tensor`` gives): the decode of :func:`decoded_box`, the box copied out, one antialiased
    resample by torch's uint8 kernels (PIL's bilinear/bicubic filters, within 2 grey levels of PIL's
    own resample; several times faster). Other interpolations: :func:`fast_crop`, then to a tensor."""
    import numpy as np

    mode = getattr(crop.interpolation, "value", None)
    if mode not in _TORCH_MODES:
        from torchvision.transforms import functional as F

        return F.pil_to_tensor(fast_crop(data, crop, box))
    img, (top, left, h, w) = decoded_box(data, crop, box)
    pixels = np.asarray(img)[top : top + h, left : left + w]
    if not (pixels.flags.c_contiguous and pixels.flags.writeable):
        # a dense channels-last copy of the box: torch's kernel reads it directly (a strided view costs more)
        pixels = np.array(pixels, order="C")
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(x, size=tuple(crop.size), mode=mode, antialias=True)
    return out[0]


class FastResizedCrop:
    """``data.image_decode=fast``: ``crop`` (a torchvision ``RandomResizedCrop``) then ``rest`` on the
    output, from encoded bytes (what the stream passes, ``takes_bytes``) or from a PIL image.

    When ``rest`` only converts to RGB and then to a uint8 tensor (open_clip's and timm's training
    transforms as the towers use them), the crop is made as that tensor (:func:`fast_crop_tensor`) and
    ``rest`` has nothing left to do; otherwise ``rest`` runs on the PIL crop (:func:`fast_crop`)."""

    takes_bytes = True

    def __init__(self, crop: Any, rest: Callable[[Any], Any] | None = None):
        self.crop, self.rest = crop, rest
        names = [type(s).__name__ for s in getattr(rest, "transforms", [rest] if rest else [])]
        self.to_tensor = (
            bool(names) and names[-1] in _TO_TENSOR_STEPS and all(n in _DEVICE_SAFE_STEPS for n in names)
        )

    def __call__(self, data: bytes | Image.Image) -> Any:
        if self.to_tensor:
            return fast_crop_tensor(data, self.crop)
        out = fast_crop(data, self.crop)
        return self.rest(out) if self.rest is not None else out

    def __repr__(self) -> str:
        return f"FastResizedCrop({self.crop!r}, then {self.rest!r})"


class EncodedImage:
    """One training image as a worker sends it under ``data.image_decode=gpu``: a JPEG's bytes with
    the crop box drawn for it (``data``, ``box``), or, for a file the device cannot decode, the
    finished ``uint8 [3, H, W]`` crop (``pixels``). ``size`` (h, w) and ``interpolation`` are the
    crop's. A plain object, so Lightning leaves it on the host when it moves the batch."""

    __slots__ = ("data", "box", "pixels", "size", "interpolation")

    def __init__(self, size, interpolation, data=None, box=None, pixels=None):
        self.size, self.interpolation = tuple(size), interpolation
        self.data, self.box, self.pixels = data, box, pixels

    def __reduce__(self):  # __slots__ without __dict__: pickled by its fields (worker -> main process)
        return (EncodedImage, (self.size, self.interpolation, self.data, self.box, self.pixels))


class DeviceResizedCrop:
    """``data.image_decode=gpu``: bytes -> :class:`EncodedImage` (JPEG bytes + box) in the worker."""

    takes_bytes = True

    def __init__(self, crop: Any):
        self.crop = crop

    def __call__(self, data: bytes | Image.Image) -> EncodedImage:
        size, interp = self.crop.size, self.crop.interpolation
        header = _jpeg_header(data) if isinstance(data, bytes) else None
        if header is not None:
            return EncodedImage(size, interp, data=data, box=_crop_box(self.crop, *header))
        return EncodedImage(size, interp, pixels=fast_crop_tensor(data, self.crop))


def decode_images(rows: list[EncodedImage | None], device: torch.device | str) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` on ``device`` from a batch's :class:`EncodedImage` rows (None: an absent
    image, zeros): every JPEG of the batch in one ``torchvision.io.decode_jpeg`` call on ``device``
    (nvJPEG on CUDA; the same code on the CPU), then each box cropped and resized there
    (``torchvision.transforms.v2.functional.resized_crop``, antialiased, uint8 in and out)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F2

    first = next((r for r in rows if r is not None), None)
    if first is None:
        raise ValueError("decode_images needs at least one image in the batch")
    device = torch.device(device)
    out = torch.zeros((len(rows), 3, *first.size), dtype=torch.uint8, device=device)
    jpeg = [k for k, r in enumerate(rows) if r is not None and r.data is not None]
    if jpeg:
        encoded = [torch.frombuffer(bytearray(rows[k].data), dtype=torch.uint8) for k in jpeg]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        for k, img in zip(jpeg, decoded):
            top, left, h, w = rows[k].box
            out[k] = F2.resized_crop(
                img, top, left, h, w, list(rows[k].size), interpolation=rows[k].interpolation, antialias=True
            )
    for k, r in enumerate(rows):
        if r is not None and r.data is None:
            out[k] = r.pixels.to(device, non_blocking=True)
    return out


def decode_on_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with every list of :class:`EncodedImage` rows replaced by the decoded images (in place)."""
    for key, value in list(batch.items()):
        if isinstance(value, list) and any(isinstance(v, EncodedImage) for v in value):
            batch[key] = decode_images(value, device)
    return batch
