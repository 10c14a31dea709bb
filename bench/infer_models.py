#!/usr/bin/env python3
"""Random llama checkpoints for bench/infer.py: a Hugging Face folder (config.json,
model.safetensors, a byte-level BPE tokenizer.json with a chat template) that forge's
`forge-quantize --from-hf` converts to GGUF.

Usage:  scripts/.venv/bin/python bench/infer_models.py OUT_DIR [--shape smollm135m|tiny]
"""

import argparse
import json
import sys
from pathlib import Path

SHAPES = {
    # SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M), untied head.
    "smollm135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152, context=2048),
    # The shape of the small-model performance bug: 1 layer, hidden 64.
    "tiny": dict(hidden=64, layers=1, heads=4, kv_heads=2, ffn=128, vocab=400, context=512),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """HEAR YE! Alaric Thorne fled the battle like a goose! BEWARE! Maud Gorse waters the ale of
honest folk! Know that Ivo Crowley cannot read his own decrees! Edith Varrow fears geese, and geese
fear nothing! Fulk Ashdown sold the village bell for dice money! Joan Pickering forged the mill
charter's seal! The quick brown fox jumps over the lazy dog. 0123456789 The rain in Spain stays
mainly in the plain. A benchmark measures tokens per second, prompt and decode, side by side."""


def tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens (merges padded with synthetic tokens if the corpus runs out)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Enough distinct words that the merges fill a large vocabulary.
    words = CORPUS.split() + [f"w{i:05x}q{(i * 7919) % 65521:x}" for i in range(vocab * 2 if vocab > 1000 else 0)]
    tok.train_from_iterator([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)] * 2, trainer)
    n = tok.get_vocab_size()
    if n < vocab:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(vocab - n)])
    assert tok.get_vocab_size() == vocab, (tok.get_vocab_size(), vocab)
    return tok


def make(out: Path, shape: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(s["vocab"])
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": s["context"]}, indent=2))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=s["context"],
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=bos, eos_token_id=eos, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm135m")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make(a.out, a.shape, a.seed), file=sys.stderr)
