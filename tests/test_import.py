"""Importing mcan-vqa / OpenVQA checkpoints: checked against an independent forward of the state dict.

The checkpoints here are written by the tests in the real container (``torch.save`` of
``{'state_dict', 'optimizer', 'lr_base'}``, an Adam state dict after one step, ``module.`` names
for DataParallel) with the real parameter names and random values. The reference forward below is
written from the parameter names and the published model with plain tensor ops: a hand-rolled
LSTM, the unbiased-std LayerNorm, masks from PAD ids and all-zero region rows, -1e9 masking and a
final sigmoid, as the original code does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqa_align.runs.checkpoint import CheckpointError, load_checkpoint
from vqa_align.config import Config
from vqa_align.errors import UserError
from vqa_align.cli import main as cli_main
from vqa_align.importers import ImportFailure, import_checkpoint, read_state_dict
from vqa_align.model.mcan import MCANLayerNorm
from vqa_align.extract.feature_store import FeatureStoreWriter

HIDDEN, HEADS, FFN, LAYERS, FLAT_MLP, FLAT_OUT, FEAT, EMBED = 32, 4, 64, 2, 16, 48, 12, 16
ANSWERS = ["yes", "no", "2", "red", "cat"]
MAX_TOKENS, REGIONS = 14, 10

# Question files and the ids mcan-vqa gives their words (worked out by hand: first appearance over
# train, val, test, VG; PAD 0, UNK 1; lower-case, punctuation deleted, '-' and '/' split words).
TRAIN_Q = ["What color is the cat?", "Is the cat's tail long?"]
VAL_Q = ["How many dogs/cats are there?", "Is it a man-made object?"]
TEST_Q = ["What is the cat doing?"]
VG_Q = ["Who holds the umbrella?"]
EXPECTED_IDS = {
    "what": 2, "color": 3, "is": 4, "the": 5, "cat": 6, "cats": 7, "tail": 8, "long": 9,
    "how": 10, "many": 11, "dogs": 12, "are": 13, "there": 14, "it": 15, "a": 16, "man": 17, "made": 18,
    "object": 19, "doing": 20, "who": 21, "holds": 22, "umbrella": 23,
}
VOCAB = 2 + len(EXPECTED_IDS)


# ----------------------------------------------------------------------------------------------
# Writing checkpoints in the original format
# ----------------------------------------------------------------------------------------------


def mcan_state_dict(seed: int = 0, flavour: str = "mcan-vqa", glimpses: int = 1, vocab: int = VOCAB) -> dict:
    """Parameter names and shapes of mcan-vqa's / OpenVQA's Net (random values, LayerNorms not at 1/0)."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=gen) * scale

    sd = {"embedding.weight": t(vocab, EMBED, scale=1.0)}
    sd.update({"lstm.weight_ih_l0": t(4 * HIDDEN, EMBED), "lstm.weight_hh_l0": t(4 * HIDDEN, HIDDEN),
               "lstm.bias_ih_l0": t(4 * HIDDEN, scale=0.1), "lstm.bias_hh_l0": t(4 * HIDDEN, scale=0.1)})
    img = "img_feat_linear" if flavour == "mcan-vqa" else "adapter.frcn_linear"

    def linear(name, out, inp):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(out, inp), t(out, scale=0.1)

    def norm(name, size):
        sd[f"{name}.a_2"], sd[f"{name}.b_2"] = 1 + t(size, scale=0.2), t(size, scale=0.2)

    def mhatt(name):
        for p in ("v", "k", "q", "merge"):
            linear(f"{name}.linear_{p}", HIDDEN, HIDDEN)

    def ffn(name):
        linear(f"{name}.mlp.fc.linear", FFN, HIDDEN)
        linear(f"{name}.mlp.linear", HIDDEN, FFN)

    linear(img, HIDDEN, FEAT)
    for i in range(LAYERS):
        e = f"backbone.enc_list.{i}"
        mhatt(f"{e}.mhatt"), ffn(f"{e}.ffn"), norm(f"{e}.norm1", HIDDEN), norm(f"{e}.norm2", HIDDEN)
    for i in range(LAYERS):
        d = f"backbone.dec_list.{i}"
        mhatt(f"{d}.mhatt1"), mhatt(f"{d}.mhatt2"), ffn(f"{d}.ffn")
        for k in (1, 2, 3):
            norm(f"{d}.norm{k}", HIDDEN)
    for flat in ("attflat_img", "attflat_lang"):
        linear(f"{flat}.mlp.fc.linear", FLAT_MLP, HIDDEN)
        linear(f"{flat}.mlp.linear", glimpses, FLAT_MLP)
        linear(f"{flat}.linear_merge", FLAT_OUT, HIDDEN * glimpses)
    norm("proj_norm", FLAT_OUT)
    linear("proj", len(ANSWERS), FLAT_OUT)
    return sd


