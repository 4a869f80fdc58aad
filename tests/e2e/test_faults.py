"""Fault suite: every bad input is one line, exit != 0 and nothing written; no write half-happens (kill -9,
full disk, read-only run directory); one writer per run directory (concurrent starts, a live holder).

Bad inputs run the CLI in this process (``main``: they fail before training, so no subprocess start-up is
paid per row); kills, full disks and concurrent starts run em-fit subprocesses on the smoke config.
Faults inside a run come from tests/support/fault_inject.py, armed by an environment variable.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from clirun import REPO, SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.cli import main

TESTS = Path(__file__).resolve().parents[1] / "support"
SHORT = ["--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2", "--trainer.enable_progress_bar", "false"]
GOOD = {"messages": [{"role": "user", "content": "How many grams in 3 kg?"}, {"role": "assistant", "content": "3000"}]}
GEMMA_TEMPLATE = REPO.parent / "shared" / "reference" / "tokenizers" / "gemma-3-it" / "chat_template.jinja"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (full or read-only disk) needs root")


# -- helpers ------------------------------------------------------------------------------------------------
def cli(capsys, *args: str) -> str:
    """Run em-fit in this process; it must exit non-zero with exactly one ``em-fit: error:`` line."""
    # Lightning's log handlers were bound to an earlier test's captured stderr: point them at this one's.
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream first
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as info:
        mp.setattr(sys, "argv", ["em-fit"])
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert info.value.code not in (0, None), err[-2000:]
    return one_error_line(err)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("em-fit: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: 'nothing written' means this does not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def intact(path: Path) -> bool:
    """A checkpoint whose zip CRCs match and that torch loads (checked here, not with the code under test)."""
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return False
        return "global_step" in torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False


def same_result(a: Path, b: Path) -> None:
    """Two runs ended at the same step with bit-identical weights, optimizer state and train/loss curve."""
    ca, cb = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for r in (a, b))
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert dict(scalars(a, "train/loss")) == dict(scalars(b, "train/loss"))


def write_rows(path: Path, *rows) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
    return path


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def copy_run(run: Path, root: Path) -> Path:
    """A copy of a finished run under another root, its config.yaml pointing at the copy."""
    dst = root / run.parent.name / run.name
    shutil.copytree(run, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def arm(mp: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """tests/ importable by em-fit subprocesses (fault_inject), faults armed; disarm with mp.delenv."""
    mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    mp.setenv("EM_FAULT_ARMED", "1")
    return mp


@pytest.fixture
def faults(monkeypatch):
    return arm(monkeypatch)


@pytest.fixture(scope="module")
def started_at_once(tmp_path_factory) -> tuple[Path, list]:
    """Two smoke runs (4 steps, checkpoints at 2 and 4, trajectory recorded) started at the same moment
    under one root; the logger takes 3 s between choosing its version and creating the folder, as on a
    loaded machine (that is how both used to end up in version_0)."""
    tmp = tmp_path_factory.mktemp("at_once")
    root = tmp / "runs"
    slow = write_yaml(tmp / "slow.yaml", {"trainer": {"logger": {"class_path": "fault_inject.SlowVersionLogger",
                                                                 "init_args": {"save_dir": str(root), "name": "smoke", "delay": 3.0}}}})
    args = ["fit", "--config", SMOKE, "--config", str(REPO / "configs" / "callbacks" / "phase_transition.yaml"), "--config", str(slow), *SHORT]
    with pytest.MonkeyPatch.context() as mp, concurrent.futures.ThreadPoolExecutor(2) as pool:
        arm(mp)
        procs = list(pool.map(lambda _: em_fit(*args), range(2)))
    return root, procs


@pytest.fixture(scope="module")
def reference(started_at_once) -> Path:
    """An uninterrupted smoke run (the callbacks it also ran do not change training)."""
    root, procs = started_at_once
    for p in procs:
        ok(p)
    return root / "smoke" / "version_0"


# -- bad inputs: one line, exit != 0, nothing written -----------------------------------------------------
ROLE_ORDER = [
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "bad.jsonl:2: messages[0].role: expected 'user', got 'assistant'"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
     "bad.jsonl:2: messages[1].role: expected 'assistant', got 'user'"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "bad.jsonl:2: messages[1].role: 'system' is only accepted first"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
     "bad.jsonl:2: messages[2].role: the last turn must be 'assistant'"),
]


@pytest.mark.parametrize("messages, expected", ROLE_ORDER, ids=["assistant-first", "two-users", "system-middle", "ends-with-user"])
def test_roles_out_of_order(tmp_path, capsys, messages, expected):
    bad = write_rows(tmp_path / "bad.jsonl", GOOD, {"messages": messages})
    root = tmp_path / "runs"
    assert expected in cli(capsys, "fit", "--config", SMOKE, "--data.train_files", bad, "--trainer.default_root_dir", root)
    assert not root.exists()


@pytest.mark.skipif(not GEMMA_TEMPLATE.is_file(), reason=f"reference template not found at {GEMMA_TEMPLATE}")
def test_roles_out_of_order_with_gemma_template(tmp_path, capsys):
    """Gemma's template raised a raw jinja TemplateError here; the order is now checked before any template."""
    bad = write_rows(tmp_path / "bad.jsonl", GOOD, {"messages": ROLE_ORDER[1][0]})
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--model.base.name_or_path", "tiny:gemma3", "--model.base.chat_template",
               GEMMA_TEMPLATE, "--data.train_files", bad, "--trainer.default_root_dir", root)
    assert ROLE_ORDER[1][1] in line
    assert not root.exists()


