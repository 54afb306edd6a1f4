"""A T5-style subword vocabulary trained on a local corpus, for models built from scratch.

T5 reads SentencePiece unigram pieces; its own vocabulary cannot be downloaded here, so the
miniature experiment (variator_jax/stages.py) trains a subword vocabulary (byte-pair merges,
which on a corpus this small split words more sensibly than a unigram model did) on the text
it has, with T5's conventions: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, pieces, then 100
sentinels with `<extra_id_0>` as the last id (span corruption, data.sentinel_ids). Words start
with "▁" (SentencePiece's metaspace), so decoding restores the spaces.

  >>> tok = train_tokenizer(["def f(x): return x", "the cat sat"] * 50, 300, "/tmp/vocab")
  >>> tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<extra_id_0>")
  (0, 1, 299)

The directory written holds `tokenizer.json` and its config: `data.load_tokenizer(DIR)` and
`transformers.AutoTokenizer.from_pretrained(DIR)` load it, and `save_hf_t5` copies can sit
beside a backbone like any HF tokenizer.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

SPECIALS = ("<pad>", "</s>", "<unk>")
SENTINELS = 100


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: str):
    """Trains a BPE vocabulary of `vocab_size` ids in all (specials and sentinels included)
    on `texts`, saves it to `directory`, and returns the HF tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    pieces = vocab_size - SENTINELS
    if pieces <= len(SPECIALS) + 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for pieces beside "
                         f"{len(SPECIALS)} specials and {SENTINELS} sentinels")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=pieces, special_tokens=list(SPECIALS),
                                  min_frequency=2)
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != pieces:  # A small corpus can have fewer pieces than asked.
        raise ValueError(f"the corpus yields {tok.get_vocab_size()} pieces, fewer than the "
                         f"{pieces} asked for: lower vocab_size")
    # T5's order: <extra_id_0> is the last id, <extra_id_99> the first after the pieces.
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(SENTINELS))])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=[f"<extra_id_{i}>" for i in range(SENTINELS)])
    os.makedirs(directory, exist_ok=True)
    hf.save_pretrained(directory)
    return hf
