"""A small byte-level BPE tokenizer with Qwen's chat and vision special tokens, for the toy world.

The real system uses Qwen3-VL's tokenizer; the toy one is trained on the toy captions with the `tokenizers` library
and carries the same special tokens (each a single id), so the prompt code in `qwen_flash_jax.text.prompts` is the
same for both. Byte-level: every string is encodable, and decoding round-trips exactly.
"""

from __future__ import annotations

from typing import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_flash_jax.text.prompts import IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START, build_prompt

PAD = "<|endoftext|>"  # Qwen's padding token

# Order fixes the ids: special tokens take ids 0..5 of the toy vocabulary.
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts` and wraps it as a transformers fast tokenizer.

    The result pads on the left (as Qwen-Image encodes prompts), uses `<|endoftext|>` as pad token and `<|im_end|>`
    as end-of-sequence token, adds no BOS/EOS of its own, and round-trips through `save_pretrained` /
    `PreTrainedTokenizerFast.from_pretrained(local_dir)`. Training is deterministic for the same texts.
    """
    texts = [str(t) for t in texts]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size}"
        )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # Train on the texts as the encoder sees them, inside the chat template (special tokens left out: they are
    # split off before BPE anyway), so the template's words get merges as often as the captions do.
    tok.train_from_iterator(_training_texts(texts), trainer=trainer)

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _training_texts(texts: list[str]):
    for text in texts:
        templated = build_prompt(text, num_condition_images=1)
        for special in SPECIAL_TOKENS:
            templated = templated.replace(special, "\n")
        yield templated
