"""Convert any attention model, including pre-trained ones, to alignment attention -- in one line.

    handle = convert_to_alignment(model, AlignmentConfig(method="ct"))
    out = model(**batch)                       # exactly what the model computed before
    loss = task_loss(out) + λ * handle.loss()  # alignment loss of this forward pass

Zhang et al. 2021: "It is simple to convert any models with self-attention, including pre-trained
ones, to the proposed alignment attention." Alignment only *reads* the projected queries and keys of
each attention module and adds a loss; it never changes what the model computes. So conversion is
done with hooks, not by rewriting modules:

- vqa-align's :class:`~vqa_align.align.attention.MultiHeadAttention`: its ``aligner`` slot gets a
  :class:`~vqa_align.align.aligner.HeadAligner`; a pre-hook asks it for the alignment term (and the
  details when recording), a hook reads them from its output.
- ``torch.nn.MultiheadAttention``: a pre-hook captures the inputs and masks; a hook recomputes the
  q/k projections from ``in_proj_weight`` (or ``q_proj_weight``/``k_proj_weight``) with the module's
  own parameters, so gradients reach them. ``batch_first`` both ways, unbatched inputs,
  ``key_padding_mask``, ``attn_mask``, ``add_bias_kv`` and ``add_zero_attn`` are handled.
- Hugging Face BERT-family self-attention (``BertSelfAttention``, ``RobertaSelfAttention``,
  ``ElectraSelfAttention``, ``AlbertAttention``, MiniLM = BERT; ``DistilBertSelfAttention``):
  hooks on the ``query``/``key`` Linear layers capture their outputs (no recomputation) and a
  pre-hook reads the ``attention_mask`` from the self-attention call, so padding never enters the
  distributions. Works with eager and SDPA attention (4-D additive float or boolean masks, 2-D
  0/1 masks, or no mask).

Helper networks (one :class:`HeadAligner` per attention module, shared by its heads) are registered
as a submodule named ``aligner`` of that attention module, so ``model.parameters()`` and the
``state_dict`` (keys ``...<attention>.aligner.*``) include them; ``handle.parameters()`` yields them
too, for an optimizer built before the conversion. ``handle.remove()`` removes every hook and every
aligner the conversion added: the module tree, its parameters and ``state_dict`` keys are exactly
as before.

Valid positions (True = real token): for self-attention the queries are the key positions, so
``q_valid = k_valid``; a key is valid when some query may attend to it. Cross-attention modules of
torch have no query-padding argument: all their queries count as valid. Hugging Face cross-attention
(``*CrossAttention``) is not supported and is reported like any unknown attention class.

Multiple calls of one module in a forward pass (ALBERT shares its layer) give one term each; the
"layer" of a record is its position in the forward order. Records are reset at every call of the
converted root module.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vqa_align.align.aligner import AlignmentSettings, AttentionDetails, HeadAligner, ModuleDiagnostics, diagnose_module
from vqa_align.align.attention import MultiHeadAttention
from vqa_align.align.distances import DISTANCES
from vqa_align.align.conversion_hooks import (
    UnsupportedAttentionError,
    _attention_weights,
    _ClearRecords,
    _HFHooks,
    _Record,
    _Site,
    _TorchMHAHooks,
    _VqaHooks,
)

ALIGNER_ATTRIBUTE = "aligner"  # the submodule name under which helper networks are attached

# Attention modules currently converted, so that converting twice is an error, not double hooks.
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, AlignmentHandle]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------
# Which modules are attention, and of which kind
# ----------------------------------------------------------------------------------------------


def _is_vqa_attention(module: nn.Module) -> bool:
    return isinstance(module, MultiHeadAttention)


def _hf_attribute_names(module: nn.Module) -> tuple[str, str, int, int] | None:
    """(query attr, key attr, heads, head dim) of a Hugging Face BERT-family self-attention, else None."""
    name = type(module).__name__
    if "Attention" not in name or "Cross" in name:
        return None
    for q_name, k_name, heads_name in (("query", "key", "num_attention_heads"), ("q_lin", "k_lin", "n_heads")):
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        heads, head_dim = getattr(module, heads_name, None), getattr(module, "attention_head_size", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(heads, int) and isinstance(head_dim, int):
            if "attention_mask" in inspect.signature(module.forward).parameters:
                return q_name, k_name, heads, head_dim
    return None


def attention_kind(module: nn.Module) -> str | None:
    """"vqa_align", "torch_mha", "hf_self_attention", or None when the module is no known attention."""
    if _is_vqa_attention(module):
        return "vqa_align"
    if isinstance(module, nn.MultiheadAttention):
        return "torch_mha"
    if _hf_attribute_names(module) is not None:
        return "hf_self_attention"
    return None


def find_attention(module: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], list[tuple[str, str]]]:
    """Known attention modules ``(name, module, kind)`` and unknown attention-like ``(name, class)``.

    Unknown = class name contains "Attention", not a known kind, and no known attention inside it
    (containers like ``BertAttention`` hold a known one); only the innermost of nested unknown ones
    is reported.
    """
    known: list[tuple[str, nn.Module, str]] = []
    known_names: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, HeadAligner):
            continue
        kind = attention_kind(sub)
        if kind is not None:
            known.append((name, sub, kind))
            known_names.append(name)

    def inside(child: str, parent: str) -> bool:
        return parent == "" or child.startswith(parent + ".")

    candidates = [
        name for name, sub in module.named_modules()
        if "Attention" in type(sub).__name__ and attention_kind(sub) is None and not isinstance(sub, HeadAligner)
        and not any(inside(k, name) for k in known_names)
    ]
    unknown = [
        (name, type(module.get_submodule(name)).__name__) for name in candidates
        if not any(other != name and inside(other, name) for other in candidates)
    ]
    return known, unknown


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------



class AlignmentHandle:
    """The result of :func:`convert_to_alignment`: read the alignment of the last forward pass.

    Attributes:
        modules: names of the converted attention modules (relative to the converted root).
        skipped: ``(name, class name)`` of unknown attention modules left alone (``strict=False``).
        always: compute the alignment terms in eval mode too (default: training mode only).
        record_details: keep detached projected q/k, masks and attention weights of every call
            for :meth:`diagnostics` (costs memory; off by default, see :meth:`recording`).
    """

    def __init__(self, root: nn.Module, kind_label: str | None):
        self.root = root
        self.kind_label = kind_label
        self.sites: list[_Site] = []
        self.skipped: list[tuple[str, str]] = []
        self.always = False
        self.record_details = False
        self._compute_override: bool | None = None
        self._records: list[_Record] = []
        self._root_hook: RemovableHandle | None = None
        self._removed = False

    # -- what training code reads ---------------------------------------------------------------

    @property
    def modules(self) -> list[str]:
        return [site.name for site in self.sites]

    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the helper networks (aligners) of the converted modules."""
        seen: set[int] = set()
        for site in self.sites:
            if site.aligner is not None and id(site.aligner) not in seen:
                seen.add(id(site.aligner))
                yield from site.aligner.parameters()

    def terms(self) -> list[Tensor]:
        """(B, H) alignment distance of every aligned call of the last forward pass, in forward order."""
        return [r.term for r in self._records if r.term is not None]

    def loss(self) -> Tensor:
        """Scalar: mean over aligned modules (calls) of the mean over batch and heads. Differentiable.

        Zero when nothing was computed (eval mode without ``always``, or no aligner).
        """
        terms = self.terms()
        if not terms:
            device = next((p.device for p in self.root.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return torch.stack([t.float().mean() for t in terms]).mean()

    @torch.no_grad()
    def diagnostics(self) -> list[ModuleDiagnostics]:
        """Per-head CT, MMD² (and the learned distance) of every call of the last recorded forward pass.

        Record first: ``with handle.recording(): model(...)``.
        """
        records = [r for r in self._records if r.details is not None]
        if not records and self.sites:
            raise RuntimeError("no details recorded: run the forward pass inside `with handle.recording():`")
        return [
            diagnose_module(r.site.name, r.kind, layer, r.details, r.site.aligner)
            for layer, r in enumerate(records)
        ]

    @contextlib.contextmanager
    def options(self, *, compute: bool | None = None, record: bool | None = None) -> Iterator["AlignmentHandle"]:
        """Temporarily force computing the terms on/off (``compute``) and recording details (``record``).

        ``compute=None`` keeps the default rule (training mode or ``always``). Used by MCAN to follow
        its own ``compute_alignment`` / ``need_details`` arguments.
        """
        saved = self._compute_override, self.record_details
        if compute is not None:
            self._compute_override = compute
        if record is not None:
            self.record_details = record
        try:
            yield self
        finally:
            self._compute_override, self.record_details = saved

    def recording(self) -> contextlib.AbstractContextManager["AlignmentHandle"]:
        """``with handle.recording(): model(...)`` then ``handle.diagnostics()``."""
        return self.options(record=True)

    # -- undo -------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove every hook and every aligner the conversion added; the model is as before."""
        if self._removed:
            return
        for site in self.sites:
            for hook in site.hooks:
                hook.remove()
            if site.owns_aligner:
                delattr(site.module, ALIGNER_ATTRIBUTE)
                if site.kind == "vqa_align":  # the slot was a plain ``None`` attribute before
                    site.module.aligner = None
            _CONVERTED.pop(site.module, None)
        if self._root_hook is not None:
            self._root_hook.remove()
        self._records = []
        self._removed = True

    def __repr__(self) -> str:
        aligned = sum(site.aligner is not None for site in self.sites)
        return f"AlignmentHandle({len(self.sites)} attention modules, {aligned} aligned, {len(self.skipped)} skipped)"

    # -- used by the hooks ------------------------------------------------------------------------

    def _computing(self, module: nn.Module) -> bool:
        if self._compute_override is not None:
            return self._compute_override
        return self.always or module.training

    def _active(self, site: _Site) -> tuple[bool, bool]:
        """(compute the term, record details) for a call of ``site`` now."""
        return self._computing(site.module) and site.aligner is not None, self.record_details

    def _clear(self) -> None:
        self._records = []

    def _emit(
        self,
        site: _Site,
        q: Tensor,
        k: Tensor,
        q_valid: Tensor,
        k_valid: Tensor,
        allowed: Tensor | None,
        scale: float,
        is_self: bool,
    ) -> None:
        """Record one call: q (B, H, Nq, d), k (B, H, Nk, d), valid masks (B, N), allowed (B|1, …, Nq, Nk)."""
        compute, record = self._active(site)
        term = site.aligner(q, k, q_valid, k_valid) if compute else None
        details = None
        if record:
            attention = _attention_weights(q.detach(), k.detach(), allowed, scale)
            details = AttentionDetails(q.detach(), k.detach(), attention, q_valid, k_valid)
        self._records.append(_Record(site, self._label(is_self), term, details))

    def _label(self, is_self: bool) -> str:
        if self.kind_label is not None:
            return self.kind_label
        return "self_attention" if is_self else "cross_attention"


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# The one-line API
# ----------------------------------------------------------------------------------------------


def convert_to_alignment(
    module: nn.Module,
    config: AlignmentSettings,
    *,
    strict: bool = True,
    kind: str | None = None,
) -> AlignmentHandle:
    """Attach alignment attention to every known attention module of ``module``; outputs unchanged.

    Args:
        module: any model (or a single attention module).
        config: method (``ct``/``gan``/``ot``; ``none`` observes only: diagnostics without
            aligners or loss), helper sizes. λ (``config.weight``) is the caller's to apply.
            ``config.modules`` (MCAN's module kinds) is not used here.
        strict: raise :class:`UnsupportedAttentionError` naming attention-like modules of unknown
            kind; with ``strict=False`` they are left alone and listed in ``handle.skipped``.
        kind: the ``kind`` label of the diagnostics (default: "self_attention" / "cross_attention").

    Returns:
        An :class:`AlignmentHandle`. Helper networks are submodules ``<attention>.aligner``.
    """
    config.validate()
    known, unknown = find_attention(module)
    if unknown and strict:
        raise UnsupportedAttentionError(unknown)
    already = [name for name, sub, _ in known if sub in _CONVERTED]
    if already:
        raise ValueError(f"already converted to alignment attention: {already}; call handle.remove() first")
    handle = AlignmentHandle(module, kind)
    handle.skipped = unknown
    handle._root_hook = module.register_forward_pre_hook(_ClearRecords(handle))
    try:
        for name, sub, sub_kind in known:
            _attach(handle, name, sub, sub_kind, config)
    except Exception:
        handle.remove()
        raise
    return handle


def _new_aligner(head_dim: int, config: AlignmentSettings, like: Tensor) -> HeadAligner | None:
    if DISTANCES[config.method].module is None:  # nothing to compute ("none": observe only)
        return None
    return HeadAligner(head_dim, config).to(device=like.device, dtype=like.dtype)


def _attach(handle: AlignmentHandle, name: str, module: nn.Module, kind: str, config: AlignmentSettings) -> None:
    if kind == "vqa_align":
        existing = module.aligner
        aligner = existing if existing is not None else _new_aligner(module.head_dim, config, module.in_proj.weight)
        site = _Site(name, module, kind, aligner, owns_aligner=existing is None and aligner is not None, hooks=[])
        if site.owns_aligner:
            module.aligner = aligner
        hooks: Any = _VqaHooks(handle, site)
    else:
        if kind == "torch_mha":
            weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
            heads, head_dim = module.num_heads, module.head_dim
        else:
            q_name, k_name, heads, head_dim = _hf_attribute_names(module)  # type: ignore[misc]
            weight = getattr(module, q_name).weight
        if hasattr(module, ALIGNER_ATTRIBUTE):
            raise ValueError(f"{name}: {type(module).__name__} already has an attribute {ALIGNER_ATTRIBUTE!r}")
        aligner = _new_aligner(head_dim, config, weight)
        site = _Site(name, module, kind, aligner, owns_aligner=aligner is not None, hooks=[])
        if aligner is not None:
            module.add_module(ALIGNER_ATTRIBUTE, aligner)
        if kind == "torch_mha":
            hooks = _TorchMHAHooks(handle, site)
        else:
            hooks = _HFHooks(handle, site, heads, head_dim)
            site.hooks.append(getattr(module, q_name).register_forward_hook(hooks.capture_query))
            site.hooks.append(getattr(module, k_name).register_forward_hook(hooks.capture_key))
    handle.sites.append(site)
    _CONVERTED[module] = handle
    site.hooks.append(module.register_forward_pre_hook(hooks.pre, with_kwargs=True))
    site.hooks.append(module.register_forward_hook(hooks.post, with_kwargs=True))


__all__ = [
    "ALIGNER_ATTRIBUTE",
    "AlignmentHandle",
    "UnsupportedAttentionError",
    "attention_kind",
    "convert_to_alignment",
    "find_attention",
]
