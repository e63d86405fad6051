r"""The official VQA accuracy, reimplemented as pure functions.

This follows GT-Vision-Lab's ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (current master,
the Python 3 version with ``evaluate(quesIds=None)``) fact for fact:

* prediction: ``\n``/``\t`` -> space, ``strip``, then punctuation processing, then
  digit/article/contraction processing -- **always**;
* ground-truth answers: compared raw, except that when the 10 human answers of a question
  disagree (``len(set(answers)) > 1``) each of them gets the punctuation processing -- and only
  that (the official code never lower-cases, strips or maps digits/articles of the GT answers);
* per question: the mean over the 10 leave-one-out subsets of ``min(1, #matches / 3)``, with exact
  string equality;
* ``overall``, ``perAnswerType`` and ``perQuestionType``: ``round(100 * mean, 2)``.

Quirks of the official code are reproduced on purpose (and pinned by tests): a digit-comma-digit
anywhere in the text makes *every* punctuation character vanish instead of becoming a space; the
period regex is the official (buggy but harmless) ``(?!<=\d)(\.)(?!\d)``; its ``sub`` is passed
``re.UNICODE`` as the *count* argument, so at most 32 periods are removed; the capitalised
contraction keys ("Im", "Ive", ...) can never match because the text is lower-cased first.

``normalize_answer`` is the full prediction-side processing; the data layer uses it to build the
answer vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vqa_align.errors import DataFormatError, InputFileNotFoundError

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")

# --- the official tables (vqaEval.py, GT-Vision-Lab master) -------------------------------------

CONTRACTIONS: dict[str, str] = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's",
    'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
    'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's",
    'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're",
    'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}

# Number words -> digits ("none" -> "0" too, as the official manualMap does).
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# The official list, in the official order (order matters: replacements accumulate).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# Verbatim official patterns. ``(?!<=\d)`` is a look-*ahead* (a typo for a look-behind in the
# original) that is always true before a '.', so the effect is: drop '.' unless a digit follows.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``.
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # == 32


# --- normalisation ------------------------------------------------------------------------------


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then surrounding whitespace is stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each punctuation mark is deleted when it touches a space somewhere in the *original* text, or
    when the original text contains a digit-comma-digit ("1,000"); otherwise it becomes a space
    ("black-and-white" -> "black and white"). Finally periods not followed by a digit are removed
    ("dog." -> "dog", "3.5" stays).
    """
    # The official loop tests the *original* ``inText`` while it edits ``outText``; deciding on
    # the partly edited text would give different results (e.g. for "a ,b-c").
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words ->
    digits, drop a/an/the, expand contractions ("dont" -> "don't"), join with single spaces."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The full processing the official code applies to a predicted answer.

    whitespace clean-up -> :func:`process_punctuation` -> :func:`process_digit_article`.
    E.g. ``"The Dog."`` -> ``"dog"``, ``"ten"`` -> ``"10"``, ``"dont"`` -> ``"don't"``.
    """
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


# --- accuracy -----------------------------------------------------------------------------------


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one predicted answer against the human answers of one question.

    Mean over the leave-one-out subsets (one per human answer; 10 in VQA) of
    ``min(1, #answers in the subset equal to the prediction / 3)``. With 10 answers, 0, 1, 2, 3
    and >= 4 matching answers give 0, 0.3, 0.6, 0.9 and 1.0.
    """
    if len(gt_answers) == 0:
        raise ValueError("question_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = list(gt_answers)
    # The official code normalises GT answers only when the humans disagree, and then only
    # their punctuation.
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leaving answer i out removes one match exactly when answer i itself matches.
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return sum(accs) / len(accs)


# --- loading and validation ---------------------------------------------------------------------
#
# The one reader and validator of the official VQA v2 JSON files, shared by scoring (here) and
# training (``vqa_data.load_questions_file`` / ``load_annotations_file`` wrap these). Bad content
# raises ``DataFormatError`` (a UserError and a ValueError), a missing file
# ``InputFileNotFoundError`` (a UserError and a FileNotFoundError); every message is one line
# naming the file, the record index, its question_id and the field.

JsonSource = str | Path | Mapping[str, Any] | Sequence[Any]


def _load_json(source: Any, what: str) -> tuple[Any, str]:
    """Return (parsed JSON, name for error messages): ``source`` is a path or already parsed."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputFileNotFoundError(f"{what} file not found: {path}")
        try:
            with path.open("r", encoding="utf-8") as f:
                return json.load(f), str(path)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from None
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text ({err.reason})") from None
    return source, f"<{what}>"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_INT = (int, "an integer")
_STR = (str, "a string")


def _check_fields(record: Any, fields: Mapping[str, tuple[type, str]], where: str) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, (typ, label) in fields.items():
        if name not in record:
            raise DataFormatError(f"{where}: missing field '{name}'")
        value = record[name]
        ok = _is_int(value) if typ is int else isinstance(value, typ)
        if not ok:
            raise DataFormatError(
                f"{where}: field '{name}' must be {label}, got {type(value).__name__} {value!r:.40}"
            )


def _records(
    source: JsonSource, key: str, fields: Mapping[str, tuple[type, str]], kind: str
) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield (record, its location "FILE: KIND record I (question_id Q)") for the records of the
    ``key`` list ("questions" / "annotations") of a VQA file, each checked against ``fields`` and
    with a question_id not seen before in that file."""
    data, name = _load_json(source, key)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataFormatError(f"{name}: not a VQA {key} file (expected a JSON object with a list '{key}')")
    seen: set[int] = set()
    for i, record in enumerate(data[key]):
        qid = record.get("question_id") if isinstance(record, dict) else None
        where = f"{name}: {kind} record {i}" + (f" (question_id {qid})" if _is_int(qid) else "")
        _check_fields(record, fields, where)
        if qid in seen:
            raise DataFormatError(f"{name}: {kind} record {i}: duplicate question_id {qid}")
        seen.add(qid)
        yield record, where


def load_questions(source: JsonSource) -> dict[int, dict[str, Any]]:
    """Validate a VQA questions file (``{"questions": [{image_id, question, question_id}]}``)
    and index it by question id (file order is kept; a repeated question_id is an error)."""
    fields = {"question_id": _INT, "image_id": _INT, "question": _STR}
    return {q["question_id"]: q for q, _ in _records(source, "questions", fields, "question")}


def load_annotations(source: JsonSource, required: Sequence[str] = ()) -> dict[int, dict[str, Any]]:
    """Validate a VQA annotations file and index it by question id (file order is kept).

    Each record needs ``question_id``, ``image_id``, ``answer_type`` (one of 'yes/no', 'number',
    'other') and a non-empty ``answers`` list of ``{"answer": str, ...}``; ``required`` names the
    further string fields the caller uses (scoring: ``question_type``; training:
    ``multiple_choice_answer``).
    """
    if isinstance(required, str):
        required = (required,)
    fields = {"question_id": _INT, "image_id": _INT, "answer_type": _STR, "answers": (list, "a list")}
    fields.update((name, _STR) for name in required)
    out: dict[int, dict[str, Any]] = {}
    for ann, where in _records(source, "annotations", fields, "annotation"):
        if ann["answer_type"] not in ANSWER_TYPES:
            raise DataFormatError(
                f"{where}: unknown answer_type {ann['answer_type']!r} (expected one of "
                + ", ".join(repr(t) for t in ANSWER_TYPES) + ")"
            )
        if not ann["answers"]:
            raise DataFormatError(f"{where}: 'answers' is empty")
        for j, a in enumerate(ann["answers"]):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise DataFormatError(f"{where}: answers[{j}] must be an object with a string 'answer'")
        out[ann["question_id"]] = ann
    return out


def load_results(
    source: JsonSource, annotations: Mapping[int, Any] | None = None
) -> dict[int, str]:
    """Validate a results file in the official submission format
    ``[{"question_id": int, "answer": str}, ...]`` and return ``{question_id: answer}``.

    With ``annotations``, also check -- as the official ``loadRes`` does -- that the results
    answer exactly the annotated questions.
    """
    data, name = _load_json(source, "results")
    if not isinstance(data, list):
        raise DataFormatError(
            f"{name}: results must be a JSON list of {{\"question_id\": int, \"answer\": str}}, "
            f"got {type(data).__name__}"
        )
    fields = {"question_id": _INT, "answer": _STR}
    out: dict[int, str] = {}
    for i, r in enumerate(data):
        _check_fields(r, fields, f"{name}: record {i}")
        qid = r["question_id"]
        if qid in out:
            raise DataFormatError(f"{name}: record {i}: duplicate question_id {qid}")
        if annotations is not None and qid not in annotations:
            raise DataFormatError(f"{name}: record {i}: question_id {qid} is not in the annotations")
        out[qid] = r["answer"]
    if annotations is not None and len(out) != len(annotations):
        missing = [q for q in annotations if q not in out]
        shown = ", ".join(str(q) for q in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataFormatError(
            f"{name}: no answer for {len(missing)} of {len(annotations)} annotated questions "
            f"(question_id {shown}); the official evaluation needs an answer for every question"
        )
    return out


# --- evaluation ---------------------------------------------------------------------------------


def _percent(values: Sequence[float], ndigits: int = 2) -> float:
    # Same arithmetic as the official setAccuracy: round(100 * float(sum) / len, n).
    return round(100 * float(sum(values)) / len(values), ndigits)


def evaluate(questions: JsonSource, annotations: JsonSource, results: JsonSource) -> dict[str, Any]:
    """Score a results file like the official ``VQAEval.evaluate``.

    Args:
        questions: VQA questions JSON (path or parsed dict).
        annotations: VQA annotations JSON (path or parsed dict).
        results: ``[{"question_id": int, "answer": str}]`` (path or parsed list); must answer
            every annotated question and nothing else.

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float}}``,
        accuracies in percent rounded to two decimals.
    """
    qs = load_questions(questions)
    anns = load_annotations(annotations, required=("question_type",))
    q_name = str(questions) if isinstance(questions, (str, Path)) else "<questions>"
    for qid, ann in anns.items():
        q = qs.get(qid)
        if q is None:
            raise DataFormatError(
                f"{q_name}: no question with question_id {qid} (it is in the annotations)"
            )
        if q["image_id"] != ann["image_id"]:
            raise DataFormatError(
                f"question_id {qid}: image_id {q['image_id']} in the questions file but "
                f"{ann['image_id']} in the annotations file"
            )
    if not anns:
        raise DataFormatError("the annotations file has no annotations to score")
    res = load_results(results, anns)

    acc_all: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid, ann in anns.items():  # annotation order, as vqa.getQuesIds()
        acc = question_accuracy(res[qid], [a["answer"] for a in ann["answers"]])
        acc_all.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
    return {
        "overall": _percent(acc_all),
        "perAnswerType": {k: _percent(v) for k, v in by_atype.items()},
        "perQuestionType": {k: _percent(v) for k, v in by_qtype.items()},
    }


def run_score(args: argparse.Namespace) -> int:
    """``vqa-align score``: print the official accuracy of a results file as JSON."""
    result = evaluate(args.questions, args.annotations, args.results)
    print(json.dumps(result, indent=2))
    return 0
