"""VQA v2 questions and answers: reading, validation, tokenisation, answer vocabulary, soft targets.

Files (the official schema; Visual Genome augmentation files use the same one)::

    questions:   {"questions":   [{"image_id": int, "question": str, "question_id": int}, ...]}
    annotations: {"annotations": [{"question_id", "image_id", "question_type", "answer_type",
                                   "multiple_choice_answer", "answers": [10 x {"answer", ...}]}]}

Soft targets (MCAN / bottom-up-attention): a question whose 10 human answers contain a vocabulary
answer ``m`` times gets target score ``SOFT_SCORES[min(m, 4)]`` = 0, 0.3, 0.6, 0.9, 1.0 for it.
These are the leave-one-out values of the official accuracy: averaged over the 10 subsets of 9
answers, ``min(1, matches / 3)`` is ``(m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10``,
i.e. 0.3, 0.6, 0.9, 1.0 for m = 1, 2, 3, >= 4 (e.g. m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6).

Two normalisations, on purpose. The vocabulary and the soft targets normalise *every* answer
(``vqa_eval.normalize_answer``, MCAN's ``prep_ans``), so "Two", "two" and "2" train one class.
The official accuracy (GT-Vision-Lab/VQA a013f00) normalises only the answers of questions whose
humans disagree and compares the others raw, so the soft target of an answer is not always its
score: humans all "Two" give the class "2" target 1.0, yet "2" scores 0 there. Validation
accuracy is therefore read off :class:`OfficialScores` (the official score of every vocabulary
answer), not off the soft targets.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vqa_align.errors import DataFormatError
from vqa_align.metrics.vqa_accuracy import (
    clean_whitespace,
    comparison_forms,
    leave_one_out_accuracy,
    load_annotations,
    load_questions,
    normalize_answer,
)

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
SOFT_SCORES = np.array([0.0, 0.3, 0.6, 0.9, 1.0], dtype=np.float32)  # index: min(matches, 4)
# MCAN's question clean-up: lower-case, these rewrites in order, split on white space. The one
# definition of the rule: tokenize_question applies it with Python's re (the vocabulary's words,
# MCAN's own code for imported models) and word_level_tokenizer as a `tokenizers` normaliser (so a
# saved tokenizer.json carries it); tests/test_vqa_data.py checks that the two agree.
QUESTION_REWRITES = (
    (r"[.,'!?\"()*#:;]", ""),  # deleted
    (r"[-/]", " "),  # separate words
)
_QUESTION_REWRITES_RE = tuple((re.compile(pattern), replacement) for pattern, replacement in QUESTION_REWRITES)


@dataclass(frozen=True, slots=True)
class QuestionRecord:
    """One question, with its annotation when the split has one. ``source`` is the questions file."""

    question_id: int
    image_id: int
    question: str
    source: str
    answers: tuple[str, ...] | None = None  # the 10 raw human answers
    multiple_choice_answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------

# The schema checks live in one place, vqa_eval (shared with scoring): a missing file raises
# InputFileNotFoundError (UserError + FileNotFoundError), bad content DataFormatError.

TRAINING_ANNOTATION_FIELDS = ("multiple_choice_answer",)  # builds the answer vocabulary


def load_questions_file(path: str | Path) -> list[dict[str, Any]]:
    """Validated ``questions`` of a VQA questions file, in file order (see ``vqa_eval.load_questions``)."""
    return list(load_questions(path).values())


def load_annotations_file(path: str | Path) -> dict[int, dict[str, Any]]:
    """Validated annotations of a VQA annotations file by question id; training also needs
    ``multiple_choice_answer`` (see ``vqa_eval.load_annotations``)."""
    return load_annotations(path, required=TRAINING_ANNOTATION_FIELDS)


def load_split(
    question_files: Sequence[str | Path], annotation_files: Sequence[str | Path] | None = None
) -> list[QuestionRecord]:
    """Records of one split from paired question / annotation files (VG augmentation = more pairs).

    ``annotation_files`` empty or None: questions only (e.g. test-dev). Otherwise one annotations
    file per questions file, in the same order.
    """
    if not question_files:
        raise DataFormatError("no questions file given for this split")
    if annotation_files and len(annotation_files) != len(question_files):
        raise DataFormatError(
            f"{len(question_files)} questions file(s) but {len(annotation_files)} annotations file(s); "
            "give one annotations file per questions file, in the same order"
        )
    records: list[QuestionRecord] = []
    seen: dict[int, str] = {}
    for k, qpath in enumerate(question_files):
        questions = load_questions_file(qpath)
        anns = load_annotations_file(annotation_files[k]) if annotation_files else None
        source = str(qpath)
        for q in questions:
            qid = q["question_id"]
            if qid in seen:
                raise DataFormatError(f"{qpath}: question_id {qid} already appears in {seen[qid]}")
            seen[qid] = source
            if anns is None:
                records.append(QuestionRecord(qid, q["image_id"], q["question"], source))
                continue
            a = anns.get(qid)
            if a is None:
                raise DataFormatError(f"{annotation_files[k]}: no annotation for question_id {qid} of {qpath}")
            if a["image_id"] != q["image_id"]:
                raise DataFormatError(
                    f"{annotation_files[k]}: question_id {qid} has image_id {a['image_id']} "
                    f"but {q['image_id']} in {qpath}"
                )
            records.append(QuestionRecord(
                qid, q["image_id"], q["question"], source,
                answers=tuple(x["answer"] for x in a["answers"]),
                multiple_choice_answer=a["multiple_choice_answer"],
                answer_type=a["answer_type"], question_type=a.get("question_type"),
            ))
    return records


def question_type(question: str) -> str:
    """A question's type, its first two words ('what color', 'is there', 'how many', ...): VQA
    v2's types are such prefixes, from a fixed list; files we write use the first two words."""
    return " ".join(question.split()[:2])


