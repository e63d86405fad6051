"""The official VQA accuracy: normalisation rules, leave-one-out accuracy, aggregation, bad input."""

from __future__ import annotations

import itertools
import json
from argparse import Namespace
from pathlib import Path

import pytest

from vqa_align.cli import UserError, main
from vqa_align.extract.feature_store import DataFormatError
from vqa_align.metrics.vqa_accuracy import (
    CONTRACTIONS,
    PUNCTUATION,
    answer_record_accuracy,
    evaluate,
    naive_sum,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    round_half_away,
    run_score,
)
from vqa_metric_variants import make_variant_files

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


# Where the current official code (GT-Vision-Lab/VQA a013f00, "Fixed processing answers bug") and
# the pre-fix code differ. Each number is worked out by hand in the comment: with 10 human answers,
# m matching ones give 0, 0.3, 0.6, 0.9, 1.0 for m = 0, 1, 2, 3, >= 4 (test_leave_one_out_accuracy).
# "pre-fix" is what the old vqa_eval (and vqaEval.py a4f1afd) gave, for contrast.
CURRENT_VS_PRE_FIX = [
    # humans all "Two": identical -> nothing is processed; "two" != "Two" -> m = 0 -> 0.0.
    # (pre-fix: prediction -> "2", GT raw "Two" -> 0.0 too)
    ("two", ["Two"] * 10, 0.0),
    # humans all "two": identical -> raw; "two" == "two", m = 10 -> 1.0.
    # (pre-fix: prediction -> "2" != "two" -> 0.0)
    ("two", ["two"] * 10, 1.0),
    # humans disagree "two" x 5 / "2" x 5: all normalised -> ten "2"; prediction "two" -> "2";
    # m = 10 -> 1.0. (pre-fix: GT only punctuation-processed -> five "2" match, 1.0 as well)
    ("two", ["two"] * 5 + ["2"] * 5, 1.0),
    # humans "two" x 2 / "2" x 1 / "x" x 7: normalised -> three "2"; m = 3 -> 0.9.
    # (pre-fix: only the one "2" matches -> 0.3)
    ("two", ["two"] * 2 + ["2"] + ["x"] * 7, 0.9),
    # humans all "Yes", prediction "yes": identical -> raw; "yes" != "Yes" -> 0.0.
    ("yes", ["Yes"] * 10, 0.0),
    # humans all "yes", prediction "Yes": raw; "Yes" != "yes" -> 0.0. (pre-fix: prediction
    # lower-cased -> 1.0)
    ("Yes", ["yes"] * 10, 0.0),
    # humans "Yes" x 3 / "yes" x 7, prediction "yes": disagree -> all lower-cased -> m = 10 -> 1.0.
    # (pre-fix: GT not lower-cased -> m = 7 -> 1.0 too)
    ("yes", ["Yes"] * 3 + ["yes"] * 7, 1.0),
    # humans "Yes" x 8 / "no" x 2, prediction "YES": disagree -> "yes" x 8; "YES" -> "yes";
    # m = 8 -> 1.0. (pre-fix: "Yes" never lower-cased -> m = 0 -> 0.0)
    ("YES", ["Yes"] * 8 + ["no"] * 2, 1.0),
    # humans all "dog.": raw; "dog" != "dog." -> 0.0.
    ("dog", ["dog."] * 10, 0.0),
    # humans all "the dog", prediction "the dog": raw equal -> 1.0. (pre-fix: prediction -> "dog"
    # -> 0.0)
    ("the dog", ["the dog"] * 10, 1.0),
    # humans "the dog" x 2 / "Dog." x 1 / "cat" x 7, prediction "a dog": disagree -> three "dog";
    # "a dog" -> "dog"; m = 3 -> 0.9. (pre-fix: GT "the dog", "Dog" never equal "dog" -> 0.0)
    ("a dog", ["the dog"] * 2 + ["Dog."] + ["cat"] * 7, 0.9),
    # humans all " yes\n" (whitespace): stripped -> identical "yes"; prediction "yes\t" -> "yes";
    # m = 10 -> 1.0. (pre-fix: GT never stripped -> 0.0)
    ("yes\t", [" yes\n"] * 10, 1.0),
    # humans "ten" x 1 / "10" x 1 / "x" x 8, prediction "10": disagree -> two "10"; m = 2 -> 0.6.
    ("10", ["ten", "10"] + ["x"] * 8, 0.6),
    # humans "dont" x 4 / "don't" x 6, prediction "don't": disagree -> "dont" -> "don't" ->
    # m = 10 -> 1.0. (pre-fix: "dont" not expanded in GT -> m = 6 -> 1.0 too)
    ("don't", ["dont"] * 4 + ["don't"] * 6, 1.0),
    # humans all "dont", prediction "don't": raw, no contraction expansion -> 0.0.
    ("don't", ["dont"] * 10, 0.0),
]


