"""f2l.presets / f2l.tokenizer / f2l.config: the tiny model, the real architectures (on
the meta device), local checkpoint round trips and bad inputs."""
import json

import pytest
import torch

from f2l.config import F2LConfig
from f2l.presets import PRESETS, BaseVLM, fingerprint, load_base, preset_config, save_base
from f2l.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


# ------------------------------------------------------------------ tokenizer

ROUND_TRIP = [
    pytest.param("What colour is the circle?", id="question"),
    pytest.param(" The red square moves left.", id="answer-leading-space"),
    pytest.param("Frame from 00:03:\n\nYou are provided the following series of twelve frames", id="template"),
    pytest.param("zyzzyva QUUX 12345 !@#$%^&*()_+{}[]", id="unknown-words-fall-back-to-chars"),
    pytest.param("  two  spaces\tand\ttabs\n", id="whitespace"),
    pytest.param(BOS_TOKEN + "User: hi" + EOS_TOKEN + "\nAssistant:", id="special-tokens"),
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(text):
    tok = build_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_special_tokens():
    tok = build_tokenizer()
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    ids = {t: tok.convert_tokens_to_ids(t) for t in (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, EOS_TOKEN)}
    assert len(set(ids.values())) == 4 and tok.unk_token_id not in ids.values()
    seq = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * 81 + FAKE_IMAGE_TOKEN
    got = tok(seq, add_special_tokens=False)["input_ids"]
    assert got == [ids[FAKE_IMAGE_TOKEN], ids[GLOBAL_IMAGE_TOKEN]] + [ids[IMAGE_TOKEN]] * 81 + [ids[FAKE_IMAGE_TOKEN]]
    # known words are single tokens (the tiny model's context stays short)
    assert len(tok(" red circle moving left", add_special_tokens=False)["input_ids"]) == 4
    assert tok.decode(tok("a" + EOS_TOKEN)["input_ids"], skip_special_tokens=True) == "a"


# ------------------------------------------------------------------ tiny preset


def test_tiny_preset(tiny):
    assert isinstance(tiny, BaseVLM)
    assert tiny.tokens_per_frame == 9 and tiny.image_size == 48
    assert tiny.num_layers == 4 and tiny.hidden_size == 64
    assert tiny.model.config.text_config.vocab_size == len(tiny.tokenizer)
    assert tiny.image_token_id == tiny.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.module_shapes(("down_proj", "q_proj")) == {"down_proj": (160, 64), "q_proj": (64, 64)}
    assert len(tiny.text_model.layers) == 4 and tiny.lm_head.out_features == len(tiny.tokenizer)


def test_tiny_is_deterministic_and_leaves_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = load_base("tiny")
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    assert again.fingerprint == tiny.fingerprint
    for (n, p), (_, q) in zip(tiny.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n


def test_fingerprint_tracks_weights_not_dtype(tiny):
    b16 = load_base("tiny", dtype=torch.bfloat16)
    assert b16.dtype == torch.bfloat16 and b16.fingerprint == tiny.fingerprint
    other = load_base("tiny")
    with torch.no_grad():
        other.text_model.layers[0].mlp.down_proj.weight.add_(0.1)
    assert fingerprint(other.model) != tiny.fingerprint


# ------------------------------------------------------------------ real architectures

REAL = [
    # name, hidden, layers, heads, kv, inter, tokens/frame, image size, vision hidden, vision layers, params (M)
    pytest.param("smolvlm2-256m", 576, 30, 9, 3, 1536, 64, 512, 768, 12, (230, 290), id="256m"),
    pytest.param("smolvlm2-500m", 960, 32, 15, 5, 2560, 64, 512, 768, 12, (460, 540), id="500m"),
    pytest.param("smolvlm2-2.2b", 2048, 24, 32, 32, 8192, 81, 384, 1152, 27, (2100, 2400), id="2.2b"),
]


@pytest.mark.parametrize("name,hidden,layers,heads,kv,inter,tpf,size,vhidden,vlayers,params", REAL)
def test_real_presets_on_meta(name, hidden, layers, heads, kv, inter, tpf, size, vhidden, vlayers, params):
    cfg, proc = preset_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (hidden, layers, heads, kv, inter)
    assert t.vocab_size == 49280 and (v.hidden_size, v.num_hidden_layers, v.image_size) == (vhidden, vlayers, size)
    assert proc["tokens_per_frame"] == tpf and proc["image_size"] == size
    base = load_base(name, device="meta")
    assert base.tokens_per_frame == tpf and base.num_layers == layers and base.hidden_size == hidden
    assert base.module_shapes() == {"down_proj": (inter, hidden)}
    assert base.fingerprint.startswith("meta-")
    n = sum(p.numel() for p in base.model.parameters()) / 1e6
    assert params[0] <= n <= params[1], n
    assert all(p.device.type == "meta" for p in base.model.parameters())


# ------------------------------------------------------------------ checkpoint directories


def test_checkpoint_round_trip(tiny, tmp_path):
    save_base(tiny, tmp_path / "ckpt")
    proc = json.loads((tmp_path / "ckpt" / "preprocessor_config.json").read_text())
    assert proc["max_image_size"]["longest_edge"] == 48
    back = load_base(tmp_path / "ckpt")
    assert back.fingerprint == tiny.fingerprint and back.tokens_per_frame == tiny.tokens_per_frame
    assert back.image_size == tiny.image_size and back.max_frames == tiny.max_frames
    assert tuple(back.image_mean) == tuple(tiny.image_mean)
    text = "What colour is the circle?"
    assert back.tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    ids = torch.randint(8, len(tiny.tokenizer), (2, 11), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(back.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)


def test_checkpoint_with_hf_processor_layout(tiny, tmp_path):
    # Checkpoints from the hub nest the video processor settings in processor_config.json.
    d = tmp_path / "ckpt"
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    (d / "processor_config.json").write_text(json.dumps({
        "image_processor": {"max_image_size": {"longest_edge": 48}, "image_mean": [0.4, 0.4, 0.4],
                            "image_std": [0.2, 0.2, 0.2]},
        "video_processor": {"video_sampling": {"max_frames": 5, "fps": 2}},
    }))
    b = load_base(d)
    assert b.image_mean == (0.4, 0.4, 0.4) and b.image_std == (0.2, 0.2, 0.2)
    assert b.max_frames == 5 and b.fps == 2.0 and b.image_size == 48


BAD_BASES = [
    pytest.param("smolvlm2-9b", ValueError, "neither a preset", id="unknown-preset"),
    pytest.param(3, TypeError, "preset name or a checkpoint", id="int"),
]


@pytest.mark.parametrize("base,exc,match", BAD_BASES)
def test_bad_base(base, exc, match):
    with pytest.raises(exc, match=match):
        load_base(base)


def test_bad_checkpoint_dirs(tmp_path, tiny):
    with pytest.raises(ValueError, match="without config.json"):
        load_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny.model.config.to_dict()))
    with pytest.raises(ValueError, match="safetensors"):
        load_base(tmp_path)
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_base(f)


@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(dtype=torch.int8), TypeError, "dtype", id="int-dtype"),
    pytest.param(dict(device=0.5), TypeError, "device", id="float-device"),
])
def test_bad_load_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_base("tiny", **kwargs)


