"""The tiny in-code tokenizer used by the ``tiny`` preset (and by real-architecture
presets built with random weights, where no checkpoint tokenizer exists).

It carries SmolVLM2's special tokens under SmolVLM2's names and roles, a small word
vocabulary that covers the prompt templates and the synthetic-video vocabulary, and a
character-level fallback so that any ASCII text round-trips exactly. It is a unigram
model over whole words (one token each) and single characters: the Viterbi
segmentation prefers a known word, and an unknown word falls back to characters.
Whitespace is kept with a metaspace marker, so ``decode(encode(text)) == text`` for
ASCII input (other characters map to the unknown token).

Two things make a saved stand-in tokenizer usable by serving engines:

* it carries SmolVLM2's chat template (:data:`CHAT_TEMPLATE`), so ``apply_chat_template``
  and OpenAI-style chat endpoints render the same turns :mod:`f2l.prompt` builds;
* ``build_tokenizer(vocab_size=V)`` fills the vocabulary up to ``V`` entries with reserved
  pieces ``<|reserved_ID|>``, so every id a model with a ``V``-entry embedding can emit
  decodes to some text (the random-weight real-architecture presets have ``V = 49280``).
  Reserved pieces never win a segmentation of ordinary text; they only make ids decodable.
"""
from __future__ import annotations

import string
from functools import lru_cache

# SmolVLM2's special tokens, in the roles its tokenizer gives them.
UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
PAD_TOKEN = "<|im_end|>"
EOS_TOKEN = "<end_of_utterance>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
END_OF_UTTERANCE = EOS_TOKEN

SPECIAL_TOKENS = (
    UNK_TOKEN,
    BOS_TOKEN,
    PAD_TOKEN,
    EOS_TOKEN,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)

_SPACE = "\u2581"  # metaspace marker: a leading space is part of the word token

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred first second third fourth fifth sixth seventh eighth ninth tenth last"
)
_TEMPLATE_WORDS = (
    "you are provided the following series of frames frame from a an video internalize this "
    "for later captioning user assistant describe caption answer question questions what which "
    "who where when how many much is are was were does do did in on at to and or it its there "
    "here that these those one ones with without by into onto out over under between"
)
_DEMO_WORDS = (
    "red green blue yellow purple orange white cyan black gray grey pink brown magenta "
    "colour color colours colors shape shapes circle circles square squares triangle triangles "
    "rectangle star object objects ball box direction directions left right up down moving "
    "moves move moved stays still static towards toward away fast slow speed appear appears "
    "appeared disappear count number total background foreground top bottom middle center "
    "centre corner side begin beginning end start middle during after before then first "
    "big small large tiny size same different both each every no yes not none only also "
    "horizontally vertically diagonally clockwise anticlockwise across along around position "
    "happens happen happened change changes changed scene shown show shows see seen visible"
)
_WORDS = tuple(dict.fromkeys((_NUMBER_WORDS + " " + _TEMPLATE_WORDS + " " + _DEMO_WORDS).split()))

# Unigram log-probabilities: any word beats its own spelling in characters, and a
# reserved filler piece loses to everything.
_WORD_SCORE = -3.0
_CHAR_SCORE = -9.0
_RESERVED_SCORE = -1000.0
_RESERVED = "<|reserved_{}|>"

# SmolVLM2's chat template (as transformers' own SmolVLM/Idefics3 processor tests spell it):
# one <|im_start|> for the whole conversation, "Role: " per turn ("Role:" when a turn starts
# with an image), every turn closed by "<end_of_utterance>\n", the generation prompt
# "Assistant:". Two additions that change nothing the authors' pipeline renders: a plain
# string content renders as one text part (OpenAI-style chat requests send strings), and a
# video part renders as <video> (4.51.3's processor replaces video blocks before rendering,
# so its template never meets one). f2l builds its prompts in code (f2l.prompt); saved
# tokenizers carry this template so engines render the same turns.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _word_pieces() -> list[str]:
    pieces: list[str] = []
    for w in _WORDS:
        for form in (w, w.capitalize()):
            # Bare form: the word right after a newline or a special token.
            pieces.extend((_SPACE + form, form))
    return list(dict.fromkeys(pieces))


def _char_pieces() -> list[str]:
    chars = string.ascii_letters + string.digits + string.punctuation + "\n\t"
    return [_SPACE] + list(chars)


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int | None = None) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = [(tok, 0.0) for tok in SPECIAL_TOKENS]
    vocab += [(c, _CHAR_SCORE) for c in _char_pieces()]
    seen = {t for t, _ in vocab}
    vocab += [(w, _WORD_SCORE) for w in _word_pieces() if w not in seen]
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size: expected at least {len(vocab)} (the stand-in's own entries), "
                             f"got {vocab_size}")
        vocab += [(_RESERVED.format(i), _RESERVED_SCORE) for i in range(len(vocab), vocab_size)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    # split=True cuts at every metaspace, so one word never swallows the next one.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tok.to_str()


def build_tokenizer(vocab_size: int | None = None):
    """The tiny tokenizer as a ``PreTrainedTokenizerFast``, with SmolVLM2's chat template.

    ``vocab_size`` (e.g. a real architecture's 49280) pads the vocabulary with reserved
    pieces so that every id below it decodes; ``None`` keeps the stand-in's own size.

    Special-token ids are fixed: ``<|endoftext|>`` 0 (unk), ``<|im_start|>`` 1 (bos),
    ``<|im_end|>`` 2 (pad), ``<end_of_utterance>`` 3 (eos), ``<fake_token_around_image>``
    4, ``<global-img>`` 5, ``<image>`` 6, ``<video>`` 7. No bos/eos are added by
    ``encode``: the prompt builders in :mod:`f2l.prompt` place them.

    >>> tok = build_tokenizer()
    >>> tok.decode(tok("Frame from 00:03:<image>")["input_ids"])
    'Frame from 00:03:<image>'
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.add_special_tokens({"additional_special_tokens": [FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of SmolVLM2's special tokens in ``tokenizer``; raises if one is missing."""
    ids = {}
    for name in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, EOS_TOKEN, BOS_TOKEN):
        i = tokenizer.convert_tokens_to_ids(name)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer: expected SmolVLM2's special token {name!r} in the vocabulary; it is missing")
        ids[name] = int(i)
    return ids