@pytest.mark.parametrize("prediction, humans, expected", CURRENT_VS_PRE_FIX)
def test_current_official_rules(prediction: str, humans: list[str], expected: float) -> None:
    assert question_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)
    assert question_accuracy(prediction, humans) == pytest.approx(reference_official(prediction, humans))


def reference_official(pred: str, answers: list[str]) -> float:
    """Slow and obvious statement of the current official rules (distinct answer records)."""
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
    return reference_accuracy(pred, answers)


def test_matches_reference_on_generated_variants() -> None:
    _, annotations, results = make_variant_files(600, seed=1)
    by_id = {r["question_id"]: r["answer"] for r in results}
    for ann in annotations["annotations"]:
        humans = [a["answer"] for a in ann["answers"]]
        pred = by_id[ann["question_id"]]
        assert question_accuracy(pred, humans) == pytest.approx(reference_official(pred, humans), abs=1e-12)


def test_repeated_answer_records_leave_together() -> None:
    # The official leave-one-out drops every record equal (as a dict) to the left-out one.
    bare = [{"answer": "yes"}] * 10
    # All 10 records are equal: each subset is empty -> m = 0 everywhere -> 0.0.
    assert answer_record_accuracy("yes", bare) == 0.0
    # 9 bare "yes" + 1 bare "no": leaving a "yes" out drops all 9 -> 0 matches; leaving "no" out
    # keeps 9 -> min(1, 9/3) = 1. Mean (9 * 0 + 1) / 10 = 0.1.
    assert answer_record_accuracy("yes", [{"answer": "yes"}] * 9 + [{"answer": "no"}]) == pytest.approx(0.1)
    # Records that become equal only after processing: "Yes" and "yes" both -> "yes" (humans
    # disagree). 5 + 5 bare records -> all 10 equal -> 0.0.
    assert answer_record_accuracy("yes", [{"answer": "Yes"}] * 5 + [{"answer": "yes"}] * 5) == 0.0
    # Repeated answer_id 1, 2, 3, 1, 2, 3, ... (same confidence): leaving record i out drops the
    # 3 or 4 records with its id. ids 1 (4 records) and 2, 3 (3 each); all "yes": leaving id 1 out
    # keeps 6 -> 1.0; leaving id 2 or 3 out keeps 7 -> 1.0. -> 1.0.
    ids = [{"answer": "yes", "answer_id": 1 + i % 3} for i in range(10)]
    assert answer_record_accuracy("yes", ids) == 1.0
    # Distinct answer_ids: the fast path, the same as question_accuracy.
    distinct = [{"answer": a, "answer_id": i} for i, a in enumerate(["yes"] * 3 + ["no"] * 7)]
    assert answer_record_accuracy("yes", distinct) == question_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == \
        pytest.approx(0.9)
    with pytest.raises(ValueError):
        answer_record_accuracy("yes", [])


