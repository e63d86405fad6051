"""The ``vqa-align`` command line: one entry point, one subcommand per job.

Each subcommand parses its arguments here and hands them to a ``run_*`` function in the module
that owns the concern (imported lazily so that ``vqa-align --help`` stays fast). Errors that are
the user's (bad config key, missing file, bad value) are printed as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import typing
from typing import Callable

from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_BATCH_SIZE, MAX_INT, MAX_WIDTH, MAX_WORKERS

__all__ = ["UserError", "build_parser", "main"]

DEBUG_SWITCH = "VQA_ALIGN_DEBUG"  # 1: tracebacks also for the user's errors


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``vqa-align eval: error: argument ...; see --help``)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float, high: float | None = None, what: str = "") -> Callable[[str], int | float]:
    """argparse type: an int or a finite float in [low, high], else a message naming the value.
    Integers are at most MAX_INT without a lower ``high``: they end up in an int64."""
    high = MAX_INT if kind is int and high is None else high
    noun = "an integer" if kind is int else "a finite number"
    rule = what or (f"{noun} >= {low}" if high is None else f"{noun} in [{low}, {high}]")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r:.80}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
BATCH_SIZE = _number(int, 1, MAX_BATCH_SIZE)
WORKERS = _number(int, 0, MAX_WORKERS)
WIDTH = _number(int, 1, MAX_WIDTH)
NON_NEGATIVE = _number(float, 0.0)
PORT = _number(int, 1, 65535, "a TCP port in [1, 65535]")
MC_SAMPLES = _number(int, 0, what="0 (off) or >= 2")


def _mc_samples(text: str) -> int:
    value = MC_SAMPLES(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (off) or >= 2 (a t-test needs two samples), got '1'")
    return int(value)


def _fraction(text: str) -> float:
    value = _number(float, 0.0, 1.0, "a number in (0, 1)")(text)
    if value in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return float(value)


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _handler(module: str, function: str) -> Callable[[argparse.Namespace], int | None]:
    def call(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), function)(args)

    return call


def _add_prep(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prep", help="convert public data formats into the region-feature store")
    kinds = prep.add_subparsers(dest="kind", required=True, metavar="KIND")

    easy = kinds.add_parser("easy-vqa", help="prepare the embedded easy-VQA data set (from the easy-vqa package)")
    easy.add_argument("--cache-dir", help="output folder (default: $VQA_ALIGN_CACHE or ~/.cache/vqa_align)")
    easy.add_argument("--overwrite", action="store_true", help="rebuild even if prepared data exist")
    easy.add_argument("--backbone", help="also extract the pictures with this `vqa-align extract` backbone")
    easy.set_defaults(func=_handler("vqa_align.data.easy_vqa", "run_prep"))

    sentiment = kinds.add_parser(
        "sentiment", help="prepare the human-rated sentences of the vaderSentiment 3.3.2 sdist (4 domains)")
    sentiment.add_argument("--sdist", help="vaderSentiment-3.3.2.tar.gz (default: pip download it from PyPI)")
    sentiment.add_argument("--cache-dir", help="output folder (default: $VQA_ALIGN_CACHE or ~/.cache/vqa_align)")
    sentiment.add_argument("--overwrite", action="store_true", help="rebuild even if prepared data exist")
    sentiment.set_defaults(func=_handler("vqa_align.sentiment.data", "run_prep"))

    qa = kinds.add_parser("qa", help="your questions and answers about your pictures (CSV/JSONL) -> VQA v2 files")
    qa.add_argument("input", metavar="QA_FILE", help="CSV with a header image,question,answer[,split], or JSONL")
    qa.add_argument("--store", required=True, help="the feature store `vqa-align extract` wrote (reads STORE.ids.json)")
    qa.add_argument("--out-dir", help="where the four JSON files go (default: the store's folder)")
    qa.add_argument("--val-fraction", type=_fraction, default=0.2,
                    help="share of the pictures of rows without a split that go to val")
    qa.add_argument("--seed", type=COUNT, default=0, help="seed of that split")
    qa.add_argument("--overwrite", action="store_true", help="replace existing output files")
    qa.set_defaults(func=_handler("vqa_align_prep.qa", "run_prep"))

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output HDF5 feature store")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
        p.add_argument("--skip-missing", action="store_true", help="skip bad records with a counted warning")

    tsv = kinds.add_parser("tsv", help="bottom-up-attention TSV files")
    tsv.add_argument("inputs", nargs="+", help="TSV file(s)")
    common(tsv)
    tsv.set_defaults(func=_handler("vqa_align_prep.tsv", "run_prep"))

    npz = kinds.add_parser("npz", help="a folder of per-image .npz files (MCAN/OpenVQA)")
    npz.add_argument("inputs", nargs="+", help="folder(s) of .npz files")
    common(npz)
    npz.set_defaults(func=_handler("vqa_align_prep.npz", "run_prep"))

    h5 = kinds.add_parser("h5", help="fixed-box HDF5 (image_features, image_bb)")
    h5.add_argument("input", help="HDF5 file with image_features (N, K, D) and image_bb (N, K, 4)")
    h5.add_argument("--ids-json", help="JSON mapping image id -> row (else the file's image_ids dataset)")
    common(h5)
    h5.set_defaults(func=_handler("vqa_align_prep.h5", "run_prep"))


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="image features of your pictures with a pretrained backbone -> feature store")
    p.add_argument("images", nargs="*", metavar="IMAGES", help="folders, glob patterns, .txt lists of paths, image files")
    p.add_argument("--backbone", help="efficientnet-lite0 (offline), clip, torchvision, bottom-up (see --list)")
    p.add_argument("--out", help="output HDF5 feature store (ids of non-COCO names go to OUT.ids.json)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="backbone parameter, e.g. --param arch=resnet50 (repeatable)")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=16, help="pictures per forward pass (raise it on a GPU)")
    p.add_argument("--workers", type=WORKERS, default=2, help="DataLoader workers decoding the pictures")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--part-size", type=POSITIVE_INT, default=256, help="images per resumable part")
    p.add_argument("--max-side", type=POSITIVE_INT, default=2048, help="pictures are downscaled to this longest side")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the backbones and exit")
    p.add_argument("--download", action="store_true",
                   help="fetch the backbone's weights (needs internet) for later offline runs, then exit")
    p.add_argument("--weights-dir", help="with --download: where to put the weights")
    p.set_defaults(func=_handler("vqa_align.extract.pipeline", "run_extract"))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model")
    p.add_argument("--config", help="YAML preset, e.g. configs/easy_vqa.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--init-from", metavar="RUN", help="start from this run's (e.g. an imported model's; a folder "
                   "or a Hugging Face Hub id user/repo) weights, "
                   "architecture, tokenizer and answers; new alignment helpers start fresh (train.init_from)")
    p.set_defaults(func=_handler("vqa_align.train.trainer", "run_train"))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (VQA accuracy, calibration, PAvPU, noise)")
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or Hugging Face Hub id user/repo")
    p.add_argument("--split", default="val", type=_non_empty, help="split to evaluate (val, test, ...)")
    p.add_argument("--results-out", help="write answers in the official submission format")
    p.add_argument("--noise-std", type=NON_NEGATIVE, default=0.0,
                   help="also evaluate with N(0, s^2) noise on the region features (`noisy`, next to the clean numbers)")
    p.add_argument("--mc-samples", type=_mc_samples, default=0, help="MC-dropout samples for PAvPU (paper: 20)")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=256)
    p.add_argument("--out", help="folder for the metrics JSON and the reliability diagram")
    p.set_defaults(func=_handler("vqa_align.evaluate.evaluator", "run_eval"))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer one question about one image, as JSON (or a questions file)")
    p.add_argument("--checkpoint", help="run or checkpoint folder, or Hugging Face Hub id user/repo (default: the quickstart's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-id", type=COUNT, help="an image of the prepared feature store")
    src.add_argument("--image", help="a picture file; its features come from the extractor the model was trained on")
    src.add_argument("--questions", metavar="FILE",
                     help="a VQA v2 questions JSON about the run's feature store: answer all (with --out)")
    p.add_argument("--question", type=_non_empty, help="the question (with --image-id or --image)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=5, help="answers listed (>= 1)")
    p.add_argument("--out", help='with --questions: results JSON, [{"question_id": int, "answer": str}]')
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=256, help="with --questions: questions per batch")
    p.set_defaults(func=_handler("vqa_align.serve.predict_cli", "run_predict"))


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="official VQA accuracy of a results file, as JSON")
    p.add_argument("--questions", required=True, help="VQA questions JSON")
    p.add_argument("--annotations", required=True, help="VQA annotations JSON")
    p.add_argument("--results", required=True, help='results JSON: [{"question_id": int, "answer": str}]')
    p.set_defaults(func=_handler("vqa_align.metrics.vqa_accuracy", "run_score"))


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="launch the Gradio app")
    p.add_argument("--checkpoint", help="run or checkpoint folder, or Hugging Face Hub id user/repo (default: the quickstart's)")
    p.add_argument("--compare", help="second checkpoint shown side by side")
    p.add_argument("--images", help="folder of the store's pictures (as given to `vqa-align extract`) for the gallery")
    p.add_argument("--host", default="127.0.0.1", type=_non_empty)
    p.add_argument("--port", type=PORT, default=7860)
    p.set_defaults(func=_handler("vqa_align_app.main", "run_demo"))


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="prepare easy-VQA, train the default aligned model, evaluate it")
    p.add_argument("--out", help="run folder (default: the cache's quickstart run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue a stopped quickstart run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the quickstart run already there")
    p.set_defaults(func=_handler("vqa_align.experiments.quickstart", "run_quickstart"))


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="train and evaluate several methods x seeds, write a report")
    p.add_argument("--config", required=True)
    p.add_argument("--methods", default="none,gan,ct,ot")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--confirmatory-seeds", default=None, metavar="SEEDS",
                   help="those of --seeds run to test an effect the others suggested (comma list); the report "
                        "tests them apart from the exploratory rest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=_handler("vqa_align.experiments.vqa", "run_experiment"))


IMPORT_DESCRIPTION = """\
Turn an MCAN checkpoint trained by mcan-vqa or OpenVQA (their released MCAN-small / MCAN-large
models, or your own runs) into a vqa-align run folder that eval, predict, demo, experiment and
train --init-from use like any other run. The question files rebuild the model's vocabulary and
must be those it was trained with, in training order. With --extractor bottom-up the run records
the detector of its features, so that it can answer about new photos (predict --image, the app).
Details: docs/import.md."""

IMPORT_EPILOG = """\
example (the released MCAN-small of mcan-vqa, trained on train+val+VG):
  vqa-align import mcan-vqa ckpts/ckpt_small/epoch13.pkl \\
      --questions v2_OpenEnded_mscoco_train2014_questions.json v2_OpenEnded_mscoco_val2014_questions.json \\
                  v2_OpenEnded_mscoco_test2015_questions.json VG_questions.json \\
      --answers core/data/answer_dict.json --features features_test.h5 \\
      --extractor bottom-up --out runs/mcan_small
  vqa-align eval --checkpoint runs/mcan_small --split test --results-out results.json   # upload to EvalAI
  vqa-align predict --checkpoint runs/mcan_small --image photo.jpg --question "what is the man holding?"
