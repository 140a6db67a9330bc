"""Tokenizers of HF and Tessera directories: ids equal transformers' on a multilingual sample.

Tokenizers are trained here on a small sample (never downloaded): a byte-level BPE saved as
tokenizer.json (the Llama 3 / Qwen2 kind) and a sentencepiece BPE tokenizer.model with byte
fallback (the Llama 2 / Mistral kind).
"""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from interop.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer_dir  # noqa: E402

SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis.",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Τάχιστη αλώπηξ βαφής ψημένη γη, δρασκελίζει υπέρ νωθρού κυνός.",
    "敏捷的棕色狐狸跳过了懒狗。我们一起学习自然语言处理。",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले",
    "def f(x):\n\treturn x  **  2  # spaces   and\ttabs 🙂🚀 ünïcödé 123456",
]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Réponds en français."},
            {"role": "user", "content": "Wie geht's? 你好"}]


def write_bpe_tokenizer(path, vocab_size: int = 600) -> None:
    """A byte-level BPE (as Llama 3 / Qwen2) with BOS/EOS and a chat template, saved the way
    transformers saves it (tokenizer.json, tokenizer_config.json, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)


def write_sentencepiece(path, vocab_size: int = 700) -> None:
    """A sentencepiece BPE with byte fallback and no whitespace folding, as Llama 2's, plus the
    tokenizer_config.json an HF Llama 2 / Mistral directory carries."""
    import sentencepiece as spm
    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE * 4), model_prefix=str(path / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    (path / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    write_bpe_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    write_sentencepiece(path)
    return path


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_ids_match_transformers(kind, bpe_dir, sp_dir):
    path = bpe_dir if kind == "bpe" else sp_dir
    ours = load_tokenizer_dir(path)
    assert isinstance(ours, HFTokenizer if kind == "bpe" else SentencePieceTokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.add_bos  # a BOS post-processor (bpe) or add_bos_token true (sentencepiece)
    for text in SAMPLE:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_bos=True) == theirs.encode(text), text
        assert ours.encode(text, add_bos=ours.add_bos) == theirs(text)["input_ids"], text  # BOS as configured
        assert ours.decode(ids) == text
        assert ours.decode(ours.encode(text, add_bos=True) + [ours.eos_id]) == text
    multi = "\n".join(SAMPLE)
    assert ours.encode(multi) == theirs.encode(multi, add_special_tokens=False)
    assert ours.encode_batch(SAMPLE) == [ours.encode(t) for t in SAMPLE]
    # Bytes per token add up to the text's UTF-8 length (+1 for sentencepiece's dummy-prefix space).
    nbytes = ours.token_bytes()
    prefix = 1 if kind == "sentencepiece" else 0
    for text in SAMPLE:
        assert nbytes[ours.encode(text, add_bos=True) + [ours.eos_id]].sum() == len(text.encode()) + prefix


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_chat_template_matches_transformers(kind, bpe_dir, sp_dir):
    path = bpe_dir if kind == "bpe" else sp_dir
    ours, theirs = load_tokenizer_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == TEMPLATE
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)


def test_specials_and_errors(bpe_dir, tmp_path):
    tok = load_tokenizer_dir(bpe_dir)
    assert tok.pad_id == tok._tok.token_to_id("<pad>") and tok.eos_ids == (tok.eos_id,)
    assert tok.path.endswith("tokenizer.json")
    from configs import ConfigError
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*tokenizer.json"):
        load_tokenizer_dir(tmp_path)


def test_sentencepiece_specials(sp_dir, tmp_path):
    tok = load_tokenizer_dir(sp_dir)
    from data import Tokenizer
    assert isinstance(tok, Tokenizer)  # the one sentencepiece wrapper, with HF specials on top
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # no pad piece: 0, as data.Tokenizer
    assert tok.path.endswith("tokenizer.model") and tok.sp.get_piece_size() == tok.vocab_size
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    from configs import ConfigError
    with pytest.raises(ConfigError, match="not a valid sentencepiece model"):
        load_tokenizer_dir(tmp_path)