def write_checkpoint(path, sd, data_parallel=False, legacy=False, extra=None):
    """torch.save in the training engine's container, with a real Adam state dict after one step."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    optim = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    sum((p * p).sum() for p in params).backward()
    optim.step()
    state = {("module." + k if data_parallel else k): v for k, v in sd.items()}
    obj = {"state_dict": state, "optimizer": optim.state_dict(), "lr_base": 1e-4, **(extra or {})}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_questions(folder, name, texts, first_id=0, image_ids=None):
    qs = [{"image_id": (image_ids or [1 + i % 3 for i in range(len(texts))])[i], "question": q,
           "question_id": first_id + i} for i, q in enumerate(texts)]
    path = folder / f"{name}_questions.json"
    path.write_text(json.dumps({"questions": qs}))
    return path


def write_answer_dict(path, answers=ANSWERS):
    path.write_text(json.dumps([{a: i for i, a in enumerate(answers)}, {str(i): a for i, a in enumerate(answers)}]))
    return path


@pytest.fixture
def files(tmp_path):
    qs = [write_questions(tmp_path, n, t, 100 * k) for k, (n, t) in
          enumerate([("train", TRAIN_Q), ("val", VAL_Q), ("test", TEST_Q), ("vg", VG_Q)])]
    return dict(questions=qs, answers=write_answer_dict(tmp_path / "answer_dict.json"), root=tmp_path)


# ----------------------------------------------------------------------------------------------
# The independent reference forward (plain tensor ops on the original names)
# ----------------------------------------------------------------------------------------------


def ref_forward(sd, ques_ix, img_feat, heads=HEADS):
    """Sigmoid scores (B, A) and pre-sigmoid logits of the original Net, eval mode."""

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def ln(x, name):
        mean = x.mean(-1, keepdim=True)
        std = (((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()  # unbiased
        return sd[f"{name}.a_2"] * (x - mean) / (std + 1e-6) + sd[f"{name}.b_2"]

    def mhatt(name, v, k, q, pad):  # pad: (B, Nk) True at padding
        b = q.shape[0]

        def split(x):
            return x.view(b, -1, heads, HIDDEN // heads).transpose(1, 2)

        vv, kk, qq = split(lin(v, f"{name}.linear_v")), split(lin(k, f"{name}.linear_k")), split(lin(q, f"{name}.linear_q"))
        scores = qq @ kk.transpose(-2, -1) / math.sqrt(HIDDEN // heads)
        att = scores.masked_fill(pad[:, None, None, :], -1e9).softmax(-1)
        return lin((att @ vv).transpose(1, 2).reshape(b, -1, HIDDEN), f"{name}.linear_merge")

    def mlp(x, name):
        return lin(torch.relu(lin(x, f"{name}.fc.linear")), f"{name}.linear")

    def attflat(x, pad, name):
        att = mlp(x, f"{name}.mlp").masked_fill(pad[..., None], -1e9).softmax(1)  # (B, N, G)
        pooled = torch.cat([(att[:, :, g:g + 1] * x).sum(1) for g in range(att.shape[-1])], 1)
        return lin(pooled, f"{name}.linear_merge")

    lang_pad = ques_ix == 0
    img_pad = img_feat.abs().sum(-1) == 0
    # LSTM, step by step (gates i, f, g, o), over the padded sequence as nn.LSTM runs it there.
    emb = sd["embedding.weight"][ques_ix]
    h = emb.new_zeros(emb.shape[0], HIDDEN)
    c = torch.zeros_like(h)
    outs = []
    for step in range(emb.shape[1]):
        gates = (emb[:, step] @ sd["lstm.weight_ih_l0"].T + sd["lstm.bias_ih_l0"]
                 + h @ sd["lstm.weight_hh_l0"].T + sd["lstm.bias_hh_l0"])
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    x = torch.stack(outs, 1)
    img_name = "img_feat_linear" if "img_feat_linear.weight" in sd else "adapter.frcn_linear"
    y = lin(img_feat, img_name)
    for i in range(LAYERS):
        e = f"backbone.enc_list.{i}"
        x = ln(x + mhatt(f"{e}.mhatt", x, x, x, lang_pad), f"{e}.norm1")
        x = ln(x + mlp(x, f"{e}.ffn.mlp"), f"{e}.norm2")
    for i in range(LAYERS):
        d = f"backbone.dec_list.{i}"
        y = ln(y + mhatt(f"{d}.mhatt1", y, y, y, img_pad), f"{d}.norm1")
        y = ln(y + mhatt(f"{d}.mhatt2", x, x, y, lang_pad), f"{d}.norm2")
        y = ln(y + mlp(y, f"{d}.ffn.mlp"), f"{d}.norm3")
    fused = attflat(x, lang_pad, "attflat_lang") + attflat(y, img_pad, "attflat_img")
    logits = lin(ln(fused, "proj_norm"), "proj")
    return torch.sigmoid(logits), logits


def random_inputs(seed=0, batch=4, vocab=VOCAB):
    """mcan-style inputs: (B, 14) ids with trailing PAD, (B, 10, F) features with zero rows as padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([MAX_TOKENS, 1, 5, 9])[:batch]
    counts = torch.tensor([REGIONS, 3, 1, 7])[:batch]
    ids = torch.randint(1, vocab, (batch, MAX_TOKENS), generator=gen)  # includes UNK (1)
    ids[torch.arange(MAX_TOKENS)[None] >= lengths[:, None]] = 0
    feats = torch.rand(batch, REGIONS, FEAT, generator=gen) + 0.05  # real rows are never all zero
    feats[torch.arange(REGIONS)[None] >= counts[:, None]] = 0.0
    return ids, feats, lengths, counts


