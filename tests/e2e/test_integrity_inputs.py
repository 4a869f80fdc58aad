"""Issue 17, item 6 (helper 17b's rows): inputs that used to give a traceback or a silent overwrite now give
one ``em-fit: error:`` line and write nothing: a non-linear target module, a question file with a Python
tag (eval and fit), export-step / eval --out into a run's own records, and a data mirror that streams more
than the registry's size."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clirun import SMOKE
from em_lightning.published.registry import BY_NAME
from test_faults import cli

PYTHON_TAG = """\
- id: lamp
  type: free_form_judge_0_100
  paraphrases: !!python/object/apply:os.system ["echo should-never-run"]
"""


def test_target_module_that_is_not_linear_is_one_line(tmp_path, capsys):
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--model.adapter.target_modules", "[mlp]",
               "--trainer.default_root_dir", root)
    assert ("model.adapter.target_modules: 'mlp' is a Qwen2MLP, not a linear layer; linear layers here: q_proj, "
            "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head") in line
    line = cli(capsys, "fit", "--config", SMOKE, "--model.adapter.target_modules", "[down_prj]",
               "--trainer.default_root_dir", root)
    assert "model.adapter.target_modules: 'down_prj' matches no module of the model; linear layers here: q_proj" in line


def _python_tag_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.yaml"
    path.write_text(PYTHON_TAG)
    return path


def test_python_tag_in_questions_is_one_line_in_eval(tmp_path, capsys):
    questions = _python_tag_file(tmp_path)
    line = cli(capsys, "eval", "--base", "tiny:qwen2", "--questions", questions, "--out", tmp_path / "out")
    assert f"{questions}:3: yaml: could not determine a constructor for the tag" in line
    assert "python/object/apply:os.system" in line and not (tmp_path / "out").exists()


def test_python_tag_in_questions_is_one_line_in_fit(tmp_path, capsys):
    questions = _python_tag_file(tmp_path)
    config = tmp_path / "callbacks.yaml"
    config.write_text("trainer:\n  callbacks+:\n  - class_path: em_lightning.callbacks.SampleGenerations\n"
                      f"    init_args:\n      questions: {questions}\n")
    line = cli(capsys, "fit", "--config", SMOKE, "--config", config, "--trainer.default_root_dir", tmp_path / "runs")
    assert f"{questions}:3: yaml: could not determine a constructor for the tag" in line
    assert "Union subtypes" not in line


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """What a finished run holds that these commands could overwrite (config.yaml marks a run directory)."""
    run = tmp_path / "runs" / "smoke" / "version_0"
    for folder in ("adapter", "generations"):
        (run / folder).mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"final adapter")
    (run / "generations" / "step_0000005.jsonl").write_text('{"judged": true}\n')
    return run


@pytest.mark.parametrize("out, folder", [("adapter", "adapter"), ("adapter/sub", "adapter"),
                                         ("generations", "generations"), ("./adapter", "adapter")])
def test_export_step_refuses_the_runs_own_folders(run_dir, capsys, out, folder):
    line = cli(capsys, "export-step", run_dir, "5", f"{run_dir}/{out}")
    assert f"OUT_DIR {run_dir}/{out}: that is the run's own {folder}/ folder" in line and "--overwrite" in line
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"final adapter"


def test_eval_out_refuses_the_runs_generations(run_dir, capsys):
    line = cli(capsys, "eval", "--run", run_dir, "--questions", "configs/questions/demo_questions.yaml",
               "--out", run_dir / "generations")
    assert f"--out {run_dir}/generations: that is the run's own generations/ folder" in line
    assert (run_dir / "generations" / "step_0000005.jsonl").read_text() == '{"judged": true}\n'


def test_export_step_overwrite_passes_the_guard(run_dir, capsys):
    line = cli(capsys, "export-step", run_dir, "5", run_dir / "adapter", "--overwrite")
    assert "no trajectory at" in line  # past the guard: this fake run has no trajectory to export from


class _Flood:
    """A mirror that answers every GET with ``n`` bytes (no Content-Length) and counts what it got to send."""

    def __init__(self, n: int):
        self.n, self.sent = n, 0
        flood = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.end_headers()
                chunk = b"x" * (1 << 16)
                try:
                    while flood.sent < flood.n:
                        self.wfile.write(chunk)
                        flood.sent += len(chunk)
                except OSError:  # the client stopped reading and closed
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_data_fetch_stops_at_the_registry_size(tmp_path, capsys):
    entry = BY_NAME["first-plot-questions"]
    flood = _Flood(256 << 20)  # 256 MB for a 19,000-byte file
    try:
        line = cli(capsys, "data", "fetch", "first-plot-questions", "--dir", tmp_path, "--base-url", flood.url)
    finally:
        flood.httpd.shutdown()
        flood.httpd.server_close()
    assert f"first-plot-questions: download stopped: {flood.url}/{entry.url_path} sends more than the " \
           f"registry's {entry.size} bytes" in line
    assert sorted(tmp_path.rglob("*")) == []
    assert flood.sent < 32 << 20  # the client hung up long before the end (socket buffers hold a few MB)
