"""SmolVLM2's video prompt and the chat format of questions and answers.

Video turn (what SmolVLM2's processor builds for a video, inside its chat template)::

    <|im_start|>User: You are provided the following series of {N in words} frames
    from a {H:MM:SS} [H:MM:SS] video.\\n
    \\nFrame from MM:SS:<fake_token_around_image><global-img><image>×T<fake_token_around_image>
    ... (one per frame)
    \\n\\n{instruction or question}<end_of_utterance>\\nAssistant:

Question turn (no visual tokens): ``<|im_start|>User: {question}<end_of_utterance>\\nAssistant:``;
the answer the model produces or is trained on is `` {answer}<end_of_utterance>``.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Sequence

from f2l.tokenizer import BOS_TOKEN, EOS_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN

VIDEO_INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME_MESSAGE = "\nFrame from {timestamp}:"
MEDIA_OUTRO = "\n\n"
USER_PREFIX = BOS_TOKEN + "User: "
ASSISTANT_PREFIX = "\nAssistant:"

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
    """A whole user turn with the video followed by ``text`` (instruction or question)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    out = USER_PREFIX + video_block(timestamps, duration, tokens_per_frame) + text + EOS_TOKEN
    return out + ASSISTANT_PREFIX if add_generation_prompt else out


def question_prompt(question: str) -> str:
    """A text-only user turn ending with the generation prompt ``\\nAssistant:``."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a str, got {type(question).__name__}")
    return USER_PREFIX + question + EOS_TOKEN + ASSISTANT_PREFIX


def answer_text(answer: str) -> str:
    """The assistant's reply as the model emits it (leading space, closing end-of-utterance)."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
    return " " + answer.strip() + EOS_TOKEN