def ours(model, ids, feats, lengths, counts):
    boxes = torch.zeros(*feats.shape[:2], 4)
    with torch.no_grad():
        return model(tokens=ids, question_lengths=lengths, features=feats, boxes=boxes, region_counts=counts).logits


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_mcan_layer_norm_is_the_unbiased_std_formula():
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    norm = MCANLayerNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
        norm.bias.fill_(0.5)
    # mean 4, unbiased variance (9 + 4 + 0 + 25) / 3, worked by hand
    std = math.sqrt(38 / 3)
    expected = torch.tensor([[-3 / (std + 1e-6), -4 / (std + 1e-6), 0.0, 5 / (std + 1e-6)]]) + 0.5
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert not torch.allclose(torch.nn.functional.layer_norm(x, (4,)), (norm(x) - 0.5) / torch.tensor([1.0, 2, 1, 1]), atol=1e-3)


@pytest.mark.parametrize(
    "flavour, data_parallel, legacy, glimpses",
    [("mcan-vqa", False, False, 1), ("mcan-vqa", True, True, 1), ("openvqa", False, False, 2)],
    ids=["mcan-vqa", "mcan-vqa-dataparallel-legacy-format", "openvqa-2-glimpses"],
)
def test_import_matches_the_reference_forward(files, flavour, data_parallel, legacy, glimpses):
    vocab = VOCAB + (flavour == "openvqa")  # OpenVQA adds CLS = 2
    sd = mcan_state_dict(seed=3, flavour=flavour, glimpses=glimpses, vocab=vocab)
    ckpt = write_checkpoint(files["root"] / "epoch13.pkl", sd, data_parallel, legacy)
    run = import_checkpoint(flavour, ckpt, files["questions"], files["answers"], files["root"] / "run", num_heads=HEADS)

    loaded = load_checkpoint(run)
    cfg = loaded.config.model
    assert (cfg.hidden_size, cfg.num_layers, cfg.ffn_size, cfg.flat_size, cfg.flat_glimpses, cfg.feature_dim) == (
        HIDDEN, LAYERS, FFN, FLAT_OUT, glimpses, FEAT)
    assert cfg.layer_norm == "mcan" and not cfg.use_box_embedding and cfg.alignment.method == "none"
    assert loaded.answers == ANSWERS
    ids, feats, lengths, counts = random_inputs(vocab=vocab)
    scores, ref_logits = ref_forward(sd, ids, feats)
    logits = ours(loaded.model, ids, feats, lengths, counts)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0), (logits - ref_logits).abs().max()
    assert torch.allclose(torch.sigmoid(logits), scores, atol=1e-5, rtol=0)
    from dataclasses import replace

    from vqa_align.model.mcan import MCAN

    # The padded question path (CUDA's default) agrees too; the packed one ran above (CPU, padding present).
    padded = MCAN(replace(loaded.model.config, pack_questions="never"))
    padded.load_state_dict(loaded.model.state_dict())
    assert torch.allclose(ours(padded.eval(), ids, feats, lengths, counts), ref_logits, atol=1e-5, rtol=0)
    # The same model with torch's LayerNorm drifts: the option matters.
    loaded.model.config.layer_norm = "torch"
    drifted = MCAN(loaded.model.config)
    drifted.load_state_dict(loaded.model.state_dict())
    assert (ours(drifted.eval(), ids, feats, lengths, counts) - ref_logits).abs().max() > 1e-3

    # The tokenizer gives mcan-vqa's ids (OpenVQA's shifted by its CLS token).
    shift = 1 if flavour == "openvqa" else 0
    enc = loaded.tokenizer("Is the cat's tail man-made? zebra", add_special_tokens=False)["input_ids"]
    words = ["is", "the", "cats", "tail", "man", "made"]
    assert enc == [EXPECTED_IDS[w] + shift for w in words] + [1]
    assert len(loaded.tokenizer) == vocab
    meta = loaded.meta["imported_from"]
    assert meta["format"] == flavour and meta["new_words_per_file"] == [8, 10, 1, 3] and meta["lr_base"] == 1e-4


