"""Image transforms whose every random decision comes from an explicit ``torch.Generator``.

Drawing from a per-sample generator (``sample_generator(seed, epoch, index)``) makes a sample's
augmentation reproducible no matter which DataLoader worker or DDP rank processes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

# Random-erasing box parameters of Zhong et al. (AAAI 2020), as in torchvision's RandomErasing.
_ERASE_SCALE = (0.02, 0.33)
_ERASE_RATIO = (0.3, 3.3)
_ERASE_ATTEMPTS = 10


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded uniquely by (seed, epoch, index); SeedSequence keeps nearby triples uncorrelated."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be non-negative, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator()
    generator.manual_seed(int(state) & ((1 << 63) - 1))
    return generator


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class ImageTransform:
    """Resize (+ flip, pad-and-crop, random erasing when training) and normalise a PIL image.

    Train order: resize to ``image_size`` -> horizontal flip with ``flip_prob`` -> pad by
    ``padding`` and crop back at a random offset -> float in [0, 1] -> normalise -> random
    erasing with probability ``random_erasing`` (erased pixels set to 0, i.e. the mean).
    Eval: resize and normalise only.
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        flip_prob: float = 0.5,
        padding: int = 10,
        random_crop: bool = True,
        random_erasing: float = 0.0,
    ) -> None:
        height, width = image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive (height, width), got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        for name, value in (("flip_prob", flip_prob), ("random_erasing", random_erasing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.image_size = (int(height), int(width))
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.train = train
        self.flip_prob = flip_prob
        self.padding = padding
        self.random_crop = random_crop
        self.random_erasing = random_erasing

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return a float tensor [3, h, w]; random choices come from ``generator``.

        Without a generator the global torch RNG is used, so results still follow ``torch.manual_seed``.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        tensor = F.to_image(image)
        tensor = F.resize(tensor, list(self.image_size), antialias=True)
        if self.train:
            rng = generator if generator is not None else torch.default_generator
            tensor = self._augment_geometry(tensor, rng)
        tensor = F.to_dtype(tensor, torch.float32, scale=True)
        tensor = F.normalize(tensor, self.mean, self.std)
        if self.train and self.random_erasing > 0:
            rng = generator if generator is not None else torch.default_generator
            tensor = self._erase(tensor, rng)
        # A plain tensor: tv_tensors.Image subclasses would leak into collate and model code.
        return tensor.as_subclass(torch.Tensor)

    def _augment_geometry(self, tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if self.flip_prob > 0 and _uniform(rng) < self.flip_prob:
            tensor = F.horizontal_flip(tensor)
        if self.random_crop and self.padding > 0:
            height, width = self.image_size
            tensor = F.pad(tensor, [self.padding], fill=0)
            top = _randint(rng, 0, 2 * self.padding)
            left = _randint(rng, 0, 2 * self.padding)
            tensor = F.crop(tensor, top, left, height, width)
        return tensor

    def _erase(self, tensor: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        if _uniform(rng) >= self.random_erasing:
            return tensor
        height, width = tensor.shape[-2:]
        area = height * width
        log_ratio = (math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1]))
        for _ in range(_ERASE_ATTEMPTS):
            target_area = area * _uniform(rng, *_ERASE_SCALE)
            aspect = math.exp(_uniform(rng, *log_ratio))
            box_h = int(round(math.sqrt(target_area * aspect)))
            box_w = int(round(math.sqrt(target_area / aspect)))
            if 0 < box_h < height and 0 < box_w < width:
                top = _randint(rng, 0, height - box_h)
                left = _randint(rng, 0, width - box_w)
                return F.erase(tensor, top, left, box_h, box_w, torch.zeros(()), inplace=False)
        return tensor

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, flip_prob={self.flip_prob}, "
            f"padding={self.padding}, random_crop={self.random_crop}, random_erasing={self.random_erasing})"
        )
