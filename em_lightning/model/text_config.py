"""The language model's part of a model config: multimodal configs (Gemma-3-it) nest it."""


def text_config(config):
    """The language model's settings: ``text_config`` of multimodal configs (Gemma-3-it), else the config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config