def vqa_json(records: Sequence[QuestionRecord]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The official questions and annotations JSON (``{"questions": [...]}``, ``{"annotations":
    [...]}``) of ``records``, in their order; the one writer of the schema that :func:`load_split`
    reads. Annotations are written for the records that have answers."""
    questions = [{"image_id": r.image_id, "question": r.question, "question_id": r.question_id} for r in records]
    annotations = [{
        "question_id": r.question_id, "image_id": r.image_id, "question_type": r.question_type or "",
        "answer_type": r.answer_type, "multiple_choice_answer": r.multiple_choice_answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(r.answers)],
    } for r in records if r.answers is not None]
    return {"questions": questions}, {"annotations": annotations}


def filter_missing_images(
    records: list[QuestionRecord], has_image: Callable[[np.ndarray], np.ndarray], skip_missing: bool,
    store_name: str = "the feature store",
) -> tuple[list[QuestionRecord], int]:
    """Drop (``skip_missing``) or reject questions whose image has no features.

    ``has_image`` maps image ids (Q,) int64 -> (Q,) bool (vectorised store lookup).
    Returns (kept records, number skipped); raises DataFormatError naming the first missing one.
    """
    if not records:
        return records, 0
    ok = has_image(np.fromiter((r.image_id for r in records), np.int64, len(records)))
    if ok.all():
        return records, 0
    if not skip_missing:
        r = records[int(np.flatnonzero(~ok)[0])]
        raise DataFormatError(
            f"{r.source}: question_id {r.question_id} refers to image_id {r.image_id}, which has no "
            f"features in {store_name} ({int((~ok).sum())} question(s) affected; set data.skip_missing "
            "to drop them with a warning)"
        )
    return [r for r, keep in zip(records, ok) if keep], int((~ok).sum())


# --------------------------------------------------------------------------------------------
# Questions: tokenisation and the Hugging Face tokenizer
# --------------------------------------------------------------------------------------------


def tokenize_question(text: str, max_tokens: int | None = None) -> list[str]:
    """MCAN tokenisation: lower-case, delete ``.,'!?"()*#:;``, split on ``-``, ``/`` and whitespace.

    >>> tokenize_question("What's the man-made object?")
    ['whats', 'the', 'man', 'made', 'object']
    """
    text = text.lower()
    for pattern, replacement in _QUESTION_REWRITES_RE:
        text = pattern.sub(replacement, text)
    words = text.split()
    return words if max_tokens is None else words[:max_tokens]


def build_tokenizer(texts: Iterable[str], max_tokens: int, min_count: int = 1) -> Any:
    """A ``PreTrainedTokenizerFast`` (WordLevel) over the words of ``texts``; [PAD] = 0, [UNK] = 1.

    The tokenizer itself applies the MCAN normalisation (so ``tokenizer(question)`` agrees with
    :func:`tokenize_question`); words are ordered by frequency then alphabetically (deterministic).
    """
    counts = Counter(w for t in texts for w in tokenize_question(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {PAD_TOKEN: PAD_ID, UNK_TOKEN: UNK_ID}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return word_level_tokenizer(vocab, max_tokens)


def word_level_tokenizer(vocab: dict[str, int], max_tokens: int) -> Any:
    """A ``PreTrainedTokenizerFast`` (WordLevel) with exactly the ids of ``vocab`` and MCAN's normalisation.

    ``vocab`` must map [PAD] to 0 and [UNK] to 1 (imported models may add more special tokens).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab.get(PAD_TOKEN) != PAD_ID or vocab.get(UNK_TOKEN) != UNK_ID:
        raise ValueError(f"a word-level vocabulary needs {PAD_TOKEN} = {PAD_ID} and {UNK_TOKEN} = {UNK_ID}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase()] + [normalizers.Replace(Regex(p), r) for p, r in QUESTION_REWRITES]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=max_tokens, padding_side="right", truncation_side="right",
    )


def load_tokenizer(folder: str | Path) -> Any:
    """Load a tokenizer saved with ``save_pretrained`` (offline: a local folder only)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers/tokenizers raise many types for a damaged file
        detail = " ".join(str(err).split())[:200]
        raise DataFormatError(
            f"{Path(folder) / 'tokenizer.json'}: cannot read the saved tokenizer ({type(err).__name__}: {detail})"
        ) from None


def encode_questions(
    tokenizer: Any, records: Sequence[QuestionRecord], max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all questions, flat: (ids (total,) int32, offsets (Q+1,) int64).

    A question without any token (empty or punctuation only) is an error naming it.
    """
    if not records:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    enc = tokenizer([r.question for r in records], add_special_tokens=False, truncation=True,
                    max_length=max_tokens)["input_ids"]
    lengths = np.fromiter((len(e) for e in enc), np.int64, len(enc))
    if (lengths == 0).any():
        r = records[int(np.flatnonzero(lengths == 0)[0])]
        raise DataFormatError(f"{r.source}: question_id {r.question_id} has no words: {r.question!r}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((i for e in enc for i in e), np.int32, int(offsets[-1]))
    return ids, offsets


# --------------------------------------------------------------------------------------------
# Answers: vocabulary and soft targets
# --------------------------------------------------------------------------------------------


def build_answer_vocab(records: Iterable[QuestionRecord], min_count: int) -> list[str]:
    """Normalised ``multiple_choice_answer`` seen >= ``min_count`` times; by frequency, then A-Z.

    Normalisation: ``vqa_eval.normalize_answer`` on every answer (whitespace clean-up,
    punctuation, number words -> digits, articles dropped, contractions), as MCAN's ``prep_ans``
    builds its answer list, so that the spellings of one answer share one class. The official
    metric would not normalise a unanimous "Two"; the vocabulary still holds "2", which is what a
    model trained on it predicts (see the module docstring for what that costs in accuracy).
    """
    counts = Counter(normalize_answer(r.multiple_choice_answer) for r in records
                     if r.multiple_choice_answer is not None)
    if not counts:
        raise DataFormatError("cannot build the answer vocabulary: the training split has no annotations")
    answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not answers:
        raise DataFormatError(
            f"no answer is seen >= {min_count} times in the training split; lower data.answer_min_count"
        )
    return answers


def soft_score(matches: np.ndarray | int) -> np.ndarray:
    """Soft target for ``matches`` equal human answers: 0, .3, .6, .9, 1.0 for 0, 1, 2, 3, >= 4."""
    return SOFT_SCORES[np.minimum(np.asarray(matches), len(SOFT_SCORES) - 1)]


def answer_targets(
    records: Sequence[QuestionRecord], answers: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse soft targets of every question: (indices (nnz,) int32, scores (nnz,) float32, offsets (Q+1,)).

    Human answers are normalised as the vocabulary is (``normalize_answer`` on every answer,
    MCAN's ``proc_ans``), whether or not the humans agree, so each class collects the votes of all
    spellings of its answer; answers outside the vocabulary get no target (the question then has
    an all-zero target row, as in MCAN). These are training targets, not scores: validation reads
    :class:`OfficialScores`.
    """
    index = {a: i for i, a in enumerate(answers)}
    cache: dict[str, str] = {}
    idx: list[int] = []
    scores: list[float] = []
    offsets = [0]
    for r in records:
        if r.answers is None:
            raise DataFormatError(f"{r.source}: question_id {r.question_id} has no annotation")
        norm = [cache[a] if a in cache else cache.setdefault(a, normalize_answer(a)) for a in r.answers]
        for ans, m in sorted(Counter(norm).items()):
            j = index.get(ans)
            if j is not None:
                idx.append(j)
                scores.append(float(soft_score(m)))
        offsets.append(len(idx))
    return np.asarray(idx, np.int32), np.asarray(scores, np.float32), np.asarray(offsets, np.int64)


class OfficialScores:
    """The official VQA accuracy (``vqa_eval.question_accuracy``) of every vocabulary answer on
    every question, for scoring a model's top-1 answers without re-running the string rules.

    Only answers that can score are stored (sparse, like the soft targets): when the humans
    disagree, the answers whose normalised form is one of the normalised human answers; when they
    agree, the answers equal to that one (stripped) answer. Every other answer scores 0.
    """

    def __init__(self, records: Sequence[QuestionRecord], answers: Sequence[str]) -> None:
        by_normal: dict[str, list[int]] = {}  # normalised form -> vocabulary indices
        by_clean: dict[str, list[int]] = {}  # whitespace-cleaned form -> vocabulary indices
        for j, a in enumerate(answers):
            by_normal.setdefault(normalize_answer(a), []).append(j)
            by_clean.setdefault(clean_whitespace(a), []).append(j)
        self._row = {r.question_id: i for i, r in enumerate(records)}
        self._scores: list[dict[int, float]] = []
        for r in records:
            if r.answers is None:
                raise DataFormatError(f"{r.source}: question_id {r.question_id} has no annotation")
            # The compared forms of the humans' answers; the prediction slot is a placeholder.
            _, humans = comparison_forms("", r.answers)
            disagree = len(set(clean_whitespace(a) for a in r.answers)) > 1
            candidates = by_normal if disagree else by_clean
            row: dict[int, float] = {}
            for form in set(humans):
                score = leave_one_out_accuracy([h == form for h in humans])
                for j in candidates.get(form, ()):
                    row[j] = score
            self._scores.append(row)

    def __call__(self, question_ids: Iterable[int], predicted: Iterable[int]) -> list[float]:
        """Official accuracy in [0, 1] of answer index ``predicted[i]`` on ``question_ids[i]``."""
        return [self._scores[self._row[q]].get(j, 0.0) for q, j in zip(question_ids, predicted)]
