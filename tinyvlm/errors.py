"""Errors that tinyvlm raises for bad input. The CLI prints each as one line and exits with code 2."""


class TinyVLMError(Exception):
    """Base class: a problem with the user's input (files, images, prompts), never a bug in tinyvlm."""


class ModelNotFound(TinyVLMError):
    """A model directory or Hugging Face cache entry does not exist."""


class WeightsError(TinyVLMError):
    """A weight file is missing, truncated, malformed, unsafe, or does not match the expected layout."""


class ConfigError(TinyVLMError):
    """config.json is missing, unreadable, or names something tinyvlm does not support."""


class TokenizerError(TinyVLMError):
    """No usable tokenizer files, or a malformed one."""


class ImageError(TinyVLMError):
    """An image that cannot be read or is too small to use."""


class PromptError(TinyVLMError):
    """A prompt that does not fit the context, or is otherwise unusable."""
