"""Hub-free, deterministic tiny tokenizers for the tiny models (tests and the embedded digits default).

The tokenizer is trained in code and handed to the *real* transformers class, so it saves, loads and behaves like the
hub one in the stock diffusers pipeline. Byte-level BPE training with the Qwen pre-tokenizer is deterministic across
processes (ties are broken by pair order, not hash order), so the same corpus always gives the same ids.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

#: QwenImagePipeline.prompt_template_encode (diffusers 0.42.1)
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
#: QwenImagePipeline.prompt_template_encode_start_idx: the pipeline drops this many leading tokens
QWEN_IMAGE_DROP_IDX = 34

# The Qwen2 pre-tokenizer split (as in the hub tokenizer.json): words keep their leading space, digits are single.
QWEN_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: phrases the digits recipes and tests use: each word becomes one token, so prompts stay short
DIGIT_PHRASES = (
    "a handwritten digit",
    "the number",
    "a drawing of the digit",
    "an even digit",
    "an odd digit",
    "a digit greater than five",
    "a digit less than five",
    "any digit",
)
GENERAL_CAPTIONS = (
    "a red fox",
    "a red fox in the snow",
    "a blue bird on a branch",
    "a photo of a cat",
    "a green tree by the river",
    "an astronaut riding a horse",
    "a painting of a squirrel eating a burger",
    "bad quality",
    "a white dog and a black cat",
    # the digit phrases again mid-sentence, so their first words also exist with a leading space
    "a photo of an even digit, an odd digit, any digit or the number seven",
)


def default_corpus() -> list[str]:
    """Template (with a prompt) + digit words and phrases + general captions."""
    digits = [f"{p} {w}" for p in DIGIT_PHRASES for w in DIGIT_WORDS]
    return [QWEN_IMAGE_TEMPLATE.format("a red fox"), *DIGIT_PHRASES, " ".join(DIGIT_WORDS), *digits, *GENERAL_CAPTIONS]


def qwen2_tokenizer(extra_corpus: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A byte-level BPE ``Qwen2Tokenizer`` trained on the Qwen-Image template and the default corpus (+ ``extra_corpus``).

    Contract: the template prefix (everything before the prompt) is exactly ``QWEN_IMAGE_DROP_IDX`` = 34 tokens, as
    with the real Qwen tokenizer, so ``QwenImagePipeline`` drops exactly the template. Same ids in every process.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    corpus = default_corpus() + list(extra_corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # A vocab budget larger than the corpus needs: training runs until every corpus word is one token, so the
    # template prefix has exactly one token per pre-token (34), whatever extra_corpus adds.
    trainer = trainers.BpeTrainer(
        vocab_size=65536,
        special_tokens=list(QWEN_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    out = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        extra_special_tokens=list(QWEN_SPECIALS[1:]),
        model_max_length=4096,
    )
    n = template_prefix_len(out)
    if n != QWEN_IMAGE_DROP_IDX:
        raise AssertionError(
            f"tiny Qwen2 tokenizer splits the template prefix into {n} tokens, not {QWEN_IMAGE_DROP_IDX}"
        )
    return out


def template_prefix_len(tokenizer) -> int:
    """Number of tokens of the Qwen-Image template before the prompt (tokenised in context, as the pipeline does)."""
    full = tokenizer(QWEN_IMAGE_TEMPLATE.format("a red fox")).input_ids
    suffix = tokenizer("a red fox" + QWEN_IMAGE_TEMPLATE.split("{}")[1]).input_ids
    if full[len(full) - len(suffix) :] != suffix:
        raise AssertionError("the template prefix and the prompt merge across their boundary")
    return len(full) - len(suffix)


def _corpus_words() -> list[str]:
    return sorted({w for line in default_corpus() for w in re.findall(r"[a-z]+", line.lower())})


def clip_tokenizer_det():
    """A ``CLIPTokenizer`` whose corpus words are single tokens; deterministic (no training)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in _corpus_words():
        if len(word) == 1:
            continue  # "a</w>" is already in the alphabet
        left = word[0]
        for j in range(1, len(word)):
            right = word[j] + ("</w>" if j == len(word) - 1 else "")
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer_det():
    """A ``T5TokenizerFast`` (Unigram) with every corpus word as one piece, plus single characters; deterministic."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _corpus_words()]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
