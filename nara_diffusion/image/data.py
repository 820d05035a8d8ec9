"""DreamBooth images: folder checks, RGB conversion, resize and crop with SDXL's micro-conditioning, the dataset.

Every image is prepared once, when the dataset is built: converted to 8-bit RGB (EXIF orientation applied; 16-bit
and float images scaled, transparent pixels over white), resized so that its shorter side is ``resolution``,
optionally mirrored, then centre- or randomly cropped to a square. The original size and the crop's top-left corner
are kept for SDXL's micro-conditioning. Because the preparation is fixed, the VAE can encode each image once
(`DreamBoothDataset.encode_latents`); each step then draws a fresh latent from the cached distribution.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

#: File suffixes PIL can open.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def list_images(folder: Union[str, Path], what: str = "instance") -> list[Path]:
    """The image files in ``folder``, sorted; other entries are skipped and named in a warning.

    Raises:
        FileNotFoundError: the folder does not exist (or is a file).
        ValueError: it is empty or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} image folder {folder} does not exist (or is not a folder).")
    entries = sorted(folder.iterdir())
    if not entries:
        raise ValueError(f"The {what} image folder {folder} is empty; put the {what} images there.")
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in entries if p not in images]
    if not images:
        raise ValueError(
            f"The {what} image folder {folder} holds no image (found only {skipped[:10]}); supported types "
            "include .png, .jpg, .webp."
        )
    if skipped:
        warnings.warn(f"Skipping {len(skipped)} non-image entries in {folder}: {skipped}", stacklevel=2)
    return images


#: Colour that transparent pixels are composited onto (what most viewers show behind a cut-out).
ALPHA_BACKGROUND = (255, 255, 255)


def grayscale_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) grayscale image scaled to 8 bits (mode ``L``);
    other modes are returned unchanged. PIL's own ``convert`` clips these modes to 0..255, which turns a 16-bit PNG
    white and a float image in [0, 1] black.

    The range is read from the mode, or guessed from the values where the mode does not fix it: ``I;16*`` is
    0..65535; ``I`` is 0..255 if every value fits, else 0..65535 (a 16-bit PNG or TIFF), else its own min..max;
    ``F`` is 0..1 if every value fits, else 0..255, else its own min..max.

    Raises:
        ValueError: a float image holds NaN or infinity.
    """
    mode = image.mode
    if not (mode in ("I", "F") or mode.startswith("I;16")):
        return image
    values = np.asarray(image, dtype=np.float32)  # exact for 16-bit data; ample for an 8-bit result
    if not np.isfinite(values).all():
        raise ValueError(f"the {mode} image holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    elif low >= 0 and high <= (1.0 if mode == "F" else 255.0):
        low, high = 0.0, 1.0 if mode == "F" else 255.0
    elif low >= 0 and high <= (255.0 if mode == "F" else 65535.0):
        low, high = 0.0, 255.0 if mode == "F" else 65535.0
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: high-bit-depth grayscale scaled (`grayscale_to_8bit`), transparent pixels (alpha
    channel or a palette's / grayscale's transparent entry) composited onto `ALPHA_BACKGROUND`, other modes
    (palette, LA, CMYK, ...) by PIL's conversion."""
    image = grayscale_to_8bit(image)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not opaque; opaque images pass through unchanged
            background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return rgba.convert("RGB")
    return image.convert("RGB")


def open_rgb(path: Union[str, Path]) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to 8-bit RGB (`to_rgb`: 16-bit and float images
    scaled, not clipped; transparency over white); a damaged file is named in the error."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); fix or remove it.") from err


@dataclass
class PreparedImage:
    """One training image after resizing and cropping.

    Attributes:
        pixels: ``[3, R, R]`` float32 in [-1, 1], or None once the latents are cached.
        original_size: ``(height, width)`` of the file, for SDXL's micro-conditioning.
        crop_top_left: ``(top, left)`` of the crop in the resized image.
        latent_mean, latent_std: ``[C, R/f, R/f]`` VAE posterior, once cached.
    """

    pixels: Optional[torch.Tensor]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    latent_mean: Optional[torch.Tensor] = None
    latent_std: Optional[torch.Tensor] = None


