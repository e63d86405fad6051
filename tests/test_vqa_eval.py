"""The official VQA accuracy: normalisation rules, leave-one-out accuracy, aggregation, bad input."""

from __future__ import annotations

import itertools
import json
from argparse import Namespace
from pathlib import Path

import pytest

from vqa_align.cli import UserError, main
from vqa_align.store import DataFormatError
from vqa_align.vqa_eval import (
    CONTRACTIONS,
    PUNCTUATION,
    evaluate,
    normalize_answer,
    process_punctuation,
    question_accuracy,
    run_score,
)

# --- normalisation, one rule per case -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # whitespace: newline/tab -> space, strip, runs of spaces collapse in the word split
        ("  yes\n", "yes"),
        ("red\tand\nblue", "red and blue"),
        # number words -> digits (zero..ten), 'none' -> '0'; other numbers untouched
        ("ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("Two", "2"),
        ("eleven", "eleven"),
        ("one two three", "1 2 3"),
        # articles dropped as whole words only
        ("the dog.", "dog"),
        ("A Cat", "cat"),
        ("an apple", "apple"),
        ("theater", "theater"),
        ("there", "there"),
        # contractions table; existing apostrophes stay (' is not in the official list)
        ("dont", "don't"),
        ("Im", "im"),  # official quirk: capitalised keys never match after lower-casing
        ("isnt it", "isn't it"),
        ("don't", "don't"),
        ("somebody'd", "somebodyd"),  # official table maps this one backwards
        # punctuation: a mark not touching a space becomes a space...
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("left/right", "left right"),
        # ...a mark touching a space is deleted
        ("yes !", "yes"),
        ("a , b", "b"),
        # digit,digit anywhere: every mark is deleted (no spaces inserted)
        ("1,000", "1000"),
        ("1,000-2", "10002"),
        ("a,b", "b"),  # no digit comma: ',' -> ' ', then the article 'a' goes
        # periods: removed unless a digit follows
        ("3.5", "3.5"),
        ("5.", "5"),
        ("u.s.a", "usa"),
        ("dog.", "dog"),
        # case
        ("YES", "yes"),
        ("", ""),
    ],
)
def test_normalize_answer_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_punctuation_decision_uses_the_original_text() -> None:
    # '-' is tested before ','; '-' touches no space in the original, so it becomes a space,
    # although after that edit it would touch one.
    assert process_punctuation("x-,y") == "x  y"
    assert process_punctuation("x -y") == "x y"


def test_period_strip_removes_at_most_32_periods() -> None:
    # The official call passes re.UNICODE (32) as the count argument.
    assert process_punctuation("." * 40 + "x") == "." * 8 + "x"


def test_official_tables() -> None:
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["youve"] == "you've" and CONTRACTIONS["twas"] == "'twas"
    assert all("’" not in k + v for k, v in CONTRACTIONS.items())  # the current, ASCII table
    assert PUNCTUATION == tuple(";/[]\"{}()=+\\_-><@`,?!")
    assert "'" not in PUNCTUATION and ":" not in PUNCTUATION and "." not in PUNCTUATION


# --- leave-one-out accuracy ---------------------------------------------------------------------


def reference_accuracy(pred: str, answers: list[str]) -> float:
    """Slow and obvious: build each leave-one-out subset, count, cap at 1, average."""
    scores = []
    for i in range(len(answers)):
        subset = answers[:i] + answers[i + 1 :]
        count = 0
        for a in subset:
            if a == pred:
                count += 1
        scores.append(min(1.0, count / 3.0))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(
    "matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (10, 1.0)]
)
def test_leave_one_out_accuracy(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert question_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert question_accuracy("cat", answers) == pytest.approx(reference_accuracy("cat", answers))


def test_leave_one_out_matches_reference_for_all_counts_and_orders() -> None:
    for m in range(11):
        for positions in itertools.islice(itertools.combinations(range(10), m), 5):
            answers = ["cow" if i in positions else f"other{i % 3}" for i in range(10)]
            assert question_accuracy("cow", answers) == pytest.approx(
                reference_accuracy("cow", answers), abs=1e-12
            )


def test_gt_normalised_only_when_humans_disagree() -> None:
    # Humans disagree -> GT punctuation processing: "dog." -> "dog" matches the prediction.
    assert question_accuracy("dog", ["dog."] * 9 + ["cat"]) == pytest.approx(1.0)
    # Humans agree -> GT compared raw: "dog." never equals the normalised prediction "dog".
    assert question_accuracy("dog", ["dog."] * 10) == 0.0
    # Only punctuation is applied to GT answers, never digits/articles/lower-casing.
    assert question_accuracy("two", ["two"] * 5 + ["2"] * 5) == pytest.approx(1.0)  # pred -> "2"
    assert question_accuracy("two", ["two"] * 9 + ["x"]) == 0.0
    assert question_accuracy("the dog", ["the dog"] * 9 + ["x"]) == 0.0
    assert question_accuracy("Yes", ["yes"] * 10) == 1.0  # the prediction is lower-cased
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0  # the GT is not


def test_question_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError):
        question_accuracy("yes", [])


