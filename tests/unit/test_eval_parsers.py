"""qtsplus_vllm.eval: answer-letter extraction, prompts, modes and the dataset layouts."""

from __future__ import annotations

import json

import pytest

from qtsplus_vllm.eval.datasets import (
    DatasetError,
    Item,
    detect_layout,
    load_choice,
    load_dataset,
    load_longvideobench,
    load_mlvu,
    load_videomme,
    strip_letter,
)
from qtsplus_vllm.eval.mini import write_mini_benchmark
from qtsplus_vllm.eval.modes import Mode, build_modes, parse_mode
from qtsplus_vllm.eval.prompts import build_prompt, extract_letter

# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        (" (C) ", "C"),
        ("D) two squares", "D"),
        ("**A**", "A"),
        ("A", "A"),
        ("A.", "A"),
        ("The best answer is: C", "C"),
        ("The answer is (D).", "D"),
        ("Answer: B. A red square moves left.", "B"),
        ("Best option: (A) red", "A"),
        ("Option C", "C"),
        ("I think the correct answer is B because the square moves.", "B"),
        ("After watching, I would pick (D) since it matches.", "D"),
        ("A man walks to the left, so B.", "B"),  # the article "A" is not a choice
        ("I believe it is C", "C"),
        ("b", None),  # a lower-case letter alone is not trusted
        ("", None),
        (None, None),
        ("I cannot tell from the video.", None),
        ("Either A or B.", None),  # two letters: undecided
        ("E", None),  # not one of A-D
        ("a red square", "B"),  # repeats option B's text
    ],
)
def test_extract_letter(reply, letter):
    options = ("a blue circle", "a red square", "two green squares", "nothing moves")
    assert extract_letter(reply, "ABCD", options) == letter


def test_extract_letter_five_options():
    assert extract_letter("E", "ABCDE") == "E"
    assert extract_letter("The answer is E.", "ABCDE") == "E"


# ------------------------------------------------------------------ prompts


def _item(protocol: str, n: int = 4) -> Item:
    return Item(
        "q1",
        __import__("pathlib").Path("v.mp4"),
        "What moves?",
        tuple(f"opt{k}" for k in range(n)),
        "B",
        protocol,
    )


def test_prompts_follow_each_protocol():
    system, text = build_prompt(_item("videomme"))
    assert system is None
    assert text.startswith(
        "Select the best answer to the following multiple-choice question based on the video."
    )
    assert "\nWhat moves?\nA. opt0\nB. opt1\nC. opt2\nD. opt3\nThe best answer is:" in text
    system, text = build_prompt(_item("mlvu", 6))
    assert system.startswith("Carefully watch this video")
    assert text.startswith("Question: What moves?\nOptions:\n(A) opt0\n") and "(F) opt5" in text
    _, text = build_prompt(_item("longvideobench", 5))
    assert text == "What moves?\nA. opt0\nB. opt1\nC. opt2\nD. opt3\nE. opt4\n" + (
        "Answer with the option's letter from the given choices directly."
    )
    _, text = build_prompt(_item("choice"))
    assert text.startswith(
        "What moves?\nA. opt0\nB. opt1\nC. opt2\nD. opt3\nPlease provide your options (only A or B"
    )
    _, text = build_prompt(_item("choice", 3))
    assert "(only A or B or C)" in text
    _, text = build_prompt(_item("videomme", 5))
    assert "(A, B, C, D, or E)" in text
    with pytest.raises(ValueError):
        build_prompt(_item("nope"))


# ------------------------------------------------------------------ modes


