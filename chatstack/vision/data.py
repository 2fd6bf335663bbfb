"""Built-in image data that installs offline: scikit-learn's handwritten digits and procedurally drawn scenes.

    python -m chatstack.vision.data digits     # prints split sizes and a few captions/questions
    python -m chatstack.vision.data scenes

Every image becomes a (3, 32, 32) float tensor in [0, 1] (`to_tensor`): the encoder's one input shape.

digits  scikit-learn's `load_digits()` (1,797 8x8 greyscale images, UCI, BSD-3 via scikit-learn), split once
        by a fixed permutation: 1,438 train, 359 held out (a fifth), the same split for every stage.
        Ink is bright on a dark ground, as the data stores it; upscaled to 32x32 (bilinear).
scenes  1-3 shapes (circle, square, triangle) in distinct colours (red, green, blue, yellow), one per column
        band of a 32x32 canvas, drawn with Pillow from a seed. Questions with known answers: colour, shape,
        count, left/right. A scene is held out when a hash of its description is 0 mod 10, so no held-out
        scene (layout, colours, shapes and exact positions) is ever drawn for training.
"""

from __future__ import annotations

import hashlib
import io
import random
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: Pillow is imported where images are made
    from PIL import Image

SIZE = 32
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
QUESTION_TYPES = ["colour", "shape", "count", "position"]
# training-only questions: where one object is on its own (left / middle / right band), a single look-up that
# the relative position question composes twice; and the whole scene described left to right (its caption)
AUX_QUESTION_TYPES = ["where", "describe"]
BANDS = ("left", "middle", "right")
BAND_X = (5, 16, 26)  # the column bands' centres, pixels
BUILTINS = ("digits", "scenes")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow image (any mode, any size) -> (3, 32, 32) float in [0, 1]."""
    from PIL import Image  # noqa: PLC0415 (optional: only image code needs it)

    img = img.convert("RGB")
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> a Pillow RGB image."""
    from PIL import Image  # noqa: PLC0415 (optional: only image code needs it)

    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before decoding (a decompression bomb guard)


def decode_image(data: bytes, where: str = "image") -> torch.Tensor:
    """Bytes of a PNG/JPEG/GIF/BMP/WebP file -> (3, 32, 32); ValueError naming `where` if it is no image or too large."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (optional: only image code needs it)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{where}: {w}x{h} pixels is too large (at most {MAX_IMAGE_PIXELS:,} pixels)")
                im.load()
                return to_tensor(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise ValueError(f"{where}: not an image Pillow can read (PNG, JPEG, GIF, BMP, WebP)") from None
        raise ValueError(f"{where}: too large to decode ({e})") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot decode the image ({e})") from None


def load_image(path: str | Path) -> torch.Tensor:
    """An image file -> (3, 32, 32); ValueError naming the file when it is missing or no image."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such image file")
    return decode_image(p.read_bytes(), str(p))


# ---- digits ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32), labels (N,), permutation) of all 1,797 digits."""
    from PIL import Image  # noqa: PLC0415 (optional: only image code needs it)
    from sklearn.datasets import load_digits  # noqa: PLC0415 (optional: only image code needs it)

    d = load_digits()
    imgs = []
    for a in d.images:  # (8, 8) values 0..16
        g = Image.fromarray((a * (255.0 / 16.0)).round().astype("uint8"), "L")
        imgs.append(to_tensor(g))
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(0))
    return torch.stack(imgs), torch.tensor(d.target, dtype=torch.long), perm


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, 32, 32), labels (N,)) of the train (1,438) or test (359) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y, perm = _digits()
    n_test = len(perm) // 5
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return x[idx], y[idx]


DIGIT_CAPTIONS = [
    "a photo of the digit {w}",
    "a handwritten {w}",
    "the number {d}",
    "an image of the digit {d}",
    "a picture of a {w}",
]


def digit_caption(label: int, rng: random.Random) -> str:
    return rng.choice(DIGIT_CAPTIONS).format(w=DIGIT_WORDS[label], d=label)


def zero_shot_prompt(label: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[label]}"


