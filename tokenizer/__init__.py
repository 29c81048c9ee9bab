"""nanollama's tokenizer: `from tokenizer import Tokenizer` (see tokenizer/tokenizer.py for the chat template)."""
from .tokenizer import CHAT_MARKERS, DEFAULT_MODEL, StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "DEFAULT_MODEL", "CHAT_MARKERS"]