def prepare_image(
    image: Image.Image, resolution: int, *, center_crop: bool, flip: bool, generator: torch.Generator
) -> PreparedImage:
    """Resize ``image`` (shorter side → ``resolution``, Lanczos), mirror it if ``flip``, crop a square.

    The crop is centred, or drawn from ``generator`` when ``center_crop`` is False.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if flip:
        resized = ImageOps.mirror(resized)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    crop = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return PreparedImage(pixels, (height, width), (top, left))


def check_resolution(resolution: int) -> None:
    """Resolutions must be positive multiples of 8 (the VAE's downsampling factor in SD and SDXL)."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8 (e.g. 1024 for SDXL), got {resolution!r}.")


class DreamBoothDataset(Dataset):
    """Instance images (and, with prior preservation, class images), prepared once.

    Item ``i`` is ``{"instance": PreparedImage, "class": PreparedImage | None}`` with instance ``i mod n`` and class
    ``i mod m``; the length is the larger of the two counts, as in diffusers' DreamBooth scripts.

    Args:
        instance_dir: Folder of instance images (any size and mode).
        resolution: Side of the square training images (a multiple of 8).
        center_crop: Centre crops (default: random crops, drawn once from ``seed``).
        random_flip: Mirror each image with probability 0.5 (drawn once from ``seed``).
        class_dir: Folder of class images for prior preservation.
        num_class_images: Use at most this many class images (sorted by name).
        seed: Seed for the random crops and flips.
    """

    def __init__(
        self,
        instance_dir: Union[str, Path],
        resolution: int,
        *,
        center_crop: bool = False,
        random_flip: bool = False,
        class_dir: Optional[Union[str, Path]] = None,
        num_class_images: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        check_resolution(resolution)
        self.resolution = resolution
        generator = torch.Generator().manual_seed(seed)

        def prepare(paths: list[Path]) -> list[PreparedImage]:
            out = []
            for path in paths:
                flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
                out.append(
                    prepare_image(open_rgb(path), resolution, center_crop=center_crop, flip=flip, generator=generator)
                )
            return out

        self.instance_paths = list_images(instance_dir, "instance")
        self.instance = prepare(self.instance_paths)
        self.class_paths: list[Path] = []
        self.classes: list[PreparedImage] = []
        if class_dir is not None:
            self.class_paths = list_images(class_dir, "class")[:num_class_images]
            self.classes = prepare(self.class_paths)

    @property
    def with_prior(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"instance": self.instance[index % len(self.instance)], "class": None}
        if self.classes:
            item["class"] = self.classes[index % len(self.classes)]
        return item

    @torch.no_grad()
    def encode_latents(
        self, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batch_size: int = 8
    ) -> None:
        """Replace every image's pixels by its VAE posterior ``(mean, std)``, computed once with ``encode``.

        Args:
            encode: ``[N, 3, R, R]`` pixels → ``([N, C, h, w] mean, [N, C, h, w] std)``.
            batch_size: Images per VAE call.
        """
        items = self.instance + self.classes
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if chunk[0].pixels is None:
                continue
            mean, std = encode(torch.stack([item.pixels for item in chunk]))
            for item, m, s in zip(chunk, mean, std, strict=True):
                item.latent_mean, item.latent_std, item.pixels = m.float().cpu(), s.float().cpu(), None


def collate_dreambooth(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch: the instance examples, then (prior preservation) the class examples.

    Returns:
        ``latent_mean``/``latent_std`` ``[N, C, h, w]`` (the cached VAE posterior),
        ``original_sizes`` and ``crop_top_lefts`` ``[N, 2]`` (long), ``is_class`` ``[N]`` (bool); N is the number of
        examples, doubled with prior preservation.
    """
    items = [e["instance"] for e in examples]
    is_class = [False] * len(items)
    if examples[0]["class"] is not None:
        items += [e["class"] for e in examples]
        is_class += [True] * len(examples)
    batch: dict[str, torch.Tensor] = {
        "original_sizes": torch.tensor([item.original_size for item in items], dtype=torch.long),
        "crop_top_lefts": torch.tensor([item.crop_top_left for item in items], dtype=torch.long),
        "is_class": torch.tensor(is_class),
    }
    if any(item.latent_mean is None for item in items):
        raise ValueError("The dataset's latents are not cached; call dataset.encode_latents(...) first.")
    batch["latent_mean"] = torch.stack([item.latent_mean for item in items])
    batch["latent_std"] = torch.stack([item.latent_std for item in items])
    return batch
