"""The one padding helper: right padding keeps each row at positions 0..n-1, left padding ends every row in
the last column; the mask marks exactly the real tokens."""

import pytest

from em_lightning.model.padding import pad_sequences


def test_right_and_left_padding():
    seqs = [[5, 6, 7], [8]]
    ids, mask = pad_sequences(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences(seqs, -100, "left")
    assert ids.tolist() == [[5, 6, 7], [-100, -100, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_unknown_side_is_refused():
    with pytest.raises(ValueError, match="side must be 'left' or 'right'"):
        pad_sequences([[1]], 0, "center")
