"""Parameter selections: which entries of which live parameters a restricted analysis may move.

``select_parameters(model, "blocks.0.attn.head3")`` returns a :class:`ParameterSelection` whose
``masks`` map live-parameter names to boolean tensors of the parameter's shape (METHODS §1,
restricted LLC: the mask multiplies gradient, prior and noise). Accepted selections:

=============================  ==========================================================================
``None`` / ``"all"``           every live parameter
``"embed"``                    token embedding (on tied models this tensor is also the unembedding)
``"unembed"``                  unembedding W_U (and b_U where it is a parameter)
``"pos_embed"``                learned positional embedding (absent on rotary models)
``"ln_final"``                 final normalization
``"blocks.L"``                 everything in layer L
``"blocks.L.attn"``            layer L's attention: W_Q, W_K, W_V, W_O and their biases, b_O included
``"blocks.L.mlp"``             layer L's MLP (W_gate included on gated MLPs)
``"blocks.L.ln1"``, ``ln2``    layer L's normalizations
``"blocks.L.attn.headH"``      head H's slices of W_Q, W_K, W_V, W_O, b_Q, b_K, b_V (not b_O, which is
                               shared by all heads); under GQA the K/V slices are those of head H's KV
                               group, which the other heads of the group share
a live-parameter name          that whole tensor (``adapter.live_parameters().names``)
a list of the above            the union
=============================  ==========================================================================

Which flat entries of a parameter belong to a head depends on the backend's storage (HF ``Linear``
[H·d, D], GPT-2 ``Conv1D`` [D, H·d], HookedTransformer [H, D, d], joint QKV tensors ...). Instead of
encoding each layout, the head layout is *measured*: the parameter is filled with its own flat
indices, the backend's TransformerLens-layout accessor (a pure re-layout of the parameter) is read
back, and the parameter is restored bit for bit (checked).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .adapter import ModelAdapter

#: Accessors with one row per query head, and with one row per key/value head.
_Q_KEYS = ("W_Q", "b_Q", "W_O")
_KV_KEYS = ("W_K", "b_K", "W_V", "b_V")
#: Indices are written in base-256 digits: 0..255 are exact in every float dtype (bf16 included).
_BASE = 256

_HEAD = re.compile(r"^blocks\.(\d+)\.attn\.head(\d+)$")
_LAYER = re.compile(r"^blocks\.(\d+)$")
_LAYER_PART = re.compile(r"^blocks\.(\d+)\.(attn|mlp|ln\w*)$")
_MODEL_PARTS = ("embed", "unembed", "pos_embed", "ln_final")

ACCEPTED = (
    'None or "all", "embed", "unembed", "pos_embed", "ln_final", "blocks.L", "blocks.L.attn", '
    '"blocks.L.mlp", "blocks.L.ln1", "blocks.L.ln2", "blocks.L.attn.headH", an exact live-parameter '
    "name, or a list of these"
)


@dataclass(frozen=True)
class ParameterSelection:
    """A subset of the live parameters' entries.

    ``masks[name]`` is a bool tensor of parameter ``name``'s shape; parameters with no selected
    entry are left out. ``spec`` is the selection as given (normalised to a tuple of strings).
    """

    spec: tuple[str, ...]
    masks: dict[str, Bool[Tensor, "..."]] = field(repr=False)
    n_live: int

    @property
    def names(self) -> list[str]:
        """Names of the parameters with at least one selected entry."""
        return list(self.masks)

    @property
    def numel(self) -> int:
        """Number of selected entries: the nominal parameter count of the selection."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def is_full(self, name: str) -> bool:
        """Whether every entry of parameter ``name`` is selected."""
        return name in self.masks and bool(self.masks[name].all())

    def __repr__(self) -> str:
        return f"ParameterSelection(spec={self.spec!r}, tensors={len(self.masks)}, numel={self.numel} of {self.n_live})"

    def to_frame(self) -> pd.DataFrame:
        """One row per selected parameter: name, shape, selected entries, fraction of the tensor."""
        return pd.DataFrame(
            [
                {
                    "name": name,
                    "shape": tuple(m.shape),
                    "numel": m.numel(),
                    "selected": int(m.sum()),
                    "fraction": float(m.float().mean()),
                }
                for name, m in self.masks.items()
            ],
            columns=["name", "shape", "numel", "selected", "fraction"],
        )

    def to_dict(self) -> dict:
        return {"spec": list(self.spec), "numel": self.numel, "n_live": self.n_live,
                "parameters": {n: int(m.sum()) for n, m in self.masks.items()}}


