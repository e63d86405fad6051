"""Your own pictures, end to end (docs/own_photos.md): `prep qa`, `predict --questions`, and the
page's commands in order on scikit-image's sample photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_inference import IMAGE_IDS, _one_thread, build_tiny_checkpoint  # noqa: F401
from vqa_align.cli import main
from vqa_align.data.vqa_v2 import load_split
from vqa_align.errors import UserError
from vqa_align_prep.qa import output_paths, prepare_qa

# ids.json as `vqa-align extract my_photos --out data/photos.h5` writes it: id -> path as given
PICTURES = {
    "11": "my_photos/astronaut.jpg",
    "12": "my_photos/coffee.jpg",
    "13": "my_photos/rocket.jpg",
    "14": "my_photos/animals/chelsea.jpg",
    "15": "my_photos/more/chelsea.jpg",
}
ROWS = [  # image, question, answer
    ("astronaut.jpg", "what is the person wearing?", "a spacesuit"),
    ("astronaut.jpg", "is there a cat?", "no"),
    ("coffee.jpg", "what is in the cup?", "coffee"),
    ("coffee.jpg", "how many cups are there?", "one"),
    ("rocket.jpg", "what is this?", "rocket"),
    ("animals/chelsea.jpg", "what animal is this?", "cat"),
    ("more/chelsea.jpg", "is there a cat?", "yes"),
]


def _store(tmp_path: Path) -> Path:
    """A store's ids file (prep qa reads only that; the store itself is read by training)."""
    store = tmp_path / "data" / "photos.h5"
    store.parent.mkdir()
    (tmp_path / "data" / "photos.h5.ids.json").write_text(json.dumps(PICTURES))
    return store


