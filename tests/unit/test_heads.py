import pytest

from routehead_rag.heads import Head, HeadGrid, as_heads, load_heads_file


def test_head_prints_and_parses():
    assert str(Head(12, 5)) == "L12.H5"
    assert Head.parse("L12.H5") == Head(12, 5)
    assert Head.parse(" l3.h0 ") == Head(3, 0)
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        Head.parse("12.5")


def test_as_heads_normalises_and_dedupes():
    assert as_heads(["L1.H2", (0, 3), Head(1, 2)]) == [Head(1, 2), Head(0, 3)]
    with pytest.raises(TypeError, match="head #0"):
        as_heads([1.5])
    with pytest.raises(TypeError, match="string"):
        as_heads("L1.H2")


def test_validate_heads_names_the_bad_head():
    with pytest.raises(ValueError, match="L30.H0 does not exist"):
        HeadGrid(num_layers=30, num_heads=9).check([Head(30, 0)])


def test_heads_files(tmp_path):
    (tmp_path / "a.json").write_text('["L1.H2", "L3.H4"]')
    (tmp_path / "b.txt").write_text("L1.H2\nL3.H4, L0.H0\n")
    assert load_heads_file(tmp_path / "a.json") == [Head(1, 2), Head(3, 4)]
    assert load_heads_file(tmp_path / "b.txt") == [Head(1, 2), Head(3, 4), Head(0, 0)]
    with pytest.raises(FileNotFoundError):
        load_heads_file(tmp_path / "missing.txt")
