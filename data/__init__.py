"""nanollama data: pretraining token memmaps, SFT memmaps, conversation/preference readers.

    from data import load_tokens, SFTDataset, read_conversations, read_preferences
See data/prepare.py (pretraining memmaps), data/sft_prepare.py (SFT memmaps) and data/formats.py
(conversation and preference formats) for the on-disk formats. data/lab.py is the lab world.
"""
from data.formats import (  # noqa: F401
    FormatError, Report, check_conversation, iter_conversations, iter_preferences, read_conversations,
    read_preferences, response_conversations, split_hh, to_messages, to_preference,
)
from data.prepare import check_tokenizer, load_tokens, read_meta, token_dtype  # noqa: F401
from data.sft_prepare import SFTDataset  # noqa: F401