def _csv(path: Path, rows, header: str = "image,question,answer") -> Path:
    lines = [header] + [",".join(f'"{v}"' if "," in v else v for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(store: Path) -> dict:
    files = output_paths(store)
    return {s: load_split([f["questions"]], [f["annotations"]]) for s, f in files.items()}


def test_csv_becomes_vqa_files_split_by_picture(tmp_path):
    store = _store(tmp_path)
    qa = _csv(tmp_path / "qa.csv", ROWS)
    summary = prepare_qa(qa, store, val_fraction=0.4, seed=3)
    loaded = _load(store)
    ids = {v.split("my_photos/")[1]: int(k) for k, v in PICTURES.items()}
    by_line = {r.question_id: r for recs in loaded.values() for r in recs}
    # every row once, question_id = its line (header = line 1), its picture's id, its answer x 10
    assert sorted(by_line) == list(range(2, 2 + len(ROWS)))
    for line, (image, question, answer) in enumerate(ROWS, start=2):
        r = by_line[line]
        assert (r.image_id, r.question, r.multiple_choice_answer) == (ids[image], question, answer)
        assert r.answers == (answer,) * 10
    assert by_line[3].answer_type == "yes/no" and by_line[5].answer_type == "number"  # "one" -> 1
    assert by_line[2].answer_type == "other" and by_line[2].question_type == "what is"
    # split by picture: 2 of 5 pictures in val, no picture on both sides
    pictures = {s: {r.image_id for r in recs} for s, recs in loaded.items()}
    assert len(pictures["val"]) == 2 and len(pictures["train"]) == 3 and not pictures["val"] & pictures["train"]
    assert summary["val"]["pictures"] == 2 and summary["train"]["questions"] == len(loaded["train"])
    # seeded: the same seed gives the same split, another seed (here) another one
    prepare_qa(qa, store, val_fraction=0.4, seed=3, overwrite=True)
    assert {r.image_id for r in _load(store)["val"]} == pictures["val"]
    splits = set()
    for seed in range(6):
        prepare_qa(qa, store, val_fraction=0.4, seed=seed, overwrite=True)
        splits.add(frozenset(r.image_id for r in _load(store)["val"]))
    assert len(splits) > 1


def test_jsonl_with_split_column_and_out_dir(tmp_path):
    store = _store(tmp_path)
    qa = tmp_path / "qa.jsonl"
    items = [{"image": i, "question": q, "answer": a, "split": "val" if i == "rocket.jpg" else "train"}
             for i, q, a in ROWS]
    items[3]["answer"] = 2  # a number in JSON is an answer too
    qa.write_text("\n".join(json.dumps(x) for x in items) + "\n\n")
    prepare_qa(qa, store, tmp_path / "out")
    loaded = {s: load_split([f["questions"]], [f["annotations"]]) for s, f in output_paths(store, tmp_path / "out").items()}
    assert [r.question_id for r in loaded["val"]] == [5]  # line 5 of the file
    assert len(loaded["train"]) == len(ROWS) - 1 and loaded["train"][3].multiple_choice_answer == "2"
    assert not output_paths(store)["train"]["questions"].exists()


@pytest.mark.parametrize("rows,header,message", [
    ([("astronaut.jpg", "what?", "x"), ("dog.jpg", "what is it?", "dog")], None,
     r"qa.csv: line 3: image 'dog.jpg' is not in .*photos.h5 \(not among the 5 pictures of .*photos.h5.ids.json"),
    ([("astronaut.jpg", "  ", "x")], None, "qa.csv: line 2: empty question"),
    ([("astronaut.jpg", "???", "x")], None, "qa.csv: line 2: question '\\?\\?\\?' has no words"),
    ([("astronaut.jpg", "what is it?", "")], None, "qa.csv: line 2: empty answer"),
    ([("astronaut.jpg", "what?", "x", "test")], "image,question,answer,split",
     "qa.csv: line 2: unknown split 'test' \\(expected train, val or empty\\)"),
    ([("chelsea.jpg", "what?", "cat")], None, "qa.csv: line 2: image 'chelsea.jpg' matches 2 pictures"),
    ([("astronaut.jpg", "what?")], "image,question", "qa.csv: line 1: expected the columns image,question,answer"),
    ([("astronaut.jpg", "what?", "x", "y")], None, "qa.csv: line 2: 4 field\\(s\\), but the header names 3"),
    ([("astronaut.jpg", "what?", "x", "train")], "image,question,answer,split", "qa.csv: no val questions"),
])
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, capsys, rows, header, message):
    store = _store(tmp_path)
    qa = _csv(tmp_path / "qa.csv", rows, header or "image,question,answer")
    code = main(["prep", "qa", str(qa), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("vqa-align prep: error: "), err
    import re

    assert re.search(message, err), err
    assert not any(p.exists() for f in output_paths(store).values() for p in f.values())  # nothing written


def test_missing_ids_file_and_existing_outputs_are_refused(tmp_path):
    store = _store(tmp_path)
    qa = _csv(tmp_path / "qa.csv", ROWS)
    with pytest.raises(UserError, match="other.h5.ids.json: no such file; `vqa-align extract"):
        prepare_qa(qa, tmp_path / "data" / "other.h5")
    prepare_qa(qa, store)
    target = output_paths(store)["val"]["annotations"]
    target.write_text("mine")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        prepare_qa(qa, store)
    assert target.read_text() == "mine"
    prepare_qa(qa, store, overwrite=True)
    assert target.read_text() != "mine"


# ----------------------------------------------------------------------------------------------
# predict --questions
# ----------------------------------------------------------------------------------------------


def test_predict_questions_writes_results_that_score_and_match_single_answers(tmp_path, capsys):
    from vqa_align.evaluate.evaluator import evaluate_checkpoint
    from vqa_align.serve.predictor import Predictor

    ckpt = build_tiny_checkpoint(tmp_path / "tiny")
    questions_file = tmp_path / "tiny" / "val_questions.json"
    questions = json.loads(questions_file.read_text())["questions"][::-1]  # not in store order
    questions_file.write_text(json.dumps({"questions": questions}))
    out = tmp_path / "results.json"
    argv = ["predict", "--checkpoint", str(ckpt), "--questions", str(questions_file), "--out", str(out),
            "--batch-size", "3"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]  # the file's order
    predictor = Predictor(ckpt)
    for q, r in zip(questions, results):
        assert set(r) == {"question_id", "answer"}
        assert r["answer"] == predictor.answer(q["question"], image_id=q["image_id"]).answer
    # the same answers as checkpoint evaluation (same loop), and `score` reads the file
    ckpt_cfg = ckpt / "config.yaml"
    import yaml

    config = yaml.safe_load(ckpt_cfg.read_text())
    config["data"]["val_questions"] = [str(questions_file)]
    ckpt_cfg.write_text(yaml.safe_dump(config))
    evaluate_checkpoint(ckpt, results_out=tmp_path / "eval.json")
    assert sorted(json.loads((tmp_path / "eval.json").read_text()), key=lambda r: r["question_id"]) == \
        sorted(results, key=lambda r: r["question_id"])
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
                    "answer_type": "other", "multiple_choice_answer": results[0]["answer"],
                    "answers": [{"answer": results[0]["answer"], "answer_id": i + 1} for i in range(10)]}
                   for q in questions]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": annotations}))
    capsys.readouterr()
    assert main(["score", "--questions", str(questions_file), "--annotations", str(tmp_path / "ann.json"),
                 "--results", str(out)]) == 0
    expected = 100.0 * sum(r["answer"] == results[0]["answer"] for r in results) / len(results)
    assert json.loads(capsys.readouterr().out)["overall"] == pytest.approx(expected, abs=0.01)
    # an existing --out is kept unless --overwrite
    out.write_text("mine")
    assert main(argv) == 2 and out.read_text() == "mine"
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0 and json.loads(out.read_text()) == results


def test_predict_questions_errors_are_one_line(tmp_path, capsys):
    ckpt = build_tiny_checkpoint(tmp_path / "tiny")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"questions": [
        {"image_id": IMAGE_IDS[0], "question": "what shape?", "question_id": 1},
        {"image_id": 987654, "question": "what shape?", "question_id": 2}]}))
    cases = [
        (["--questions", str(questions), "--out", str(tmp_path / "r.json")],
         "q.json: question_id 2 is about image_id 987654, which is not in the run's feature store"),
        (["--questions", str(questions)], "--questions needs --out"),
        (["--questions", str(questions), "--question", "what?", "--out", "r.json"], "--question goes with"),
        (["--image-id", "1"], "--question is required with --image-id or --image"),
        (["--questions", str(tmp_path / "none.json"), "--out", str(tmp_path / "r.json")], "none.json"),
    ]
    for extra, message in cases:
        code = main(["predict", "--checkpoint", str(ckpt)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------------------------
# docs/own_photos.md, in order
# ----------------------------------------------------------------------------------------------

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat")
# a random ResNet-18 at 64 px (2 x 2 cells of 512-d): the page's commands, seconds instead of minutes
TINY_BACKBONE = ["--backbone", "torchvision", "--param", "arch=resnet18", "--param", "weights=none",
                 "--param", "image_size=64"]
TINY_MODEL = ["model.feature_dim=512", "model.hidden_size=32", "model.ffn_size=64", "model.num_layers=1",
              "model.flat_mlp_size=32", "model.flat_size=32", "model.classifier_hidden=32",
              "model.word_embed_dim=16", "model.alignment.helper_hidden=8", "model.alignment.helper_out=8",
              "train.epochs=2", "train.warmup_epochs=1", "train.decay_epochs=[1]"]


def test_own_photos_page_end_to_end(tmp_path, monkeypatch, capsys):
    """extract -> prep qa -> train (configs/own_photos.yaml) -> predict (a photo, a questions file) -> score."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # the preset's paths are relative to where the commands run
    folder = tmp_path / "my_photos"
    (folder / "animals").mkdir(parents=True)
    for name in SKIMAGE_PHOTOS:
        sub = "animals/" if name in ("chelsea", "cat") else ""
        Image.fromarray(getattr(skimage_data, name)()).save(folder / f"{sub}{name}.jpg")
    rows = [("astronaut.jpg", "what is the person wearing?", "spacesuit"), ("astronaut.jpg", "is there a cat?", "no"),
            ("coffee.jpg", "what is in the cup?", "coffee"), ("coffee.jpg", "is there a cat?", "no"),
            ("rocket.jpg", "what is this?", "rocket"), ("animals/chelsea.jpg", "what animal is this?", "cat"),
            ("animals/chelsea.jpg", "is there a cat?", "yes"), ("animals/cat.jpg", "is there a cat?", "yes")]
    _csv(folder / "qa.csv", rows)

    def run(*argv: str) -> str:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    run("extract", "my_photos", *TINY_BACKBONE, "--out", "data/photos.h5", "--workers", "0", "--quiet")
    run("prep", "qa", "my_photos/qa.csv", "--store", "data/photos.h5")
    sets = [x for kv in TINY_MODEL for x in ("--set", kv)]
    run("train", "--config", "configs/own_photos.yaml", *sets, "--out", "runs/own_photos")
    answer = json.loads(run("predict", "--checkpoint", "runs/own_photos", "--image", "my_photos/animals/chelsea.jpg",
                            "--question", "what animal is this?"))
    train = json.loads(Path("data/photos_train_annotations.json").read_text())["annotations"]
    assert answer["answer"] in {a["multiple_choice_answer"] for a in train}  # the classes it was trained on
    run("predict", "--checkpoint", "runs/own_photos", "--questions", "data/photos_val_questions.json",
        "--out", "results.json")
    val = json.loads(Path("data/photos_val_questions.json").read_text())["questions"]
    results = json.loads(Path("results.json").read_text())
    assert [r["question_id"] for r in results] == [q["question_id"] for q in val]
    scores = json.loads(run("score", "--questions", "data/photos_val_questions.json", "--annotations",
                            "data/photos_val_annotations.json", "--results", "results.json"))
    assert 0.0 <= scores["overall"] <= 100.0
