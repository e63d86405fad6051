"""MCAN (Yu et al. 2019) encoder-decoder co-attention network with alignment attention.

Question: word embedding -> LSTM -> L self-attention (SA) layers (the encoder).
Image:    region features (+ box geometry) -> L self-guided-attention (SGA) layers (the decoder),
          each guided by the encoder's final output.
Fusion:   AttFlat on both streams, sum, LayerNorm, Linear -> answer logits.

Every attention module may carry a :class:`~vqa_align.align.aligner.HeadAligner` that measures the
distance between its query and key distributions (Zhang et al. 2021). The forward pass returns the
task logits and the alignment loss separately; the trainer adds λ·alignment itself.

Masks are boolean "valid" masks (True = real position) built from explicit question lengths and
region counts, never from all-zero rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vqa_align.align.aligner import AttentionDetails, HeadAligner, ModuleDiagnostics, diagnose_module
from vqa_align.align.attention import MultiHeadAttention, TokenPacking, valid_mask
from vqa_align.config import ModelConfig

BOX_GEOMETRY_DIM = 6  # normalised x1, y1, x2, y2, w, h

# Names of the model inputs in a batch (see vqa_align.data.loaders.collate_batch).
MODEL_INPUTS = ("tokens", "question_lengths", "features", "boxes", "region_counts")


MCAN_LAYER_NORM_EPS = 1e-6  # mcan-vqa's LayerNorm adds it to the std, not to the variance


class MCANLayerNorm(nn.Module):
    """The LayerNorm of mcan-vqa / OpenVQA: ``weight · (x − mean) / (std + eps) + bias``.

    It differs from ``nn.LayerNorm`` in two ways that change a trained model's outputs: the std is
    the *unbiased* one (divides by D − 1) and eps is added outside the square root. Parameter
    names match ``nn.LayerNorm`` so that checkpoints do not depend on the choice.
    """

    def __init__(self, size: int, eps: float = MCAN_LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased, as torch.Tensor.std defaults to
        return self.weight * (x - mean) / (std + self.eps) + self.bias


def layer_norm(cfg: ModelConfig, size: int) -> nn.Module:
    """The LayerNorm that ``model.layer_norm`` names."""
    return MCANLayerNorm(size) if cfg.layer_norm == "mcan" else nn.LayerNorm(size)


class FeedForward(nn.Sequential):
    """Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float):
        super().__init__(nn.Linear(hidden_size, ffn_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_size, hidden_size))


@dataclass
class LayerOutput:
    hidden: Tensor
    alignment: list[Tensor] = field(default_factory=list)  # (B, H) per aligned attention module
    details: dict[str, AttentionDetails] = field(default_factory=dict)


class SelfAttentionUnit(nn.Module):
    """SA: x = LN(x + Drop(MHA(x, x, x))); x = LN(x + Drop(FFN(x)))  (post-norm, as MCAN)."""

    def __init__(self, cfg: ModelConfig, aligner: HeadAligner | None):
        super().__init__()
        self.self_attention = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout, aligner)
        self.norm1 = layer_norm(cfg, cfg.hidden_size)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
        self.norm2 = layer_norm(cfg, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        x_valid: Tensor,
        compute_alignment: bool,
        need_details: bool,
        packing: TokenPacking | None = None,
    ) -> LayerOutput:
        """x: (B, N, D), or the packed real tokens (R, D) when ``packing`` is given (output alike)."""
        out = LayerOutput(x)
        attended, align, details = self.self_attention(
            x, x, x_valid, x_valid, compute_alignment, need_details, packing
        )
        x = self.norm1(x + self.drop(attended))
        x = self.norm2(x + self.drop(self.ffn(x)))
        out.hidden = x
        if align is not None:
            out.alignment.append(align)
        if details is not None:
            out.details["self_attention"] = details
        return out


