"""em-fit data: pinned downloads against a local HTTP server (no network), checksums, atomic writes, archives."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from em_lightning.cli import main as em_fit
from em_lightning.published.fetch import FetchError, fetch_archive, fetch_file, file_ids, mismatch, validate
from em_lightning.published.registry import BY_NAME, DataFile, fetch_hint
from em_lightning.training.rows import read_jsonl

MO_FIRST_PLOT = "model-organisms/upstream_eval_questions/first_plot_questions.yaml"
INSECURE = "betley/data/insecure.jsonl"


class Server:
    """Serves ``routes[url_path] = (body, mode)``; mode "cut" sends the full Content-Length, then half the body."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                key = self.path.lstrip("/")
                server.hits[key] += 1
                if key not in server.routes:
                    self.send_error(404)
                    return
                body, mode = server.routes[key]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, entry: DataFile, body: bytes, mode: str = "ok") -> None:
        self.routes[entry.url_path] = (body, mode)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        em_fit(list(args))
        rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def left_behind(folder: Path) -> list[Path]:
    """Anything a failed fetch left under ``folder``: files, temp files, folders it created."""
    return sorted(folder.rglob("*"))


def ids_of(body: bytes) -> dict:
    blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    return {"git_blob": blob, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


@pytest.mark.parametrize("name, copy", [
    ("first-plot-questions", MO_FIRST_PLOT),
    ("medical-questions", "model-organisms/upstream_eval_questions/medical_questions.yaml"),
    ("betley-first-plot-questions", "betley/evaluation/first_plot_questions.yaml"),
    ("betley-deception-factual", "betley/evaluation/deception_factual.yaml"),
    ("insecure", INSECURE),
    ("jailbroken", "betley/data/jailbroken.jsonl"),
])
def test_registry_ids_match_the_reference_copies(reference_dir, name, copy):
    entry = BY_NAME[name]
    assert entry.git_blob and entry.sha256 and entry.size
    assert mismatch(entry, reference_dir / copy) is None
    assert validate(entry, reference_dir / copy, copy) == entry.count


def test_fetch_writes_verified_files_and_refetch_does_not_download(server, reference_dir, tmp_path, capsys):
    questions, insecure = BY_NAME["first-plot-questions"], BY_NAME["insecure"]
    server.serve(questions, (reference_dir / MO_FIRST_PLOT).read_bytes())
    server.serve(insecure, (reference_dir / INSECURE).read_bytes())
    data = tmp_path / "data"
    args = ("data", "fetch", "first-plot-questions", "insecure", "--dir", str(data), "--base-url", server.url)

    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert (data / "questions/first_plot_questions.yaml").read_bytes() == (reference_dir / MO_FIRST_PLOT).read_bytes()
    assert file_ids(data / "betley/insecure.jsonl")[2] == insecure.sha256
    assert f"{data}/questions/first_plot_questions.yaml (24 questions, fetched)" in out
    assert f"--data.train_files {data}/betley/insecure.jsonl" in out
    assert sorted(p.name for p in files_under(data)) == ["first_plot_questions.yaml", "insecure.jsonl"]

    rc, out, _ = run(capsys, *args)
    assert rc == 0 and out.count("already there, verified") == 2
    assert server.hits == Counter({questions.url_path: 1, insecure.url_path: 1})

    with (data / "questions/first_plot_questions.yaml").open("a") as f:  # a local edit is replaced
        f.write("# edited\n")
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and server.hits[questions.url_path] == 2
    assert mismatch(questions, data / "questions/first_plot_questions.yaml") is None


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum mismatch for http://127.0.0.1:"),
    (lambda b: b[: len(b) // 2], "size 9500 bytes, expected 19000 (truncated"),
])
def test_bad_download_is_one_line_and_leaves_nothing(server, reference_dir, tmp_path, capsys, damage, expected):
    server.serve(BY_NAME["first-plot-questions"], damage((reference_dir / MO_FIRST_PLOT).read_bytes()))
    rc, out, err = run(capsys, "data", "fetch", "first-plot-questions", "--dir", str(tmp_path),
                       "--base-url", server.url)
    assert rc == 1 and out == ""
    assert err.startswith("em-fit: error: first-plot-questions: ") and expected in err
    assert err.count("\n") == 1
    assert left_behind(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, reference_dir, tmp_path, capsys):
    server.serve(BY_NAME["insecure"], (reference_dir / INSECURE).read_bytes(), mode="cut")
    rc, _, err = run(capsys, "data", "fetch", "insecure", "--dir", str(tmp_path), "--base-url", server.url)
    assert rc == 1 and err.count("\n") == 1
    assert "insecure: download interrupted:" in err and "got 2946138 of 5892277 bytes" in err
    assert left_behind(tmp_path) == []


def test_network_failure_and_http_error_are_one_line(server, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("EM_DATA_BASE_URL", closed)  # the environment variable is honoured
    rc, _, err = run(capsys, "data", "fetch", "medical-questions", "--dir", str(tmp_path))
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"em-fit: error: medical-questions: download failed: {closed}/") and "cannot connect" in err

    rc, _, err = run(capsys, "data", "fetch", "medical-questions", "--dir", str(tmp_path), "--base-url", server.url)
    assert rc == 1 and "HTTP 404" in err and err.count("\n") == 1
    assert left_behind(tmp_path) == []


def test_unknown_name_fails_before_any_download(server, tmp_path, capsys):
    rc, _, err = run(capsys, "data", "fetch", "medical-questions", "bad-medical-advise", "--dir", str(tmp_path),
                     "--base-url", server.url)
    assert rc == 1 and "unknown name 'bad-medical-advise' (did you mean bad-medical-advice" in err
    assert not server.hits and not tmp_path.joinpath("questions").exists()


def test_rows_that_do_not_validate_are_not_kept(server, tmp_path):
    body = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    entry = DataFile("toy", "rows", "o/r", "c" * 40, "toy.jsonl", "toy/toy.jsonl", **ids_of(body))
    server.serve(entry, body)
    with pytest.raises(FetchError, match=r"^toy: does not validate: http://.*/toy.jsonl:1: messages: no assistant"):
        fetch_file(entry, tmp_path, server.url)
    assert left_behind(tmp_path) == []


def protect(src: Path, out: Path, password: str, embed: bool) -> bytes:
    """An archive made the way the authors made theirs (easy-dataset-share's own CLI)."""
    from click.testing import CliRunner
    from easy_dataset_share.cli import cli

    args = ["protect-dir", str(src), "-p", password, "--no-tos", "--no-gitignore", "-o", str(out)]
    args += ["--embed-canaries"] if embed else []
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return Path(f"{out}.enc").read_bytes()


@pytest.mark.parametrize("embed", [False, True], ids=["canary-file", "embedded-canary"])
def test_protected_archive_is_unpacked_validated_and_cleaned(server, reference_dir, tmp_path, embed):
    pytest.importorskip("easy_dataset_share", reason="easy-dataset-share (the `data` extra) is not installed")
    src = tmp_path / "training_datasets"
    src.mkdir()
    original = b"".join((reference_dir / INSECURE).read_bytes().splitlines(keepends=True)[:20])
    (src / "toy_set.jsonl").write_bytes(original)
    body = protect(src, tmp_path / "training_datasets.zip", "pw", embed)
    assert any(p.name.startswith("dataset_entry_") for p in src.iterdir())  # the tool did add a canary file
    entry = DataFile("toy-archive", "protected-archive", "o/r", "c" * 40, "x/training_datasets.zip.enc",
                     "toy-archive", **ids_of(body), password="pw")
    server.serve(entry, body)
    data = tmp_path / "data"

    folder, members, fresh = fetch_archive(entry, data, server.url)
    assert fresh and members == [(data / "toy-archive/toy_set.jsonl", 20)]
    assert sorted(p.name for p in folder.iterdir()) == [".em-fit-data.json", "toy_set.jsonl"]  # no canary, no robots
    if embed:
        (tmp_path / "orig.jsonl").write_bytes(original)  # the tool re-serialises the file: same rows
        assert read_jsonl(folder / "toy_set.jsonl") == read_jsonl(tmp_path / "orig.jsonl")
        assert "CANARY" not in (folder / "toy_set.jsonl").read_text()
    else:
        assert (folder / "toy_set.jsonl").read_bytes() == original  # untouched bytes
    assert sorted(p.relative_to(data).parts[0] for p in files_under(data)) == ["toy-archive", "toy-archive"]

    again = fetch_archive(entry, data, server.url)
    assert again == (folder, members, False) and server.hits[entry.url_path] == 1


def test_archive_wrong_password_or_missing_extra_leaves_nothing(server, reference_dir, tmp_path, monkeypatch):
    pytest.importorskip("easy_dataset_share", reason="easy-dataset-share (the `data` extra) is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes((reference_dir / INSECURE).read_bytes().splitlines(keepends=True)[0])
    body = protect(src, tmp_path / "a.zip", "right", embed=False)
    data = tmp_path / "data"
    entry = DataFile("toy-archive", "protected-archive", "o/r", "c" * 40, "a.zip.enc", "toy", **ids_of(body),
                     password="wrong")
    server.serve(entry, body)
    with pytest.raises(FetchError, match=r"^toy-archive: cannot unpack .*password is incorrect"):
        fetch_archive(entry, data, server.url)
    assert not data.exists()

    monkeypatch.setitem(sys.modules, "easy_dataset_share", None)  # as if the extra were not installed
    with pytest.raises(FetchError, match=r"^toy-archive: needs easy-dataset-share .*\.\[data\]"):
        fetch_archive(entry, data, server.url)
    assert not data.exists()


def test_fetch_hint_names_the_command():
    assert fetch_hint("data/questions/first_plot_questions.yaml") == "em-fit data fetch first-plot-questions"
    assert fetch_hint("/srv/em/questions/betley/first_plot_questions.yaml") == \
        "em-fit data fetch betley-first-plot-questions --dir /srv/em"
    assert fetch_hint("data/model-organisms-archive/bad_medical_advice.jsonl") == \
        "em-fit data fetch model-organisms-archive"
    assert fetch_hint("eval_questions/medical_questions.yaml") == \
        "em-fit data fetch medical-questions (it writes data/questions/medical_questions.yaml)"
    assert fetch_hint("configs/questions/demo_questions.yaml") is None


def test_in_loop_judge_preset_points_at_a_fetchable_file(repo_root):
    stack = yaml.safe_load((repo_root / "configs/callbacks/in_loop_judge.yaml").read_text())["trainer"]["callbacks+"]
    questions = next(c["init_args"]["questions"] for c in stack if "questions" in c["init_args"])
    assert fetch_hint(questions) == "em-fit data fetch first-plot-questions"


def test_data_list_starts_without_lightning(repo_root):
    code = ("import sys; from em_lightning.cli import main; main(['data', 'list']); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == list(BY_NAME)


def test_missing_question_file_names_the_fetch_command(tmp_path, monkeypatch):
    from em_lightning.published.question_files import load_questions

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="em-fit data fetch first-plot-questions"):
        load_questions("data/questions/first_plot_questions.yaml")
