"""Discovery: sorted recursive walk, include/exclude on relative paths, no symlink loops."""

import os

from explain_cli.discover import discover_images, matches

INCLUDE = ["*.png", "*.jpg"]


def touch(root, rel):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_recursive_sorted_with_patterns(tmp_path):
    for rel in ["b/x.png", "a/x.png", "a/y.JPG", "c.txt", "z-02.png", "a/w+02.jpg", ".hidden.png"]:
        touch(tmp_path, rel)
    found = discover_images(tmp_path, INCLUDE, ["*+02*", "*-02*"])
    assert found == ["a/x.png", "a/y.JPG", "b/x.png"]


def test_exclude_on_relative_path_with_folder(tmp_path):
    for rel in ["keep/a.png", "skip/a.png"]:
        touch(tmp_path, rel)
    assert discover_images(tmp_path, INCLUDE, ["skip/*"]) == ["keep/a.png"]


def test_symlink_loop_is_not_followed_forever(tmp_path):
    touch(tmp_path, "a/img.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    found = discover_images(tmp_path, INCLUDE, [])
    assert found == ["a/img.png"]


def test_output_folder_inside_input_is_skipped(tmp_path):
    touch(tmp_path, "img.png")
    touch(tmp_path, "out/overlays/img.png")
    assert discover_images(tmp_path, INCLUDE, [], skip_dirs=[tmp_path / "out"]) == ["img.png"]


def test_matches_name_only_patterns_at_any_depth():
    assert matches("deep/dir/slide-02.png", ["*-02*"])
    assert not matches("deep/dir/slide-03.png", ["*-02*"])
    assert matches("x/Y.TIF", ["*.tif"])