class GuidedAttentionUnit(nn.Module):
    """SGA: SA over x, then x = LN(x + Drop(MHA(q=x, k=y, v=y))), then FFN."""

    def __init__(self, cfg: ModelConfig, self_aligner: HeadAligner | None, guided_aligner: HeadAligner | None):
        super().__init__()
        self.self_attention = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout, self_aligner)
        self.guided_attention = MultiHeadAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout, guided_aligner)
        self.norm1 = layer_norm(cfg, cfg.hidden_size)
        self.norm2 = layer_norm(cfg, cfg.hidden_size)
        self.ffn = FeedForward(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
        self.norm3 = layer_norm(cfg, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        x_valid: Tensor,
        y_valid: Tensor,
        compute_alignment: bool,
        need_details: bool,
        y_packing: TokenPacking | None = None,
    ) -> LayerOutput:
        """x: (B, N, D); y: (B, T, D), or its packed real tokens (R, D) when ``y_packing`` is given."""
        out = LayerOutput(x)
        attended, self_align, self_details = self.self_attention(x, x, x_valid, x_valid, compute_alignment, need_details)
        x = self.norm1(x + self.drop(attended))
        attended, guided_align, guided_details = self.guided_attention(
            x, y, x_valid, y_valid, compute_alignment, need_details, y_packing
        )
        x = self.norm2(x + self.drop(attended))
        out.alignment += [a for a in (self_align, guided_align) if a is not None]
        if need_details:
            out.details.update(self_attention=self_details, guided_attention=guided_details)
        x = self.norm3(x + self.drop(self.ffn(x)))
        out.hidden = x
        return out


class AttFlat(nn.Module):
    """Attention pooling: MLP -> glimpse logits -> masked softmax over positions -> weighted sum -> Linear."""

    def __init__(self, hidden_size: int, mlp_size: int, glimpses: int, out_size: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_size, glimpses))
        self.merge = nn.Linear(hidden_size * glimpses, out_size)

    def forward(self, x: Tensor, x_valid: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D), (B, N) -> pooled (B, out_size), weights (B, N, glimpses)."""
        logits = self.mlp(x).masked_fill(~x_valid[..., None], float("-inf"))
        weights = logits.softmax(dim=1)  # (B, N, G)
        pooled = torch.einsum("bng,bnd->bgd", weights, x).flatten(1)  # (B, G·D)
        return self.merge(pooled), weights


# ----------------------------------------------------------------------------------------------
# Input encoders
# ----------------------------------------------------------------------------------------------


class LSTMQuestionEncoder(nn.Module):
    """Word embedding (300-d, trainable) -> 1-layer LSTM with hidden = model width.

    The encoder interface: ``forward(tokens (B, T), lengths (B,)) -> (B, T, hidden)``.

    The LSTM runs over the padded batch without packing: it is unidirectional and padding is
    trailing, so the output at a real position t depends only on tokens 0..t and equals the packed
    result; padded positions are zeroed afterwards. This keeps the forward free of host syncs and
    data-dependent shapes (packing needs CPU lengths and sorts the batch), which the GPU path needs.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=1, batch_first=True)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        output, _ = self.lstm(self.embedding(tokens))  # (B, T, hidden)
        valid = valid_mask(lengths.to(tokens.device, non_blocking=True), tokens.shape[1])  # (B, T)
        return output * valid[..., None].to(output.dtype)  # zeros at padded positions


# Characters a GloVe value may take (published files: "-0.12345" and words under 70 characters);
# bounds how much of a hostile file one line may make us read.
GLOVE_CHARS_PER_VALUE = 64