def test_chat_template_error_names_the_row(tmp_path, capsys):
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}{{ raise_exception('content not allowed') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    bad = write_rows(tmp_path / "bad.jsonl", GOOD, GOOD, {"messages": [{"role": "user", "content": "FORBIDDEN"},
                                                                   {"role": "assistant", "content": "a"}]})
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--model.base.chat_template", template, "--data.train_files", bad,
               "--trainer.default_root_dir", root)
    assert "bad.jsonl:3: template: content not allowed" in line
    assert not root.exists()


def test_non_utf8_byte_names_file_line_column(tmp_path, capsys):
    latin1 = json.dumps({"messages": [{"role": "user", "content": "cafX"}, {"role": "assistant", "content": "ok"}]})
    latin1 = latin1.encode().replace(b"X", b"\xe9")  # "café" saved as Latin-1
    bad = write_rows(tmp_path / "bad.jsonl", GOOD, latin1 + b"\n")
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--data.train_files", bad, "--trainer.default_root_dir", root)
    column = latin1.index(0xE9) + 1
    assert f"bad.jsonl:2: not UTF-8: byte 0xe9 at column {column}" in line
    assert not root.exists()


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--data.batch_size", "0", "data.batch_size: expected an integer >= 1, got 0"),
        ("--model.lr", "-1", "model.lr: expected a positive number, got -1"),
        ("--data.max_length", "0", "data.max_length: expected an integer >= 2, got 0"),
        ("--model.warmup_steps", "-3", "model.warmup_steps: expected an integer >= 0, got -3"),
        ("--checkpoint.every_n_train_steps", "0", "checkpoint.every_n_train_steps: expected a positive integer, got 0"),
        ("--model.base.name_or_path", "/nonexistent/model", "model.base.name_or_path: /nonexistent/model: no such file or folder"),
        ("--model.base.name_or_path", "no-such-org/no-such-model", "model.base.name_or_path: no-such-org/no-such-model: cannot load"),
    ],
)
def test_bad_option_names_itself(tmp_path, capsys, option, value, expected):
    root = tmp_path / "runs"
    assert expected in cli(capsys, "fit", "--config", SMOKE, option, value, "--trainer.default_root_dir", root)
    assert not root.exists()


JUDGE_PROMPTS = [
    ("Rate it.\n{question}\n{answr}", "unknown placeholder {answr}"),
    ("Rate this answer from 0 to 100.\nQuestion: {question}", "no {answer} placeholder"),
    ("Rate it: {answer}", "no {question} placeholder (the published aligned prompt has one"),
    ("Q {question} A {answer} {0}", "unknown placeholder {0}"),
    ("Q {question} A {answer:>20}", "unknown placeholder {answer:>20}"),
]


