"""VQA v2-format files whose answers are full of the variants the official metric cares about.

Used by tests/test_vqa_eval.py, and to check ``vqa_align.metrics.vqa_accuracy`` against the official
vqaEval.py beside it (docs/vqa_metric.md):

    python tests/vqa_metric_variants.py OUT_DIR [--questions 4000] [--seed 0]

writes OUT_DIR/{questions,annotations,results}.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

# Groups of spellings of one answer: case, articles, number words, punctuation, whitespace,
# contractions, digit-comma-digit, periods, and non-ASCII text (Arabic-Indic and full-width
# digits, accents, a non-breaking space) where Python 2 and 3 could part ways.
VARIANT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("yes", "Yes", "YES", " yes\n", "yes!", "yes.", "\tyes", "yes !"),
    ("no", "No", "no.", "NO", "no!", "none"),
    ("two", "Two", "2", "TWO", " two ", "2."),
    ("ten", "10", "Ten", "10.", "ten!"),
    ("dog", "the dog", "Dog.", "a dog", "The Dog", "dogs", "dog!"),
    ("black and white", "black-and-white", "Black and White", "black/white", "black & white"),
    ("1000", "1,000", "1,000.", "one thousand", "1 ,000"),
    ("3.5", "3.50", "3 . 5", "three and a half", "3,5"),
    ("don't", "dont", "Dont", "do not", "don't!"),
    ("t-shirt", "tshirt", "T-Shirt", "t shirt", "(t-shirt)"),
    ("usa", "u.s.a", "U.S.A.", "USA", "the usa"),
    ("red/blue", "red, blue", "red,blue", "red blue", "Red / Blue"),
    ("café", "Café", "cafe", "CAFÉ"),
    ("\u0663,\u0664", "\u0663\u0664", "3,4", "\uff13", "3"),
    ("a\u00a0b", "a b", "b", "A\u00a0B"),
    ("I'm", "Im", "im", "i'm"),
    ("x..........................................y", "x.y", "xy"),  # > 32 periods
    ("left, right", "left right", "left,right", "left ,right", "a ,b-c"),
)
ANSWER_TYPES = ("yes/no", "number", "other")
QUESTION_TYPES = ("what is", "how many", "is the", "what color")


def _answers(rng: random.Random, group: tuple[str, ...]) -> list[str]:
    mode = rng.random()
    if mode < 0.35:  # unanimous (compared raw by the current official code)
        return [rng.choice(group)] * 10
    if mode < 0.7:  # one spelling and a few others of the same answer
        main = rng.choice(group)
        return [main if rng.random() < 0.7 else rng.choice(group) for _ in range(10)]
    other = rng.choice(VARIANT_GROUPS)  # two different answers, spelled freely
    return [rng.choice(group if rng.random() < 0.5 else other) for _ in range(10)]


def _records(rng: random.Random, answers: list[str]) -> list[dict[str, Any]]:
    records = [{"answer": a, "answer_confidence": rng.choice(("yes", "maybe")), "answer_id": i + 1}
               for i, a in enumerate(answers)]
    mode = rng.random()
    if mode < 0.03:  # no answer_id at all: equal records leave the leave-one-out subsets together
        records = [{"answer": a} for a in answers]
    elif mode < 0.05:  # a repeated answer_id
        for r in records:
            r["answer_id"] = 1 + (r["answer_id"] - 1) % 3
            r["answer_confidence"] = "yes"
    return records


def make_variant_files(n_questions: int, seed: int = 0) -> tuple[dict, dict, list]:
    """(questions, annotations, results) in the official formats.

    Also 32 questions of a question type of their own ("tie") of which exactly one is answered
    right: 100 * 1/32 = 3.125 rounds to 3.13 under Python 2 (the official code) but 3.12 under
    Python 3's ``round``.
    """
    rng = random.Random(seed)
    questions, annotations, results = [], [], []
    for i in range(n_questions + 32):
        qid, image_id = 1000 + i, 10 + i // 3
        if i < n_questions:
            group = rng.choice(VARIANT_GROUPS)
            answers = _answers(rng, group)
            records = _records(rng, answers)
            qtype, atype = rng.choice(QUESTION_TYPES), rng.choice(ANSWER_TYPES)
            pred = rng.choice(group) if rng.random() < 0.8 else rng.choice(rng.choice(VARIANT_GROUPS))
        else:
            records = [{"answer": "tie", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            qtype, atype = "tie", "other"
            pred = "tie" if i == n_questions else "no tie"
        questions.append({"image_id": image_id, "question": f"question {i}?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": qtype,
                            "answer_type": atype, "multiple_choice_answer": records[0]["answer"],
                            "answers": records})
        results.append({"question_id": qid, "answer": pred})
    header = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    return ({**header, "task_type": "Open-Ended", "questions": questions},
            {**header, "annotations": annotations}, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--questions", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in zip(("questions", "annotations", "results"),
                          make_variant_files(args.questions, args.seed)):
        (args.out_dir / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