def test_vocabulary_mismatch_names_the_files(files, capsys):
    ckpt = write_checkpoint(files["root"] / "c.pkl", mcan_state_dict())
    with pytest.raises(ImportFailure, match=r"word embedding has 24 rows but the question files give 23 tokens "
                       r"\(2 special \+ new words per file: train train_questions.json: 8, val val_questions.json: 10, "
                       r"test vg_questions.json: 3\), 1 fewer than the checkpoint; no VG questions file was given"):
        import_checkpoint("mcan-vqa", ckpt, files["questions"][:2] + [files["questions"][3]], files["answers"],
                          files["root"] / "run", num_heads=HEADS)
    # The CLI prints it as one line and writes nothing.
    code = cli_main(["import", "mcan-vqa", str(ckpt), "--questions", *map(str, files["questions"][:3]),
                     "--answers", str(files["answers"]), "--out", str(files["root"] / "run"), "--num-heads", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "21 tokens" in err and "3 fewer than the checkpoint" in err
    assert not (files["root"] / "run").exists()


def test_answer_dict_that_does_not_fit_is_refused(files):
    ckpt = write_checkpoint(files["root"] / "c.pkl", mcan_state_dict())
    bad = write_answer_dict(files["root"] / "bad.json", ANSWERS[:4])
    with pytest.raises(ImportFailure, match=r"bad.json: 4 answers but the checkpoint's classifier .* has 5 outputs"):
        import_checkpoint("mcan-vqa", ckpt, files["questions"], bad, files["root"] / "run", num_heads=HEADS)


_REDUCED: list[str] = []


def _record_unpickle() -> None:
    _REDUCED.append("executed")


class Payload:
    """Unpickling this calls _record_unpickle: a loader that executes pickles would record it."""

    def __reduce__(self):
        return (_record_unpickle, ())


def test_pickled_object_is_refused_without_running_it(files):
    ckpt = write_checkpoint(files["root"] / "evil.pkl", mcan_state_dict(), extra={"hook": Payload()})
    with pytest.raises(ImportFailure, match=r"evil.pkl: refused: the file stores Python objects that loading would "
                       r"have to execute \(it needs .*_record_unpickle\); vqa-align reads only tensors"):
        read_state_dict(ckpt)
    assert _REDUCED == []
    # Not a checkpoint at all: a different message (nothing to do with Python objects).
    (files["root"] / "notes.pkl").write_text('{"state_dict": {}}')
    with pytest.raises(ImportFailure, match=r"notes.pkl: not a readable PyTorch checkpoint \(Unsupported operand"):
        read_state_dict(files["root"] / "notes.pkl")


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"backbone.enc_list.0.gate.weight": torch.zeros(2)}),
     r"1 parameter\(s\) have no counterpart in vqa-align's MCAN, e.g. backbone.enc_list.0.gate.weight"),
    (lambda sd: sd.pop("backbone.dec_list.1.mhatt2.linear_k.bias"),
     r"not a complete mcan-vqa MCAN checkpoint: 1 parameter\(s\) missing, e.g. backbone.dec_list.1.mhatt2.linear_k.bias"),
    (lambda sd: sd.pop("embedding.weight"), r"not an MCAN checkpoint of mcan-vqa: it has no parameter 'embedding.weight'"),
])
def test_unmappable_checkpoints_are_clear_errors(files, change, message):
    sd = mcan_state_dict()
    change(sd)
    ckpt = write_checkpoint(files["root"] / "c.pkl", sd)
    with pytest.raises(ImportFailure, match=message):
        import_checkpoint("mcan-vqa", ckpt, files["questions"], files["answers"], files["root"] / "run", num_heads=HEADS)


