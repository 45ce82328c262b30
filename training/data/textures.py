"""Textures for synthetic scenes: backgrounds and object fills as float32 RGB arrays in [0, 1].

Backgrounds and objects draw from the same families (photos, noise, stripes, gradients) with colours over the whole
RGB cube, so no colour or brightness alone tells an object from the background: a model has to use shape and edges.
"""

from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image
from skimage import data as skdata

# Bundled with scikit-image (no download). Left out on purpose: coins, cells, logos, the retina disc and the galaxies
# of hubble_deep_field look like objects themselves.
_PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
)
Texture = Callable[[np.random.Generator, int, int, float], np.ndarray]


@cache
def _photos(max_side: int) -> tuple[np.ndarray, ...]:
    """Loads the photographs once per process and size, shrunk so that resizing a crop is cheap (PIL resampling
    cost grows with the source size, and a background never needs more than 2x the scene's resolution)."""
    return tuple(_shrink(np.asarray(getattr(skdata, name)()), max_side) for name in _PHOTO_NAMES)


def _shrink(photo: np.ndarray, max_side: int) -> np.ndarray:
    """Downsizes a photo whose longer side exceeds max_side; gray photos stay 2-D so they can be tinted."""
    height, width = photo.shape[:2]
    factor = max_side / max(height, width)
    if factor >= 1:
        return photo
    size = (round(width * factor), round(height * factor))
    return np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour anywhere in the RGB cube, so objects can be darker, brighter or equally bright as what is behind."""
    return rng.random(3, dtype=np.float32)


def _lerp(field: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Maps a scalar field in [0, 1] onto the colour ramp low -> high."""
    return low + field[..., None] * (high - low)


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Smoothly resizes a small float grid to height x width (bicubic, so no blocky value-noise cells). PIL rather
    than a matrix product: multi-threaded BLAS stalls badly on these small products when the CPU is busy."""
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int, octaves: int) -> np.ndarray:
    """Multi-octave value noise stretched to [0, 1]: smooth clutter without blob-like structure."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        side = cells * 2**octave + 1
        total += amplitude * _upsample(rng.random((side, side), dtype=np.float32), height, width)
        amplitude *= 0.5
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-6)


