"""The procedural world the small SAM3 is trained on, and the out-of-distribution concepts kept out of it.

Objects are a shape (``synthetic.SHAPES``) in one named colour (COLOURS, jittered per object), over the cluttered
backgrounds of ``synthetic``. The model learns three kinds of noun phrase:

- "<colour> <shape>" ("red star"): the objects with both attributes;
- "<shape>" ("star"): every object of that shape;
- "<colour>" ("red"): every object of that colour.

Training renders only the TRAIN_SHAPES x COLOURS combinations not used by an OOD concept. Each OOD concept
is an object the training images never contain:

- ``new-name``: a seen shape and colour in a combination never rendered, named by a word never trained
  ("tomato" = red blobs);
- ``new-combo``: a combination never rendered, named by its trained words ("blue triangle");
- ``new-shape``: a shape never rendered, named by a word never trained ("heart").

(A first recipe with textures instead of colours, 7,000 steps, learned objectness but no grounding: presence
stayed at chance. Colours are what a from-scratch ViT at this size picks up in a CPU-hour.)

Nobody plants an answer: the ground truth is the drawn mask, and whether any token sequence segments the object
is for the search to find out. Training and evaluation images come from disjoint seed streams
(``TRAIN_STREAM`` vs ``EVAL_STREAM``), so no evaluation image is ever a training image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .masks import union_of_instances
from .synthetic import SHAPES, TEXTURES, Concept, Dataset, Instance, Sample, background, draw_shape, place_object

TRAIN_SHAPES = ("blob", "star", "ring", "crescent", "hexagon", "cross", "triangle", "square")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230), "yellow": (240, 220, 20),
    "purple": (150, 40, 200), "orange": (250, 130, 0), "white": (250, 250, 250), "black": (15, 15, 15)}
COLOUR_NAMES = tuple(COLOURS)
TRAIN_STREAM = 1  # first word of every training image's seed
EVAL_STREAM = 2  # ... and of every evaluation image's: the two never meet
RADIUS = (0.12, 0.22)  # object radius, fraction of the image side


@dataclass(frozen=True)
class OODConcept:
    """name (COCO category name), label (its natural prompt), what it looks like, and why it is OOD."""

    name: str
    label: str
    shape: str
    colour: str
    kind: str  # new-name | new-combo | new-shape


OOD_CONCEPTS: tuple[OODConcept, ...] = (
    OODConcept("tomato", "tomato", "blob", "red", "new-name"),
    OODConcept("starfish", "starfish", "star", "orange", "new-name"),
    OODConcept("lifebuoy", "lifebuoy", "ring", "white", "new-name"),
    OODConcept("moon", "moon", "crescent", "yellow", "new-name"),
    OODConcept("emerald", "emerald", "hexagon", "green", "new-name"),
    OODConcept("blue_triangle", "blue triangle", "triangle", "blue", "new-combo"),
    OODConcept("purple_cross", "purple cross", "cross", "purple", "new-combo"),
    OODConcept("black_square", "black square", "square", "black", "new-combo"),
    OODConcept("heart", "heart", "heart", "red", "new-shape"),
    OODConcept("arrow", "arrow", "arrow", "blue", "new-shape"),
    OODConcept("kite", "kite", "diamond", "purple", "new-shape"),
)
OOD_BY_NAME = {c.name: c for c in OOD_CONCEPTS}
HELD_OUT_COMBOS = frozenset((c.shape, c.colour) for c in OOD_CONCEPTS)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (s, t) for s in TRAIN_SHAPES for t in COLOUR_NAMES if (s, t) not in HELD_OUT_COMBOS)


@dataclass(frozen=True)
class IDConcept:
    """A trained "<colour> <shape>" concept."""

    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.shape}"

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


ID_CONCEPTS: tuple[IDConcept, ...] = tuple(IDConcept(s, t) for s, t in TRAIN_COMBOS)


@dataclass
class Scene:
    """One rendered image: uint8[S, S, 3], and per object its shape, colour and bool[S, S] mask (visible pixels;
    objects never overlap)."""

    image: np.ndarray
    shapes: list[str]
    colours: list[str]
    masks: list[np.ndarray]
    image_id: str = ""
    instances: list[Instance] = field(default_factory=list)


def render(rng: np.random.Generator, size: int, objects: list[tuple[str, str]], image_id: str = "",
           tags: list[str] | None = None) -> Scene:
    """Draw ``objects`` ((shape, colour) pairs; later ones are dropped when the image is full) over a background.
    ``tags`` names each object's concept in the returned instances (default "<colour>_<shape>")."""
    img = background(rng, size)
    placed: list[tuple[float, float, float]] = []
    scene = Scene(img, [], [], [], image_id)
    for i, (shape, colour) in enumerate(objects):
        spot = place_object(rng, size, placed, RADIUS)
        if spot is None:
            continue
        placed.append(spot)
        tag = tags[i] if tags else f"{colour}_{shape}"
        inst = draw_shape(rng, img, tag, SHAPES[shape], TEXTURES["plain"], *spot, colour=COLOURS[colour])
        if inst.mask.any():
            scene.shapes.append(shape)
            scene.colours.append(colour)
            scene.masks.append(inst.mask)
            scene.instances.append(inst)
    return scene


