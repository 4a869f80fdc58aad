"""Bad rows fail with one line naming file:line, field and problem."""

import json

import pytest

from em_lightning.training.rows import DataError, read_jsonl, read_rows

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
        # role order: [system] (user assistant)+
        (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
         r"rows.jsonl:2: messages\[0\]\.role: expected 'user', got 'assistant'"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
         r"rows.jsonl:2: messages\[1\]\.role: expected 'assistant', got 'user'"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}),
         r"rows.jsonl:2: messages\[2\]\.role: expected 'user', got 'assistant'"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}),
         r"rows.jsonl:2: messages\[1\]\.role: 'system' is only accepted first"),
        (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
         r"rows.jsonl:2: messages\[1\]\.role: 'system' is only accepted first"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
         r"rows.jsonl:2: messages\[2\]\.role: the last turn must be 'assistant'"),
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


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
    ],
)
def test_accepted_role_orders(tmp_path, messages):
    (row,) = read_jsonl(write(tmp_path, [json.dumps({"messages": messages})]))
    assert row == messages and row.where.endswith("rows.jsonl:1")


@pytest.mark.parametrize(
    "raw, pattern",
    [
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', r"rows.jsonl:2: not UTF-8: byte 0xe9 at column 47"),
        (b"\xff\xfe{}", r"rows.jsonl:2: not UTF-8: byte 0xff at column 1"),
    ],
)
def test_non_utf8_names_line_and_column(tmp_path, raw, pattern):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + raw + b"\n")
    with pytest.raises(DataError, match=pattern):
        read_jsonl(path)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(read_jsonl(path)) == 1


@pytest.mark.parametrize("limit, kept", [(10_000, 3), (200, 2), (30, 0)])
def test_rows_over_max_row_bytes_are_skipped_and_counted(tmp_path, limit, kept):
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 300}]}
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(long), json.dumps(GOOD)])
    oversize: list[str] = []
    if kept == 0:
        with pytest.raises(DataError, match=r"rows.jsonl: no rows \(3 over data.max_row_bytes=30 skipped\)"):
            read_jsonl(path, max_row_bytes=limit, oversize=oversize)
        return
    rows = read_jsonl(path, max_row_bytes=limit, oversize=oversize)
    assert len(rows) == kept and oversize == ([] if kept == 3 else [f"{path}:2"])
    assert [r.where for r in rows][-1] == f"{path}:3"  # line numbers stay right after a skipped line


def test_line_exactly_at_the_limit_is_read(tmp_path):
    line = json.dumps(GOOD).encode()
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line + b"\n" + line)  # the last line has no newline
    assert len(read_jsonl(path, max_row_bytes=len(line))) == 2
    with pytest.raises(DataError, match=r"no rows \(2 over data.max_row_bytes"):
        read_jsonl(path, max_row_bytes=len(line) - 1)


def test_template_error_names_the_row(tmp_path):
    from em_lightning.lit.datamodule import ChatDataModule
    from em_lightning.model.loading import ModelSpec

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
                        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    boom = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(boom)])
    dm = ChatDataModule(train_files=str(path), base=ModelSpec(name_or_path="tiny:qwen2", chat_template=str(template)))
    with pytest.raises(DataError, match=r"rows.jsonl:2: template: no boom$"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "data.batch_size: expected an integer >= 1, got 0"),
        ({"batch_size": True}, "data.batch_size: expected an integer >= 1, got True"),
        ({"max_length": 1}, "data.max_length: expected an integer >= 2, got 1"),
        ({"num_workers": -1}, "data.num_workers: expected an integer >= 0, got -1"),
        ({"max_row_bytes": 0}, "data.max_row_bytes: expected an integer >= 1, got 0"),
    ],
)
def test_data_options_validated_in_constructor(kwargs, message):
    from em_lightning.lit.datamodule import ChatDataModule

    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        ChatDataModule(**kwargs)
