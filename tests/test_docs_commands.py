"""Every `vqa-align ...` command written in README.md and docs/ parses as written.

Commands are taken from fenced code blocks (shell lines: comments, ``\\`` continuations,
``&&``/``;``/``|`` chains and ``VAR=value`` prefixes handled) and from inline code spans. A
command in a code block must parse completely against the real parser (``vqa_align.cli``), as
a user would paste it; an inline span is often a fragment of prose (`vqa-align eval`,
`vqa-align prep tsv|npz|h5`), so only its subcommands and option names are checked. Nothing is
executed here except the cheap commands at the end (``--help``; ``score`` on a fixture). A failure
names the file and line of the command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from vqa_align.cli import build_parser, main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PROGRAM = "vqa-align"
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SEPARATORS = {"&&", "||", ";", "|", "&"}  # between the commands of one shell line
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
WRAPPERS = {"time", "/usr/bin/time", "-v", "nohup", "env", "sudo"}  # words before the program


@dataclass(frozen=True)
class DocCommand:
    file: Path
    line: int
    argv: tuple[str, ...]  # the arguments after `vqa-align`
    text: str
    complete: bool  # from a code block (parsed completely) or an inline span (names only)

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: `{self.text}`"


def _program_argv(words: list[str]) -> list[str] | None:
    """The arguments of the vqa-align call in ``words`` (a shell command), None if it calls no vqa-align."""
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in WRAPPERS):
        words = words[1:]
    if words and Path(words[0]).name == PROGRAM:  # vqa-align, .venv/bin/vqa-align
        # `vqa-align eval: error: ...` is the program's output shown in a block, not a command
        return None if len(words) > 1 and words[1].endswith(":") else words[1:]
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "vqa_align.cli"]:
        return words[3:]
    return None


def _split(command: str) -> list[str] | None:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote: not a shell command
        return None


def _shell_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: words split at ``&&``, ``||``, ``;``, ``|``, ``&``,
    each cut at its first redirection; comments dropped; none for a line that is not shell."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell command
        return []
    commands: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    cut = []
    for words in commands:
        redirect = next((i for i, w in enumerate(words) if w and set(w) <= set("<>&")), len(words))
        cut.append(words[:redirect])
    return cut


def _block_commands(path: Path, lines: list[str], start: int) -> list[DocCommand]:
    """The vqa-align commands of a shell code block whose first line is ``lines[0]`` (line ``start``)."""
    found, pending, first = [], "", start
    for number, raw in enumerate(lines, start):
        line = raw.strip()
        if not pending:
            first = number
            line = re.sub(r"^\$\s+", "", line)  # a console prompt
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        for words in _shell_commands(text):
            argv = _program_argv(words)
            if argv is not None:
                found.append(DocCommand(path, first, tuple(argv), shlex.join(words), complete=True))
    return found


def doc_commands(path: Path, text: str | None = None) -> list[DocCommand]:
    """The vqa-align commands of the Markdown file ``path`` (or of ``text``, as if it were that file)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[DocCommand] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(1))), len(lines))
            if fence.group(2).lower() in SHELL_LANGUAGES:
                found += _block_commands(path, lines[i + 1:end], i + 2)
            i = end + 1
            continue
        for span in INLINE.findall(lines[i]):
            words = _split(span)
            argv = _program_argv(words) if words else None
            if argv is not None:
                found.append(DocCommand(path, i + 1, tuple(argv), span, complete=False))
        i += 1
    return found


ALL_COMMANDS = [c for path in DOC_FILES for c in doc_commands(path)]


# ----------------------------------------------------------------------------------------------
# Checking a command against the parser
# ----------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _is_placeholder(word: str) -> bool:
    """Prose stand-ins in an inline span: `...`, `[VG]`, `KIND`, `<run>`."""
    return word in ("...", "…") or word.startswith(("[", "<")) or word.endswith("...")


def strict_parser() -> argparse.ArgumentParser:
    """The real parser without abbreviations: `--noise` for `--noise-std` would break as soon as
    another option starts the same way, so a documented command spells options out."""
    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        sub = _subparsers(p)
        todo += list(sub.choices.values()) if sub is not None else []
    return parser


def check_names(argv: tuple[str, ...]) -> str | None:
    """Subcommands and option names only (inline fragments); the problem, or None."""
    parser = build_parser()
    for word in argv:
        if word.strip("[").startswith("-"):  # `--overwrite`, `[--cache-dir DIR]`
            name = word.strip("[]").split("=", 1)[0]
            if name not in parser._option_string_actions:
                return f"{parser.prog} has no option {name}"
            continue
        sub = _subparsers(parser)
        if sub is None or _is_placeholder(word):
            continue  # a value (or a placeholder) of an option or positional argument
        choices = word.split("|")  # `prep tsv|npz|h5`: any of them
        unknown = [c for c in choices if c not in sub.choices]
        if unknown:
            return f"{parser.prog} has no subcommand {unknown[0]!r} (it has {', '.join(sub.choices)})"
        parser = sub.choices[choices[0]]
    return None


