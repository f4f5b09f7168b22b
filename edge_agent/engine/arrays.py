"""Array helpers shared by the front-end and the network."""

from __future__ import annotations

import numpy as np


def sliding_view(array: np.ndarray, shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A read-only view of C-contiguous ``array`` with ``shape`` and ``strides`` (overlapping
    windows, without a copy); numpy refuses shapes that would read past the array's end.

    ``np.lib.stride_tricks.as_strided`` builds the same view through an ``__array_interface__``
    dictionary, about three times the cost of the ndarray constructor: in a 100 ms step of one
    stream, which makes several such views on small arrays, that is a visible share.
    """
    if not array.flags.c_contiguous:
        raise ValueError("sliding_view needs a C-contiguous array")
    view = np.ndarray(shape, array.dtype, buffer=array, strides=strides)
    view.flags.writeable = False
    return view
