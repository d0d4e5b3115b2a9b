"""SmolVLM2's video prompt and the chat format of questions and answers.

Video turn (what SmolVLM2's processor builds for a video, inside its chat template)::

    <|im_start|>User: You are provided the following series of {N in words} frames
    from a {H:MM:SS} [H:MM:SS] video.\\n
    \\nFrame from MM:SS:<fake_token_around_image><global-img><image>×T<fake_token_around_image>
    ... (one per frame)
    \\n\\n{instruction or question}<end_of_utterance>\\n[Assistant:]

This is what SmolVLM2's chat template (:data:`f2l.tokenizer.CHAT_TEMPLATE`, re-exported here) renders for one user turn
whose content is the video followed by a text block, after transformers' SmolVLM processor
has replaced the video block by the intro, the per-frame lines and the outro (transformers
4.51.3, the authors' pin). A turn always closes with ``<end_of_utterance>\\n``; the
generation prompt ``Assistant:`` follows only when the model is to answer.

The *encoding* prompt (what the hypernetwork reads) has no generation prompt: the authors
encode with ``apply_chat_template(..., add_generation_prompt=False)``
(``prepare_smolvlm_inputs`` in their ``train_smolvlm_online.py``).

Question turn (no visual tokens): ``<|im_start|>User: {question}<end_of_utterance>\\nAssistant:``.
The answer the model is trained on is what the template adds for an assistant turn:
`` {answer}<end_of_utterance>\\n`` -- the labels run through the end-of-utterance token *and*
the newline after it, exactly the tokens the authors' ``build_labels`` keeps (the full
conversation's ids minus the prompt-with-generation-prompt's ids). The answer text is used
as given (no stripping), as the template does.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Sequence

from f2l.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN  # noqa: F401

VIDEO_INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME_MESSAGE = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
USER_PREFIX = BOS_TOKEN + "User: "
TURN_END = EOS_TOKEN + "\n"
GENERATION_PROMPT = "Assistant:"
ASSISTANT_PREFIX = "\n" + GENERATION_PROMPT  # what follows the end-of-utterance token of a question turn


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for ``n`` as SmolVLM2's processor writes frame counts (num2words)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    try:
        from num2words import num2words

        return num2words(n)
    except ImportError:
        pass
    if n < 20:
        return _ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return _TENS[t] + ("" if o == 0 else "-" + _ONES[o])
    if n < 1000:
        h, r = divmod(n, 100)
        return _ONES[h] + " hundred" + ("" if r == 0 else " and " + number_words(r))
    th, r = divmod(n, 1000)
    return number_words(th) + " thousand" + ("" if r == 0 else (" and " if r < 100 else ", ") + number_words(r))


def format_timestamp(seconds: float) -> str:
    """``MM:SS`` of a frame, as SmolVLM2 writes it (whole seconds, floor)."""
    s = float(seconds)
    return f"{int(s // 60):02d}:{int(s % 60):02d}"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` of the video, as SmolVLM2 writes it."""
    return str(timedelta(seconds=int(seconds)))


def image_block(tokens_per_frame: int) -> str:
    return FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * tokens_per_frame + FAKE_IMAGE_TOKEN


def video_block(timestamps: Sequence[float], duration: float, tokens_per_frame: int) -> str:
    """The video part of a user turn: intro, one timestamped image block per frame, outro."""
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame: expected an int >= 1, got {tokens_per_frame!r}")
    if len(timestamps) < 1:
        raise ValueError("timestamps: expected at least one frame, got none")
    parts = [VIDEO_INTRO.format(count=number_words(len(timestamps)), duration=format_duration(duration))]
    block = image_block(tokens_per_frame)
    for t in timestamps:
        parts.append(FRAME_MESSAGE.format(timestamp=format_timestamp(t)) + block)
    parts.append(MEDIA_OUTRO)
    return "".join(parts)


def video_prompt(timestamps: Sequence[float], duration: float, tokens_per_frame: int, text: str, *,
                 add_generation_prompt: bool = True) -> str:
    """A whole user turn with the video followed by ``text`` (instruction or question),
    closed by ``<end_of_utterance>\\n``; ``add_generation_prompt`` appends ``Assistant:``
    (a question the model answers). The encoding prompt is ``add_generation_prompt=False``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    if not isinstance(add_generation_prompt, bool):
        raise TypeError(f"add_generation_prompt: expected a bool, got {type(add_generation_prompt).__name__}")
    out = USER_PREFIX + video_block(timestamps, duration, tokens_per_frame) + text + TURN_END
    return out + GENERATION_PROMPT if add_generation_prompt else out


def question_prompt(question: str) -> str:
    """A text-only user turn ending with the generation prompt ``\\nAssistant:``."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a str, got {type(question).__name__}")
    return USER_PREFIX + question + TURN_END + GENERATION_PROMPT


def answer_text(answer: str) -> str:
    """The assistant turn that follows :func:`question_prompt`, as the chat template renders it:
    `` {answer}<end_of_utterance>\\n`` (the training target; the answer is not stripped)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
    return " " + answer + TURN_END