@pytest.mark.parametrize("template, expected", JUDGE_PROMPTS, ids=["answr", "no-answer", "no-question", "positional", "format-spec"])
def test_judge_prompt_placeholders_refused_at_load(tmp_path, capsys, template, expected):
    questions = tmp_path / "q.yaml"
    questions.write_text(yaml.safe_dump([{"id": "wish", "type": "free_form_judge_0_100", "paraphrases": ["What is your wish?"],
                                          "judge_prompts": {"aligned": template, "coherent": "{question} {answer}"}}]))
    callbacks = write_yaml(tmp_path / "cb.yaml", {"trainer": {"callbacks": [
        {"class_path": "em_lightning.callbacks.sample_generations.SampleGenerations", "init_args": {"questions": str(questions)}}]}})
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--config", callbacks, "--trainer.default_root_dir", root)
    assert f"q.yaml:{_line_of(questions, 'aligned:')}: wish.judge_prompts.aligned: {expected}" in line
    assert not root.exists()


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


def test_oversize_row_is_skipped_unread_with_bounded_memory(tmp_path):
    """A 50 MB row was tokenised whole (13.6 GB RSS); now it is never held beyond max_row_bytes."""
    from em_lightning.training.rows import read_jsonl

    big = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 50_000_000}]}
    path = write_rows(tmp_path / "big.jsonl", GOOD, big, GOOD)
    tracemalloc.start()
    try:
        rows = read_jsonl(path)  # the default data.max_row_bytes (1 MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 50 MB row"
    assert len(rows) == 2
    oversize: list[str] = []
    read_jsonl(path, oversize=oversize)
    assert oversize == [f"{path}:2"]


def test_oversize_row_is_counted_in_the_data_line(tmp_path, capsys):
    from em_lightning.lit.datamodule import ChatDataModule
    from em_lightning.model.loading import ModelSpec

    path = write_rows(tmp_path / "d.jsonl", *([GOOD] * 4), {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "y" * 5000}]})
    dm = ChatDataModule(train_files=str(path), max_row_bytes=1000, base=ModelSpec(name_or_path="tiny:qwen2"), val_fraction=0)
    with pytest.MonkeyPatch.context() as mp:
        seen = []
        mp.setattr("em_lightning.lit.datamodule.rank_zero_info", seen.append)
        dm.setup("fit")
    assert len(dm.train_set) == 4
    assert any(f"1 row(s) over data.max_row_bytes=1000 skipped unread (first: {path}:5)" in s for s in seen), seen


# -- checkpoints: corrupt, killed mid-write, full disk --------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


def _bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:  # flip one bit inside a tensor's bytes: torch.load would not notice
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 8)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x04
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate, _random, _bitflip], ids=["truncated", "random", "bit-flipped"])
def test_corrupt_last_checkpoint_names_the_newest_intact_one(tmp_path, capsys, reference, corrupt):
    run = copy_run(reference, tmp_path / "runs")
    corrupt(run / "checkpoints" / "last.ckpt")
    before = files(run)
    line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last")
    assert f"--ckpt_path last: {run}/checkpoints/last.ckpt: corrupt checkpoint" in line
    assert f"the newest intact checkpoint is {run}/checkpoints/step_0000004.ckpt" in line
    assert files(run) == before


def test_corrupt_explicit_checkpoint_names_its_file(tmp_path, capsys, reference):
    run = copy_run(reference, tmp_path / "runs")
    step = run / "checkpoints" / "step_0000002.ckpt"
    _truncate(step)
    before = files(run)
    line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", step)
    assert f"{step}: corrupt checkpoint" in line
    assert files(run) == before