def training_scene(seed: int, index: int, size: int) -> Scene:
    """Training image ``index`` of ``seed``: 1-4 objects of trained combinations only."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, index])
    n = int(rng.integers(1, 5))
    picks = rng.integers(0, len(TRAIN_COMBOS), n)
    return render(rng, size, [TRAIN_COMBOS[int(i)] for i in picks], f"train_{index:06d}")


def concept_scene(seed: int, concept: OODConcept | IDConcept, k: int, size: int) -> Scene:
    """Evaluation image k of a concept (from EVAL_STREAM): 1-3 instances of it and, half the time, 1-2 distractors
    of trained combinations."""
    ood = isinstance(concept, OODConcept)
    idx = [c.name for c in OOD_CONCEPTS].index(concept.name) if ood else 100 + ID_CONCEPTS.index(concept)
    rng = np.random.default_rng([EVAL_STREAM, seed, idx, k])
    n = int(rng.integers(1, 4))
    others = [c for c in TRAIN_COMBOS if c != (concept.shape, concept.colour)]
    d = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    picks = [others[int(i)] for i in rng.integers(0, len(others), d)]
    objects = [(concept.shape, concept.colour)] * n + picks
    tags = [concept.name] * n + [f"{t}_{s}" for s, t in picks]
    return render(rng, size, objects, f"{concept.name}_{k:03d}", tags)


def phrase_targets(scene: Scene, phrase: tuple[str | None, str | None]) -> list[int]:
    """Indices of the scene's objects a phrase (colour or None, shape or None) refers to."""
    colour, shape = phrase
    return [i for i in range(len(scene.masks))
            if (shape is None or scene.shapes[i] == shape) and (colour is None or scene.colours[i] == colour)]


def phrase_text(phrase: tuple[str | None, str | None]) -> str:
    return " ".join(w for w in phrase if w)


def training_phrases() -> list[tuple[str | None, str | None]]:
    """Every phrase the model is trained on: (colour, shape) combos, shapes alone, colours alone."""
    return ([(t, s) for s, t in TRAIN_COMBOS] + [(None, s) for s in TRAIN_SHAPES]
            + [(t, None) for t in COLOUR_NAMES])


def ood_dataset(names: list[str], n_images: int, size: int, seed: int = 0) -> Dataset:
    """A COCO-writable dataset of OOD concepts (``OOD_BY_NAME`` keys): ``n_images`` evaluation images per concept
    (`concept_scene`, EVAL_STREAM: never training images), concept-major, ids "<concept>_<k:03d>"."""
    unknown = [n for n in names if n not in OOD_BY_NAME]
    if unknown:
        raise ValueError(f"unknown OOD concept {', '.join(unknown)}; choose from: {', '.join(OOD_BY_NAME)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"concepts must be a non-empty list without repeats, got {names}")
    samples = []
    for name in names:
        for k in range(n_images):
            sc = concept_scene(seed, OOD_BY_NAME[name], k, size)
            masks = {n: union_of_instances([i.mask for i in sc.instances if i.concept == n], shape=(size, size))
                     for n in names}
            samples.append(Sample(sc.image, masks, sc.image_id, sc.instances))
    return Dataset(samples, [Concept(n, OOD_BY_NAME[n].label) for n in names])