def check_parse(argv: tuple[str, ...]) -> str | None:
    """The whole command through argparse, as the shell would run it; the error, or None."""
    optional = [w for w in argv if w.startswith("[")]
    if optional:  # argparse may take `[--x` for a positional value: it does not run as written
        return f"{optional[0]!r}: an optional part in [brackets] cannot be pasted; write it as a comment"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            strict_parser().parse_args(list(argv))
    except SystemExit as stop:
        if stop.code not in (0, None):  # --help exits 0
            return err.getvalue().strip() or f"exit {stop.code}"
    return None


def test_the_docs_contain_commands():
    """The extraction finds the commands it must check (a regex slip would make the test vacuous)."""
    texts = {c.text for c in ALL_COMMANDS}
    assert any(t.startswith("vqa-align quickstart") for t in texts)
    assert any(c.complete for c in ALL_COMMANDS) and any(not c.complete for c in ALL_COMMANDS)
    assert len({c.file for c in ALL_COMMANDS}) >= 4


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.file.name}:{c.line}")
def test_documented_command_parses(command: DocCommand):
    problem = check_parse(command.argv) if command.complete else check_names(command.argv)
    assert problem is None, f"{command.where} does not parse: {problem}"


def test_the_checks_catch_wrong_commands():
    assert check_parse(("eval", "--checkpoint", "r", "--noise", "1")) is not None
    assert check_parse(("quickstart", "--resume")) is None
    assert "brackets" in check_parse(("extract", "--download", "--backbone", "clip", "[--weights-dir", "DIR]"))
    assert "no option --cache" in check_names(("prep", "easy-vqa", "[--cache", "DIR]"))
    assert check_names(("prep", "tsv|npz|h5|easy-vqa")) is None
    assert "no subcommand 'csv'" in check_names(("prep", "tsv|csv"))
    assert "no option --colour" in check_names(("demo", "--colour"))
    block = doc_commands(ROOT / "README.md", "```bash\nVQA_ALIGN_CACHE=/tmp/c vqa-align eval \\\n  --checkpoint r  # note\n"
                                   "vqa-align demo && .venv/bin/vqa-align score --x\n```\nsee `vqa-align demo --port 1`\n")
    assert [(c.line, c.argv, c.complete) for c in block] == [
        (2, ("eval", "--checkpoint", "r"), True), (4, ("demo",), True), (4, ("score", "--x"), True),
        (6, ("demo", "--port", "1"), False)]
    assert doc_commands(ROOT / "README.md", "```\nvqa-align eval: error: argument --split: bad\n```\n") == []


# ----------------------------------------------------------------------------------------------
# Running the cheap ones
# ----------------------------------------------------------------------------------------------


def subcommand_path(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The subcommands a command names (``("prep", "tsv")``), up to its first option or value."""
    parser, path = build_parser(), []
    for word in argv:
        sub = _subparsers(parser)
        if sub is None or word not in sub.choices:
            break
        path.append(word)
        parser = sub.choices[word]
    return tuple(path)


DOCUMENTED_SUBCOMMANDS = sorted({subcommand_path(c.argv) for c in ALL_COMMANDS})


@pytest.mark.parametrize("path", DOCUMENTED_SUBCOMMANDS, ids=lambda p: " ".join(p) or "vqa-align")
def test_help_of_every_documented_subcommand_runs(path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main([*path, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(('vqa-align', *path))}")


def _score_fixture(questions: Path, annotations: Path, results: Path) -> float:
    """Two questions in the official format; returns their official accuracy (95.0)."""
    def answers(*words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    for path in (questions, annotations, results):
        path.parent.mkdir(parents=True, exist_ok=True)
    questions.write_text(json.dumps({"questions": [
        {"image_id": 7, "question": "is it red?", "question_id": 70},
        {"image_id": 8, "question": "what color is it?", "question_id": 80}]}))
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 70, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 10)},
        {"question_id": 80, "image_id": 8, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "blue", "answers": answers(*["red"] * 3, *["blue"] * 7)}]}))
    results.write_text(json.dumps([{"question_id": 70, "answer": "yes"}, {"question_id": 80, "answer": "red"}]))
    # yes: 100; red (3 of 10 annotators): 3 leave-one-out subsets with 2 matches (2/3), 7 with 3 (1) -> 90
    return 95.0


SCORE_COMMANDS = [c for c in ALL_COMMANDS if subcommand_path(c.argv) == ("score",) and check_parse(c.argv) is None]


@pytest.mark.parametrize("command", SCORE_COMMANDS, ids=lambda c: f"{c.file.name}:{c.line}")
def test_documented_score_command_runs_on_a_fixture(command, tmp_path, monkeypatch, capsys):
    """As written, in a folder where its file names hold a two-question fixture."""
    monkeypatch.chdir(tmp_path)
    args = strict_parser().parse_args(list(command.argv))
    expected = _score_fixture(Path(args.questions), Path(args.annotations), Path(args.results))
    assert cli_main(list(command.argv)) == 0, command.where
    assert json.loads(capsys.readouterr().out)["overall"] == expected, command.where


def test_the_docs_show_a_runnable_score_command():
    assert SCORE_COMMANDS, "README.md / docs: no complete `vqa-align score ...` command found"
