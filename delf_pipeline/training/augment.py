"""Augmentation for landmark photos: random resized crop, small rotation, colour; no flip by default.

Every random number comes from the ``numpy.random.Generator`` the caller passes (the epoch
plan draws it from (seed, epoch)), and the pixels are made by PIL and NumPy on the CPU, so
the same draw gives the same crop on any run: a resumed epoch is replayed exactly.
Flips are off by default because landmarks are often asymmetric and carry text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

AREA = (0.25, 1.0)  # share of the image a crop covers
ASPECT = (3 / 4, 4 / 3)  # crop width / height, drawn log-uniform
ROTATION_DEGREES = 10.0  # at most, either way
COLOUR = 0.25  # brightness, contrast and saturation factors in [1 - COLOUR, 1 + COLOUR]
FILL = 127  # grey where a rotated crop leaves the image (the model's mean pixel)


@dataclass(frozen=True)
class Augmentation:
    """One image's draw: a crop (centre and size as shares of the image), a rotation and colour factors."""

    centre_y: float
    centre_x: float
    height: float
    width: float
    degrees: float
    brightness: float
    contrast: float
    saturation: float
    flip: bool


def draw(rng: np.random.Generator, aspect_of_image: float, flip: bool = False) -> Augmentation:
    """A random :class:`Augmentation` of an image whose width / height is ``aspect_of_image``.

    The crop covers a share in :data:`AREA` of the image with a width / height ratio in
    :data:`ASPECT` (clipped to fit inside), placed uniformly; ``flip`` allows a horizontal
    flip half of the time. Always draws the same count of numbers, so draws stay aligned.
    """
    area, log_ratio, u_y, u_x, degrees, *colour, coin = rng.random(9)
    area = AREA[0] + area * (AREA[1] - AREA[0])
    ratio = math.exp(math.log(ASPECT[0]) + log_ratio * (math.log(ASPECT[1]) - math.log(ASPECT[0])))
    # in shares of the image's own sides: (w * W) / (h * H) = ratio and w * h = area
    width = min(1.0, math.sqrt(area * ratio / aspect_of_image))
    height = min(1.0, area / width)
    centre_y = height / 2 + u_y * (1 - height)
    centre_x = width / 2 + u_x * (1 - width)
    factors = [1 - COLOUR + 2 * COLOUR * c for c in colour]
    return Augmentation(centre_y, centre_x, height, width, (2 * degrees - 1) * ROTATION_DEGREES, *factors,
                        flip=bool(flip and coin < 0.5))


def apply(image: np.ndarray, aug: Augmentation, size: int) -> np.ndarray:
    """The crop of ``image`` (uint8 [H, W, 3]) that ``aug`` describes, rotated and resized to
    [size, size, 3] in one bilinear resampling, then coloured. Returns uint8."""
    height, width = image.shape[:2]
    scale_y, scale_x = aug.height * height / size, aug.width * width / size
    cos, sin = math.cos(math.radians(aug.degrees)), math.sin(math.radians(aug.degrees))
    sign = -1.0 if aug.flip else 1.0
    # output pixel (u, v) -> source (x, y) = centre + R(degrees) @ diag(sign * scale_x, scale_y) @ ((u, v) - size / 2)
    a, b = cos * scale_x * sign, -sin * scale_y
    d, e = sin * scale_x * sign, cos * scale_y
    cx, cy = aug.centre_x * width, aug.centre_y * height
    half = size / 2
    coefficients = (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)
    warped = Image.fromarray(image).transform((size, size), Image.AFFINE, coefficients, Image.BILINEAR,
                                              fillcolor=(FILL, FILL, FILL))
    return colour(np.asarray(warped), aug.brightness, aug.contrast, aug.saturation)


def colour(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """uint8 RGB [H, W, 3] times ``brightness``, its contrast about the mean grey scaled by
    ``contrast``, its saturation (distance from each pixel's grey) by ``saturation``."""
    pixels = image.astype(np.float32) * brightness
    grey = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    pixels = (pixels - grey.mean()) * contrast + grey.mean()
    grey = grey[..., None] * contrast + grey.mean() * (1 - contrast)
    pixels = grey + (pixels - grey) * saturation
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def resize_longest(image: np.ndarray, longest: int) -> np.ndarray:
    """``image`` (uint8 [H, W, 3]) resized so its longest side is ``longest`` (bilinear, up or down)."""
    height, width = image.shape[:2]
    if max(height, width) == longest:
        return image
    factor = longest / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
