"""MCAN with alignment attention: attention against PyTorch's, masking, gradients, diagnostics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_batch, tiny_model_config
from vqa_align.config import load_config
from vqa_align.align.attention import MultiHeadAttention, TokenPacking
from vqa_align.model.mcan import MCAN


def _copy_to_torch_mha(ours: MultiHeadAttention, dim: int, heads: int) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


@pytest.mark.parametrize("need_details", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_torch_multihead_attention(need_details, cross):
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = MultiHeadAttention(dim, heads, dropout=0.0).eval()
    ref = _copy_to_torch_mha(ours, dim, heads)
    x = torch.randn(3, 7, dim)
    y = torch.randn(3, 5, dim) if cross else x
    x_valid = torch.ones(3, 7, dtype=torch.bool)
    y_valid = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    if not cross:
        y_valid = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1] + [0] * 6], dtype=torch.bool)
    out, _, details = ours(x, y, x_valid, y_valid, need_details=need_details)
    want, want_weights = ref(x, y, y, key_padding_mask=~y_valid, average_attn_weights=False)
    assert (out - want).abs().max() <= 1e-5
    if need_details:
        assert (details.attention - want_weights).abs().max() <= 1e-5
        assert details.queries.shape == (3, heads, 7, dim // heads)


@pytest.mark.parametrize("method", ["none", "ct", "gan", "ot"])
def test_padding_changes_neither_logits_nor_alignment(method):
    torch.manual_seed(0)
    model = MCAN(tiny_model_config(method)).train()  # dropout 0: train mode is deterministic
    batch = random_batch()
    base = model(**batch)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad_tokens = torch.arange(noisy["tokens"].shape[1])[None] >= noisy["question_lengths"][:, None]
    noisy["tokens"][pad_tokens] = 5
    pad_regions = torch.arange(noisy["features"].shape[1])[None] >= noisy["region_counts"][:, None]
    noisy["features"][pad_regions] = 1e3
    noisy["boxes"][pad_regions] = 0.7
    other = model(**noisy)
    assert torch.allclose(base.logits, other.logits, atol=1e-5)
    assert torch.allclose(base.alignment_loss, other.alignment_loss, atol=1e-6)
    if method != "none":
        assert base.alignment_loss.item() > 0


@pytest.mark.parametrize("method", ["none", "ct"])
def test_removing_padding_gives_the_same_result(method):
    torch.manual_seed(0)
    model = MCAN(tiny_model_config(method)).eval()
    batch = random_batch(batch=4)
    full = model(**batch, compute_alignment=True)
    for i in range(4):
        t, n = batch["question_lengths"][i].item(), batch["region_counts"][i].item()
        single = dict(
            tokens=batch["tokens"][i : i + 1, :t],
            question_lengths=batch["question_lengths"][i : i + 1],
            features=batch["features"][i : i + 1, :n],
            boxes=batch["boxes"][i : i + 1, :n],
            region_counts=batch["region_counts"][i : i + 1],
        )
        alone = model(**single, compute_alignment=True)
        assert torch.allclose(alone.logits, full.logits[i : i + 1], atol=1e-5)


def test_token_packing_round_trip():
    valid = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    x = torch.randn(3, 3, 5)
    packing = TokenPacking.from_mask(valid)
    packed = packing.pack(x)
    assert packed.shape == (6, 5)
    assert torch.equal(packed, x[valid])
    unpacked = packing.unpack(packed)
    assert torch.equal(unpacked[valid], x[valid])
    assert unpacked[~valid].abs().sum() == 0


@pytest.mark.parametrize("method", ["none", "ct", "gan"])
def test_packed_question_encoder_equals_padded(method):
    """Running the encoder's per-token ops on real tokens only changes no output and no gradient."""
    batch = random_batch(batch=5, max_tokens=7, max_regions=6, seed=3)
    assert not bool((batch["question_lengths"] == 7).all())  # something to pack
    results = {}
    for mode in ("always", "never"):
        torch.manual_seed(0)
        model = MCAN(tiny_model_config(method, pack_questions=mode)).train()  # dropout 0
        assert (model._question_packing(torch.ones(2, 3, dtype=torch.bool)) is None)  # nothing to skip
        out = model(**batch)
        (out.logits.square().mean() + out.alignment_loss).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[mode] = (out.logits.detach(), out.alignment_loss.detach(), grads)
    (logits_a, align_a, grads_a), (logits_b, align_b, grads_b) = results["always"], results["never"]
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    assert torch.allclose(align_a, align_b, atol=1e-6)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("method", ["ct", "gan", "ot", "none"])
def test_gradients_reach_what_should_move_and_nothing_else(method):
    torch.manual_seed(0)
    model = MCAN(tiny_model_config(method)).train()
    batch = random_batch()
    batch["features"].requires_grad_(True)
    out = model(**batch)
    (out.logits.square().mean() + out.alignment_loss).backward()
    # AttFlat's glimpse-logit bias shifts every logit of a softmax alike, so its true gradient is 0
    # (what reaches it is rounding noise, sometimes exactly 0): it is checked to get a gradient at all.
    shift_invariant = ("question_flat.mlp.3.bias", "image_flat.mlp.3.bias")
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reached {name}"
        if name not in shift_invariant:
            assert param.grad.abs().sum() > 0, f"no gradient reached {name}"
    pad = torch.arange(batch["features"].shape[1])[None] >= batch["region_counts"][:, None]
    assert batch["features"].grad[pad].abs().max() == 0, "padded regions must not receive gradient"
    assert batch["features"].grad[~pad].abs().sum() > 0