# ---- scenes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: int  # centre, pixels
    y: int
    r: int  # half-size


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # sorted left to right

    def key(self) -> str:
        return ";".join(f"{o.shape},{o.colour},{o.x},{o.y},{o.r}" for o in self.objects)

    def held_out(self) -> bool:
        return int(hashlib.sha1(self.key().encode()).hexdigest(), 16) % 10 == 0

    def draw(self) -> torch.Tensor:
        from PIL import Image, ImageDraw  # noqa: PLC0415 (optional: only image code needs it)

        img = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
        d = ImageDraw.Draw(img)
        for o in self.objects:
            box = (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
            c = COLOURS[o.colour]
            if o.shape == "circle":
                d.ellipse(box, fill=c)
            elif o.shape == "square":
                d.rectangle(box, fill=c)
            else:
                d.polygon([(o.x, o.y - o.r), (o.x - o.r, o.y + o.r), (o.x + o.r, o.y + o.r)], fill=c)
        return to_tensor(img)

    def caption(self) -> str:
        parts = [f"a {o.colour} {o.shape}" for o in self.objects]
        if len(parts) == 1:
            return parts[0]
        return " left of ".join(parts)


def band_of(o: Obj) -> int:
    """The column band (0 left, 1 middle, 2 right) an object was placed in."""
    return min(range(3), key=lambda b: abs(BAND_X[b] - o.x))


def random_scene(rng: random.Random, n: int | None = None) -> Scene:
    """1-3 objects, distinct shapes and colours, one per column band (so left/right is never ambiguous)."""
    n = n or rng.randint(1, 3)
    bands = sorted(rng.sample(range(3), n))
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    objs = []
    for b, s, c in zip(bands, shapes, colours):
        r = rng.randint(4, 5)
        x = BAND_X[b] + rng.randint(0, 1)
        y = rng.randint(r + 1, SIZE - r - 2)
        objs.append(Obj(s, c, x, y, r))
    return Scene(tuple(objs))


def counterfactual(scene: Scene, rng: random.Random) -> Scene:
    """The same layout with its attributes rearranged, so its caption differs (a CLIP hard negative: telling
    the two apart takes which colour goes with which shape and what is left of what, not the set of words).
    One object: another shape or colour. Several: the colours, the shapes, or the places moved round."""
    objs = list(scene.objects)
    if len(objs) == 1:
        o = objs[0]
        if rng.random() < 0.5:
            o = Obj(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.x, o.y, o.r)
        else:
            o = Obj(o.shape, rng.choice([c for c in COLOURS if c != o.colour]), o.x, o.y, o.r)
        return Scene((o,))
    n, k = len(objs), rng.randint(1, len(objs) - 1)  # a cyclic shift by k moves every object's attribute
    kind = rng.choice(["colour", "shape", "place"])
    new = []
    for i, o in enumerate(objs):
        src = objs[(i + k) % n]
        if kind == "colour":
            new.append(Obj(o.shape, src.colour, o.x, o.y, o.r))
        elif kind == "shape":
            new.append(Obj(src.shape, o.colour, o.x, o.y, o.r))
        else:
            new.append(Obj(o.shape, o.colour, src.x, src.y, src.r))
    return Scene(tuple(sorted(new, key=lambda o: o.x)))


def scenes(split: str, n: int, seed: int) -> list[Scene]:
    """n scenes of a split (test: hash 0 mod 10; train: the rest), drawn from `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"scenes-{split}-{seed}")
    out = []
    while len(out) < n:
        s = random_scene(rng)
        if s.held_out() == (split == "test"):
            out.append(s)
    return out


def scene_question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one type about a scene (position needs >= 2 objects)."""
    objs = scene.objects
    if qtype == "colour":
        o = rng.choice(objs)
        return f"What colour is the {o.shape}?", o.colour
    if qtype == "shape":
        o = rng.choice(objs)
        return f"What shape is the {o.colour} one?", o.shape
    if qtype == "count":
        return "How many shapes are there?", str(len(objs))
    if qtype == "position":
        if len(objs) < 2:
            raise ValueError("a position question needs two objects")
        i, j = rng.sample(range(len(objs)), 2)
        a, b = objs[i], objs[j]
        return f"Is the {a.colour} {a.shape} left or right of the {b.colour} {b.shape}?", "left" if i < j else "right"
    if qtype == "where":
        o = rng.choice(objs)
        return f"Where is the {o.colour} {o.shape}?", BANDS[band_of(o)]
    if qtype == "describe":
        return "Describe the picture.", scene.caption()
    raise ValueError(f"unknown question type {qtype!r} (one of {', '.join(QUESTION_TYPES + AUX_QUESTION_TYPES)})")


def random_qtype(scene: Scene, rng: random.Random) -> str:
    types = QUESTION_TYPES if len(scene.objects) > 1 else QUESTION_TYPES[:3]
    return rng.choice(types)


DIGIT_QUESTIONS = ["What digit is this?", "Which digit is shown?", "What number is in the picture?"]


def normalize_answer(s: str) -> str:
    return s.strip().strip(".!?").strip().lower()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "digits"
    r = random.Random(0)
    if name == "digits":
        for sp in ("train", "test"):
            x, y = digits(sp)
            print(sp, tuple(x.shape), "labels", torch.bincount(y).tolist())
        print(digit_caption(7, r))
    else:
        for s in scenes("test", 3, 0):
            q, a = scene_question(s, random_qtype(s, r), r)
            print(s.caption(), "|", q, "->", a)
