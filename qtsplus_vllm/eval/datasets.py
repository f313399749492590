"""Multiple-choice long-video QA items from local files, in each benchmark's published layout.

Nothing is downloaded. Every loader returns a :class:`Dataset`: the items whose video exists, the
items whose video is missing (reported, not fatal) and the records that cannot be evaluated as
multiple choice here (open-ended tasks, no gold answer, frame directories), each with the reason.

Layouts (``root`` is the directory the benchmark was unpacked into; an annotation file works too):

- ``videomme``: ``videomme/test-00000-of-00001.parquet`` (the Hugging Face release; needs pyarrow,
  ``pip install ".[eval]"``) or a JSON/JSONL file of the same records, flat
  (``video_id, duration, domain, sub_category, videoID, question_id, task_type, question, options,
  answer``) or nested (a video record with a ``questions`` list). Videos ``data/<videoID>.mp4``
  (or ``videos/``; ``.mkv`` and other containers too).
  Groups: ``duration`` (short / medium / long), ``task`` (task_type), ``domain``.
- ``mlvu``: the dev set, ``json/<k>_<task>.json`` (``video, duration, question, candidates,
  answer, question_type``) with videos in ``video/<k>_<task>/``. The gold answer is the text of
  one candidate. Open-ended tasks (no ``candidates``: sub-scene captioning, summary) are skipped.
  Groups: ``task``.
- ``longvideobench``: ``lvb_val.json`` (``id, video_path, question, candidates, correct_choice,
  duration_group, question_category, ...``), videos in ``videos/``. Groups: ``duration``
  (duration_group in seconds), ``category`` (question_category). Subtitles are not sent.
- ``choice``: the reference implementation's JSONL (``evaluation/eval_sharegpt_video_choice.py``
  in Siyou-Li/QTSplus): ``question``, ``options`` (letter -> text), ``answer`` (a letter),
  ``vision_id`` (a path under the media directory). A ``vision_id`` that is a directory of frames
  is skipped: a ``video_url`` request needs a video file.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = "ABCDEFGHIJ"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
LAYOUTS = ("videomme", "mlvu", "longvideobench", "choice")

# LongVideoBench's duration_group values (seconds, upper bound of the group) and the ranges they stand for.
LVB_DURATION = {"15": "8-15s", "60": "15-60s", "600": "180-600s", "3600": "900-3600s"}


@dataclass(frozen=True)
class Item:
    """One multiple-choice question about one video."""

    id: str
    video: Path
    question: str
    options: tuple[str, ...]  # option texts, without their letters
    answer: str  # the gold letter
    protocol: str  # which benchmark's prompt to use (qtsplus_vllm.eval.prompts)
    groups: dict[str, str] = field(default_factory=dict)  # e.g. {"duration": "long", "task": "..."}
    system: str | None = None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


@dataclass
class Dataset:
    layout: str
    source: str
    items: list[Item]
    missing: list[dict[str, str]] = field(default_factory=list)  # {"id", "video"}: video not found
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"id", "reason"}: not evaluable here

    def subset(self, limit: int | None, seed: int | None = None) -> Dataset:
        """The first ``limit`` items, or a random ``limit`` of them (kept in file order) when ``seed`` is set."""
        if limit is None or limit >= len(self.items):
            return self
        if seed is None:
            chosen = self.items[:limit]
        else:
            keep = set(random.Random(seed).sample(range(len(self.items)), limit))
            chosen = [item for k, item in enumerate(self.items) if k in keep]
        return Dataset(self.layout, self.source, chosen, self.missing, self.skipped)


class DatasetError(ValueError):
    pass


_LETTER_PREFIX = re.compile(r"^\s*\(?([A-J])\s*[.):]\s*")


def strip_letter(option: str, letter: str) -> str:
    """``"B. a red car"`` -> ``"a red car"`` when the prefix is this option's own letter."""
    match = _LETTER_PREFIX.match(option)
    if match and match.group(1) == letter:
        return option[match.end() :].strip()
    return option.strip()


def find_video(directory: Path, stem_or_name: str) -> Path:
    """``directory/name`` if it exists, else ``directory/stem`` with the first video suffix that exists.

    Returns the first candidate (which does not exist) when none does, for the missing-video report.
    """
    direct = directory / stem_or_name
    if direct.suffix.lower() in VIDEO_SUFFIXES or direct.is_file():
        return direct
    for suffix in VIDEO_SUFFIXES:
        candidate = directory / f"{stem_or_name}{suffix}"
        if candidate.is_file():
            return candidate
    return directory / f"{stem_or_name}.mp4"


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise DatasetError(
                f"{path}: reading parquet needs pyarrow (pip install 'qtsplus-vllm[eval]'), "
                "or give the same records as a JSON file"
            ) from err
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or {id: record}
        data = data.get("data", list(data.values()))
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of records")
    return data


