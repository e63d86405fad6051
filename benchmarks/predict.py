"""Latency of one app request: answer + every figure of the page, rendered to PNG as the app sends it.

One request = ``Predictor.answer`` (tokenise, read the regions, diagnose: forward pass with per-head
attention, CT and MMD²) + ``render_views`` (region attention, projection, layers × heads heatmap,
attention matrix, word shading) + PNG encoding of the four figures (what ``gr.Plot`` does).
Median and p90 of ``--runs`` requests after ``--warmup`` ones, single process.

    python benchmarks/predict.py                       # the quickstart's checkpoint
    python benchmarks/predict.py --checkpoint runs/x   # any run or checkpoint folder
    python benchmarks/predict.py --random --json       # untrained model of configs/easy_vqa.yaml
                                                       # (same shapes and cost, no training needed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqa_align.paths import default_checkpoint_path  # noqa: E402
from vqa_align.serve.predictor import Predictor  # noqa: E402
from vqa_align.serve.startup import freeze_startup_objects  # noqa: E402
from vqa_align.serve.views import render_views  # noqa: E402
from vqa_align.serve.figures import figure_to_png  # noqa: E402

EASY_VQA_QUESTIONS = [
    "what shape is in the image?", "what is the color of the shape?", "is there a red circle?",
    "does the image contain a blue rectangle?", "is there not a green triangle in the image?",
    "what color is the triangle?", "is there a gray shape?", "does the image not contain a yellow circle?",
]
KEYS = ("answer_ms", "figures_ms", "png_ms", "total_ms", "total_cpu_ms")
EASY_VQA_ANSWERS = ["circle", "rectangle", "triangle", "red", "green", "blue", "black", "gray", "teal", "brown",
                    "yellow", "yes", "no"]


def _shape(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((64, 64, 3), 255, np.uint8)
    x, y = (int(v) for v in rng.integers(16, 48, 2))
    yy, xx = np.mgrid[:64, :64]
    img[(yy - y) ** 2 + (xx - x) ** 2 < 144] = rng.integers(0, 200, 3)
    return img


def random_checkpoint(folder: Path) -> Path:
    """An untrained model of the quickstart's preset, on the prepared easy-VQA store when there is
    one (else a 16-image store made by the built-in extractor in ``folder``)."""
    from vqa_align.runs.checkpoint import save_checkpoint
    from vqa_align.config import load_config
    from vqa_align.data.loaders import feature_store_path
    from vqa_align.model.mcan import MCAN
    from vqa_align.extract.regions import extract_regions
    from vqa_align.extract.feature_store import FeatureStoreWriter
    from vqa_align.data.vqa_v2 import build_tokenizer

    config = load_config(REPO_ROOT / "configs" / "easy_vqa.yaml")
    prepared = feature_store_path(config.data)
    if prepared is None or not prepared.is_file():
        store = folder / "features.h5"
        with FeatureStoreWriter(store, source="easy_vqa regions (vqa_align.extract.regions)") as writer:
            for i in range(16):
                regions = extract_regions(_shape(i))
                writer.add(i, regions.features, regions.boxes, regions.image_size)
        config = load_config(REPO_ROOT / "configs" / "easy_vqa.yaml", [f"data.features={store}"])
    tokenizer = build_tokenizer(EASY_VQA_QUESTIONS, config.data.max_question_tokens)
    config.model.vocab_size = len(tokenizer.get_vocab())
    config.model.num_answers = len(EASY_VQA_ANSWERS)
    torch.manual_seed(0)
    return save_checkpoint(folder / "ckpt", MCAN(config.model), config, EASY_VQA_ANSWERS, tokenizer)


def one_request(predictor: Predictor, question: str, image_id: int) -> dict[str, float]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    pred = predictor.answer(question, image_id=image_id)
    t1 = time.perf_counter()
    views = render_views(pred, "sga_guided", -1, 0)
    t2 = time.perf_counter()
    for fig in (views.region, views.projection, views.grid, views.matrix):
        figure_to_png(fig)
    t3 = time.perf_counter()
    # CPU time of the process: what the request costs without other processes competing for the
    # cores (on a shared, loaded machine the wall time also counts waiting for a core).
    cpu = time.process_time() - c0
    return {"answer_ms": (t1 - t0) * 1e3, "figures_ms": (t2 - t1) * 1e3, "png_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - t0) * 1e3, "total_cpu_ms": cpu * 1e3}


def app_round_trips(predictor: Predictor, question: str, image_id: int, runs: int, warmup: int) -> list[float]:
    """Wall ms of ``/answer`` requests sent with gradio_client to the app served in this process."""
    import socket

    from gradio_client import Client

    from vqa_align_app.main import build_app, launch_kwargs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(predictor)
    demo.queue(default_concurrency_limit=2)
    demo.launch(**launch_kwargs("127.0.0.1", port), prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        last = predictor.num_layers - 1
        args = (question, image_id, None, "", "sga_guided", last, 0, "mmd2", "glimpse", "all words (glimpse-weighted)")
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            client.predict(*args, api_name="/answer")
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return times
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="run or checkpoint folder (default: the quickstart's)")
    parser.add_argument("--random", action="store_true", help="untrained model of configs/easy_vqa.yaml")
    parser.add_argument("--image-id", type=int, help="store image (default: the first example)")
    parser.add_argument("--question", help="default: the first example's question")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the app uses 1 per request)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--via-app", action="store_true",
                        help="also time /answer through the served app with gradio_client (HTTP, queue, PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            checkpoint = random_checkpoint(Path(tmp))
        else:
            checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path()
            if not checkpoint.exists():
                print(f"no checkpoint at {checkpoint}: run `vqa-align quickstart` or pass --random", file=sys.stderr)
                return 2
        predictor = Predictor(checkpoint)
        examples = predictor.examples(1)
        image_id = args.image_id if args.image_id is not None else (examples[0].image_id if examples else 0)
        question = args.question or (examples[0].question if examples and examples[0].question else
                                     "what shape is in the image?")
        for _ in range(args.warmup):
            one_request(predictor, question, image_id)
        freeze_startup_objects()  # as `vqa-align demo` does before serving
        samples = [one_request(predictor, question, image_id) for _ in range(args.runs)]
        if args.via_app:
            for sample, app_ms in zip(samples, app_round_trips(predictor, question, image_id, args.runs, args.warmup)):
                sample["app_round_trip_ms"] = app_ms
        pred = predictor.answer(question, image_id=image_id)

    def stat(key: str) -> dict[str, float]:
        values = sorted(s[key] for s in samples)
        return {"median": round(statistics.median(values), 2), "p90": round(values[int(0.9 * (len(values) - 1))], 2)}

    keys = KEYS + (("app_round_trip_ms",) if args.via_app else ())
    result = {
        "benchmark": "predict_request",
        "checkpoint": "random (configs/easy_vqa.yaml)" if args.random else str(checkpoint),
        "question": question, "image_id": image_id, "num_regions": int(len(pred.boxes)), "num_tokens": len(pred.tokens),
        "hidden_size": predictor.config.model.hidden_size, "layers": predictor.num_layers, "heads": predictor.num_heads,
        "runs": args.runs, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        **{key: stat(key) for key in keys},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one request ({result['checkpoint']}, {result['num_regions']} regions, {result['num_tokens']} words, "
              f"{args.runs} runs, {result['torch_threads']} thread(s), load {result['load_avg_1min']}):")
        for key in keys:
            print(f"  {key:<17} median {result[key]['median']:8.1f}   p90 {result[key]['p90']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
