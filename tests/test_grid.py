"""The index's grid (`index._Grid`) finds, for each point, exactly the boxes that hold it,
edges included, sorted by point then box: against a check of every box."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.geofence.core.index import _Grid

COORD = st.one_of(st.floats(-10.0, 10.0), st.sampled_from([-10.0, -2.5, 0.0, 2.5, 10.0]))


def every_box(grid: _Grid, x: np.ndarray, y: np.ndarray) -> tuple[list[int], list[int]]:
    pairs = [
        (i, b)
        for i in range(len(x))
        for b in range(grid.count)
        if grid.x0[b] <= x[i] <= grid.x1[b] and grid.y0[b] <= y[i] <= grid.y1[b]
    ]
    return [p for p, _ in pairs], [b for _, b in pairs]


@st.composite
def boxes(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    n = draw(st.integers(0, 40))
    x0 = np.array(draw(st.lists(COORD, min_size=n, max_size=n)))
    y0 = np.array(draw(st.lists(COORD, min_size=n, max_size=n)))
    w = np.array(draw(st.lists(st.floats(0.0, 8.0), min_size=n, max_size=n)))
    h = np.array(draw(st.lists(st.floats(0.0, 8.0), min_size=n, max_size=n)))
    x1, y1 = x0 + w, y0 + h
    # A box no grid can hold (a projection gone wrong): tried against every point.
    if n and draw(st.booleans()):
        x0[0], x1[0] = -np.inf, np.inf
    if n > 1 and draw(st.booleans()):
        y1[1] = np.nan
    return x0, y0, x1, y1


@settings(max_examples=200, deadline=None)
@given(boxes(), st.lists(st.tuples(COORD, COORD), max_size=30), st.booleans())
def test_the_grid_finds_every_box_holding_each_point(
    box: tuple[np.ndarray, ...], points: list[tuple[float, float]], nan: bool
) -> None:
    grid = _Grid(*box)
    x = np.array([p[0] for p in points] + ([np.nan] if nan else []), dtype=np.float64)
    y = np.array([p[1] for p in points] + ([0.0] if nan else []), dtype=np.float64)
    pt, bx = grid.query(x, y)
    assert (pt.tolist(), bx.tolist()) == every_box(grid, x, y)


def test_many_boxes_over_one_point() -> None:
    """More boxes hold a point than the query's first room for them (16)."""
    n = 100
    corner = np.linspace(-5.0, -0.1, n)
    grid = _Grid(corner, corner, -corner, -corner)
    x = np.array([0.0, 0.0, 4.0])
    pt, bx = grid.query(x, x)
    assert (pt.tolist(), bx.tolist()) == every_box(grid, x, x)
    assert np.count_nonzero(pt == 0) == n