def test_slow_record_path_equals_fast_path_for_distinct_records() -> None:
    _, annotations, results = make_variant_files(300, seed=2)
    by_id = {r["question_id"]: r["answer"] for r in results}
    for ann in annotations["annotations"]:
        records = [dict(a, answer_id=f"id{i}") for i, a in enumerate(ann["answers"])]
        pred = by_id[ann["question_id"]]
        # an unhashable answer_id forces the slow path; distinct values keep the records distinct
        slow = answer_record_accuracy(pred, [dict(r, answer_id=[r["answer_id"]]) for r in records])
        assert slow == answer_record_accuracy(pred, records)


def test_digits_in_regexes_are_ascii_only() -> None:
    # Python 2's byte-string patterns: \d is [0-9]. Arabic-Indic "3,4" is no digit-comma-digit, so
    # ',' touching no space becomes a space: "\u0663 \u0664" (Python 3's Unicode \d would delete it).
    assert process_punctuation("\u0663,\u0664") == "\u0663 \u0664"
    assert process_punctuation("3,4") == "34"
    # A period before a non-ASCII digit is stripped.
    assert process_punctuation("\u0663.\u0665") == "\u0663\u0665"


def test_rounding_is_python2_round() -> None:
    # 100 * 1/32 = 3.125 exactly: Python 2 (the official code) rounds ties away from zero -> 3.13.
    assert round_half_away(3.125, 2) == 3.13 and round(3.125, 2) == 3.12
    # 2.675 is stored as 2.67499999... -> 2.67 under both.
    assert round_half_away(2.675, 2) == 2.67
    assert round_half_away(-0.125, 2) == -0.13 and round_half_away(0.5, 0) == 1.0


def test_naive_sum_adds_left_to_right() -> None:
    values = [1e16, 1.0, -1e16]
    # Left to right: 1e16 + 1 rounds back to 1e16, then - 1e16 -> 0.0 (a compensated sum gives 1.0).
    assert naive_sum(values) == 0.0
    assert naive_sum([0.1] * 10) == 0.9999999999999999


def test_evaluate_generated_variants_and_tie_rounding() -> None:
    questions, annotations, results = make_variant_files(200, seed=3)
    with pytest.warns(UserWarning, match="without distinct answer_id"):
        out = evaluate(questions, annotations, results)
    # The 32 "tie" questions: one right (1.0), 31 wrong -> 100 / 32 = 3.125 -> 3.13 (Python 2).
    assert out["perQuestionType"]["tie"] == 3.13
    accs = [answer_record_accuracy(r["answer"], a["answers"])
            for r, a in zip(results, annotations["annotations"])]
    assert out["overall"] == round_half_away(100 * naive_sum(accs) / len(accs), 2)


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


def test_score_warns_in_one_line_about_records_without_answer_ids(tmp_path: Path, capsys) -> None:
    q, a, r = make_fixture()
    for ann in a["annotations"]:
        ann["answers"] = [{"answer": x["answer"]} for x in ann["answers"]]
    args = ["score", "--questions", str(_write(tmp_path, "q.json", q)),
            "--annotations", str(_write(tmp_path, "a.json", a)), "--results", str(_write(tmp_path, "r.json", r))]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "a.json: 5 questions" in captured.err
    # Question 1 (ten equal bare "yes") now scores 0; q2: "2" x 2 / "3" x 8, pred "two": records
    # "2" leave together -> leaving a "2" out keeps 0 matches, leaving a "3" out keeps 2 -> (8 *
    # 2/3) / 10 = 0.5333; q3: one "no" record, pred "no": leaving it out -> 0, else 1 match ->
    # 9 * 1/3 / 10 = 0.3; q4: 0; q5: dog x 3 -> leaving a dog out 0, else min(1, 3/3) = 1 ->
    # 7 / 10 = 0.7. Overall 100 * (0 + 0.5333 + 0.3 + 0 + 0.7) / 5 = 30.67.
    assert json.loads(captured.out)["overall"] == 30.67
