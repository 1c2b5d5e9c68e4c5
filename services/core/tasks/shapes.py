"""Shapes in a picture: ``"How many shapes?"`` -> ``"2"``, ``"What colour are the shapes?"`` ->
``"red"``, checked by case-insensitive exact match.

A vision-language task small enough for the tiny models, in the spirit of the paper's Geo3K
(a numeric answer read off a figure) and EmoSet (a label for a picture). Each problem is one
56x56 RGB picture (PNG) holding 1 to 3 filled shapes (square, circle, triangle), all of one colour
(red, green, blue or yellow), on a white background, with one of the two questions. A tiny vision
encoder sees 4x4 patches of 14 px merged 2x2 into 4 image tokens, one per quadrant, so every
shape is drawn inside its own quadrant: shapes never overlap and each token sees at most one.

Colour, count and question cycle over the pool, so each combination is equally frequent; the
rest of a picture (quadrants, kinds, sizes, offsets) comes from a random generator seeded per
problem, and no picture appears twice. The pool of 4,000 problems is the same for every seed;
``seed`` shuffles it and the first 500 are held out, so held-out pictures are never trained on.

The out-of-domain split asks the same questions about pictures on a dark grey background, which
no training picture has: 500 problems from a fixed seed, the same for every run.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw

from services.core.tasks import BuiltinTask, Example, register_builtin

NAME = "shapes"
SIZE = 56
POOL = 4000
HELD_OUT = 500
OOD_PROBLEMS = 500
#: Seed of the out-of-domain pictures: fixed, so that every run is scored on the same problems.
OOD_SEED = 31

WHITE = (255, 255, 255)
#: Background of the out-of-domain pictures only.
DARK_GREY = (64, 64, 64)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
}
KINDS = ("square", "circle", "triangle")
COUNTS = (1, 2, 3)
COLOUR_PROMPT = "What colour are the shapes?"
COUNT_PROMPT = "How many shapes?"
QUESTIONS = ("colour", "count")

CELL = SIZE // 2
#: Blank border inside each quadrant, so shapes stay apart and the corners show the background.
MARGIN = 2
#: Side lengths (px): most of a quadrant, so that even a vision encoder that starts from random
#: weights tells a quadrant with a shape from an empty one (smaller shapes, on a white background
#: that dominates every patch, left the tiny warm-started models guessing), with room to move.
MIN_SIDE, MAX_SIDE = 18, 24


@dataclass(frozen=True)
class Shape:
    kind: str
    x: int
    y: int
    side: int


@dataclass(frozen=True)
class Picture:
    """What a picture shows, enough to draw it again."""

    colour: str
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int] = WHITE


def random_picture(
    rng: random.Random, colour: str, count: int, background: tuple[int, int, int] = WHITE
) -> Picture:
    """``count`` shapes of ``colour``, each in its own randomly chosen quadrant."""
    quadrants = rng.sample(range(4), count)
    shapes = []
    for q in sorted(quadrants):
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        x = (q % 2) * CELL + rng.randint(MARGIN, CELL - MARGIN - side)
        y = (q // 2) * CELL + rng.randint(MARGIN, CELL - MARGIN - side)
        shapes.append(Shape(rng.choice(KINDS), x, y, side))
    return Picture(colour, tuple(shapes), background)


def render(picture: Picture) -> bytes:
    """The picture as PNG bytes, deterministic for a given Pillow version; light compression,
    since it dominates the build time and barely changes the size of such flat pictures.
    """
    image = Image.new("RGB", (SIZE, SIZE), picture.background)
    draw = ImageDraw.Draw(image)
    fill = PALETTE[picture.colour]
    for s in picture.shapes:
        box = (s.x, s.y, s.x + s.side - 1, s.y + s.side - 1)
        if s.kind == "square":
            draw.rectangle(box, fill=fill)
        elif s.kind == "circle":
            draw.ellipse(box, fill=fill)
        else:
            apex = (s.x + (s.side - 1) / 2, s.y)
            draw.polygon([apex, (box[0], box[3]), (box[2], box[3])], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def problem(id_: str, picture: Picture, question: str) -> Example:
    if question == "colour":
        prompt, answer = COLOUR_PROMPT, picture.colour
    else:
        prompt, answer = COUNT_PROMPT, str(len(picture.shapes))
    return Example(id=id_, prompt=prompt, answer=answer, task=NAME, images=(render(picture),))


def problems(count: int, prefix: str, background: tuple[int, int, int]) -> tuple[Example, ...]:
    """``count`` problems with distinct pictures, each drawn by its own generator seeded with
    ``prefix`` and its index, so pools and their ids stay stable when the pool size changes.
    """
    colours = list(PALETTE)
    seen: set[Picture] = set()
    out = []
    for i in range(count):
        # Cycle question, colour and count: every combination equally often.
        question = QUESTIONS[i % 2]
        colour = colours[(i // 2) % len(colours)]
        n = COUNTS[(i // (2 * len(colours))) % len(COUNTS)]
        rng = random.Random(f"{prefix}-{i}")
        picture = random_picture(rng, colour, n, background)
        while picture in seen:  # a repeat (~1%): redraw from the same generator, deterministic
            picture = random_picture(rng, colour, n, background)
        seen.add(picture)
        out.append(problem(f"{prefix}-{i}", picture, question))
    return tuple(out)


@cache
def pool() -> tuple[Example, ...]:
    """Every in-domain problem, in generation order (cached: the same for every seed)."""
    return problems(POOL, NAME, WHITE)


@cache
def out_of_domain() -> tuple[Example, ...]:
    """The same questions on dark grey pictures, which the white-background pool never holds."""
    return problems(OOD_PROBLEMS, f"{NAME}-ood{OOD_SEED}", DARK_GREY)


def build(seed: int = 0) -> BuiltinTask:
    """The pool shuffled by ``seed``; the first HELD_OUT form the held-out split."""
    shuffled = list(pool())
    random.Random(seed).shuffle(shuffled)
    return BuiltinTask(
        NAME, train=tuple(shuffled[HELD_OUT:]), eval=tuple(shuffled[:HELD_OUT]), ood=out_of_domain()
    )


register_builtin(NAME, build)