class _Builder:
    def __init__(self, layout: str, source: Path) -> None:
        self.dataset = Dataset(layout, str(source), [])
        self.seen: set[str] = set()

    def add(self, item: Item) -> None:
        if item.id in self.seen:
            raise DatasetError(f"{self.dataset.source}: duplicate item id {item.id!r}")
        self.seen.add(item.id)
        if item.video.is_file():
            self.dataset.items.append(item)
        else:
            self.dataset.missing.append({"id": item.id, "video": str(item.video)})

    def skip(self, item_id: str, reason: str) -> None:
        self.dataset.skipped.append({"id": item_id, "reason": reason})


# ---------------------------------------------------------------- Video-MME


def _videomme_annotation(root: Path) -> Path:
    if root.is_file():
        return root
    for pattern in ("videomme/*.parquet", "*.parquet", "videomme/*.json", "*.json", "*.jsonl"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise DatasetError(f"{root}: no Video-MME annotation (videomme/test-*.parquet or a JSON file)")


def _videomme_flat(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for record in records:
        if "questions" in record:  # nested: one record per video
            video = {k: v for k, v in record.items() if k != "questions"}
            for question in record["questions"]:
                yield {**video, **question}
        else:
            yield record


def load_videomme(root: str | Path, videos: str | Path | None = None) -> Dataset:
    root = Path(root)
    annotation = _videomme_annotation(root)
    base = annotation.parent.parent if annotation.parent.name == "videomme" else annotation.parent
    if videos:
        video_dir = Path(videos)
    else:  # the release's zips unpack into data/; some copies keep them in videos/
        video_dir = next((base / d for d in ("data", "videos") if (base / d).is_dir()), base)
    build = _Builder("videomme", annotation)
    for k, record in enumerate(_videomme_flat(_read_records(annotation))):
        item_id = str(record.get("question_id") or f"{record.get('video_id', 'q')}-{k}")
        options = list(record.get("options") or [])
        answer = str(record.get("answer") or "").strip().upper()
        if not options or not answer:
            build.skip(item_id, "no options or no answer")
            continue
        letters = LETTERS[: len(options)]
        if answer not in letters:
            build.skip(item_id, f"answer {answer!r} is not one of {letters}")
            continue
        groups = {
            "duration": str(record.get("duration") or "unknown"),
            "task": str(record.get("task_type") or "unknown"),
            "domain": str(record.get("domain") or "unknown"),
        }
        name = str(record.get("videoID") or record.get("video_id"))
        build.add(
            Item(
                id=item_id,
                video=find_video(video_dir, name),
                question=str(record["question"]).strip(),
                options=tuple(strip_letter(str(o), letters[j]) for j, o in enumerate(options)),
                answer=answer,
                protocol="videomme",
                groups=groups,
            )
        )
    return build.dataset


# ---------------------------------------------------------------- MLVU


def load_mlvu(root: str | Path, videos: str | Path | None = None) -> Dataset:
    root = Path(root)
    if root.is_file():
        files, video_root = [root], Path(videos) if videos else root.parent.parent / "video"
    else:
        if not (root / "json").is_dir() and (root / "MLVU" / "json").is_dir():  # the Hub download's root
            root = root / "MLVU"
        json_dir = root / "json" if (root / "json").is_dir() else root
        files = sorted(json_dir.glob("*.json"))
        video_root = Path(videos) if videos else root / "video"
        if not files:
            raise DatasetError(f"{root}: no MLVU annotation (json/<k>_<task>.json)")
    build = _Builder("mlvu", root)
    for path in files:
        task_dir = video_root / path.stem
        for k, record in enumerate(_read_records(path)):
            item_id = f"{path.stem}/{k}"
            candidates = record.get("candidates")
            if not candidates:
                build.skip(item_id, "open-ended (no candidates)")
                continue
            answer_text = str(record.get("answer", ""))
            texts = [str(c) for c in candidates]
            if answer_text not in texts:
                build.skip(item_id, "the answer is not one of the candidates")
                continue
            name = str(record["video"])
            video = task_dir / name if (task_dir / name).is_file() or task_dir.is_dir() else video_root / name
            task = str(record.get("question_type") or path.stem.split("_", 1)[-1])
            build.add(
                Item(
                    id=item_id,
                    video=video,
                    question=str(record["question"]).strip(),
                    options=tuple(texts),
                    answer=LETTERS[texts.index(answer_text)],
                    protocol="mlvu",
                    groups={"task": task},
                )
            )
    return build.dataset


# ---------------------------------------------------------------- LongVideoBench


def load_longvideobench(root: str | Path, videos: str | Path | None = None) -> Dataset:
    root = Path(root)
    annotation = root if root.is_file() else root / "lvb_val.json"
    if not annotation.is_file():
        raise DatasetError(f"{root}: no LongVideoBench annotation (lvb_val.json)")
    video_dir = Path(videos) if videos else annotation.parent / "videos"
    build = _Builder("longvideobench", annotation)
    for k, record in enumerate(_read_records(annotation)):
        item_id = str(record.get("id") or k)
        candidates = [str(c) for c in record.get("candidates") or []]
        choice = record.get("correct_choice")
        if not candidates or choice is None:
            build.skip(item_id, "no candidates or no correct_choice (the test split has no answers)")
            continue
        if not 0 <= int(choice) < len(candidates):
            build.skip(item_id, f"correct_choice {choice} out of range")
            continue
        group = str(record.get("duration_group", "unknown"))
        build.add(
            Item(
                id=item_id,
                video=find_video(video_dir, str(record.get("video_path") or record["video_id"])),
                question=str(record["question"]).strip(),
                options=tuple(candidates),
                answer=LETTERS[int(choice)],
                protocol="longvideobench",
                groups={
                    "duration": LVB_DURATION.get(group, group),
                    "category": str(record.get("question_category") or "unknown"),
                },
            )
        )
    return build.dataset


# ---------------------------------------------------------------- the reference's choice JSONL


def load_choice(path: str | Path, videos: str | Path | None = None) -> Dataset:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        if not found:
            raise DatasetError(f"{path}: no choice JSONL file")
        path = found[0]
    media = Path(videos) if videos else path.parent
    build = _Builder("choice", path)
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item_id = f"line{k}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            build.skip(item_id, "not JSON")
            continue
        options = record.get("options") or {}
        answer = str(record.get("answer") or "").strip().upper()
        vision = record.get("vision_id")
        if not record.get("question") or not options or not answer or not vision:
            build.skip(item_id, "question, options, answer or vision_id missing")
            continue
        keys = sorted(options)
        letters = LETTERS[: len(keys)]
        if list(keys) != list(letters) or answer not in letters:
            build.skip(item_id, f"options {keys} / answer {answer!r} are not consecutive letters from A")
            continue
        target = media / str(vision)
        if target.is_dir():
            build.skip(item_id, "vision_id is a directory of frames; video_url needs a video file")
            continue
        build.add(
            Item(
                id=str(record.get("id") or item_id),
                video=target if target.suffix else find_video(media, str(vision)),
                question=str(record["question"]).strip(),
                options=tuple(str(options[key]) for key in keys),
                answer=answer,
                protocol="choice",
                groups={"task": str(record["task"])} if record.get("task") else {},
            )
        )
    return build.dataset


LOADERS = {
    "videomme": load_videomme,
    "mlvu": load_mlvu,
    "longvideobench": load_longvideobench,
    "choice": load_choice,
}


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        if path.suffix == ".parquet":
            return "videomme"
        if path.suffix == ".jsonl":
            first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "{}")
            if "vision_id" in json.loads(first):
                return "choice"
        if path.name.startswith("lvb_"):
            return "longvideobench"
        records = _read_records(path)
        sample = records[0] if records else {}
        if "candidates" in sample and "correct_choice" in sample:
            return "longvideobench"
        if "candidates" in sample:
            return "mlvu"
        return "videomme"
    if (path / "lvb_val.json").is_file():
        return "longvideobench"
    if (path / "json").is_dir() or (path / "MLVU" / "json").is_dir():
        return "mlvu"
    if list(path.glob("videomme/*.parquet")) or list(path.glob("*.parquet")):
        return "videomme"
    if list(path.glob("*.jsonl")):
        return "choice"
    if list(path.glob("*.json")):
        return "videomme"
    raise DatasetError(f"{path}: cannot tell the layout; pass --layout")


def load_dataset(layout: str, path: str | Path, videos: str | Path | None = None) -> Dataset:
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LOADERS:
        raise DatasetError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)} or auto")
    return LOADERS[layout](path, videos)
