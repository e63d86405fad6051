r"""The official VQA accuracy, reimplemented as pure functions.

Implemented version: GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at the
repository's latest commit a013f0043c1e ("Fixed processing answers bug", 2021-03-11). Older
revisions (a4f1afd and before, 2017) and most vendored copies use the *pre-fix* rules (prediction
always normalised, human answers only punctuation-processed) and give different numbers. Per
question, the current code does:

1. on the prediction and on every human answer: ``\n``/``\t`` -> space, then ``strip``;
2. only if the human answers are not all identical (``len(set(answers)) > 1``): punctuation
   processing, then digit/article/contraction processing, on every human answer *and* on the
   prediction;
3. otherwise the stripped strings are compared as they are (no lower-casing, nothing else);
4. accuracy: the mean over the leave-one-out subsets of ``min(1, #matches / 3)``, exact equality;
5. ``overall``, ``perAnswerType`` and ``perQuestionType``: ``round(100 * mean, 2)``.

The official code runs only under Python 2 (``print`` statements); where Python 2 and 3 differ
we follow what it does there, and tests pin each case: ``round`` ties go away from zero (Python 2),
not to even (Python 3's ``round(3.125, 2) == 3.12``, the official code gives 3.13); ``\d`` in its
regexes (byte-string patterns, no ``re.UNICODE`` flag) matches ASCII digits only; sums add left to
right. Its quirks are kept too: a digit-comma-digit anywhere in the text makes *every* punctuation
mark vanish instead of becoming a space; the period regex is the verbatim
``(?!<=\d)(\.)(?!\d)``, and its ``sub`` gets ``re.UNICODE`` as the *count* argument, so at most
32 periods go; the capitalised contraction keys ("Im", "Ive", ...) never match because the text is
lower-cased first; a leave-one-out subset drops every answer *record* equal to the left-out one
(records normally differ by ``answer_id``; see :func:`answer_record_accuracy`).

Checked against the official file (Python 2.7.18, run locally, not committed) on 4,000 generated
questions full of case, article, number-word, punctuation, whitespace and non-ASCII variants:
identical per-question accuracies and aggregates (docs/vqa_metric.md).

``normalize_answer`` is the full processing of step 2 (after step 1); the data layer also uses it,
as MCAN does, to build the answer vocabulary and the soft training targets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from vqa_align.errors import DataFormatError, InputFileNotFoundError
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, read_json

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
# The official patterns are Python 2 byte strings without re.UNICODE, so \d is [0-9] only.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
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
    """Whitespace clean-up, then the official punctuation and digit/article processing.

    This is what the official code does to the prediction and to every human answer of a question
    whose humans disagree. E.g. ``"The Dog."`` -> ``"dog"``, ``"ten"`` -> ``"10"``,
    ``"dont"`` -> ``"don't"``.
    """
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


# --- accuracy -----------------------------------------------------------------------------------


def naive_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum, as the official (Python 2) ``sum`` adds; Python >= 3.12's ``sum``
    compensates rounding errors and could differ in the last bit."""
    total = 0.0
    for v in values:
        total += v
    return total


def comparison_forms(prediction: str, gt_answers: Sequence[str]) -> tuple[str, list[str]]:
    """The strings the official code compares: (prediction, human answers).

    Whitespace clean-up on all; then, only when the cleaned human answers are not all identical,
    :func:`normalize_answer` on all of them and on the prediction.
    """
    pred = clean_whitespace(prediction)
    gts = [clean_whitespace(a) for a in gt_answers]
    if len(set(gts)) > 1:
        # normalize_answer's own clean-up is a no-op here: the texts are already clean.
        pred = normalize_answer(pred)
        gts = [normalize_answer(a) for a in gts]
    return pred, gts


