"""ARC grids and the invertible transforms that augment them (SEAL §4.1, after Akyürek et al.'s
test-time training): pure functions on immutable grids, nothing else.

Every transform comes with its inverse, because a transform is used twice:
  * augmentation: apply the same transform to every grid of a task to make a new, equally valid
    training task;
  * voting: ask the model to solve the transformed task, then map its answer back through the
    inverse so that answers from different views can be compared and counted.

An inverse returns ``None`` when its argument cannot be an output of the forward transform (a
"×2 height" grid whose paired rows differ): such a model answer is not an answer of that view
and casts no vote.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Grid = tuple[tuple[int, ...], ...]  # rows of colours 0-9; immutable so it can be hashed and counted

MAX_SIDE = 30  # ARC's largest grid is 30 × 30; an augmentation that grows a grid past it is skipped
COLOURS = range(10)
BACKGROUND = 0  # ARC's black: colour permutations keep it, since tasks treat it as empty space


def as_grid(rows: object) -> Grid:
    """A validated, immutable grid from nested lists (JSON). Raises ValueError saying what is wrong."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"a grid is a non-empty list of rows, got {type(rows).__name__}")
    width = None
    converted = []
    for index, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"grid row {index} is not a non-empty list of cells")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ValueError(f"grid row {index} has {len(row)} cells, row 0 has {width}: a grid is rectangular")
        for cell in row:
            if isinstance(cell, bool) or not isinstance(cell, int) or cell not in COLOURS:
                raise ValueError(f"grid row {index} holds {cell!r}; cells are colours, integers 0-9")
        converted.append(tuple(row))
    return tuple(converted)


def shape(grid: Grid) -> tuple[int, int]:
    """(height, width)."""
    return len(grid), len(grid[0])


def fits(grid: Grid, max_side: int = MAX_SIDE) -> bool:
    height, width = shape(grid)
    return height <= max_side and width <= max_side


# --- the dihedral group: geometry that keeps every cell ---------------------------------------


def identity(grid: Grid) -> Grid:
    return grid


def rotate90(grid: Grid) -> Grid:
    """Clockwise quarter turn: the first column read bottom-up becomes the first row."""
    return tuple(zip(*grid[::-1]))


def rotate180(grid: Grid) -> Grid:
    return tuple(row[::-1] for row in grid[::-1])


def rotate270(grid: Grid) -> Grid:
    """Anticlockwise quarter turn (the inverse of :func:`rotate90`)."""
    return tuple(zip(*grid))[::-1]


def flip_horizontal(grid: Grid) -> Grid:
    """Mirror left ↔ right."""
    return tuple(row[::-1] for row in grid)


def flip_vertical(grid: Grid) -> Grid:
    """Mirror top ↔ bottom."""
    return grid[::-1]


def transpose(grid: Grid) -> Grid:
    """Reflect across the main diagonal: rows become columns."""
    return tuple(zip(*grid))


def anti_transpose(grid: Grid) -> Grid:
    """Reflect across the anti-diagonal (top-right to bottom-left)."""
    return rotate180(transpose(grid))


# --- size: stretching, and its inverse that checks the stretch is there -----------------------


def stretch(grid: Grid, rows: int, cols: int) -> Grid:
    """Each cell becomes a ``rows × cols`` block: (2, 2) doubles the resolution, (2, 1) the height."""
    return tuple(tuple(cell for cell in row for _ in range(cols)) for row in grid for _ in range(rows))


def shrink(grid: Grid, rows: int, cols: int) -> Grid | None:
    """Inverse of :func:`stretch`: None unless every ``rows × cols`` block is one colour."""
    height, width = shape(grid)
    if height % rows or width % cols:
        return None
    small = tuple(tuple(grid[r][c] for c in range(0, width, cols)) for r in range(0, height, rows))
    return small if stretch(small, rows, cols) == grid else None


def tile(grid: Grid, rows: int, cols: int) -> Grid:
    """The grid repeated ``rows`` times downwards and ``cols`` times across."""
    return tuple(row * cols for row in grid) * rows


