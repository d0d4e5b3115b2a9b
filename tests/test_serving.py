"""What serving engines need from f2l's checkpoints: the chat template, a tokenizer that
decodes every id the model can emit, and a tiny preset whose attention heads are wide
enough for engines' CPU kernels (head_dim >= 32)."""
import json

import pytest

from f2l.presets import PRESETS, load_base, save_base
from f2l.prompt import question_prompt
from f2l.tokenizer import CHAT_TEMPLATE, build_tokenizer

QUESTIONS = ["What colour is the circle?", "Which way does it move?  ", "count\nthem"]


@pytest.mark.parametrize("q", QUESTIONS)
@pytest.mark.parametrize("form", ["string", "parts"])
def test_chat_template_renders_f2l_question_prompt(q, form):
    tok = build_tokenizer()
    content = q if form == "string" else [{"type": "text", "text": q}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert text == question_prompt(q)
    ids = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok(question_prompt(q), add_special_tokens=False)["input_ids"]


def test_chat_template_multi_turn_and_media_parts():
    tok = build_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A ball."},
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "video"}]},
    ]
    got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert got == ("<|im_start|>System: Be brief.<end_of_utterance>\n"
                   "User:<image>What is it?<end_of_utterance>\n"
                   "Assistant: A ball.<end_of_utterance>\n"
                   "User: Colour?<video><end_of_utterance>\n")


def test_saved_checkpoint_carries_chat_template(tmp_path):
    base = load_base("tiny")
    save_base(base, tmp_path / "ck")
    back = load_base(tmp_path / "ck")
    assert back.tokenizer.chat_template == CHAT_TEMPLATE
    q = "What colour is the circle?"
    assert back.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) == question_prompt(q)
    # the file an engine reads without f2l
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    cfg = json.loads((tmp_path / "ck" / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template") == CHAT_TEMPLATE or "chat_template.jinja" in files


def test_stand_in_tokenizer_covers_a_real_vocabulary():
    tok = build_tokenizer(vocab_size=49280)
    assert len(tok) == 49280
    small = build_tokenizer()
    # ordinary text is segmented exactly as by the unpadded tokenizer
    for text in ["Frame from 00:03:<image> red circle", "zyzzyva QUUX 12345", question_prompt("What?")]:
        assert tok(text, add_special_tokens=False)["input_ids"] == small(text, add_special_tokens=False)["input_ids"]
    # every id decodes to some text
    pieces = tok.convert_ids_to_tokens(list(range(49280)))
    assert all(isinstance(p, str) and p for p in pieces)
    assert tok.decode([49279]) == "<|reserved_49279|>"
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=10)


def test_real_architecture_preset_tokenizer_matches_embedding():
    base = load_base("smolvlm2-256m", device="meta")
    assert len(base.tokenizer) == base.model.config.text_config.vocab_size == 49280


def test_tiny_serve_preset_heads():
    assert "tiny-serve" in PRESETS
    base = load_base("tiny-serve")
    t = base.model.config.text_config
    v = base.model.config.vision_config
    assert t.hidden_size // t.num_attention_heads >= 32
    assert v.hidden_size // v.num_attention_heads >= 32
    tiny = load_base("tiny")
    assert base.tokens_per_frame == tiny.tokens_per_frame and base.image_size == tiny.image_size
    assert base.fingerprint != tiny.fingerprint
