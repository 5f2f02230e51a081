"""Report contents to and from strict JSON (and CSV): every number kept, nothing Python-specific.

Conventions: NaN → null; ±∞ → the strings "inf" / "-inf"; complex numbers → [re, im]; arrays and
tensors → nested lists; tuples → lists. Tables are stored as column names plus one record per row
(with the frame's ``attrs``); figures as plotly's own JSON description.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["to_jsonable", "table_to_dict", "table_from_dict", "csv_frame", "figure_to_dict", "figure_from_dict"]


def to_jsonable(obj):
    """``obj`` as plain JSON values (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isnan(x):
            return None
        return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
    if isinstance(obj, (complex, np.complexfloating)):
        return [to_jsonable(obj.real), to_jsonable(obj.imag)]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()] if obj.ndim else to_jsonable(obj.item())
    if type(obj).__module__.startswith("torch"):
        import torch

        if isinstance(obj, torch.Tensor):
            return to_jsonable(obj.detach().cpu().numpy())
        return str(obj)  # torch.device, torch.dtype
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # e.g. data.Positions
        return to_jsonable(obj.to_dict())
    raise TypeError(f"cannot store a {type(obj).__name__} in the report JSON: {obj!r:.80}")


#: Column dtypes a table read back from JSON takes again: JSON's numbers and nulls make a nullable
#: integer column float ("0.0" in a resumed report's CSV where the first run wrote "0": audit 15b).
_RESTORED = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "boolean",
             "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")


def table_to_dict(frame: pd.DataFrame) -> dict:
    """{"columns": [...], "records": [{column: value}, ...], "attrs": {...}, "dtypes": {column:
    dtype}} in JSON values (the integer and boolean dtypes, for :func:`table_from_dict`)."""
    return {
        "columns": [str(c) for c in frame.columns],
        "records": [to_jsonable(r) for r in frame.to_dict(orient="records")],
        "attrs": to_jsonable(dict(frame.attrs)),
        "dtypes": {str(c): str(t) for c, t in frame.dtypes.items() if str(t) in _RESTORED},
    }


def table_from_dict(d: dict) -> pd.DataFrame:
    """The table of :func:`table_to_dict` (arrays come back as lists, NaN as None; integer and
    boolean columns with their dtypes)."""
    frame = pd.DataFrame(d["records"], columns=d["columns"])
    for column, dtype in (d.get("dtypes") or {}).items():
        if column in frame.columns and dtype in _RESTORED:
            frame[column] = frame[column].astype(dtype)
    frame.attrs.update(d.get("attrs", {}))
    return frame


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with list/array/tuple cells written as their JSON text, so a CSV cell holds them whole."""
    out = frame.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray, dict))).any():
            out[col] = out[col].map(lambda v: json.dumps(to_jsonable(v)) if isinstance(v, (list, tuple, np.ndarray, dict)) else v)
    return out


def figure_to_dict(fig) -> dict:
    """A plotly figure as JSON values (data and layout, arrays as lists)."""
    return to_jsonable(fig.to_plotly_json())


def figure_from_dict(d: dict):
    import plotly.graph_objects as go

    return go.Figure(d)
