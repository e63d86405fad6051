"""How well the app's "unlike the training pictures" warning separates easy-VQA pictures from photos.

Every picture goes through the upload path (``Predictor._upload_regions``: decode, RGB, the
checkpoint's extractor) and is scored by :mod:`vqa_align.serve.novelty` against the statistics of
the model's training pictures. Prints the fraction flagged among the easy-VQA test pictures (never
used for the statistics) and the score of each photo bundled with scikit-image.

    python benchmarks/upload_novelty.py                    # the quickstart's checkpoint
    python benchmarks/upload_novelty.py --checkpoint RUN --limit 300 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from vqa_align.data.easy_vqa import TEST_IMAGE_ID_OFFSET, easy_vqa_image_path  # noqa: E402
from vqa_align.errors import UserError  # noqa: E402
from vqa_align.paths import default_checkpoint_path  # noqa: E402
from vqa_align.serve.novelty import novelty  # noqa: E402
from vqa_align.serve.predictor import Predictor  # noqa: E402

# Photos shipped inside scikit-image's package (nothing is downloaded); grayscale ones included.
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png", "moon.png",
          "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "brick.png", "grass.png",
          "gravel.png", "page.png", "text.png", "color.png", "logo.png", "clock_motion.png", "horse.png"]


def easy_vqa_test_pictures(limit: int) -> list[Path]:
    paths = []
    for k in range(limit):
        try:
            paths.append(easy_vqa_image_path(TEST_IMAGE_ID_OFFSET + k))
        except UserError:
            break
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the quickstart's run")
    parser.add_argument("--limit", type=int, default=1000, help="easy-VQA test pictures scored")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    predictor = Predictor(args.checkpoint or default_checkpoint_path())
    start = time.perf_counter()
    stats = predictor.novelty_stats()
    if stats is None:
        raise SystemExit(f"{predictor.path}: no feature store, no statistics")
    fit_s = time.perf_counter() - start

    def score(picture: object) -> float:
        return novelty(stats, predictor._upload_regions(picture).features)

    tests = [score(str(p)) for p in easy_vqa_test_pictures(args.limit)]
    import skimage.data

    folder = Path(skimage.data.data_dir)
    photos = {name: score(str(folder / name)) for name in PHOTOS if (folder / name).is_file()}
    flagged = sum(s > stats.threshold for s in tests)
    result = dict(
        checkpoint=str(predictor.path), statistics_images=stats.images, statistics_seconds=round(fit_s, 2),
        threshold=round(stats.threshold, 3), easy_vqa_test=len(tests),
        easy_vqa_test_flagged=flagged, easy_vqa_test_not_flagged_pct=round(100 * (1 - flagged / max(len(tests), 1)), 1),
        easy_vqa_test_max=round(max(tests), 3) if tests else None,
        photos={k: round(v, 2) for k, v in photos.items()},
        photos_flagged=sum(v > stats.threshold for v in photos.values()), photos_total=len(photos),
    )
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"statistics: {stats.images} training pictures, {fit_s:.2f} s; threshold {stats.threshold:.2f}")
    print(f"easy-VQA test pictures: {len(tests) - flagged}/{len(tests)} not flagged "
          f"({result['easy_vqa_test_not_flagged_pct']} %), max score {result['easy_vqa_test_max']}")
    print(f"photos flagged: {result['photos_flagged']}/{len(photos)}")
    for name, value in sorted(photos.items(), key=lambda kv: kv[1]):
        print(f"  {name:24s} {value:8.2f}  {'flagged' if value > stats.threshold else 'NOT flagged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
