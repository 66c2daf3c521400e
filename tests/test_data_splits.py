"""Split files: the peers' formats read unchanged, round trips, seeded labeled/unlabeled splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from allspark_seg.data.splits import Item, make_split, parse_split_line, read_split_file, write_split_file
from allspark_seg.errors import ConfigError, DataError

VOC_LINES = [
    "JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png",
    "JPEGImages/2007_000039.jpg SegmentationClass/2007_000039.png",
]
CITYSCAPES_LINES = [
    "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
    "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
    "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png "
    "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png",
]
COCO_LINES = [
    "train2017/000000000009.jpg masks/train2017/000000000009.png",
    "train2017/000000000025.jpg masks/train2017/000000000025.png",
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("lines", "names"),
    [
        (VOC_LINES, ["2007_000032", "2007_000039"]),
        (CITYSCAPES_LINES, ["aachen_000000_000019", "bochum_000000_000313"]),
        (COCO_LINES, ["000000000009", "000000000025"]),
    ],
)
def test_peer_split_files_are_read_unchanged(tmp_path: Path, lines: list[str], names: list[str]) -> None:
    split = write_lines(tmp_path / "splits" / "labeled.txt", lines)
    items = read_split_file(split, tmp_path, require_masks=True)
    assert [item.name for item in items] == names
    for item, line in zip(items, lines, strict=True):
        image_rel, mask_rel = line.split()
        assert item.image == tmp_path / image_rel and item.mask == tmp_path / mask_rel


def test_one_path_lines_blank_lines_and_the_image_image_workaround(tmp_path: Path) -> None:
    split = write_lines(tmp_path / "u.txt", ["a/x.jpg", "", "a/y.jpg a/y.jpg", "  a/z.png b/z.png  "])
    items = read_split_file(split, tmp_path)
    assert [(i.name, i.mask) for i in items] == [("x", None), ("y", None), ("z", tmp_path / "b" / "z.png")]
    with pytest.raises(DataError, match=r"line 1: .*has no mask path"):
        read_split_file(split, tmp_path, require_masks=True)


def test_paths_with_spaces() -> None:
    assert parse_split_line("my images/a b.jpg my masks/a b.png") == ("my images/a b.jpg", "my masks/a b.png")
    assert parse_split_line("unlabeled/photo 1.jpg") == ("unlabeled/photo 1.jpg", None)
    assert parse_split_line("   ") is None
    assert parse_split_line("a\\b.jpg c\\d.png") == ("a/b.jpg", "c/d.png")


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    items = [
        Item(tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a.png", "a"),
        Item(tmp_path / "images" / "b.jpg", None, "b"),
    ]
    path = write_split_file(tmp_path / "out" / "split.txt", items, tmp_path)
    assert path.read_text().splitlines() == ["images/a.jpg masks/a.png", "images/b.jpg"]
    assert read_split_file(path, tmp_path) == items


def test_write_refuses_files_outside_the_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="outside the data root"):
        write_split_file(tmp_path / "s.txt", [Item(tmp_path.parent / "x.jpg", None, "x")], tmp_path / "root")


def list_file(tmp_path: Path, n: int) -> Path:
    return write_lines(
        tmp_path / "all.txt", [f"JPEGImages/{i:06d}.jpg SegmentationClass/{i:06d}.png" for i in range(n)]
    )


def test_make_split_is_seeded_disjoint_and_covering(tmp_path: Path) -> None:
    source = list_file(tmp_path, 50)
    lab, unl = make_split(source, 7, None, 0, tmp_path / "s0")
    labeled, unlabeled = lab.read_text().splitlines(), unl.read_text().splitlines()
    assert len(labeled) == 7 and len(unlabeled) == 43
    assert set(labeled).isdisjoint(unlabeled)
    assert set(labeled) | set(unlabeled) == set(source.read_text().splitlines())
    again, _ = make_split(source, 7, None, 0, tmp_path / "s0b")
    assert again.read_text() == lab.read_text()
    other, _ = make_split(source, 7, None, 1, tmp_path / "s1")
    assert other.read_text() != lab.read_text()
    shuffled = write_lines(tmp_path / "shuffled.txt", list(reversed(source.read_text().splitlines())))
    same, _ = make_split(shuffled, 7, None, 0, tmp_path / "s0c")
    assert same.read_text() == lab.read_text()  # depends on the set of lines, not their order


def test_fraction_rounds_up_like_the_published_splits(tmp_path: Path) -> None:
    source = list_file(tmp_path, 10582)  # VOC augmented train set: 1/16 -> 662, 1/2 -> 5291
    for fraction, expected in [(1 / 16, 662), (1 / 2, 5291)]:
        lab, unl = make_split(source, None, fraction, 0, tmp_path / str(expected))
        assert len(lab.read_text().splitlines()) == expected
        assert len(unl.read_text().splitlines()) == 10582 - expected


def test_make_split_from_items(tmp_path: Path) -> None:
    items = [Item(tmp_path / "labeled" / "images" / f"{i}.png", tmp_path / "m" / f"{i}.png", str(i)) for i in range(6)]
    lab, unl = make_split(items, 2, None, 3, tmp_path / "out", root=tmp_path)
    read = read_split_file(lab, tmp_path) + read_split_file(unl, tmp_path)
    assert sorted(i.name for i in read) == [str(i) for i in range(6)]
    with pytest.raises(ConfigError, match="data root"):
        make_split(items, 2, None, 3, tmp_path / "out")


@pytest.mark.parametrize(
    ("n_labeled", "fraction"), [(None, None), (3, 0.5), (0, None), (10, None), (None, 0.0), (None, 1.0)]
)
def test_make_split_rejects_bad_sizes(tmp_path: Path, n_labeled: int | None, fraction: float | None) -> None:
    with pytest.raises(ConfigError):
        make_split(list_file(tmp_path, 10), n_labeled, fraction, 0, tmp_path / "out")


def test_make_split_rejects_a_repeated_line(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "all.txt", ["a.jpg a.png", "b.jpg b.png", "a.jpg a.png"])
    with pytest.raises(DataError, match=r"all.txt, line 3: repeats line 1"):
        make_split(source, 1, None, 0, tmp_path / "out")
