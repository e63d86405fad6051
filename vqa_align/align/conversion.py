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
import math
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vqa_align.align.aligner import AttentionDetails, HeadAligner, ModuleDiagnostics, diagnose_module
from vqa_align.align.attention import MultiHeadAttention
from vqa_align.config import AlignmentConfig

ALIGNER_ATTRIBUTE = "aligner"  # the submodule name under which helper networks are attached

# Additive masks: 0 = keep, a large negative number (-1e4 in old BERT code, finfo.min now, -inf in
# torch) = masked. Anything below this threshold counts as masked.
_ADDITIVE_MASKED_BELOW = -1e3

# Attention modules currently converted, so that converting twice is an error, not double hooks.
_CONVERTED: "weakref.WeakKeyDictionary[nn.Module, AlignmentHandle]" = weakref.WeakKeyDictionary()


class UnsupportedAttentionError(TypeError):
    """A module looks like attention (class name contains "Attention") but is not a known kind.

    ``modules`` lists ``(name, class name)`` of every such module.
    """

    def __init__(self, modules: list[tuple[str, str]]):
        self.modules = modules
        listed = ", ".join(f"{name or '<root>'} ({cls})" for name, cls in modules)
        super().__init__(
            f"cannot convert {len(modules)} attention module(s) of unknown kind: {listed}. Known kinds: "
            "vqa_align MultiHeadAttention, torch.nn.MultiheadAttention, Hugging Face BERT-family "
            "self-attention. Pass strict=False to convert the others and list these in handle.skipped."
        )


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
# Masks
# ----------------------------------------------------------------------------------------------


def _allowed_from_mask(mask: Tensor, *, true_means_keep: bool) -> Tensor:
    """A mask of any of the usual conventions -> bool, True where attention is allowed."""
    if mask.dtype == torch.bool:
        return mask if true_means_keep else ~mask
    if mask.is_floating_point():
        return mask > _ADDITIVE_MASKED_BELOW  # additive: 0 keeps, large negative masks
    return mask != 0 if true_means_keep else mask == 0


def _key_valid_from_allowed(allowed: Tensor, batch: int, num_keys: int) -> Tensor:
    """Allowed (…, Nk) with a leading batch (or 1) dim -> (B, Nk): some query may attend to the key."""
    if allowed.dim() == 2:  # (B, Nk) 0/1 padding mask
        return allowed.expand(batch, num_keys)
    flat = allowed.reshape(allowed.shape[0], -1, allowed.shape[-1]).any(1)  # (B or 1, Nk)
    return flat.expand(batch, num_keys)