def untile(grid: Grid, rows: int, cols: int) -> Grid | None:
    """Inverse of :func:`tile`: None unless the grid is ``rows × cols`` copies of one tile."""
    height, width = shape(grid)
    if height % rows or width % cols:
        return None
    single = tuple(row[: width // cols] for row in grid[: height // rows])
    return single if tile(single, rows, cols) == grid else None


def translate(grid: Grid, down: int, right: int) -> Grid:
    """Move the content ``down`` rows and ``right`` columns by adding background rows above and
    background columns on the left (the grid grows, so no cell falls off and it stays invertible)."""
    width = shape(grid)[1]
    padded_rows = tuple((BACKGROUND,) * right + row for row in grid)
    return ((BACKGROUND,) * (width + right),) * down + padded_rows


def untranslate(grid: Grid, down: int, right: int) -> Grid | None:
    """Inverse of :func:`translate`: None unless the added band is background and something is left."""
    height, width = shape(grid)
    if height <= down or width <= right:
        return None
    band_is_empty = all(cell == BACKGROUND for row in grid[:down] for cell in row) and all(
        cell == BACKGROUND for row in grid[down:] for cell in row[:right]
    )
    return tuple(row[right:] for row in grid[down:]) if band_is_empty else None


def recolour(grid: Grid, mapping: Sequence[int]) -> Grid:
    """Colour ``c`` becomes ``mapping[c]``; ``mapping`` is a permutation of 0-9."""
    return tuple(tuple(mapping[cell] for cell in row) for row in grid)


def inverse_permutation(mapping: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(mapping)
    for source, target in enumerate(mapping):
        inverse[target] = source
    return tuple(inverse)


def colour_permutation(rng: random.Random) -> tuple[int, ...]:
    """A random permutation of the colours 1-9; the background keeps colour 0."""
    others = [c for c in COLOURS if c != BACKGROUND]
    rng.shuffle(others)
    mapping = [BACKGROUND] * len(COLOURS)
    for source, target in zip((c for c in COLOURS if c != BACKGROUND), others):
        mapping[source] = target
    return tuple(mapping)


# --- transforms as (forward, inverse) pairs ---------------------------------------------------


@dataclass(frozen=True)
class GridTransform:
    """A named, invertible map on grids. ``inverse(forward(g)) == g`` for every grid ``g``
    (tests/test_fewshot.py checks it with hypothesis); ``inverse`` returns None for a grid that
    ``forward`` cannot produce."""

    name: str
    forward: Callable[[Grid], Grid]
    inverse: Callable[[Grid], Grid | None]

    def then(self, other: GridTransform) -> GridTransform:
        """This transform followed by ``other``; undone in the opposite order."""

        def backward(grid: Grid) -> Grid | None:
            undone = other.inverse(grid)
            return None if undone is None else self.inverse(undone)

        return GridTransform(f"{self.name}+{other.name}", lambda grid: other.forward(self.forward(grid)), backward)


def _exact(name: str, forward: Callable[[Grid], Grid], inverse: Callable[[Grid], Grid]) -> GridTransform:
    return GridTransform(name, forward, inverse)


IDENTITY = _exact("identity", identity, identity)
ROTATE90 = _exact("rotate90", rotate90, rotate270)
ROTATE180 = _exact("rotate180", rotate180, rotate180)
ROTATE270 = _exact("rotate270", rotate270, rotate90)
FLIP_HORIZONTAL = _exact("flip_horizontal", flip_horizontal, flip_horizontal)
FLIP_VERTICAL = _exact("flip_vertical", flip_vertical, flip_vertical)
TRANSPOSE = _exact("transpose", transpose, transpose)
ANTI_TRANSPOSE = _exact("anti_transpose", anti_transpose, anti_transpose)

DIHEDRAL: tuple[GridTransform, ...] = (
    ROTATE90, ROTATE180, ROTATE270, FLIP_HORIZONTAL, FLIP_VERTICAL, TRANSPOSE, ANTI_TRANSPOSE,
)


def stretching(rows: int, cols: int, name: str) -> GridTransform:
    return GridTransform(name, lambda grid: stretch(grid, rows, cols), lambda grid: shrink(grid, rows, cols))


def tiling(rows: int, cols: int) -> GridTransform:
    return GridTransform(f"tile{rows}x{cols}", lambda grid: tile(grid, rows, cols), lambda grid: untile(grid, rows, cols))


def translation(down: int, right: int) -> GridTransform:
    return GridTransform(
        f"translate{down},{right}", lambda grid: translate(grid, down, right), lambda grid: untranslate(grid, down, right)
    )


def recolouring(mapping: Sequence[int]) -> GridTransform:
    mapping = tuple(mapping)
    if sorted(mapping) != list(COLOURS):
        raise ValueError(f"a recolouring is a permutation of the colours 0-9, got {mapping}")
    inverse = inverse_permutation(mapping)
    label = "".join(str(c) for c in mapping)
    return GridTransform(f"recolour{label}", lambda grid: recolour(grid, mapping), lambda grid: recolour(grid, inverse))


UPSCALE2 = stretching(2, 2, "upscale2")
DOUBLE_HEIGHT = stretching(2, 1, "double_height")
DOUBLE_WIDTH = stretching(1, 2, "double_width")
SHIFT_ONE = translation(1, 1)
REPEATS: tuple[GridTransform, ...] = (tiling(1, 2), tiling(2, 1), tiling(2, 2))

BY_NAME: dict[str, GridTransform] = {
    t.name: t for t in (IDENTITY, *DIHEDRAL, UPSCALE2, DOUBLE_HEIGHT, DOUBLE_WIDTH, SHIFT_ONE, *REPEATS)
}


def transform_named(name: str) -> GridTransform:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown grid transform {name!r}; known: {', '.join(BY_NAME)}") from None


# --- the self-edit's augmentation groups ------------------------------------------------------
# SEAL's self-edit switches four groups of augmentations on or off. What each group holds is this
# module's choice (the paper names the groups, not their members); every member is invertible.

AUGMENTATION_GROUPS = ("basic", "size", "chain", "repeat")


def augmentation_group(group: str, rng: random.Random) -> list[GridTransform]:
    """The transforms a group adds. ``rng`` draws the colour permutations of the chain group, so
    a seeded caller gets the same augmentations on every machine.

    * basic: the 7 rotations and reflections (size and colours kept);
    * size: ×2 resolution, ×2 height, ×2 width, and a one-cell shift down-right;
    * chain: a rotation or reflection followed by a size change or by a colour permutation, and
      two colour permutations on their own;
    * repeat: the grid tiled 1×2, 2×1 and 2×2.
    """
    if group == "basic":
        return list(DIHEDRAL)
    if group == "size":
        return [UPSCALE2, DOUBLE_HEIGHT, DOUBLE_WIDTH, SHIFT_ONE]
    if group == "chain":
        recolourings = [recolouring(colour_permutation(rng)) for _ in range(4)]
        return [
            ROTATE90.then(UPSCALE2),
            TRANSPOSE.then(DOUBLE_HEIGHT),
            FLIP_HORIZONTAL.then(DOUBLE_WIDTH),
            ROTATE180.then(recolourings[0]),
            TRANSPOSE.then(recolourings[1]),
            recolourings[2],
            recolourings[3],
        ]
    if group == "repeat":
        return list(REPEATS)
    raise ValueError(f"unknown augmentation group {group!r}; choose from {', '.join(AUGMENTATION_GROUPS)}")


def apply_to_all(transform: GridTransform, grids: Iterable[Grid], max_side: int = MAX_SIDE) -> list[Grid] | None:
    """``transform`` on every grid of a task, or None when one result would exceed ``max_side``
    (the whole task is skipped: a task with one grid left untransformed would teach a wrong rule)."""
    out = []
    for grid in grids:
        mapped = transform.forward(grid)
        if not fits(mapped, max_side):
            return None
        out.append(mapped)
    return out