# ---------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class _HeadLayout:
    """For every attention parameter of one layer: which query head (``q_head``) or KV head
    (``kv_head``) each flat entry feeds, -1 where none (e.g. b_O, or a K entry in ``q_head``)."""

    q_head: dict[str, Int[Tensor, "..."]]
    kv_head: dict[str, Int[Tensor, "..."]]
    n_kv: int


_LAYOUTS: "weakref.WeakKeyDictionary[ModelAdapter, dict[int, _HeadLayout]]" = weakref.WeakKeyDictionary()


def _bits(t: Tensor) -> Tensor:
    """The tensor's bytes, for a bit-exact comparison (NaN and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def read_attention(adapter: ModelAdapter, layer: int) -> dict[str, Tensor]:
    """Detached copies of layer ``layer``'s per-head attention accessors (TL layout, n_kv heads for
    K/V; b_O, which no head owns, and absent biases left out)."""
    values = adapter.layer_attention(layer)
    return {k: values[k].detach().clone() for k in _Q_KEYS + _KV_KEYS if values.get(k) is not None}


def measure_parameter(adapter: ModelAdapter, layer: int, name: str, p: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """accessor key → (touched mask of the accessor's shape, flat index into ``p`` per touched entry).

    Fills ``p`` with 0, then 1 (entries that change come from ``p``), then the base-256 digits of
    each entry's flat index, reading the accessors after each fill; restores ``p`` exactly.
    """
    saved = p.detach().clone()
    flat = torch.arange(p.numel(), device=p.device)
    n_digits = 1
    while _BASE**n_digits < p.numel():
        n_digits += 1
    try:
        with torch.no_grad():
            p.fill_(0)
            zero = read_attention(adapter, layer)
            p.fill_(1)
            one = read_attention(adapter, layer)
            touched = {k: one[k] != zero[k] for k in zero}
            touched = {k: t for k, t in touched.items() if t.any()}
            codes = {k: torch.zeros(int(t.sum()), dtype=torch.long, device=p.device) for k, t in touched.items()}
            for digit in range(n_digits):
                p.copy_(((flat // _BASE**digit) % _BASE).view(p.shape).to(p.dtype))
                read = read_attention(adapter, layer)
                for k, t in touched.items():
                    values = read[k][t].double()
                    if not ((values == values.round()) & (values >= 0) & (values < _BASE)).all():
                        raise RuntimeError(
                            f"{type(adapter).__name__}: the {k} accessor of layer {layer} is not a re-layout of "
                            f"parameter {name!r}, so its entries cannot be assigned to heads"
                        )
                    codes[k] += values.long() * _BASE**digit
            # One scrambled fill checks the decoded indices end to end.
            probe = (flat * 7919 + 13) % _BASE
            p.copy_(probe.view(p.shape).to(p.dtype))
            read = read_attention(adapter, layer)
            for k, t in touched.items():
                if not torch.equal(read[k][t].long(), probe[codes[k]]):
                    raise RuntimeError(f"head layout of {name!r} ({k}, layer {layer}) failed its check")
    finally:
        with torch.no_grad():
            p.copy_(saved)
    if not torch.equal(_bits(p), _bits(saved)):
        raise RuntimeError(f"parameter {name!r} was not restored bit for bit after measuring its head layout")
    return {k: (t, codes[k]) for k, t in touched.items()}


def _parameters_for_writing(adapter: ModelAdapter):
    """The live parameters; where the adapter refuses them because some *MLP* weights are computed
    from detached copies (TransformerLens 3.x bridge, compatibility mode, gated MLP), the parameters
    that do get a gradient still include every attention weight, which is all a gauge writes. That
    partial set is computed without being cached on the adapter, so no other analysis sees it."""
    try:
        return adapter.live_parameters()
    except RuntimeError:
        return adapter.unchecked_live_parameters()


def attention_layouts(adapter: ModelAdapter, layer: int) -> list[tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]]:
    """(parameter, accessor key → (touched mask, flat parameter index)) for layer ``layer``'s attention
    (:func:`measure_parameter` of every live parameter of that component)."""
    component = f"blocks.{layer}.attn"
    out = []
    for lp in _parameters_for_writing(adapter):
        if component in adapter.parameter_components(lp):
            out.append((lp.param, measure_parameter(adapter, layer, lp.name, lp.param)))
    return out


def writable(layouts, key: str, shape: torch.Size) -> bool:
    """Whether every entry of accessor ``key`` comes from some live parameter entry."""
    covered = torch.zeros(shape, dtype=torch.bool)
    for _, layout in layouts:
        if key in layout:
            covered |= layout[key][0].cpu()
    return bool(covered.all())

@dataclass(frozen=True)
class CircuitParameters:
    """Whether a layer's OV factors (W_V, W_O and a nonzero b_V) and QK factors (W_Q, W_K and nonzero
    b_Q, b_K) are entirely live parameters. Where they are not (the SMA toy has a learned query in b_Q
    over W_Q = 0 and no W_K or W_O: the adapter presents fixed identities), the circuit has no
    GL(d_head) gauge, and its product is fixed by the architecture rather than degenerate in the
    weights (METHODS §2)."""

    ov: bool
    qk: bool


def circuit_parameters(adapter: ModelAdapter, layer: int) -> CircuitParameters:
    """:class:`CircuitParameters` of layer ``layer``: the one rule for the gauges
    (``tl_degeneracy.gauge``) and the counts that assume a gauge (invariants' free directions, head
    synchronization). Decided without writing anything and without a backward pass: the adapters'
    accessors are re-layouts of the model's parameters (``ModelAdapter.layer_attention``), so an
    accessor whose storage is a parameter's is that parameter's, and one with storage of its own is
    fixed (the SMA toy's identities and zeros). Measuring the layouts (:func:`measure_parameter`) would
    write into the weights, which a read-only analysis must not (and cannot, for weights made under
    inference_mode)."""
    storages = {p.untyped_storage().data_ptr() for p in adapter.model.parameters()}
    values = adapter.layer_attention(layer)

    def param(key: str) -> bool:
        t = values.get(key)
        return t is not None and t.untyped_storage().data_ptr() in storages

    def bias_ok(key: str) -> bool:  # a bias that is not a parameter must be zero to leave the gauge free
        t = values.get(key)
        return t is None or param(key) or not bool(t.detach().any())

    return CircuitParameters(ov=param("W_V") and param("W_O") and bias_ok("b_V"),
                             qk=param("W_Q") and param("W_K") and bias_ok("b_Q") and bias_ok("b_K"))


def _head_layout(adapter: ModelAdapter, layer: int) -> _HeadLayout:
    cache = _LAYOUTS.setdefault(adapter, {})
    if layer in cache:
        return cache[layer]
    component = f"blocks.{layer}.attn"
    q_head: dict[str, Tensor] = {}
    kv_head: dict[str, Tensor] = {}
    n_kv = adapter.n_kv_heads
    for lp in adapter.live_parameters():
        if component not in adapter.parameter_components(lp):
            continue
        p = lp.param
        qh = torch.full(p.shape, -1, dtype=torch.long, device=p.device)
        kh = torch.full(p.shape, -1, dtype=torch.long, device=p.device)
        for key, (touched, idx) in measure_parameter(adapter, layer, lp.name, p).items():
            n_rows = touched.shape[0]
            # the head axis is axis 0 of every per-layer accessor: the row of each touched entry
            rows = torch.arange(n_rows, device=p.device).view(-1, *[1] * (touched.ndim - 1))
            rows = rows.expand_as(touched)[touched]
            if key in _Q_KEYS:
                qh.view(-1)[idx] = rows
            else:
                n_kv = n_rows
                kh.view(-1)[idx] = rows
        q_head[lp.name], kv_head[lp.name] = qh, kh
    cache[layer] = _HeadLayout(q_head=q_head, kv_head=kv_head, n_kv=n_kv)
    return cache[layer]


def _head_masks(adapter: ModelAdapter, layer: int, head: int) -> dict[str, Tensor]:
    layout = _head_layout(adapter, layer)
    group = adapter.n_heads // layout.n_kv
    return {
        name: (layout.q_head[name] == head) | (layout.kv_head[name] == head // group)
        for name in layout.q_head
    }


# ---------------------------------------------------------------------------------------------- selection
def _full(lp) -> Tensor:
    return torch.ones(lp.shape, dtype=torch.bool, device=lp.param.device)


def _resolve(adapter: ModelAdapter, item: str) -> dict[str, Tensor]:
    live = adapter.live_parameters()
    if item == "all":
        return {lp.name: _full(lp) for lp in live}
    if item in live:
        return {item: _full(live[item])}
    m = _HEAD.match(item)
    if m:
        layer, head = int(m[1]), int(m[2])
        _check_layer(adapter, layer, item)
        if not 0 <= head < adapter.n_heads:
            raise ValueError(
                f"selection {item!r}: head {head} out of range; this model has heads 0..{adapter.n_heads - 1}"
            )
        return _head_masks(adapter, layer, head)
    m = _LAYER.match(item)
    if m:
        _check_layer(adapter, int(m[1]), item)
        prefix = f"{item}."
        chosen = {lp.name: _full(lp) for lp in live if any(c.startswith(prefix) for c in adapter.parameter_components(lp))}
    elif _LAYER_PART.match(item) or item in _MODEL_PARTS:
        if _LAYER_PART.match(item):
            _check_layer(adapter, int(_LAYER_PART.match(item)[1]), item)
        chosen = {lp.name: _full(lp) for lp in live if item in adapter.parameter_components(lp)}
    else:
        raise ValueError(
            f"unknown parameter selection {item!r}; accepted: {ACCEPTED}. Components of this model: "
            f"{', '.join(sorted({c for lp in live for c in adapter.parameter_components(lp)}))}"
        )
    if not chosen:
        raise ValueError(
            f"selection {item!r} matches no live parameter of this {type(adapter.model).__name__} "
            f"(e.g. pos_embed on a rotary model, mlp on an attention-only model); live parameters: {live.names[:8]} ..."
        )
    return chosen


def _check_layer(adapter: ModelAdapter, layer: int, item: str) -> None:
    if not 0 <= layer < adapter.n_layers:
        raise ValueError(
            f"selection {item!r}: layer {layer} out of range; this model has layers 0..{adapter.n_layers - 1}"
        )


def select_parameters(model, selection: str | Sequence[str] | None = None) -> ParameterSelection:
    """Resolve a parameter selection (module docstring) on ``model`` (anything :func:`adapt` takes).

    Raises ValueError for an unknown selection (listing what is accepted), a layer or head out of
    range, or a component the model does not have.
    """
    from .adapt import adapt

    adapter = adapt(model)
    if selection is None:
        items: tuple[str, ...] = ("all",)
    elif isinstance(selection, str):
        items = (selection,)
    elif isinstance(selection, Sequence) and selection and all(isinstance(s, str) for s in selection):
        items = tuple(selection)
    else:
        raise ValueError(
            f"parameter selection must be a string or a non-empty list of strings, got {selection!r}; "
            f"accepted: {ACCEPTED}"
        )
    masks: dict[str, Tensor] = {}
    for item in items:
        for name, mask in _resolve(adapter, item).items():
            masks[name] = masks[name] | mask if name in masks else mask
    order = adapter.live_parameters().names
    masks = {name: masks[name] for name in order if name in masks and bool(masks[name].any())}
    return ParameterSelection(spec=items, masks=masks, n_live=adapter.live_parameters().numel)


def component_selections(model, components: str | Sequence[str]) -> list[str]:
    """One selection per component named by ``components``, on ``model`` (anything :func:`adapt`
    takes): ``"heads"`` (``blocks.L.attn.headH``, every layer and head), ``"layers"``
    (``blocks.L``), ``"attn"`` / ``"mlp"`` (``blocks.L.attn`` / ``blocks.L.mlp`` of the layers that
    have one), or a list of selections, returned as given. How ``llc_by_component`` and the report's
    ``llc_components`` read the argument.
    """
    from .adapt import adapt

    if not isinstance(components, str):
        return list(components)
    adapter = adapt(model)
    L, H = adapter.n_layers, adapter.n_heads
    if components == "heads":
        return [f"blocks.{l}.attn.head{h}" for l in range(L) for h in range(H)]
    if components == "layers":
        return [f"blocks.{l}" for l in range(L)]
    if components in ("attn", "mlp"):
        out = []
        for l in range(L):
            try:
                select_parameters(adapter, f"blocks.{l}.{components}")
                out.append(f"blocks.{l}.{components}")
            except ValueError:
                continue  # e.g. an attention-only layer has no MLP
        return out
    raise ValueError(f'components must be "heads", "layers", "attn", "mlp" or a list of selections; got {components!r}')