"""


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import an MCAN checkpoint of mcan-vqa or OpenVQA as a vqa-align run",
                       description=IMPORT_DESCRIPTION, epilog=IMPORT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["mcan-vqa", "openvqa"], help="the code base that trained the checkpoint")
    p.add_argument("checkpoint", help="its .pkl checkpoint (torch.save of {'state_dict', ...})")
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE",
                   help="the TRAIN VAL TEST [VG] question files it built its vocabulary from, in that order")
    p.add_argument("--answers", required=True, help="its answer_dict.json (the classifier's answer order)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--num-heads", type=WIDTH, default=8, help="attention heads (not stored in the checkpoint; 8 in MCAN)")
    p.add_argument("--features", help="feature store for eval/predict/demo (data.features)")
    p.add_argument("--val-annotations", help="annotations of the val questions, for `vqa-align eval`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="set a data field of the written config (repeatable)")
    p.add_argument("--extractor", metavar="BACKBONE",
                   help="the `vqa-align extract` backbone its features came from (bottom-up for the released "
                        "models); recorded with its weights' sha256 so that predict --image and the app can "
                        "answer about new photos (its weights must be here: `vqa-align extract --download "
                        "--backbone bottom-up`)")
    p.add_argument("--extractor-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of --extractor, as `extract --param` (default: adaptive 10-100 boxes, "
                        "600/1000 px, as generate_tsv.py made the downloadable features); e.g. weights=DIR, mode=fixed, boxes=36")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_handler("vqa_align.importers.mcan", "run_import"))


def _add_sentiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sentiment", help="alignment attention on real sentences: MiniLM, binary sentiment, 4 domains")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")
    e = jobs.add_parser("experiment", help="fine-tune methods x seeds, evaluate in- and cross-domain, write a report")
    e.add_argument("--config", default="configs/sentiment_minilm.yaml")
    e.add_argument("--methods", default="none,ct,gan")
    e.add_argument("--seeds", default="0,1,2,3,4")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--out", default="docs/results/sentiment", help="report folder (finished runs are kept and skipped)")
    e.add_argument("--runs-dir", help="checkpoints and logs (default: <cache>/runs/sentiment)")
    e.set_defaults(func=_handler("vqa_align.sentiment.experiment", "run_experiment"))
    r = jobs.add_parser("report", help="rewrite the report from the runs finished so far")
    r.add_argument("--out", default="docs/results/sentiment")
    r.add_argument("--methods", help="default: those of the last report")
    r.set_defaults(func=_handler("vqa_align.sentiment.experiment", "run_report"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vqa-align",
        description="Visual question answering with alignment attention (MCAN + AA-CT/GAN/OT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prep, _add_extract, _add_train, _add_eval, _add_predict, _add_score, _add_demo,
                _add_quickstart, _add_experiment, _add_import, _add_sentiment):
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """The error as one line; an OSError names its file (h5py's, the OS's)."""
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; the user's errors are one line on stderr (exit 2), bugs keep their traceback.

    User errors: UserError / ConfigError (bad values, files, data), and OSError (a path that does not
    exist or cannot be written, a full disk, a file that is not HDF5). Anything else is a bug in
    vqa-align and is raised with its traceback. ``VQA_ALIGN_DEBUG=1`` shows tracebacks for all.
    """
    from vqa_align.config import ConfigError

    args = build_parser().parse_args(argv)
    debug = os.environ.get(DEBUG_SWITCH, "").strip() not in ("", "0")
    try:
        result = args.func(args)
    except (UserError, ConfigError, OSError) as err:
        if debug:
            raise
        print(f"vqa-align {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vqa-align {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