def _attention_weights(q: Tensor, k: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) over allowed keys -> (B, H, Nq, Nk); all-masked rows are zeros."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H·d) -> (B, H, N, d)."""
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One converted attention module."""

    name: str
    module: nn.Module
    kind: str  # "vqa_align" | "torch_mha" | "hf_self_attention"
    aligner: HeadAligner | None
    owns_aligner: bool  # the conversion attached it (remove() detaches it)
    hooks: list[RemovableHandle]
    state: dict[str, Any] | None = None  # what the pre-hook captured for the call in progress


@dataclass
class _Record:
    """What one call of one converted module produced in the last forward pass."""

    site: _Site
    kind: str  # the diagnostics kind label
    term: Tensor | None  # (B, H) alignment distance, when computed
    details: AttentionDetails | None  # when recording


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
# Hooks (callable objects rather than closures, so deepcopy / pickle of the model stay consistent)
# ----------------------------------------------------------------------------------------------


class _ClearRecords:
    def __init__(self, handle: AlignmentHandle):
        self.handle = handle

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.handle._clear()


class _SiteHooks:
    """What every attention-site hook pair shares: whether this call is observed, argument binding,
    and handing the per-call state from the pre-hook to the post-hook exactly once."""

    def __init__(self, handle: AlignmentHandle, site: _Site):
        self.handle, self.site = handle, site
        self.signature = inspect.signature(site.module.forward)

    def _bind(self, args: tuple, kwargs: dict) -> tuple[bool, bool, inspect.BoundArguments] | None:
        """(compute, record, bound forward arguments), or None (and no state) when not observed."""
        compute, record = self.handle._active(self.site)
        if not (compute or record):
            self.site.state = None
            return None
        return compute, record, self.signature.bind(*args, **kwargs)

    def _take_state(self) -> Any:
        state, self.site.state = self.site.state, None
        return state


class _VqaHooks(_SiteHooks):
    """vqa-align MultiHeadAttention computes alignment and details itself; ask for them, read them."""

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self._bind(args, kwargs)
        if call is None:
            return None
        compute, record, bound = call
        bound.apply_defaults()
        arguments = bound.arguments
        self.site.state = {"compute": compute, "record": record, "x": arguments["x"], "y": arguments["y"]}
        arguments["compute_alignment"] = bool(arguments["compute_alignment"]) or compute
        arguments["need_details"] = bool(arguments["need_details"]) or record
        return bound.args, bound.kwargs

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._take_state()
        if state is None:
            return
        _, alignment, details = output
        term = alignment if state["compute"] else None
        kept = details if state["record"] else None
        self.handle._records.append(_Record(self.site, self.handle._label(state["x"] is state["y"]), term, kept))


class _TorchMHAHooks(_SiteHooks):
    """torch.nn.MultiheadAttention: capture inputs, recompute q/k with the module's own weights."""

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._bind(args, kwargs)
        if call is None:
            return
        bound = call[2]
        bound.apply_defaults()
        self.site.state = dict(bound.arguments)

    def post(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._take_state()
        if state is None:
            return
        query, key = state["query"], state["key"]
        is_self = query is key
        nested_valid = None
        if query.is_nested:  # nn.TransformerEncoder's eval fast path: padding is in the nested sizes
            lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
            query = query.to_padded_tensor(0.0)  # (B, L, E), always batch-first
            key = query if is_self else key.to_padded_tensor(0.0)
            nested_valid = torch.arange(query.shape[1], device=query.device)[None, :] < lengths[:, None]
        elif query.dim() == 2:  # unbatched (L, E) -> (1, L, E)
            query, key = query.unsqueeze(0), key.unsqueeze(0)
        elif not module.batch_first:  # (L, B, E) -> (B, L, E)
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        batch, num_q, num_k = query.shape[0], query.shape[1], key.shape[1]
        embed = module.embed_dim
        if module._qkv_same_embed_dim:
            w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
        else:
            w_q, w_k = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        b_q, b_k = (bias[:embed], bias[embed : 2 * embed]) if bias is not None else (None, None)
        q = F.linear(query, w_q, b_q)  # (B, Nq, E)
        k = F.linear(key, w_k, b_k)  # (B, Nk, E)
        extra = 0
        if module.bias_k is not None:  # add_bias_kv: one learned key appended to every sequence
            k = torch.cat([k, module.bias_k.reshape(1, 1, embed).expand(batch, 1, embed).to(k.dtype)], 1)
            extra += 1
        if module.add_zero_attn:  # one zero key appended after projection
            k = torch.cat([k, k.new_zeros(batch, 1, embed)], 1)
            extra += 1

        # allowed (B, 1 | H, Nq, Nk + extra): key padding and attention mask, extra keys always allowed.
        allowed = torch.ones(batch, 1, num_q, num_k, dtype=torch.bool, device=q.device)
        padding = state.get("key_padding_mask")
        key_valid = torch.ones(batch, num_k, dtype=torch.bool, device=q.device)
        if nested_valid is not None and is_self:
            key_valid = nested_valid
            allowed = allowed & key_valid[:, None, None, :]
        elif padding is not None:
            key_valid = _allowed_from_mask(padding.reshape(batch, num_k), true_means_keep=False)
            allowed = allowed & key_valid[:, None, None, :]
        attn_mask = state.get("attn_mask")
        if attn_mask is not None:
            mask = _allowed_from_mask(attn_mask, true_means_keep=False)
            mask = mask.reshape(1, 1, num_q, num_k) if mask.dim() == 2 else mask.reshape(batch, module.num_heads, num_q, num_k)
            allowed = allowed & mask
        if extra:
            allowed = F.pad(allowed, (0, extra), value=True)
        k_valid = _key_valid_from_allowed(allowed, batch, num_k + extra)
        # Self-attention: queries are the key positions (padding from key_padding_mask only).
        q_valid = key_valid if is_self else torch.ones(batch, num_q, dtype=torch.bool, device=q.device)
        heads = module.num_heads
        self.handle._emit(
            self.site, _split_heads(q, heads), _split_heads(k, heads), q_valid, k_valid, allowed,
            1.0 / math.sqrt(module.head_dim), is_self,
        )


class _HFHooks(_SiteHooks):
    """Hugging Face BERT-family self-attention: read q/k from the Linear layers, the mask from the call."""

    def __init__(self, handle: AlignmentHandle, site: _Site, heads: int, head_dim: int):
        super().__init__(handle, site)
        self.heads, self.head_dim = heads, head_dim

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._bind(args, kwargs)
        if call is None:
            return
        arguments = call[2].arguments
        extra = arguments.get("kwargs", {})  # **kwargs of the forward
        cross = arguments.get("encoder_hidden_states", extra.get("encoder_hidden_states"))
        if cross is not None:
            raise UnsupportedAttentionError([(self.site.name, f"{type(module).__name__} used as cross-attention")])
        self.site.state = {
            "mask": arguments.get("attention_mask", extra.get("attention_mask")),
            "q": None,
            "k": None,
        }

    def capture_query(self, linear: nn.Module, args: tuple, output: Tensor) -> None:
        if self.site.state is not None and self.site.state["q"] is None:
            self.site.state["q"] = output

    def capture_key(self, linear: nn.Module, args: tuple, output: Tensor) -> None:
        if self.site.state is not None and self.site.state["k"] is None:
            self.site.state["k"] = output

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._take_state()
        if state is None:
            return
        if state["q"] is None or state["k"] is None:
            raise RuntimeError(f"{self.site.name}: the query/key projections were not called in this forward pass")
        q, k = _split_heads(state["q"], self.heads), _split_heads(state["k"], self.heads)  # (B, H, N, d)
        batch, _, num_q, _ = q.shape
        num_k = k.shape[2]
        mask = state["mask"]
        allowed = None
        if mask is not None:
            if mask.shape[-1] != num_k:
                raise RuntimeError(
                    f"{self.site.name}: attention mask covers {mask.shape[-1]} keys but the key projection "
                    f"gave {num_k} (cached decoding is not supported by alignment)"
                )
            allowed = _allowed_from_mask(mask, true_means_keep=True)
            if allowed.dim() == 2:  # (B, Nk) 0/1 padding mask (flash-attention style)
                allowed = allowed[:, None, None, :]
            k_valid = _key_valid_from_allowed(allowed, batch, num_k)
        else:
            k_valid = torch.ones(batch, num_k, dtype=torch.bool, device=q.device)
        q_valid = k_valid if num_q == num_k else torch.ones(batch, num_q, dtype=torch.bool, device=q.device)
        scale = float(getattr(module, "scaling", 1.0 / math.sqrt(self.head_dim)))
        self.handle._emit(self.site, q, k, q_valid, k_valid, allowed, scale, True)


# ----------------------------------------------------------------------------------------------
# The one-line API
# ----------------------------------------------------------------------------------------------


def convert_to_alignment(
    module: nn.Module,
    config: AlignmentConfig,
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


def _new_aligner(head_dim: int, config: AlignmentConfig, like: Tensor) -> HeadAligner | None:
    if config.method == "none":
        return None
    return HeadAligner(head_dim, config).to(device=like.device, dtype=like.dtype)


def _attach(handle: AlignmentHandle, name: str, module: nn.Module, kind: str, config: AlignmentConfig) -> None:
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