def test_openvqa_box_features_are_refused(files):
    sd = mcan_state_dict(flavour="openvqa", vocab=VOCAB + 1)
    sd["adapter.bbox_linear.weight"], sd["adapter.bbox_linear.bias"] = torch.zeros(8, 5), torch.zeros(8)
    ckpt = write_checkpoint(files["root"] / "c.pkl", sd)
    with pytest.raises(ImportFailure, match=r"USE_BBOX_FEAT .* cannot be imported exactly"):
        import_checkpoint("openvqa", ckpt, files["questions"], files["answers"], files["root"] / "run", num_heads=HEADS)


def test_existing_output_is_kept_without_overwrite(files):
    ckpt = write_checkpoint(files["root"] / "c.pkl", mcan_state_dict())
    out = files["root"] / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ImportFailure, match="exists and is not empty; pass --overwrite"):
        import_checkpoint("mcan-vqa", ckpt, files["questions"], files["answers"], out, num_heads=HEADS)
    assert (out / "notes.txt").read_text() == "mine"
    # --overwrite never deletes a folder vqa-align did not write (issue 21): refused, nothing lost.
    with pytest.raises(UserError, match="has no .vqa-align-run marker"):
        import_checkpoint("mcan-vqa", ckpt, files["questions"], files["answers"], out, num_heads=HEADS, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    # An imported run is a marked run folder, so a second import may replace it.
    run = files["root"] / "run2"
    import_checkpoint("mcan-vqa", ckpt, files["questions"], files["answers"], run, num_heads=HEADS)
    first = (run / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns
    import_checkpoint("mcan-vqa", ckpt, files["questions"], files["answers"], run, num_heads=HEADS, overwrite=True)
    assert (run / ".vqa-align-run").is_file()
    assert (run / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns >= first
    assert not run.with_name("run2.replaced").exists() and not run.with_name("run2.importing").exists()


# --- the imported run in the rest of vqa-align --------------------------------------------------


@pytest.fixture
def imported_run(files):
    """An imported run with a feature store and annotated train/val splits (images 1..3)."""
    root = files["root"]
    rng = np.random.default_rng(0)
    feats = {}
    with FeatureStoreWriter(root / "features.h5", dtype="float32") as w:
        for image_id, k in ((1, REGIONS), (2, 4), (3, 7)):
            feats[image_id] = rng.random((k, FEAT), dtype=np.float32) + 0.05
            w.add(image_id, feats[image_id], np.tile(np.array([0, 0, 10, 20], np.float32), (k, 1)), (40, 40))
    for name, texts in (("train", TRAIN_Q), ("val", VAL_Q)):
        qs = json.loads(files["questions"][0 if name == "train" else 1].read_text())["questions"]
        anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                 "answer_type": "other", "multiple_choice_answer": ANSWERS[i % 5],
                 "answers": [{"answer": ANSWERS[i % 5], "answer_id": j + 1} for j in range(10)]}
                for i, q in enumerate(qs)]
        (root / f"{name}_annotations.json").write_text(json.dumps({"annotations": anns}))
    sd = mcan_state_dict(seed=5)
    ckpt = write_checkpoint(root / "epoch13.pkl", sd, data_parallel=True)
    code = cli_main(["import", "mcan-vqa", str(ckpt), "--questions", *map(str, files["questions"]),
                     "--answers", str(files["answers"]), "--out", str(root / "run"), "--num-heads", str(HEADS),
                     "--features", str(root / "features.h5"),
                     "--val-annotations", str(root / "val_annotations.json"),
                     "--set", f"data.train_annotations={json.dumps([str(root / 'train_annotations.json')])}",
                     "--set", "data.num_workers=0"])
    assert code == 0
    return dict(run=root / "run", sd=sd, feats=feats, root=root, files=files)


def _reference_for(imported, question_ids: list[int], image_id: int):
    feats = torch.zeros(1, REGIONS, FEAT)
    f = torch.from_numpy(imported["feats"][image_id])
    feats[0, : len(f)] = f
    ids = torch.zeros(1, MAX_TOKENS, dtype=torch.long)
    ids[0, : len(question_ids)] = torch.tensor(question_ids)
    return ref_forward(imported["sd"], ids, feats)


def test_predict_and_app_views_on_an_imported_model(imported_run, capsys):
    from vqa_align.serve.predictor import Predictor
    from vqa_align.serve.views import render_views

    capsys.readouterr()
    question = "what color is the umbrella?"
    code = cli_main(["predict", "--checkpoint", str(imported_run["run"]), "--image-id", "3", "--question", question])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    ids = [EXPECTED_IDS[w] for w in ("what", "color", "is", "the", "umbrella")]
    scores, _ = _reference_for(imported_run, ids, 3)
    assert out["answer"] == ANSWERS[int(scores.argmax())]
    # What the app computes and draws for one request.
    predictor = Predictor(imported_run["run"])
    pred = predictor.answer(question, image_id=3)
    assert pred.answer == out["answer"] and len(pred.modules) == 3 * LAYERS
    views = render_views(pred, "sga_guided", 1, 0)
    assert views.grid is not None and views.matrix is not None
    from vqa_align_app.main import build_app

    build_app(predictor)  # the Blocks build on an imported model (gallery from the store)


def test_eval_runs_on_an_imported_model(imported_run, capsys):
    out = imported_run["root"] / "eval"
    assert cli_main(["eval", "--checkpoint", str(imported_run["run"]), "--split", "val", "--out", str(out),
                     "--batch-size", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # Worked out from the reference: each val question's predicted answer vs its (uniform) annotation.
    val = json.loads(imported_run["files"]["questions"][1].read_text())["questions"]
    from vqa_align.data.vqa_v2 import tokenize_question

    right = 0
    for i, q in enumerate(val):
        scores, _ = _reference_for(imported_run, [EXPECTED_IDS[w] for w in tokenize_question(q["question"])], q["image_id"])
        right += ANSWERS[int(scores.argmax())] == ANSWERS[i % 5]
    assert metrics["accuracy"] == pytest.approx(100.0 * right / len(val), abs=0.01)


def test_init_from_keeps_the_imported_logits_and_adds_fresh_aligners(imported_run, capsys):
    from vqa_align.config import load_config
    from vqa_align.train.trainer import Trainer

    run = imported_run["run"]
    imported = load_checkpoint(run)
    config = load_config(run / "config.yaml", ["model.alignment.method=ct", f"train.init_from={run}",
                                               "model.hidden_size=64", "train.batch_size=2"])
    trainer = Trainer(config, imported_run["root"] / "ft")
    assert "hidden_size: 64 -> 32" in capsys.readouterr().err
    assert trainer.model.has_alignment and trainer.answers == imported.answers
    assert trainer.tokenizer.get_vocab() == imported.tokenizer.get_vocab()
    trainer.model.eval()
    ids, feats, lengths, counts = random_inputs(seed=1)
    assert torch.equal(ours(trainer.model, ids, feats, lengths, counts), ours(imported.model, ids, feats, lengths, counts))

    # End to end through the CLI: one CT step from the imported weights, then a normal checkpoint.
    preset = Path(__file__).resolve().parents[1] / "configs" / "mcan_finetune_ct.yaml"
    code = cli_main(["train", "--config", str(preset), "--init-from", str(run),
                     "--out", str(imported_run["root"] / "ft2"),
                     "--set", f"data.features={imported_run['root'] / 'features.h5'}",
                     "--set", f"data.train_questions={json.dumps([str(imported_run['files']['questions'][0])])}",
                     "--set", f"data.train_annotations={json.dumps([str(imported_run['root'] / 'train_annotations.json')])}",
                     "--set", f"data.val_questions={json.dumps([str(imported_run['files']['questions'][1])])}",
                     "--set", f"data.val_annotations={json.dumps([str(imported_run['root'] / 'val_annotations.json')])}",
                     "--set", "data.num_workers=0", "--set", "train.max_steps=1", "--set", "train.batch_size=2"])
    assert code == 0
    tuned = load_checkpoint(imported_run["root"] / "ft2")
    assert tuned.config.model.alignment.method == "ct" and tuned.config.model.layer_norm == "mcan"
    assert tuned.answers == imported.answers
    changed = [k for k, v in imported.model.state_dict().items() if not torch.equal(v, tuned.model.state_dict()[k])]
    assert changed  # it trained
    # --resume reads the tokenizer and answers from the run itself: the source may have moved.
    run.rename(run.with_name("moved"))
    assert cli_main(["train", "--resume", "--out", str(imported_run["root"] / "ft2"), "--set", "train.max_steps=2"]) == 0
    resumed = load_checkpoint(imported_run["root"] / "ft2")
    assert resumed.meta["global_step"] == 2 and resumed.answers == imported.answers


def test_init_from_refuses_weights_that_do_not_fit(imported_run):
    from safetensors.torch import load_file, save_file

    from vqa_align.model.mcan import MCAN
    from vqa_align.train.warm_start import load_initial_weights, load_warm_start

    weights = imported_run["run"] / "checkpoints" / "last" / "model.safetensors"
    state = load_file(str(weights))
    state["classifier.extra"] = torch.zeros(1)
    save_file(state, str(weights))
    warm = load_warm_start(imported_run["run"])
    with pytest.raises(CheckpointError, match=r"weights do not fit the model: missing \[\], unexpected \['classifier.extra'\]"):
        load_initial_weights(MCAN(warm.source.model), warm)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.slow  # ~70 s on 2 cores: two short trainings and the experiment's evaluations
def test_experiment_grid_from_an_imported_model(imported_run, capsys):
    """Every method starts from the imported weights; a second call reuses the finished runs."""
    root = imported_run["root"]
    args = ["experiment", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "mcan_finetune_ct.yaml"),
            "--methods", "none,ct", "--seeds", "0", "--out", str(root / "grid"),
            "--set", f"train.init_from={root / 'run'}",
            "--set", f"data.features={root / 'features.h5'}",
            "--set", f"data.train_questions={json.dumps([str(imported_run['files']['questions'][0])])}",
            "--set", f"data.train_annotations={json.dumps([str(root / 'train_annotations.json')])}",
            "--set", f"data.val_questions={json.dumps([str(imported_run['files']['questions'][1])])}",
            "--set", f"data.val_annotations={json.dumps([str(root / 'val_annotations.json')])}",
            "--set", "data.num_workers=0", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
            "--set", "train.epochs=1"]
    assert cli_main(args) == 0
    for method in ("none", "ct"):
        tuned = load_checkpoint(root / "grid" / "runs" / f"{method}_seed0")
        assert tuned.config.model.layer_norm == "mcan" and tuned.config.model.hidden_size == HIDDEN
    capsys.readouterr()
    assert cli_main(args) == 0
    assert "finished earlier, reusing" in capsys.readouterr().out


def test_init_from_an_aligned_run_keeps_same_helpers_and_refreshes_resized_ones(tmp_path):
    """Source CT helpers of the same width are kept; other widths start fresh; other weights must fit."""
    from conftest import tiny_model_config

    from vqa_align.model.mcan import MCAN
    from vqa_align.train.warm_start import WarmStart, load_initial_weights

    torch.manual_seed(0)
    source = MCAN(tiny_model_config("ct"))
    warm = WarmStart(tmp_path, Config(model=source.config), None, [], source.state_dict())
    same = MCAN(tiny_model_config("ct"))
    fresh, dropped = load_initial_weights(same, warm)
    assert fresh == [] and dropped == []
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())
    wider = tiny_model_config("ct")
    wider.alignment.helper_hidden *= 2
    other = MCAN(wider)
    fresh, dropped = load_initial_weights(other, warm)
    assert fresh and set(fresh) == set(dropped) and all(".aligner." in k for k in fresh)
    assert torch.equal(other.classifier.weight, source.classifier.weight)
