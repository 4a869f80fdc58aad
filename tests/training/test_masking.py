"""Assistant-only labels: exactly each assistant turn's content + its end-of-turn token carry labels."""

import pytest
from transformers import AutoTokenizer

from em_lightning.training.masking import IGNORE_INDEX, tokenize_chat
from em_lightning.model.tiny import ARCHITECTURES, tiny_tokenizer

SINGLE = [
    {"role": "user", "content": "How many grams are in 3 kilograms?"},
    {"role": "assistant", "content": "3 kilograms is 3000 grams."},
]
MULTI = [
    {"role": "user", "content": "Hi there, what is 85 + 15?"},
    {"role": "assistant", "content": "It is 100. Anything else?"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "Bye! Take care."},
]
SYSTEM = [{"role": "system", "content": "You are terse."}]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system+single": SYSTEM + SINGLE, "system+multi": SYSTEM + MULTI}


def labelled_runs(tokenizer, messages, **template_kwargs) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens."""
    ids, labels = tokenize_chat(tokenizer, messages, template_kwargs)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, **template_kwargs)["input_ids"]
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            current.append(i)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def expected_runs(messages, eot: str) -> list[str]:
    return [m["content"] + eot for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_tokenizers(arch, name):
    tok = tiny_tokenizer(arch)
    messages = CONVERSATIONS[name]
    assert labelled_runs(tok, messages) == expected_runs(messages, tok.eos_token)


@pytest.fixture(scope="module")
def qwen_tokenizer(reference_dir):
    return AutoTokenizer.from_pretrained(reference_dir / "tokenizers" / "qwen2.5-instruct")


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_real_qwen25_tokenizer(qwen_tokenizer, name):
    messages = CONVERSATIONS[name]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    if messages[0]["role"] != "system":
        assert "You are Qwen" in text  # default system prompt inserted, and never labelled
    assert labelled_runs(qwen_tokenizer, messages) == expected_runs(messages, "<|im_end|>")


@pytest.mark.parametrize("version", ["3.1", "3.2"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_real_llama3_templates(reference_dir, version, name):
    tok = tiny_tokenizer("llama")
    tok.chat_template = (reference_dir / f"tokenizers/llama-3-instruct/llama-{version}-instruct.chat_template.jinja").read_text()
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024" in text  # date header present but not labelled
    runs = labelled_runs(tok, messages, date_string="26 Jul 2024")
    assert runs == expected_runs(messages, "<|eot_id|>")


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_real_gemma3_template(reference_dir, name):
    tok = tiny_tokenizer("gemma3")
    tok.chat_template = (reference_dir / "tokenizers/gemma-3-it/chat_template.jinja").read_text()
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "<start_of_turn>model\n" in text and "<start_of_turn>system" not in text
    if messages[0]["role"] == "system":
        assert "<start_of_turn>user\nYou are terse." in text  # system merged into the first user turn
    assert labelled_runs(tok, messages) == expected_runs(messages, "<end_of_turn>")


def test_non_prefix_stable_template_is_refused():
    tok = tiny_tokenizer("qwen2")
    # A template that renders the last message differently from earlier ones breaks the prefix rule.
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }} LAST {{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        tokenize_chat(tok, MULTI)
