"""A GGUF base as a newcomer meets it: the exported adapter names a base AutoPeftModelForCausalLM loads (the
converted folder; the conversion is faked with a tiny model), the GGUF metadata's hub id is recorded, every
load prints the folder, and `em-fit cache list/clean` show and free the cache."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from clirun import em_fit

from em_lightning.model import gguf_cache
from em_lightning.model.adapters import AdapterSpec, apply_adapter
from em_lightning.model.gguf_cache import SOURCE_FILE, cache_entries, cached_fp32_folder, exported_base, source_hub_id
from em_lightning.model.tiny import tiny_model, tiny_tokenizer


def _fake_convert(gguf, out):  # a real HF folder, as convert_gguf writes one
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer("llama").save_pretrained(out)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "convert_gguf", _fake_convert)
    monkeypatch.setattr(gguf_cache, "_announced", set())
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF fake")
    return f


def test_export_names_a_base_auto_peft_loads(cache, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    name, revision = exported_base(str(cache), None, "main")
    folder = cached_fp32_folder(cache)
    assert name == str(folder) and revision is None
    assert f"m.gguf -> fp32 folder {folder}" in capsys.readouterr().err
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(folder), AdapterSpec(r=1, target_modules=["down_proj"], layers=[1]))
    config = model.peft_config["default"]
    config.base_model_name_or_path = name
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.fill_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["gguf"] == str(cache.resolve()) and len(source["sha256"]) == 64 and source["source_hub_id"] is None


def test_hub_id_is_read_from_gguf_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    for key, value, expected in (("general.source.huggingface.repository", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                 ("general.source.url", "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/tree/main",
                                  "Qwen/Qwen2.5-0.5B-Instruct"),
                                 ("general.name", "not a repo", None)):
        path = tmp_path / f"{len(value)}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert source_hub_id(path) == expected, key
    assert source_hub_id(tmp_path / "missing.gguf") is None


@pytest.mark.slow
def test_cache_list_and_clean(cache, tmp_path):
    folder = cached_fp32_folder(cache)
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"GGUF other")
    orphan = cached_fp32_folder(gone)
    gone.unlink()
    assert {e["folder"]: e["stale"] is None for e in cache_entries()} == {folder: True, orphan: False}
    listed = em_fit("cache", "list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert str(folder) in listed.stdout and str(orphan) in listed.stdout and "no GGUF file with this content" in listed.stdout
    cleaned = em_fit("cache", "clean", timeout=60)
    assert cleaned.returncode == 0 and f"removed {orphan}" in cleaned.stdout
    assert folder.is_dir() and not orphan.exists()
    em_fit("cache", "clean", "--all", timeout=60)
    assert not folder.exists() and cache_entries() == []