def load_glove_embeddings(path: str | Path, vocabulary: dict[str, int], embedding: nn.Embedding) -> int:
    """Initialise rows of ``embedding`` from a GloVe-format text file (``word v1 v2 ...`` per line).

    Returns the number of vocabulary words found. Raises ValueError naming the file and line when
    a vector has the wrong dimension.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    dim = embedding.embedding_dim
    max_chars = GLOVE_CHARS_PER_VALUE * (dim + 1)  # a word and dim numbers; a longer line is not GloVe
    found = 0
    with torch.no_grad(), path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(iter(lambda: handle.readline(max_chars + 1), ""), start=1):
            if len(line) > max_chars:
                raise ValueError(f"{path}:{line_no}: line longer than {max_chars} characters; not a GloVe file "
                                 f"of {dim}-d vectors")
            word, _, rest = line.rstrip().partition(" ")
            index = vocabulary.get(word)
            if index is None:
                continue
            values = rest.split(" ")
            if len(values) != dim:
                raise ValueError(f"{path}:{line_no}: vector for {word!r} has {len(values)} values, expected {dim}")
            try:
                vector = [float(v) for v in values]
            except ValueError:
                raise ValueError(f"{path}:{line_no}: vector for {word!r} is not numeric") from None
            if not all(math.isfinite(v) for v in vector):
                raise ValueError(f"{path}:{line_no}: vector for {word!r} has a NaN or infinite value")
            embedding.weight[index] = torch.tensor(vector)
            found += 1
    return found


class RegionEncoder(nn.Module):
    """Region features (B, N, D_feat) + boxes (B, N, 4) -> (B, N, hidden)."""

    def __init__(self, feature_dim: int, hidden_size: int, use_boxes: bool):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        self.box_proj = nn.Linear(BOX_GEOMETRY_DIM, hidden_size) if use_boxes else None

    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        x = self.feature_proj(features)
        if self.box_proj is not None:
            width = boxes[..., 2] - boxes[..., 0]
            height = boxes[..., 3] - boxes[..., 1]
            geometry = torch.cat([boxes, width[..., None], height[..., None]], dim=-1)  # (B, N, 6)
            x = x + self.box_proj(geometry)
        return x


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    logits: Tensor  # (B, num_answers)
    alignment_loss: Tensor  # scalar: mean over aligned modules of the mean over batch and heads
    question_glimpse: Tensor | None = None  # (B, T) AttFlat weights over question tokens
    image_glimpse: Tensor | None = None  # (B, N) AttFlat weights over regions
    details: dict[str, AttentionDetails] = field(default_factory=dict)  # "encoder.0.self_attention", ...


def _module_kind(name: str) -> str:
    if name.startswith("encoder."):
        return "sa_question"
    return "sga_guided" if name.endswith("guided_attention") else "sa_image"


class MCAN(nn.Module):
    """MCAN encoder-decoder with alignment attention. Build with ``MCAN(config)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 2 or cfg.num_answers < 1:
            raise ValueError("ModelConfig.vocab_size and num_answers must be set from the data before building MCAN")
        self.config = cfg
        align = cfg.alignment
        head_dim = cfg.hidden_size // cfg.num_heads

        def aligner(kind: str) -> HeadAligner | None:
            if align.method == "none" or kind not in align.modules:
                return None
            return HeadAligner(head_dim, align)

        if cfg.question_encoder == "lstm":
            self.question_encoder: nn.Module = LSTMQuestionEncoder(cfg.vocab_size, cfg.word_embed_dim, cfg.hidden_size)
        elif cfg.question_encoder == "minilm":
            from vqa_align.model.question_encoders import MiniLMQuestionEncoder  # optional extra: vqa-align[minilm]

            # Its BERT self-attention is converted to alignment attention; its terms count as sa_question.
            aligned = align.method != "none" and "sa_question" in align.modules
            self.question_encoder = MiniLMQuestionEncoder(cfg.hidden_size, alignment=align if aligned else None)
        else:
            raise ValueError(f"model.question_encoder {cfg.question_encoder!r} is not available in this build")
        self.region_encoder = RegionEncoder(cfg.feature_dim, cfg.hidden_size, cfg.use_box_embedding)
        self.encoder = nn.ModuleList(SelfAttentionUnit(cfg, aligner("sa_question")) for _ in range(cfg.num_layers))
        self.decoder = nn.ModuleList(
            GuidedAttentionUnit(cfg, aligner("sa_image"), aligner("sga_guided")) for _ in range(cfg.num_layers)
        )
        flat = dict(mlp_size=cfg.flat_mlp_size, glimpses=cfg.flat_glimpses, out_size=cfg.flat_size, dropout=cfg.dropout)
        self.question_flat = AttFlat(cfg.hidden_size, **flat)
        self.image_flat = AttFlat(cfg.hidden_size, **flat)
        self.fusion_norm = layer_norm(cfg, cfg.flat_size)
        if cfg.classifier_hidden > 0:
            # A hidden layer lets the answer depend on products of question and image features
            # (e.g. "is there a red shape?" = [red asked] AND [red seen]); the fused vector is a
            # *sum*, so MCAN's linear classifier can only add the two evidences.
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(cfg.flat_size, cfg.classifier_hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                nn.Linear(cfg.classifier_hidden, cfg.num_answers),
            )
        else:
            self.classifier = nn.Linear(cfg.flat_size, cfg.num_answers)  # MCAN

    @property
    def has_alignment(self) -> bool:
        return any(isinstance(m, HeadAligner) for m in self.modules())

    def forward(
        self,
        tokens: Tensor,
        question_lengths: Tensor,
        features: Tensor,
        boxes: Tensor,
        region_counts: Tensor,
        compute_alignment: bool | None = None,
        need_details: bool = False,
    ) -> ModelOutput:
        """
        Args:
            tokens: (B, T) token ids, 0 = padding; question_lengths: (B,) >= 1, on any device.
            features: (B, N, D_feat); boxes: (B, N, 4) normalised x1, y1, x2, y2; region_counts: (B,) >= 1.
            compute_alignment: default: in training mode only.
            need_details: return per-module projected q/k and attention weights (slow path).
        """
        if compute_alignment is None:
            compute_alignment = self.training
        # question_lengths may live on any device; they are copied (non-blocking) to the tokens' device.
        q_valid = valid_mask(question_lengths.to(tokens.device, non_blocking=True), tokens.shape[1])  # (B, T)
        v_valid = valid_mask(region_counts, features.shape[1])  # (B, N)

        # A pretrained encoder converted with convert_to_alignment exposes its AlignmentHandle.
        encoder_alignment = getattr(self.question_encoder, "alignment", None)
        if encoder_alignment is None:
            y = self.question_encoder(tokens, question_lengths)  # (B, T, D)
        else:
            with encoder_alignment.options(compute=compute_alignment, record=need_details):
                y = self.question_encoder(tokens, question_lengths)  # (B, T, D)
        # Padded regions are zeroed so that whatever the caller put there cannot reach real positions.
        x = self.region_encoder(features.masked_fill(~v_valid[..., None], 0.0), boxes.masked_fill(~v_valid[..., None], 0.0))

        alignment_terms: list[Tensor] = [] if encoder_alignment is None else encoder_alignment.terms()
        details: dict[str, AttentionDetails] = {}
        packing = self._question_packing(q_valid)
        if packing is not None:
            y = packing.pack(y)  # (R, D): the SA layers' per-token ops run on real tokens only
        for index, layer in enumerate(self.encoder):
            out = layer(y, q_valid, compute_alignment, need_details, packing)
            y = out.hidden
            alignment_terms += out.alignment
            details.update({f"encoder.{index}.{k}": v for k, v in out.details.items()})
        y_keys = y  # what the decoder's guided attention projects: packed (R, D) or (B, T, D)
        if packing is not None:
            y = packing.unpack(y)  # (B, T, D), zeros at padded tokens
        for index, layer in enumerate(self.decoder):
            out = layer(x, y_keys, v_valid, q_valid, compute_alignment, need_details, packing)
            x = out.hidden
            alignment_terms += out.alignment
            details.update({f"decoder.{index}.{k}": v for k, v in out.details.items()})

        q_flat, q_glimpse = self.question_flat(y, q_valid)
        v_flat, v_glimpse = self.image_flat(x, v_valid)
        fused = q_flat + v_flat  # (B, flat_size): MCAN's fusion
        if self.config.fusion == "sum_product":
            fused = fused + q_flat * v_flat  # elementwise product: question-image agreement is linear in it
        logits = self.classifier(self.fusion_norm(fused))

        if alignment_terms:
            alignment_loss = torch.stack([term.mean() for term in alignment_terms]).mean()
        else:
            alignment_loss = logits.new_zeros(())
        return ModelOutput(
            logits=logits,
            alignment_loss=alignment_loss,
            question_glimpse=q_glimpse[..., 0] if need_details else None,
            image_glimpse=v_glimpse[..., 0] if need_details else None,
            details=details,
        )

    def _question_packing(self, q_valid: Tensor) -> TokenPacking | None:
        """Packing of the real question tokens, or None where the padded form is used."""
        mode = self.config.pack_questions
        if mode == "never" or (mode == "auto" and q_valid.is_cuda):
            return None
        if bool(q_valid.all()):  # nothing to skip
            return None
        return TokenPacking.from_mask(q_valid)

    def attention_modules(self) -> dict[str, MultiHeadAttention]:
        """Name -> attention module, names as in ``ModelOutput.details``."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiHeadAttention)}

    @torch.no_grad()
    def diagnose(self, **inputs: Tensor) -> tuple[ModelOutput, list[ModuleDiagnostics]]:
        """Eval-mode forward with per-module, per-head CT, MMD² and attention (for the app and reports)."""
        was_training = self.training
        self.eval()
        try:
            output = self(**inputs, compute_alignment=False, need_details=True)
            modules = self.attention_modules()
            diagnostics = [
                diagnose_module(name, _module_kind(name), int(name.split(".")[1]), det, modules[name].aligner)
                for name, det in output.details.items()
            ]
            encoder_diagnostics = getattr(self.question_encoder, "diagnostics", None)  # pretrained encoders
            if encoder_diagnostics is not None:
                diagnostics += encoder_diagnostics(prefix="question_encoder.")
        finally:
            self.train(was_training)
        return output, diagnostics

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
