#!/usr/bin/env python3
"""Regenerate units/demo/model/: a tiny, weight-less model directory.

Dynamo's frontend and mocker need only a tokenizer, a chat template and a
config.json (the mocker never loads weights), so the demo stack can run on a
CPU-only machine without touching a model hub.

What it writes (a few tens of KB in all):

* tokenizer.json        byte-level BPE (GPT-2/Qwen style), 512 ids: 256 byte
                        symbols, merges learned from the fixed corpus below,
                        then the special tokens <|endoftext|>, <|im_start|>,
                        <|im_end|> at the top of the vocabulary.
* tokenizer_config.json ChatML chat template, eos/pad/bos tokens.
* config.json           a Llama-shaped config (2 layers, hidden 64), whose
                        vocab_size equals the tokenizer's size.
* generation_config.json eos/bos ids.

The output is deterministic: the BPE trainer is fed a fixed corpus and the
JSON files are written with sorted keys; run it twice and the bytes match.

Usage: python tools/make_tiny_model.py [OUT_DIR]   (default units/demo/model)
It needs only the `tokenizers` package (a dependency of ai-dynamo).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_NAME = "dynsup/tiny-demo"

# ChatML, as Qwen2 uses it. Content may be a plain string or OpenAI's list of
# {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A fixed training corpus: enough English and code-ish text for a few hundred
# merges. Changing it changes the tokenizer.
_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "dynsup supervises etcd, nats-server, the Dynamo frontend and its workers.",
    "A process supervisor starts programs, watches them, and restarts them when they fail.",
    "The model answers questions about the weather, the time, and the meaning of life.",
    "user assistant system: You are a helpful assistant. Answer briefly and clearly.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a small robot who learned to serve tokens quickly.",
    "def main():\n    print('hello world')\n    return 0\n",
    "for i in range(10):\n    total += i * i\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 2024 3.14",
    "inference, tokenizer, prefill, decode, router, cache, block, request, response",
    "Once upon a time there was a tiny model that lived in a repository.",
    "It had no weights at all, only a vocabulary and a chat template.",
    "Every morning it greeted the frontend, and every evening it said goodbye.",
]
CORPUS = [line for _ in range(4) for line in _CORPUS_LINES]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Specials last, so ids 0..255+merges are ordinary tokens.
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    out = Path(argv[1]) if len(argv) > 1 else root / "units" / "demo" / "model"
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if vocab_size != VOCAB_SIZE or None in ids.values():
        raise SystemExit(f"unexpected tokenizer: size {vocab_size}, specials {ids}")

    # Re-serialise with sorted keys so the bytes do not depend on map order.
    _dump(out / "tokenizer.json", json.loads(tok.to_str()))

    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _dump(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 2048,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )

    eos = ids["<|im_end|>"]
    bos = ids["<|endoftext|>"]
    _dump(
        out / "config.json",
        {
            "_name_or_path": MODEL_NAME,
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": vocab_size,
        },
    )
    _dump(
        out / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": [eos, bos], "max_new_tokens": 64},
    )
    print(f"wrote {out} (vocab {vocab_size}, eos {eos})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
