"""Tiny tokenizers written into a folder, like a Hugging Face checkpoint's, for tests.

Both are trained in-process on the short text below in well under a second, so
tests need no network and no downloaded checkpoint.
"""

import io
import json
from pathlib import Path

# Our own few sentences: enough for BPE merges of common English words.
TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to follow instructions.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.
What is the capital of France? The capital of France is Paris.
Translate the following sentence into French: the cat sits on the mat.
Summarize the text in one sentence. Explain why the sky is blue during the day.
Adapters are trained together on one shared frozen base model, each with its own data and optimizer.
Numbers like 1, 2, 3, 42 and 2024 appear in text, as do symbols: (a + b) * c = d; x -> y!
### Instruction:
### Input:
### Response:
user assistant system hello world
""".splitlines()

# ChatML, as in SmolLM2-Instruct's tokenizer_config.json.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer_json(dir: str | Path, vocab_size: int = 300, add_bos: bool = False,
                         chat_template: str | None = CHATML_TEMPLATE) -> int:
    """Train a byte-level BPE tokenizer.json (SmolLM2 / GPT-2 style) into dir; return its vocab size.

    add_bos=True imitates Llama 3: a post-processor prepends <|endoftext|> as BOS and
    tokenizer_config.json has no add_bos_token key, so loaders must detect it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # The full byte alphabet first, so any text encodes; special tokens get ids 0, 1, 2.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXT, trainer=trainer)
    if add_bos:
        bos_id = tokenizer.token_to_id("<|endoftext|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
            special_tokens=[("<|endoftext|>", bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 2048,
    }
    if not add_bos:
        config["add_bos_token"] = False
    if chat_template is not None:
        config["chat_template"] = chat_template
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_sentencepiece(dir: str | Path, vocab_size: int = 400) -> int:
    """Train a Llama 1/2 style sentencepiece tokenizer.model into dir; return its vocab size.

    BPE with byte fallback, <unk>=0, <s>=1, </s>=2, add_bos_token true, no chat template.
    """
    import sentencepiece as spm

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # Llama's trainer settings: bpe, byte_fallback, identity normalization, digits split.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": 2048,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