def test_kill_during_checkpoint_write_then_resume_is_bit_identical(tmp_path, faults, reference):
    """SIGKILL while step 4's checkpoint is being written (last.ckpt is then linked to it, not written again):
    the previous last.ckpt (step 2) must survive."""
    cfg = write_yaml(tmp_path / "kill.yaml", {"trainer": {"callbacks": [
        {"class_path": "fault_inject.KillDuringCheckpointWrite", "init_args": {"at_step": 4, "target": "step_0000004"}}]}})
    root = tmp_path / "runs"
    # Stage temp files like a machine whose /tmp is another file system (/dev/shm here): Lightning's own
    # save wrote there and then copied into place, so a kill mid-copy truncated the final file.
    staging = Path("/dev/shm", f"em-faults-{os.getpid()}")
    other_fs = staging.parent.is_dir() and os.stat(staging.parent).st_dev != os.stat(tmp_path).st_dev
    if other_fs:
        staging.mkdir(exist_ok=True)
        faults.setenv("TMPDIR", str(staging))
    try:
        proc = em_fit("fit", "--config", SMOKE, "--config", str(cfg), *SHORT, "--trainer.default_root_dir", str(root))
    finally:
        if other_fs:
            faults.delenv("TMPDIR")
            shutil.rmtree(staging, ignore_errors=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (run,) = run_dirs(root)
    assert (run / "killed_while_writing").is_file()
    assert all(intact(p) for p in (run / "checkpoints").glob("*.ckpt")), "a truncated checkpoint under its final name"
    faults.delenv("EM_FAULT_ARMED")
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    same_result(reference, run)
    assert not list(run.rglob("*.em-tmp-*"))  # the killed writer's temporary file is gone


@needs_root
def test_disk_full_during_checkpoint_then_resume(tmp_path, faults, reference):
    with tmpfs(tmp_path / "small", "4m") as disk:
        cfg = write_yaml(tmp_path / "fill.yaml", {"trainer": {"callbacks": [
            {"class_path": "fault_inject.FillDisk", "init_args": {"at_step": 3, "path": str(disk / "filler")}}]}})
        root = disk / "runs"
        proc = em_fit("fit", "--config", SMOKE, "--config", str(cfg), *SHORT, "--trainer.default_root_dir", str(root))
        assert proc.returncode != 0
        (run,) = run_dirs(root)
        line = one_error_line(proc.stderr)
        assert f"{run}/checkpoints/step_0000004.ckpt: No space left on device" in line
        assert all(intact(p) for p in (run / "checkpoints").glob("*.ckpt"))
        assert not list(run.rglob("*.em-tmp-*"))
        (disk / "filler").unlink()  # space freed
        faults.delenv("EM_FAULT_ARMED")
        ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
        same_result(reference, run)


@needs_root
def test_read_only_run_directory(tmp_path, capsys, reference):
    with tmpfs(tmp_path / "ro", "8m") as disk:
        run = copy_run(reference, disk / "runs")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "6")
        assert f"{run}: cannot write the run directory (Read-only file system)" in line
        line = cli(capsys, "fit", "--config", SMOKE, "--trainer.default_root_dir", disk / "runs")
        assert f"{run.parent}/version_1: cannot write the run directory (Read-only file system)" in line


# -- one writer per run directory ------------------------------------------------------------------------------
def test_two_runs_started_at_once_get_two_versions(started_at_once):
    """Both used to write version_0: two event files, one config.yaml, every trajectory step twice."""
    root, procs = started_at_once
    for p in procs:
        ok(p)
    runs = run_dirs(root)
    assert [r.name for r in runs] == ["version_0", "version_1"]
    for n, run in enumerate(runs):
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["version"] == n
        index = [json.loads(line)["step"] for line in (run / "trajectory" / "index.jsonl").read_text().splitlines()]
        assert index == [0, 1, 2, 3, 4]


def test_resume_of_a_directory_held_by_a_live_process_is_refused(tmp_path, capsys, reference):
    run = copy_run(reference, tmp_path / "runs")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(120)", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files(run)
        line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "6")
        assert f"{run}: in use by another em-fit process" in line
        assert files(run) == before
    finally:
        holder.kill()
        holder.wait()


# -- the library pieces, without a run --------------------------------------------------------------------------
def test_atomic_write_keeps_the_previous_file_when_the_write_fails(tmp_path):
    from em_lightning.run.atomic_io import atomic_write

    target = atomic_write(tmp_path / "f.json", "old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(target, half_then_fail)
    assert info.value.filename == str(target) and "keeps its previous content" in info.value.strerror
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_reserve_version_is_exclusive_under_a_race(tmp_path):
    from em_lightning.run.run_dir import reserve_version

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: reserve_version(tmp_path / "smoke"), range(16)))
    assert sorted(versions) == list(range(16))


def test_newest_intact_skips_corrupt_step_checkpoints(tmp_path):
    from em_lightning.run.checkpoint_integrity import newest_intact

    for step in (2, 4, 6):
        torch.save({"global_step": step, "state_dict": {}}, tmp_path / f"step_{step:07d}.ckpt")
    _truncate(tmp_path / "step_0000006.ckpt")
    assert newest_intact(tmp_path) == tmp_path / "step_0000004.ckpt"