# --- evaluate on the official JSON formats ------------------------------------------------------


def _answers(values: list[str]) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(values)]


def make_fixture() -> tuple[dict, dict, list]:
    """Four questions, two answer types, three question types, in the official formats."""
    qs = [
        (1, 10, "is the cat black?", "is the", "yes/no", ["yes"] * 10, "yes"),  # 1.0
        (2, 10, "how many dogs?", "how many", "number", ["2"] * 2 + ["3"] * 8, "two"),  # 0.6
        (3, 11, "is it raining?", "is the", "yes/no", ["no"] * 1 + ["yes"] * 9, "no"),  # 0.3
        (4, 11, "how many cats?", "how many", "number", ["4"] * 10, "five"),  # 0.0
        (5, 12, "what is it?", "what is", "other", ["dog"] * 3 + ["cat"] * 7, "The dog."),  # 0.9
    ]
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
        "data_subtype": "val2014",
        "questions": [{"image_id": im, "question": q, "question_id": qid} for qid, im, q, *_ in qs],
    }
    annotations = {
        "info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "annotations": [
            {"question_id": qid, "image_id": im, "question_type": qt, "answer_type": at,
             "multiple_choice_answer": ans[-1], "answers": _answers(ans)}
            for qid, im, _, qt, at, ans, _ in qs
        ],
    }
    results = [{"question_id": qid, "answer": pred} for qid, *_, pred in qs]
    return questions, annotations, results


def test_evaluate_aggregates_like_the_official_code() -> None:
    questions, annotations, results = make_fixture()
    out = evaluate(questions, annotations, results)
    # per question: 1.0, 0.6, 0.3, 0.0, 0.9
    assert out["overall"] == round(100 * (1.0 + 0.6 + 0.3 + 0.0 + 0.9) / 5, 2) == 56.0
    assert out["perAnswerType"] == {"yes/no": 65.0, "number": 30.0, "other": 90.0}
    assert out["perQuestionType"] == {"is the": 65.0, "how many": 30.0, "what is": 90.0}
    assert list(out) == ["overall", "perAnswerType", "perQuestionType"]


def test_evaluate_rounds_to_two_decimals() -> None:
    questions, annotations, results = make_fixture()
    # Only questions 2 (0.6) and 3 (0.3) get credit.
    for r in results:
        r["answer"] = "nothing"
    results[2]["answer"] = "no"
    results[1]["answer"] = "2"  # 0.6
    out = evaluate(questions, annotations, results)
    assert out["overall"] == 18.0
    # yes/no = (0 + 0.3) / 2, number = (0.6 + 0) / 2, other = 0
    assert out["perAnswerType"] == {"yes/no": 15.0, "number": 30.0, "other": 0.0}
    annotations["annotations"] = annotations["annotations"][:3]
    questions["questions"] = questions["questions"][:3]
    out = evaluate(questions, annotations, results[:3])
    assert out["overall"] == 30.0  # (0 + 0.6 + 0.3) / 3
    results3 = [dict(r) for r in results[:3]]
    results3[1]["answer"] = "nothing"
    assert evaluate(questions, annotations, results3)["overall"] == 10.0
    results3[0]["answer"] = "yes"
    assert evaluate(questions, annotations, results3)["overall"] == round(100 * 1.3 / 3, 2) == 43.33


