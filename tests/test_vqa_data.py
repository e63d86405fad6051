"""VQA v2 JSON, tokenisation, vocabularies, soft targets, the batch contract and the bucket sampler."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from vqa_align.config import DataConfig
from vqa_align.data.loaders import RegionBucketBatchSampler, build_data, collate_batch, make_loader
from vqa_align.errors import UserError
from vqa_align.extract.feature_store import DataFormatError, FeatureStoreWriter
from vqa_align.data.vqa_v2 import (
    OfficialScores,
    QuestionRecord,
    answer_targets,
    build_answer_vocab,
    build_tokenizer,
    load_split,
    load_tokenizer,
    soft_score,
    tokenize_question,
)
from vqa_align.metrics.vqa_accuracy import normalize_answer, question_accuracy

D = 6


# --- tokenisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What color is the cat?", ["what", "color", "is", "the", "cat"]),
        ("What's on the man-made table/desk?", ["whats", "on", "the", "man", "made", "table", "desk"]),
        ('Is it "red" (or #blue): yes; no!', ["is", "it", "red", "or", "blue", "yes", "no"]),
        ("  HOW   many\tdogs*  ", ["how", "many", "dogs"]),
        ("3.5 or 1,000?", ["35", "or", "1000"]),
    ],
)
def test_tokenize_question(text, expected):
    assert tokenize_question(text) == expected


def test_tokenize_max_tokens():
    assert tokenize_question("a b c d e", max_tokens=3) == ["a", "b", "c"]


TRICKY_QUESTIONS = [
    "Is the T-shirt's colour BLUE/green??",
    "  What\u00a0is\u3000this\u2003thing?\n\tHow\r\nmany? ",  # no-break, ideographic, em spaces
    "ÉCOLE, İstanbul, ΑΛΦΑ or STRASSE/straße?",  # accents, dotted I, Greek, sharp s
    "5'11\" tall -- or 1,000.5 m//s*#?",
    "...!?", "", "-/-", "¿Qué es esto? ¡Nada! 日本語の質問 🐱-🐶",
    "what's (the) \"man-made\": object; here",
]


@pytest.mark.parametrize("text", TRICKY_QUESTIONS)
def test_word_level_tokenizer_splits_as_tokenize_question(text):
    # The two implementations of MCAN's rule (Python's re for the vocabulary and imported models,
    # the `tokenizers` normaliser inside a saved tokenizer) must cut every question alike. Known
    # and left alone (no such question in VQA v2): the ASCII separators \x1c-\x1f are white space to
    # Python's split() only, Python lower-cases a word-final capital sigma to "ς" and `tokenizers` to
    # "σ", and characters newer than Python's Unicode tables may lower-case differently.
    backend = build_tokenizer(["x"], max_tokens=14).backend_tokenizer
    normalised = backend.normalizer.normalize_str(text)
    assert [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalised)] == tokenize_question(text)


def test_hf_tokenizer_matches_and_round_trips(tmp_path):
    texts = ["What color is the cat?", "Is the man-made cat red?", "What's that?"]
    tok = build_tokenizer(texts, max_tokens=4)
    assert tok.pad_token_id == 0 and tok.unk_token_id == 1
    assert tok.convert_ids_to_tokens([0, 1]) == ["[PAD]", "[UNK]"]
    for t in texts:
        ids = tok(t, add_special_tokens=False, truncation=True, max_length=14)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == tokenize_question(t)
    unseen = tok("What was the DOG/cat?", add_special_tokens=False)["input_ids"]
    assert unseen == [tok.convert_tokens_to_ids("what"), 1, tok.convert_tokens_to_ids("the"), 1,
                      tok.convert_tokens_to_ids("cat")]
    assert tok.convert_ids_to_tokens([2])[0] in ("cat", "the", "is", "what")  # most frequent first
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again("Is the cat red?", add_special_tokens=False)["input_ids"] == \
        tok("Is the cat red?", add_special_tokens=False)["input_ids"]
    assert again.pad_token_id == 0 and again.unk_token_id == 1 and len(again) == len(tok)
    batch = again(["what", "what color is the cat"], padding=True, truncation=True)
    assert batch["input_ids"][0][1:] == [0, 0, 0] and len(batch["input_ids"][1]) == 4


# --- answers ------------------------------------------------------------------------------------


def _rec(qid, mc, answers=None, image_id=1):
    answers = answers if answers is not None else [mc] * 10
    return QuestionRecord(qid, image_id, "what is it?", "q.json", tuple(answers), mc, "other", "what is")


def test_answer_vocab_threshold_and_order():
    recs = [_rec(i, a) for i, a in enumerate(["Yes"] * 3 + ["no"] * 3 + ["two"] * 2 + ["cat"] * 2 + ["dog"])]
    assert build_answer_vocab(recs, min_count=2) == ["no", "yes", "2", "cat"]  # count desc, then A-Z
    assert build_answer_vocab(recs, min_count=1)[-1] == "dog"
    with pytest.raises(DataFormatError, match="answer_min_count"):
        build_answer_vocab(recs, min_count=100)


def test_soft_scores_equal_leave_one_out_accuracy():
    np.testing.assert_allclose(soft_score(np.arange(11)), [0, 0.3, 0.6, 0.9] + [1.0] * 7)
    for m in range(11):
        humans = ["cat"] * m + ["dog"] * (10 - m)
        assert question_accuracy("cat", humans) == pytest.approx(float(soft_score(m)))


def test_official_scores_equal_question_accuracy_of_every_answer():
    from vqa_metric_variants import make_variant_files

    _, annotations, _ = make_variant_files(150, seed=4)
    recs = [_rec(a["question_id"], a["multiple_choice_answer"], [x["answer"] for x in a["answers"]])
            for a in annotations["annotations"]]
    # every spelling in the generator, raw and normalised, as vocabulary entries
    vocab = sorted({x["answer"] for a in annotations["annotations"] for x in a["answers"]}
                   | {normalize_answer(x["answer"]) for a in annotations["annotations"] for x in a["answers"]})
    table = OfficialScores(recs, vocab)
    for r in recs:
        got = table([r.question_id] * len(vocab), range(len(vocab)))
        assert got == [question_accuracy(a, r.answers) for a in vocab], r.answers


def test_soft_targets_and_official_scores_differ_where_the_rules_do():
    answers = ["2", "two"]
    recs = [_rec(0, "Two", ["Two"] * 10), _rec(1, "two", ["two"] * 10), _rec(2, "2", ["two"] * 4 + ["2"] * 6)]
    idx, scores, off = answer_targets(recs, answers)
    # Soft targets normalise every answer: all three questions give class "2" the target 1.0.
    assert [dict(zip(idx[off[q]:off[q + 1]], scores[off[q]:off[q + 1]])) for q in range(3)] == [{0: 1.0}] * 3
    table = OfficialScores(recs, answers)
    # Official: unanimous answers are compared raw -- "Two" matches neither "2" nor "two" (0, 0);
    # unanimous "two" matches "two" only (0, 1); disagreeing humans are all normalised to "2",
    # and so are both predictions (1, 1).
    assert [table([q, q], [0, 1]) for q in range(3)] == [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_answer_targets_normalised():
    answers = ["cat", "2", "dog"]
    recs = [_rec(0, "cat", ["cat"] * 2 + ["Cat."] + ["two"] * 4 + ["bird"] * 3), _rec(1, "dog", ["dog"] * 10)]
    idx, scores, off = answer_targets(recs, answers)
    dense = np.zeros((2, 3), np.float32)
    for q in range(2):
        dense[q, idx[off[q]:off[q + 1]]] = scores[off[q]:off[q + 1]]
    np.testing.assert_allclose(dense, [[0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert normalize_answer("Cat.") == "cat"


# --- files --------------------------------------------------------------------------------------


def _write_vqa(folder, name, questions, annotations=None):
    q = folder / f"{name}_questions.json"
    q.write_text(json.dumps({"questions": questions}))
    if annotations is None:
        return q, None
    a = folder / f"{name}_annotations.json"
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a


def _qa(qid, image_id, text, answer, answer_type="other"):
    return ({"image_id": image_id, "question": text, "question_id": qid},
            {"question_id": qid, "image_id": image_id, "question_type": "what is", "answer_type": answer_type,
             "multiple_choice_answer": answer,
             "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]})


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, a: q[1].pop("question"),
         r"x_questions\.json: question record 1 \(question_id 11\): missing field 'question'"),
        (lambda q, a: q[0].update(image_id="1"),
         r"x_questions\.json: question record 0 \(question_id 10\): field 'image_id' must be an integer.*, got str"),
        (lambda q, a: a[0].update(answer_type="colour"),
         r"x_annotations\.json: annotation record 0 \(question_id 10\): unknown answer_type 'colour'"),
        (lambda q, a: a[1].pop("answers"),
         r"x_annotations\.json: annotation record 1 \(question_id 11\): missing field 'answers'"),
        # training needs multiple_choice_answer (scoring does not); question_type is optional here
        (lambda q, a: a[1].pop("multiple_choice_answer"),
         r"annotation record 1 \(question_id 11\): missing field 'multiple_choice_answer'"),
        (lambda q, a: a[1]["answers"].__setitem__(3, {"answer_id": 4}),
         r"annotation record 1 \(question_id 11\): answers\[3\] must be an object with a string 'answer'"),
        (lambda q, a: a.pop(1), r"x_annotations\.json: no annotation for question_id 11"),
        (lambda q, a: q[1].update(question_id=10), r"x_questions\.json: question record 1: duplicate question_id 10"),
        (lambda q, a: a[1].update(question_id=10), r"x_annotations\.json: annotation record 1: duplicate question_id 10"),
    ],
)
def test_load_split_errors(tmp_path, mutate, match):
    pairs = [_qa(10, 1, "what is it?", "cat"), _qa(11, 2, "is it?", "yes", "yes/no")]
    qs, anns = [p[0] for p in pairs], [p[1] for p in pairs]
    mutate(qs, anns)
    q, a = _write_vqa(tmp_path, "x", qs, anns)
    with pytest.raises(DataFormatError, match=match) as err:
        load_split([q], [a])
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_load_split_optional_question_type_and_unreadable_files(tmp_path):
    q_rec, a_rec = _qa(10, 1, "what is it?", "cat")
    del a_rec["question_type"]  # not needed for training
    q, a = _write_vqa(tmp_path, "x", [q_rec], [a_rec])
    assert load_split([q], [a])[0].question_type is None
    # a missing file is both a FileNotFoundError and a UserError (the CLI prints one line)
    with pytest.raises(FileNotFoundError, match=r"annotations file not found: .*nope\.json") as err:
        load_split([q], [tmp_path / "nope.json"])
    assert isinstance(err.value, UserError)
    a.write_text('{"annotations": [')
    with pytest.raises(DataFormatError, match=r"x_annotations\.json: not valid JSON \(line 1"):
        load_split([q], [a])
    a.write_text('{"questions": []}')
    with pytest.raises(DataFormatError, match=r"x_annotations\.json: not a VQA annotations file"):
        load_split([q], [a])


def test_load_split_with_augmentation(tmp_path):
    q1, a1 = _write_vqa(tmp_path, "vqa", *map(list, zip(_qa(1, 1, "what?", "cat"))))
    q2, a2 = _write_vqa(tmp_path, "vg", *map(list, zip(_qa(2, 5, "who?", "man"))))
    recs = load_split([q1, q2], [a1, a2])
    assert [r.question_id for r in recs] == [1, 2] and recs[1].answers == ("man",) * 10
    only_q = load_split([q1])
    assert only_q[0].answers is None
    with pytest.raises(DataFormatError, match="one annotations file per questions file"):
        load_split([q1, q2], [a1])
    # a question id may appear once per split, across all its files
    q3, a3 = _write_vqa(tmp_path, "vg2", *map(list, zip(_qa(1, 1, "what?", "cat"))))
    with pytest.raises(DataFormatError, match=r"vg2_questions\.json: question_id 1 already appears in .*vqa_questions\.json"):
        load_split([q1, q3], [a1, a3])


# --- datasets and batches ----------------------------------------------------------------------

QUESTIONS = ["what color is the cat?", "is it red?", "how many?", "what is on the table near the cat?"]


@pytest.fixture
def vqa_files(tmp_path):
    rng = np.random.default_rng(0)
    counts = {1: 3, 2: 7, 3: 1, 4: 12}
    with FeatureStoreWriter(tmp_path / "f.h5", dtype="float32") as w:
        for image_id, k in counts.items():
            boxes = np.tile(np.array([0, 0, 10, 20], np.float32), (k, 1))
            w.add(image_id, rng.random((k, D), dtype=np.float32) + 0.1, boxes, (20, 40))
    answers = ["cat", "yes", "2", "cat", "no", "yes"]
    pairs = [_qa(100 + i, 1 + i % 4, QUESTIONS[i % 4], answers[i % 6]) for i in range(24)]
    q, a = _write_vqa(tmp_path, "train", [p[0] for p in pairs], [p[1] for p in pairs])
    vq, va = _write_vqa(tmp_path, "val", [p[0] for p in pairs[:6]], [p[1] for p in pairs[:6]])
    tq, _ = _write_vqa(tmp_path, "test", [{"image_id": 9, "question": "what?", "question_id": 1},
                                          {"image_id": 2, "question": "who?", "question_id": 2}])
    cfg = DataConfig(dataset="vqa_v2", features=str(tmp_path / "f.h5"), train_questions=[str(q)],
                     train_annotations=[str(a)], val_questions=[str(vq)], val_annotations=[str(va)],
                     test_questions=[str(tq)], answer_min_count=4, max_regions=5, num_workers=0)
    return cfg, counts


def test_batch_contract(vqa_files):
    cfg, counts = vqa_files
    data = build_data(cfg, ["train", "val"])
    assert data.answers == ["cat", "yes", "2", "no"]  # 8, 8, 4, 4: count desc, then A-Z
    assert data.feature_dim == D and len(data.datasets["train"]) == 24
    ds = data.datasets["val"]
    batch = collate_batch([ds[i] for i in range(4)])  # images 1, 2, 3, 4 -> 3, 7->5, 1, 12->5 regions
    expected = {"question_ids": (torch.int64, (4,)), "image_ids": (torch.int64, (4,)),
                "tokens": (torch.int64, (4, 8)), "question_lengths": (torch.int64, (4,)),
                "features": (torch.float32, (4, 5, D)), "boxes": (torch.float32, (4, 5, 4)),
                "region_counts": (torch.int64, (4,)), "targets": (torch.float32, (4, 4))}
    assert set(batch) == set(expected)
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype and tuple(batch[key].shape) == shape, key
    assert batch["region_counts"].tolist() == [3, 5, 1, 5]
    assert batch["question_lengths"].tolist() == [5, 3, 2, 8]
    assert (batch["tokens"][2, 2:] == 0).all() and (batch["tokens"][2, :2] > 1).all()
    assert (batch["features"][0, 3:] == 0).all() and (batch["features"][0, :3] > 0).all()
    assert (batch["boxes"][2, 1:] == 0).all()
    np.testing.assert_allclose(batch["boxes"][0, 0], [0, 0, 0.5, 0.5])
    assert batch["targets"][0].tolist() == [1.0, 0, 0, 0] and batch["targets"][1].tolist() == [0, 1.0, 0, 0]
    assert batch["question_ids"].tolist() == [100, 101, 102, 103]


def test_missing_image_error_and_skip(vqa_files):
    cfg, _ = vqa_files
    data = build_data(cfg, ["train"])
    with pytest.raises(DataFormatError, match=r"test_questions.json: question_id 1 refers to image_id 9"):
        build_data(cfg, ["test"], tokenizer=data.tokenizer, answers=data.answers)
    cfg.skip_missing = True
    test = build_data(cfg, ["test"], tokenizer=data.tokenizer, answers=data.answers).datasets["test"]
    assert len(test) == 1 and test.num_skipped == 1
    batch = next(iter(make_loader(test, 4, False, 0, 0, True, False)))
    assert "targets" not in batch and batch["image_ids"].tolist() == [2]


def test_subset_and_unknown_split(vqa_files):
    cfg, _ = vqa_files
    cfg.subset, cfg.answer_min_count = 5, 1
    assert len(build_data(cfg, ["train"]).datasets["train"]) == 5
    with pytest.raises(Exception, match="unknown split"):
        build_data(cfg, ["dev"])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_covers_epoch(vqa_files, workers):
    cfg, _ = vqa_files
    ds = build_data(cfg, ["train"]).datasets["train"]
    loader = make_loader(ds, 5, True, 3, workers, True, False)
    seen = []
    for batch in loader:
        assert batch["features"].dtype == torch.float32
        assert batch["features"].shape[1] == int(batch["region_counts"].max())
        seen += batch["question_ids"].tolist()
    assert sorted(seen) == list(range(100, 124)) and len(loader) == 5


# --- the bucket sampler ------------------------------------------------------------------------


def _batches(sampler):
    return [list(b) for b in sampler]


def test_sampler_deterministic_and_complete():
    counts = np.random.default_rng(1).integers(10, 101, 1000)
    s = RegionBucketBatchSampler(counts, 32, shuffle=True, seed=7, pool_batches=4)
    e0 = _batches(s)
    assert e0 == _batches(RegionBucketBatchSampler(counts, 32, shuffle=True, seed=7, pool_batches=4))
    assert sorted(itertools.chain(*e0)) == list(range(1000)) and len(s) == len(e0) == 32
    s.set_epoch(1)
    assert _batches(s) != e0
    # bucketing: within-batch spread of region counts is far below that of random batches
    spread = np.mean([np.ptp(counts[b]) for b in e0 if len(b) == 32])
    random_spread = np.mean([np.ptp(counts[b]) for b in np.array_split(np.random.permutation(1000), 31)])
    assert spread < random_spread / 3
    flat = _batches(RegionBucketBatchSampler(counts, 32, shuffle=False, bucket=False))
    assert list(itertools.chain(*flat)) == list(range(1000))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_sharding(drop_last):
    counts = np.arange(103) % 17 + 1
    shards = [RegionBucketBatchSampler(counts, 10, True, 0, drop_last, num_replicas=3, rank=r) for r in range(3)]
    got = [_batches(s) for s in shards]
    assert all(len(g) == len(s) for g, s in zip(got, shards))
    assert len({len(g) for g in got}) == 1  # equal step counts on every rank
    covered = set(itertools.chain(*itertools.chain(*got)))
    if drop_last:
        assert len(shards[0]) == 3 and all(len(b) == 10 for g in got for b in g)
        assert len(covered) == 90
    else:
        assert len(shards[0]) == 4 and covered == set(range(103))
    with pytest.raises(ValueError):
        RegionBucketBatchSampler(counts, 10, num_replicas=2, rank=2)


def test_plain_dataloader_with_collate_batch_is_float32(tmp_path):
    """A DataLoader built by hand with collate_batch (as a trainer may do) also meets the contract."""
    from torch.utils.data import DataLoader

    with FeatureStoreWriter(tmp_path / "f.h5") as w:  # float16 store
        for i in range(4):
            w.add(i, np.full((i + 1, D), 0.5, np.float32), np.tile([0, 0, 1, 1], (i + 1, 1)).astype(np.float32), (2, 2))
    from vqa_align.extract.feature_store import FeatureStore
    from vqa_align.data.loaders import VQADataset

    recs = [QuestionRecord(i, i, "what is it?", "q.json") for i in range(4)]
    tok = build_tokenizer([r.question for r in recs], 14)
    ds = VQADataset(recs, FeatureStore(tmp_path / "f.h5"), tok, max_tokens=14, max_regions=10)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_batch, num_workers=1)))
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (4, 4, D)
    assert (batch["features"][0, 1:] == 0).all() and (batch["features"][3] == 0.5).all()