def leave_one_out_accuracy(matches: Sequence[bool]) -> float:
    """Mean over i of ``min(1, #matches without answer i / 3)``, for distinct answer records.

    With 10 answers, 0, 1, 2, 3 and >= 4 matches give 0, 0.3, 0.6, 0.9 and 1.0.
    """
    total = sum(matches)
    # Leaving answer i out removes one match exactly when answer i itself matches.
    accs = [min(1.0, (total - int(m)) / 3.0) for m in matches]
    return naive_sum(accs) / len(accs)


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy in [0, 1] of one predicted answer against the human answers of one
    question, each human answer a distinct record (as in the official files: ``answer_id`` 1..10).

    E.g. humans all "Two", prediction "two": compared raw, 0.0; humans "two" x 5 and "2" x 5,
    prediction "two": all normalised to "2", 1.0.
    """
    if len(gt_answers) == 0:
        raise ValueError("question_accuracy needs at least one ground-truth answer")
    pred, gts = comparison_forms(prediction, gt_answers)
    return leave_one_out_accuracy([a == pred for a in gts])


def _records_distinct(records: Sequence[Mapping[str, Any]]) -> bool:
    """True when the records surely stay pairwise unequal whatever their answers become: each
    has an ``answer_id`` and the ids are distinct (equal hashable values compare equal)."""
    try:
        ids = [r["answer_id"] for r in records]
        return len(set(ids)) == len(ids)
    except (KeyError, TypeError):  # no answer_id, or an unhashable one
        return False


def answer_record_accuracy(prediction: str, records: Sequence[Mapping[str, Any]]) -> float:
    """Official accuracy of ``prediction`` against a question's answer records (``{"answer": str,
    "answer_id": ..., ...}``), including the official way of leaving one out.

    The official code leaves answer i out by keeping the records that are ``!=`` record i (whole
    dicts, after their answers are processed), so records that are equal -- no ``answer_id``, or a
    repeated one -- all leave together: ten bare ``{"answer": "yes"}`` score 0 against "yes". With
    distinct records this is :func:`question_accuracy` (the fast path).
    """
    if len(records) == 0:
        raise ValueError("answer_record_accuracy needs at least one answer record")
    if _records_distinct(records):
        return question_accuracy(prediction, [r["answer"] for r in records])
    pred, gts = comparison_forms(prediction, [r["answer"] for r in records])
    processed = [{**r, "answer": a} for r, a in zip(records, gts)]
    accs = []
    for left_out in processed:
        others = [r for r in processed if r != left_out]
        accs.append(min(1.0, sum(r["answer"] == pred for r in others) / 3.0))
    return naive_sum(accs) / len(accs)


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
        return read_json(path, MAX_DATASET_JSON_BYTES), str(path)
    return source, f"<{what}>"


# Ids become int64 arrays (question ids, image ids in the feature store): larger ones are refused
# where they are read, with the record named, not by an OverflowError deep in numpy.
MIN_ID, MAX_ID = -(2**63), 2**63 - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_id(x: Any) -> bool:
    return _is_int(x) and MIN_ID <= x <= MAX_ID


_ID = ("id", "an integer of at most 64 bits")
_STR = (str, "a string")


def _check_fields(record: Any, fields: Mapping[str, tuple[type | str, str]], where: str) -> None:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, (typ, label) in fields.items():
        if name not in record:
            raise DataFormatError(f"{where}: missing field '{name}'")
        value = record[name]
        ok = _is_id(value) if typ == "id" else isinstance(value, typ)
        if not ok:
            raise DataFormatError(
                f"{where}: field '{name}' must be {label}, got {type(value).__name__} {value!r:.40}"
            )


def _records(
    source: JsonSource, key: str, fields: Mapping[str, tuple[type | str, str]], kind: str
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
    fields = {"question_id": _ID, "image_id": _ID, "question": _STR}
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
    fields = {"question_id": _ID, "image_id": _ID, "answer_type": _STR, "answers": (list, "a list")}
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
    fields = {"question_id": _ID, "answer": _STR}
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


def round_half_away(x: float, ndigits: int) -> float:
    """Python 2's ``round``: the exact binary value of ``x`` rounded to ``ndigits`` decimals, ties
    away from zero (Python 3 rounds ties to even: ``round(3.125, 2) == 3.12``, Python 2 gives 3.13)."""
    return float(Decimal(x).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def _percent(values: Sequence[float], ndigits: int = 2) -> float:
    # The official setAccuracy: round(100 * float(sum) / len, n), under Python 2.
    return round_half_away(100 * naive_sum(values) / len(values), ndigits)


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
    shared_records = 0
    for qid, ann in anns.items():  # annotation order, as vqa.getQuesIds()
        acc = answer_record_accuracy(res[qid], ann["answers"])
        shared_records += not _records_distinct(ann["answers"])
        acc_all.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
    if shared_records:
        a_name = str(annotations) if isinstance(annotations, (str, Path)) else "<annotations>"
        warnings.warn(
            f"{a_name}: {shared_records} questions have answer records without distinct answer_id; "
            "as in the official code, equal records leave the leave-one-out subsets together "
            "(ten bare {'answer': 'yes'} score 0 against 'yes')",
            stacklevel=2,
        )
    return {
        "overall": _percent(acc_all),
        "perAnswerType": {k: _percent(v) for k, v in by_atype.items()},
        "perQuestionType": {k: _percent(v) for k, v in by_qtype.items()},
    }


def run_score(args: argparse.Namespace) -> int:
    """``vqa-align score``: print the official accuracy of a results file as JSON (warnings, one
    line each, on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(args.questions, args.annotations, args.results)
    for w in caught:
        print(f"vqa-align score: warning: {w.message}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