def test_evaluate_reads_files_and_run_score_prints_json(tmp_path: Path, capsys) -> None:
    questions, annotations, results = make_fixture()
    paths = {}
    for name, data in [("q", questions), ("a", annotations), ("r", results)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    assert evaluate(paths["q"], paths["a"], str(paths["r"]))["overall"] == 56.0
    assert run_score(Namespace(questions=str(paths["q"]), annotations=str(paths["a"]),
                               results=str(paths["r"]))) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"] == 56.0 and printed["perAnswerType"]["other"] == 90.0
    # and through the real command line entry point
    rc = main(["score", "--questions", str(paths["q"]), "--annotations", str(paths["a"]),
               "--results", str(paths["r"])])
    assert rc == 0 and json.loads(capsys.readouterr().out)["overall"] == 56.0


# --- bad input ----------------------------------------------------------------------------------


def _err(questions, annotations, results) -> str:
    with pytest.raises(UserError) as info:
        evaluate(questions, annotations, results)
    # bad content is a DataFormatError, a missing file a FileNotFoundError; both are UserErrors
    assert isinstance(info.value, (DataFormatError, FileNotFoundError)), type(info.value)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_bad_results(tmp_path: Path) -> None:
    q, a, r = make_fixture()
    cases = [
        ({"question_id": 1, "answer": "yes"}, ["r.json", "list", "dict"]),
        ([*r[:2], "yes", *r[3:]], ["r.json", "record 2", "object"]),
        ([*r[:1], {"question_id": 2}, *r[2:]], ["r.json", "record 1", "missing field 'answer'"]),
        ([*r[:1], {"answer": "2"}, *r[2:]], ["record 1", "missing field 'question_id'"]),
        ([*r[:3], {"question_id": "4", "answer": "5"}, *r[4:]], ["record 3", "'question_id'", "integer"]),
        ([*r[:3], {"question_id": 4.0, "answer": "5"}, *r[4:]], ["record 3", "integer"]),
        ([*r[:3], {"question_id": True, "answer": "5"}, *r[4:]], ["record 3", "integer"]),
        ([*r[:3], {"question_id": 4, "answer": 5}, *r[4:]], ["record 3", "'answer'", "string"]),
        ([*r, {"question_id": 99, "answer": "x"}], ["record 5", "question_id 99", "not in the annotations"]),
        ([*r, {"question_id": 3, "answer": "x"}], ["record 5", "duplicate question_id 3"]),
        (r[:2], ["r.json", "3 of 5", "3, 4, 5"]),
        ([], ["5 of 5", "1, 2, 3, 4, 5"]),
    ]
    for bad, expected in cases:
        message = _err(q, a, _write(tmp_path, "r.json", bad))
        for piece in expected:
            assert piece in message, (piece, message)


def test_missing_predictions_message_shows_a_few_ids() -> None:
    q, a, r = make_fixture()
    message = _err(q, a, [])
    assert "5 of 5" in message and ", ..." not in message
    many = [dict(x, question_id=100 + i) for i, x in enumerate(a["annotations"] * 2)]
    a2 = dict(a, annotations=many)
    q2 = dict(q, questions=[{"image_id": x["image_id"], "question": "?", "question_id": x["question_id"]} for x in many])
    message = _err(q2, a2, [{"question_id": 100, "answer": "yes"}])
    assert "9 of 10" in message and "101, 102, 103, 104, 105, ..." in message


def test_bad_annotations(tmp_path: Path) -> None:
    q, a, r = make_fixture()

    def with_record(i: int, **changes) -> dict:
        anns = [dict(x) for x in a["annotations"]]
        anns[i].update(changes)
        for key, value in changes.items():
            if value is None:
                del anns[i][key]
        return dict(a, annotations=anns)

    cases = [
        ({"questions": []}, ["a.json", "'annotations'"]),
        ([], ["a.json", "annotations"]),
        (with_record(2, answer_type="color"), ["a.json", "record 2", "question_id 3", "'color'", "yes/no"]),
        (with_record(1, answer_type=None), ["record 1", "question_id 2", "missing field 'answer_type'"]),
        (with_record(1, question_type=None), ["question_id 2", "'question_type'"]),
        (with_record(4, answers=None), ["question_id 5", "'answers'"]),
        (with_record(4, answers=[]), ["question_id 5", "empty"]),
        (with_record(4, answers=[{"answer_id": 1}]), ["question_id 5", "answers[0]"]),
        (with_record(0, question_id="1"), ["record 0", "'question_id'", "integer"]),
        (with_record(3, question_id=1), ["record 3", "duplicate question_id 1"]),
        (with_record(3, image_id=99), ["question_id 4", "image_id"]),
    ]
    for bad, expected in cases:
        message = _err(q, _write(tmp_path, "a.json", bad), r)
        for piece in expected:
            assert piece in message, (piece, message)
    # scoring needs question_type but not multiple_choice_answer (training needs that one)
    no_mc = dict(a, annotations=[{k: v for k, v in x.items() if k != "multiple_choice_answer"}
                                 for x in a["annotations"]])
    assert evaluate(q, _write(tmp_path, "a.json", no_mc), r)["overall"] == 56.0


def test_bad_questions(tmp_path: Path) -> None:
    q, a, r = make_fixture()
    qs = q["questions"]
    cases = [
        ({"annotations": []}, ["q.json", "'questions'"]),
        (dict(q, questions=[*qs[:2], {"image_id": 10, "question": "?"}, *qs[3:]]),
         ["q.json", "record 2", "missing field 'question_id'"]),
        (dict(q, questions=[*qs[:2], {"question_id": 3, "question": "?"}, *qs[3:]]),
         ["record 2", "question_id 3", "'image_id'"]),
        (dict(q, questions=qs[:4]), ["q.json", "question_id 5"]),
        (dict(q, questions=[*qs, qs[0]]), ["record 5", "duplicate question_id 1"]),
    ]
    for bad, expected in cases:
        message = _err(_write(tmp_path, "q.json", bad), a, r)
        for piece in expected:
            assert piece in message, (piece, message)


def test_unreadable_files(tmp_path: Path) -> None:
    q, a, r = make_fixture()
    assert "questions file not found: " in _err(tmp_path / "nope.json", a, r)
    with pytest.raises(FileNotFoundError):
        evaluate(q, tmp_path / "nope.json", r)
    message = _err(q, a, _write(tmp_path, "r.json", '[{"question_id": 1,'))
    assert "r.json" in message and "not valid JSON" in message and "line 1" in message


def test_cli_reports_user_errors_as_one_line(tmp_path: Path, capsys) -> None:
    q, a, r = make_fixture()
    args = ["score", "--questions", str(_write(tmp_path, "q.json", q)),
            "--annotations", str(_write(tmp_path, "a.json", a)),
            "--results", str(_write(tmp_path, "r.json", r[:4]))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqa-align score: error: ")
    assert "r.json" in err and "1 of 5" in err and "(question_id 5)" in err
