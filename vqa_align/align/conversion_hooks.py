"""The hooks of :func:`vqa_align.align.conversion.convert_to_alignment`, one class per attention
family, and what they share: the mask conventions, head splitting and the attention weights of a
recorded call. Each hook object holds the ``AlignmentHandle`` that owns it (``handle``) and calls
its ``_active`` / ``_emit`` / ``_clear``; see :mod:`vqa_align.align.conversion` for the families.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vqa_align.align.aligner import AttentionDetails, HeadAligner

# Additive masks: 0 = keep, a large negative number (-1e4 in old BERT code, finfo.min now, -inf in
# torch) = masked. Anything below this threshold counts as masked.
_ADDITIVE_MASKED_BELOW = -1e3


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


# Hooks (callable objects rather than closures, so deepcopy / pickle of the model stay consistent)
# ----------------------------------------------------------------------------------------------


class _ClearRecords:
    def __init__(self, handle: Any):
        self.handle = handle

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.handle._clear()


class _SiteHooks:
    """What every attention-site hook pair shares: whether this call is observed, argument binding,
    and handing the per-call state from the pre-hook to the post-hook exactly once."""

    def __init__(self, handle: Any, site: _Site):
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

    def __init__(self, handle: Any, site: _Site, heads: int, head_dim: int):
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