def test_alignment_gradient_only_reaches_attention_and_below():
    """The alignment term must not touch the classifier, the poolings or the last FFNs."""
    torch.manual_seed(0)
    model = MCAN(tiny_model_config("ct")).train()
    model(**random_batch()).alignment_loss.backward()
    for name, param in model.named_parameters():
        touched = param.grad is not None and param.grad.abs().sum() > 0
        if name.startswith(("classifier", "fusion_norm", "question_flat", "image_flat")):
            assert not touched, f"alignment loss reached {name}"
        if "aligner" in name or "in_proj" in name:
            assert touched, f"alignment loss did not reach {name}"


def test_alignment_is_off_in_eval_and_details_match_fast_path():
    torch.manual_seed(0)
    model = MCAN(tiny_model_config("ct")).eval()
    batch = random_batch()
    fast = model(**batch)
    assert fast.alignment_loss.item() == 0.0
    slow = model(**batch, need_details=True)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    assert slow.question_glimpse.shape == batch["tokens"].shape
    assert torch.allclose(slow.image_glimpse.sum(-1), torch.ones(4), atol=1e-5)


def test_diagnostics_per_module_and_head():
    torch.manual_seed(0)
    cfg = tiny_model_config("ct")
    model = MCAN(cfg)
    batch = random_batch()
    _, diags = model.diagnose(**batch)
    kinds = [d.kind for d in diags]
    assert kinds.count("sa_question") == kinds.count("sa_image") == kinds.count("sga_guided") == cfg.num_layers
    for d in diags:
        assert d.ct.shape == d.mmd2.shape == (4, cfg.num_heads)
        assert torch.isfinite(d.ct).all() and (d.mmd2 >= -1e-6).all()
        assert d.learned_distance is not None
        rows = d.details.attention.sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert model.training  # restored


def test_alignment_modules_selectable():
    cfg = tiny_model_config("ct")
    cfg.alignment.modules = ["sga_guided"]
    model = MCAN(cfg)
    aligned = [n for n, m in model.attention_modules().items() if m.aligner is not None]
    assert aligned and all(n.endswith("guided_attention") for n in aligned)


@pytest.mark.parametrize("preset", ["mcan_small", "mcan_large", "easy_vqa"])
def test_presets_load_and_build(preset):
    cfg = load_config(f"configs/{preset}.yaml")
    cfg.model.vocab_size, cfg.model.num_answers = 50, 10
    if preset == "mcan_large":
        assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.ffn_size, cfg.model.flat_size) == (1024, 16, 4096, 2048)
        return  # building the large model is slow; its shape numbers are what matters here
    model = MCAN(cfg.model)
    assert model.num_parameters() > 0


def test_lstm_encoder_equals_packed_lstm_at_real_positions():
    """The unpacked LSTM (no host sync) gives the packed result at real positions, zeros elsewhere."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from vqa_align.model.mcan import LSTMQuestionEncoder

    torch.manual_seed(0)
    encoder = LSTMQuestionEncoder(vocab_size=50, embed_dim=12, hidden_size=16)
    lengths = torch.tensor([7, 3, 1, 5])
    tokens = torch.randint(1, 50, (4, 7))
    tokens[torch.arange(7)[None] >= lengths[:, None]] = 0
    packed = pack_padded_sequence(encoder.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
    reference, _ = pad_packed_sequence(encoder.lstm(packed)[0], batch_first=True, total_length=7)
    torch.testing.assert_close(encoder(tokens, lengths), reference, atol=1e-6, rtol=1e-5)