def test_modes():
    assert parse_mode("on").extra_body() == {"mm_processor_kwargs": {"qtsplus_select": True}}
    assert parse_mode("off").extra_body() == {"mm_processor_kwargs": {"qtsplus_select": False}}
    assert parse_mode("default").extra_body() == {} and parse_mode("default").name == "default"
    rho = parse_mode("rho_max=0.25")
    assert rho.name == "rho_max=0.25"
    assert rho.extra_body() == {"mm_processor_kwargs": {"qtsplus_select": True, "qtsplus_rho_max": 0.25}}
    frames = parse_mode("off,fps=0.5,max_frames=64")
    assert frames.name == "off,fps=0.5,max_frames=64"
    assert frames.extra_body() == {
        "mm_processor_kwargs": {"qtsplus_select": False},
        "media_io_kwargs": {"video": {"fps": 0.5, "max_frames": 64}},
    }
    for bad in ("off,rho_max=0.2", "rho_max=x", "fps=0", "max_frames=-1", "colour=red", "select=maybe"):
        with pytest.raises(ValueError):
            parse_mode(bad)
    modes = build_modes(["on", "off", "on"], [0.1, 0.25], fps=2.0)
    assert [m.name for m in modes] == ["on,fps=2", "off,fps=2", "rho_max=0.1,fps=2", "rho_max=0.25,fps=2"]
    assert Mode(select=True, rho_max=0.1, fps=2.0).name == "rho_max=0.1,fps=2"


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("layout", ["videomme", "videomme-json", "mlvu", "longvideobench", "choice"])
def test_mini_layouts_load_and_report_missing_videos(tmp_path, layout):
    if layout == "videomme":
        pytest.importorskip("pyarrow")
    path = write_mini_benchmark(tmp_path, layout, videos=3, questions=2, missing=1)
    expected = "videomme" if layout.startswith("videomme") else layout
    assert detect_layout(path) == expected
    dataset = load_dataset("auto", path)
    assert dataset.layout == expected
    assert len(dataset.items) == 4 and len(dataset.missing) == 2  # the third video was not written
    assert all(item.video.is_file() for item in dataset.items)
    assert len({item.id for item in dataset.items}) == 4
    for item in dataset.items:
        assert item.answer in item.letters and len(item.options) >= 4
        assert not item.options[0].startswith("A.")  # letters stripped, the prompt adds its own
    if layout == "mlvu":
        assert dataset.skipped == [{"id": "9_summary/0", "reason": "open-ended (no candidates)"}]
    elif layout == "choice":
        assert [s["id"] for s in dataset.skipped] == ["line7"] and "frames" in dataset.skipped[0]["reason"]
    else:
        assert dataset.skipped == []
    assert len(dataset.subset(2).items) == 2
    picked = dataset.subset(2, seed=3).items
    assert picked == dataset.subset(2, seed=3).items and len(picked) == 2


def test_videomme_records_flat_and_nested(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "yt1.mp4").write_bytes(b"x")
    flat = {
        "video_id": "001", "duration": "long", "domain": "Sports", "sub_category": "Football",
        "videoID": "yt1", "question_id": "001-1", "task_type": "Counting Problem",
        "question": "How many goals?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C",
    }  # fmt: skip
    (tmp_path / "flat.json").write_text(json.dumps([flat]))
    item = load_videomme(tmp_path / "flat.json").items[0]
    assert item.options == ("1", "2", "3", "4") and item.answer == "C" and item.id == "001-1"
    assert item.groups == {"duration": "long", "task": "Counting Problem", "domain": "Sports"}
    assert item.video == tmp_path / "data" / "yt1.mp4"
    nested = {k: v for k, v in flat.items() if k in ("video_id", "duration", "domain", "videoID")}
    nested["questions"] = [
        {k: flat[k] for k in ("question_id", "task_type", "question", "options", "answer")}
    ]
    (tmp_path / "nested.json").write_text(json.dumps([nested]))
    assert load_videomme(tmp_path / "nested.json").items == [item]
    bad = dict(flat, answer="E", question_id="001-2")
    (tmp_path / "bad.json").write_text(json.dumps([flat, bad, dict(flat)]))
    with pytest.raises(DatasetError, match="duplicate"):
        load_videomme(tmp_path / "bad.json")


def test_strip_letter():
    assert strip_letter("A. a dog", "A") == "a dog"
    assert strip_letter("(B) a cat", "B") == "a cat"
    assert strip_letter("A dog", "A") == "A dog"  # no punctuation: the text itself
    assert strip_letter("C. x", "D") == "C. x"  # another letter: kept as written


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError):
        load_longvideobench(tmp_path)
    with pytest.raises(DatasetError):
        load_mlvu(tmp_path)
    with pytest.raises(DatasetError):
        load_choice(tmp_path)
    with pytest.raises(DatasetError):
        load_dataset("nope", tmp_path)
    with pytest.raises(DatasetError):
        detect_layout(tmp_path)


def test_longvideobench_test_split_has_no_answers(tmp_path):
    (tmp_path / "lvb_val.json").write_text(
        json.dumps([{"id": "x", "video_path": "x.mp4", "question": "?", "candidates": ["a", "b"]}])
    )
    dataset = load_longvideobench(tmp_path)
    assert dataset.items == [] and dataset.skipped[0]["id"] == "x"


def test_mlvu_from_the_hub_download_root(tmp_path):
    write_mini_benchmark(tmp_path / "MLVU", "mlvu", videos=2, questions=1)
    assert detect_layout(tmp_path) == "mlvu"
    assert len(load_dataset("auto", tmp_path).items) == 2