def _rotated_coordinate(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Pixel coordinate along a random direction, for stripes and gradients at any angle."""
    angle = rng.uniform(0, np.pi)
    cols = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle))
    rows = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle))
    return rows[:, None] + cols[None, :]


def _near_colour(rng: np.random.Generator, colour: np.ndarray, spread: float) -> np.ndarray:
    """A second colour close to the first: for low-contrast clutter rather than strong edges."""
    return np.clip(colour + rng.normal(0, spread, 3), 0, 1).astype(np.float32)


def _tint(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours a gray photo with a random two-colour ramp."""
    return _lerp(gray, _random_colour(rng), _random_colour(rng))


def _shift_colours(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permutes and rescales colour channels so photo crops do not keep their natural, learnable palette."""
    if rng.random() < 0.5:
        rgb = rgb[..., rng.permutation(3)]
    gain = rng.uniform(0.6, 1.4, 3).astype(np.float32)
    offset = rng.uniform(-0.2, 0.2, 3).astype(np.float32)
    return np.clip(rgb * gain + offset, 0, 1)


def _stretch(pixels: np.ndarray) -> np.ndarray:
    """Rescales values to span [0, 1], so dull crops (moon, gravel) still cover the whole brightness range."""
    low, high = pixels.min(), pixels.max()
    return (pixels - low) / max(high - low, 1.0)


def _photo_crop(
    rng: np.random.Generator, height: int, width: int, zoom: tuple[float, float], max_side: int
) -> np.ndarray:
    """A random crop of a bundled photo, resized to height x width; zoom is the crop's share of the largest crop."""
    library = _photos(max_side)
    photo = library[rng.integers(len(library))]
    photo_height, photo_width = photo.shape[:2]
    scale = rng.uniform(*zoom) * min(photo_height / height, photo_width / width)
    crop_height, crop_width = max(2, round(height * scale)), max(2, round(width * scale))
    top = rng.integers(photo_height - crop_height + 1)
    left = rng.integers(photo_width - crop_width + 1)
    crop = photo[top : top + crop_height, left : left + crop_width]
    resized = Image.fromarray(crop).resize((width, height), Image.Resampling.BILINEAR)
    pixels = _stretch(np.asarray(resized, np.float32))
    return _tint(pixels, rng) if pixels.ndim == 2 else _shift_colours(pixels, rng)


def _photo_side(scale: float) -> int:
    """Photo resolution for a scene scale (image side / 128): twice the scene side."""
    return round(256 * scale)


def _noise_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Value noise on a two-colour ramp, or independent noise per channel for colourful clouds."""
    cells = max(1, round(rng.uniform(2, 6) * max(height, width) / (128 * scale)))
    octaves = int(rng.integers(2, 5))
    if rng.random() < 0.3:
        channels = [_value_noise(rng, height, width, cells, octaves) for _ in range(3)]
        return np.stack(channels, axis=-1)
    return _lerp(_value_noise(rng, height, width, cells, octaves), _random_colour(rng), _random_colour(rng))


def _gradient_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A linear colour gradient at a random angle."""
    coordinate = _rotated_coordinate(rng, height, width)
    field = (coordinate - coordinate.min()) / max(float(np.ptp(coordinate)), 1e-6)
    return _lerp(field, _random_colour(rng), _random_colour(rng))


def _stripe_fill(rng: np.random.Generator, height: int, width: int, scale: float, contrast: float) -> np.ndarray:
    """Two-colour stripes, hard or soft; contrast is the spread of the second colour around the first."""
    period = rng.uniform(4, 14) * scale
    wave = 0.5 + 0.5 * np.sin(_rotated_coordinate(rng, height, width) * np.float32(2 * np.pi / period))
    field = (wave > 0.5).astype(np.float32) if rng.random() < 0.5 else wave
    first = _random_colour(rng)
    return _lerp(field, first, _near_colour(rng, first, contrast))


def _checker_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A rotated two-colour checkerboard."""
    cell = np.float32(rng.uniform(3, 10) * scale)
    along = _rotated_coordinate(rng, height, width)
    across = _rotated_coordinate(rng, height, width)
    parity = (np.floor(along / cell) + np.floor(across / cell)) % 2
    return _lerp(parity.astype(np.float32), _random_colour(rng), _random_colour(rng))


def _solid_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """One colour with pixel noise, the plainest object surface."""
    noise = rng.normal(0, rng.uniform(0.01, 0.06), (height, width, 3)).astype(np.float32)
    return np.clip(_random_colour(rng) + noise, 0, 1)


def _shade(rng: np.random.Generator, fill: np.ndarray, scale: float, strength: float) -> np.ndarray:
    """Multiplies a fill by smooth noise, like uneven lighting, so flat surfaces are not perfectly flat."""
    height, width = fill.shape[:2]
    cells = max(1, round(3 * max(height, width) / (128 * scale)))
    light = 1 - strength + 2 * strength * _value_noise(rng, height, width, cells, 2)
    return np.clip(fill * light[..., None], 0, 1)


def lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth size x size brightness field, as from uneven light: it keeps local edges but moves whole regions up
    or down, so no global brightness threshold can pick out the objects."""
    strength = rng.uniform(0.2, 0.5)
    field = _value_noise(rng, size, size, int(rng.integers(1, 3)), 2)
    return rng.uniform(0.85, 1.15) * (1 - strength + 2 * strength * field)


def _background_photo(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A wide, recoloured photo crop as a background."""
    return _photo_crop(rng, height, width, (0.1, 0.5), _photo_side(scale))  # part views: clutter, not whole objects


def _background_stripes(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Moderate-contrast stripes: clutter, but weaker than the stripes on objects."""
    return _stripe_fill(rng, height, width, scale, contrast=0.3)


_BACKGROUND_FILLS: tuple[Texture, ...] = (_background_photo, _noise_fill, _gradient_fill, _background_stripes)
_BACKGROUND_FILL_WEIGHTS = (0.45, 0.25, 0.15, 0.15)


def _pick(rng: np.random.Generator, fills: tuple[Texture, ...], weights: tuple[float, ...]) -> Texture:
    """One fill function, drawn by weight."""
    return fills[rng.choice(len(fills), p=weights)]


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size scene background: photo, noise, gradient or stripes, sometimes two of them softly blended
    (more clutter, but no hard edges that could pass for an object), sometimes unevenly shaded."""
    scale = size / 128
    fill = _pick(rng, _BACKGROUND_FILLS, _BACKGROUND_FILL_WEIGHTS)(rng, size, size, scale)
    if rng.random() < 0.6:
        other = _pick(rng, _BACKGROUND_FILLS, _BACKGROUND_FILL_WEIGHTS)(rng, size, size, scale)
        weight = _value_noise(rng, size, size, int(rng.integers(1, 4)), 2)[..., None]
        fill = fill + weight * (other - fill)
    return _shade(rng, fill, scale, strength=0.2) if rng.random() < 0.5 else fill


def _photo_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A close-up crop of a photo, recoloured, as an object surface."""
    return _photo_crop(rng, height, width, (0.05, 0.4), _photo_side(scale))


def _object_stripes(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """High-contrast stripes for objects (backgrounds use low-contrast ones)."""
    return _stripe_fill(rng, height, width, scale, contrast=0.6)


_OBJECT_FILLS: tuple[Texture, ...] = (_solid_fill, _object_stripes, _checker_fill, _photo_fill, _gradient_fill)
_OBJECT_FILL_WEIGHTS = (0.3, 0.15, 0.15, 0.2, 0.2)


def object_fill(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A height x width surface for one object, sometimes unevenly lit."""
    fill = _pick(rng, _OBJECT_FILLS, _OBJECT_FILL_WEIGHTS)(rng, height, width, scale)
    return _shade(rng, fill, scale, strength=0.15) if rng.random() < 0.4 else fill
