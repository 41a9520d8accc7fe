"""``ImageExplanation``: a ``shap.Explanation`` of images that keeps explain-cli's per-(image, class)
fields through slicing, and works around shap's output-axis guess.

Imported only by the Python API (explain_cli.api), never by the CLI: ``import shap`` takes seconds.

Layout, as shap's image explainers return it: ``values`` (N, H, W, C, k), channels last with the
k explained classes on the last axis (a layer map is at the layer's resolution and channels);
``data`` (N, size, size, 3) uint8, the images as the model saw them; ``base_values`` and
``output_names`` (N, k). shap decides which axis is the output from shapes alone, and guesses
wrong when the channel count equals the image count (3 RGB images: ``values.shape[-2:] ==
output_names.shape``); ``__init__`` gives it a shape it cannot misread, and ``__copy__`` (every
slice goes through it) rebuilds this class, so the fix and the extra fields survive ``expl[0]``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import shap
from slicer import Obj

#: Per-(image, class) fields beside shap's own, each (N, k) like ``base_values`` (see docs/python-api.md).
FIELDS = ("class_index", "probability", "rank", "output", "shap_sum", "additivity_error", "stability",
          "deletion_auc", "insertion_auc", "nsamples_used")


class ImageExplanation(shap.Explanation):
    """A shap.Explanation whose ``FIELDS`` (``expl.stability``, ``expl.rank``, ...) slice with it.

    Example::

        expl = explain_cli.explain("configs/demo.yaml")
        shap.image_plot(expl[:1])            # the first image
        expl[:1].stability                   # (1, k), its classes' split-half stability
    """

    def __init__(self, values: np.ndarray, base_values: Any = None, data: Any = None,
                 output_names: Any = None, fields: dict[str, tuple[np.ndarray, list[int]]] | None = None,
                 **kwargs: Any) -> None:
        names_shape = np.shape(output_names) if output_names is not None else ()
        values_shape = np.shape(values)
        guess_wrong = (len(names_shape) == 2 and len(values_shape) >= 2
                       and tuple(values_shape[-2:]) == tuple(names_shape))
        if guess_wrong:  # a zero-memory stand-in with another channel count, then the real values
            stand_in = values_shape[:-2] + (values_shape[-2] + 1, values_shape[-1])
            super().__init__(np.broadcast_to(np.float32(0), stand_in), base_values=base_values, data=data,
                             output_names=output_names, **kwargs)
            self.values = values
        else:
            super().__init__(values, base_values=base_values, data=data, output_names=output_names, **kwargs)
        for name, (array, dims) in (fields or {}).items():
            setattr(self._s, name, Obj(array, list(dims)))

    def _fields(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        return {name: (self._s._objects[name].o, list(self._s._objects[name].dim))
                for name in FIELDS if name in self._s._objects}

    def __copy__(self) -> "ImageExplanation":
        new = type(self)(self.values, base_values=self.base_values, data=self.data,
                         display_data=self.display_data, instance_names=self.instance_names,
                         output_names=self.output_names, fields=self._fields())
        new.op_history = copy.copy(self.op_history)
        return new

    def __getattr__(self, name: str) -> Any:
        """The per-(image, class) fields: ``expl.stability`` and the others of ``FIELDS``."""
        if name in FIELDS:
            objects = self.__dict__.get("_s")
            if objects is not None and name in objects._objects:
                return objects._objects[name].o
            return None
        raise AttributeError(name)
