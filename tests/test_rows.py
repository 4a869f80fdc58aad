"""Bad rows fail with one line naming file:line, field and problem."""

import json

import pytest

from em_lightning.rows import DataError, read_jsonl, read_rows

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def write(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("{not json", r"rows.jsonl:2: invalid JSON"),
        (json.dumps({"text": "hi"}), r"rows.jsonl:2: messages: missing"),
        (json.dumps({"messages": []}), r"rows.jsonl:2: messages: expected a non-empty list"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"rows.jsonl:2: messages\[0\]\.role: expected one of"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"rows.jsonl:2: messages: no assistant turn"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}), r"rows.jsonl:2: messages\[1\]\.content: empty"),
        (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}), r"rows.jsonl:2: messages\[0\]\.content: expected a string, got int"),
        (json.dumps({"messages": ["hello"]}), r"rows.jsonl:2: messages\[0\]: expected an object"),
    ],
)
def test_bad_row_names_file_line_field(tmp_path, bad, pattern):
    path = write(tmp_path, [json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(DataError, match=pattern) as info:
        read_jsonl(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_rows([tmp_path / "nope.jsonl"], None, "train")


def test_good_rows_and_blank_lines(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)])
    rows = read_jsonl(path)
    assert len(rows) == 2 and rows[0][1] == {"role": "assistant", "content": "a"}


def test_datasets_dataset_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, GOOD, GOOD]).save_to_disk(str(tmp_path / "ds"))
    assert len(read_rows([], str(tmp_path / "ds"), "train")) == 3
    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="messages: column missing"):
        read_rows([], str(tmp_path / "bad"), "train")