def test_module_shapes_unknown_name(tiny):
    with pytest.raises(ValueError, match="not a linear module"):
        tiny.module_shapes(("nope_proj",))


# ------------------------------------------------------------------ F2LConfig


def test_f2l_config_round_trip(tmp_path):
    cfg = F2LConfig(base="tiny", max_frames=6, fps=2, instruction="Remember this.", chunk_videos=2)
    cfg.save(tmp_path / "c.json")
    back = F2LConfig.load(tmp_path / "c.json")
    assert back == cfg and back.fps == 2.0


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(max_frames=0), "max_frames", id="max-frames-0"),
    pytest.param(dict(fps=0), "fps", id="fps-0"),
    pytest.param(dict(target_modules=()), "target_modules", id="no-targets"),
    pytest.param(dict(chunk_videos=0), "chunk_videos", id="chunk-videos-0"),
    pytest.param(dict(chunk_frames=0), "chunk_frames", id="chunk-frames-0"),
])
def test_f2l_config_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F2LConfig(**kwargs)


def test_f2l_config_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        F2LConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        F2LConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown F2LConfig keys"):
        F2LConfig.from_dict({"base": "tiny", "frames_per_second": 3})
    with pytest.raises(ValueError, match="version"):
        F2LConfig.from_dict({"base": "tiny", "version": 99})


def test_presets_listed():
    assert PRESETS == ("tiny", "tiny-serve", "smolvlm2-256m", "smolvlm2-500m", "smolvlm2-2.2b")
