"""Scenes of the tiny world: shapes on a grid, drawn with PIL, each with its description beside it.

The canvas is a GRID × GRID board of CELL-pixel cells; each object sits in one cell (with a little
jitter), so a vision transformer whose patch size equals the cell sees one object per patch. That
alignment is what lets a tiny ViT learn the world in seconds on a CPU.

Objects have a shape, a colour, a size, a fill and a mark (a dotted texture over the object's cell,
or none). The vision encoder's pretraining covers shape and colour only; size, fill and the mark are left
for the later stages to discover (as CLIP was never taught OCR), which is what gives the freeze ablation
something to find. Size and fill change a hundred pixels each, so a frozen encoder carries them anyway.
The mark is the one a frozen encoder cannot see at all: its texture is a fixed pixel pattern, and the
tower's pretraining holds its patch embedding orthogonal to that pattern (`pretrain.mark_direction`), as a
camera with a filter would be blind to it. Only a tower whose patch embedding trains can read it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL
BACKGROUND = (255, 255, 255)

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# No channel below MARK_DEPTH (64): the mark's texture darkens any colour without clipping.
COLOURS = {
    "red": (220, 64, 64),
    "green": (64, 170, 80),
    "blue": (64, 96, 220),
    "yellow": (235, 200, 64),
    "purple": (150, 64, 180),
    "orange": (245, 140, 64),
}
SIZES = ("small", "large")
FILLS = ("solid", "outline")
MARKS = ("plain", "dotted")
# The mark darkens every other pixel of its object's cell (a checkerboard, aligned with the cell, whatever
# the object's jitter) by MARK_DEPTH. No colour channel is below MARK_DEPTH, so nothing clips: a marked
# image is exactly the plain one minus the pattern, and a tower blind to the pattern sees no difference.
MARK_DEPTH = 64
ROW_NAMES = ("top", "upper middle", "lower middle", "bottom")
COL_NAMES = ("left", "centre left", "centre right", "right")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    fill: str
    row: int
    col: int
    dx: int = 0  # jitter in pixels, inside the cell
    dy: int = 0
    mark: str = "plain"  # sampled scenes draw both values; "plain" here keeps hand-built objects unmarked

    @property
    def name(self) -> str:
        """The words that pick this object out: `small red circle`."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        return Scene(tuple(Obj(**o) for o in data["objects"]))

    @property
    def key(self) -> tuple:
        """Identity of a scene regardless of jitter (held-out scenes must differ from training ones)."""
        return tuple(sorted((o.shape, o.colour, o.size, o.fill, o.mark, o.row, o.col) for o in self.objects))


def sample_scene(rng: random.Random, *, min_objects: int = 1, max_objects: int = 5) -> Scene:
    """A random scene: distinct cells, and no two objects with the same colour and shape (so that
    `the red circle` always names one object)."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n)
    objects = []
    for (row, col), (shape, colour) in zip(cells, kinds):
        size = rng.choice(SIZES)
        jitter = 1 if size == "large" else 3
        objects.append(Obj(shape, colour, size, rng.choice(FILLS), row, col,
                           rng.randint(-jitter, jitter), rng.randint(-jitter, jitter), rng.choice(MARKS)))
    return Scene(tuple(sorted(objects, key=lambda o: (o.row, o.col))))


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """A generator for scene `index` of `split`: deterministic, and independent across splits."""
    return random.Random(f"tiny-world/{seed}/{split}/{index}")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    w = r * 0.4  # cross: a plus sign of two bars
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene at CELL pixels per cell, then scale to `image_size` if it differs."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx = o.col * CELL + CELL / 2 + o.dx
        cy = o.row * CELL + CELL / 2 + o.dy
        r = 6.5 if o.size == "large" else 3.5
        colour = COLOURS[o.colour]
        fill = colour if o.fill == "solid" else None
        width = 2 if o.size == "large" else 1
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=colour, width=width)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=colour, width=width)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill, outline=colour, width=width)
    marked = [o for o in scene.objects if o.mark != "plain"]
    if marked:
        pixels = np.asarray(image, dtype=np.int16).copy()
        texture = MARK_DEPTH * mark_pattern()[..., None]
        for o in marked:
            pixels[o.row * CELL:(o.row + 1) * CELL, o.col * CELL:(o.col + 1) * CELL] -= texture
        image = Image.fromarray(pixels.astype(np.uint8))
    if image_size != IMAGE_SIZE:
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return image


def mark_pattern() -> np.ndarray:
    """The mark's texture on one cell, [CELL, CELL] of 0 and 1: a checkerboard of single pixels."""
    rows, cols = np.indices((CELL, CELL))
    return ((rows + cols) % 2).astype(np.int16)


def position(o: Obj) -> str:
    """`top left`, `lower middle centre right`, ..."""
    return f"{ROW_NAMES[o.row]} {COL_NAMES[o.col]}"


def quadrant(o: Obj) -> str:
    """The coarse place of an object: `top left`, `top right`, `bottom left` or `bottom right`."""
    return f"{'top' if o.row < GRID // 2 else 'bottom'} {'left' if o.col < GRID // 2 else 'right'}"
