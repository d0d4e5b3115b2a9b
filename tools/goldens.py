"""Golden arrays from the authors' preprocessing stack, for ``tests/test_goldens.py``.

The Frames2LoRA checkpoints were trained on what transformers 4.51.3's SmolVLM processor
makes of a video (``processor.apply_chat_template(..., add_generation_prompt=False)`` with
``processor.video_size = processor.image_processor.size = {"longest_edge": 384}``) and on
labels cut from the tokenizer's chat template. This script runs *that code* -- not a
re-description of it -- on fixed synthetic frames and prompts, and writes what it produced:

* ``tests/goldens/pixels.safetensors``: for single frames of awkward sizes and both tower
  squares (512: 256M/500M, 384: 2.2B), the processor's ``pixel_values`` (SHA-256 of the whole
  float32 array, a 24-pixel grid of values, the intermediate size);
* ``tests/goldens/videos.safetensors``: whole synthetic videos through
  ``apply_chat_template`` (frame sampling, timestamps, prompt ids, pixel hashes);
* ``tests/goldens/labels.safetensors``: ``build_labels``-style ids and labels of
  (prompt, target) pairs through ``tokenizer.apply_chat_template``;
* ``tests/goldens/states.safetensors``: the stacked layer states ``hidden_states[:-1]`` that
  the authors' ``extract_l2l_fused_text_features`` takes from ``vlm.model(...)`` for a
  synthetic video, on f2l's ``tiny`` SmolVLM architecture with deterministic weights
  (:func:`deterministic_weights`; a 48 px tower, so the longest edge there is 40).

Run it in a separate environment (CI only reads the committed files)::

    python -m venv /tmp/tf451
    /tmp/tf451/bin/pip install torch==2.13.0 transformers==4.51.3 pillow==13.0.0 numpy num2words safetensors
    /tmp/tf451/bin/python tools/goldens.py            # from the repository root

No hub access is needed: the processor is built from SmolVLM2's processor settings and the
chat template in ``f2l/prompt.py``, the tokenizer is f2l's in-code tokenizer (loaded from
``f2l/tokenizer.py`` by path, without importing the rest of f2l). Video decoding is the one
part replaced: ``load_video`` is given in-memory frames with the metadata PyAV would report
(``total_num_frames``, ``fps``, ``duration = frames / fps``), then the processor's own
sampling function picks the frames. Everything is seeded and integer-valued, so a rerun
writes byte-identical files; files are written beside the target and renamed into place.

Importing this module needs only numpy: the test suite uses :func:`synthetic_frame` and the
case tables to rebuild the same inputs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "goldens"
TRANSFORMERS_VERSION = "4.51.3"

LONGEST_EDGE = 384  # the authors' --video-size-longest-edge for every model size
# Tower square -> (image tokens per frame, processor "size" of the checkpoint's config).
TOWERS = {512: (64, 2048), 384: (81, 1536)}
GRID = 24  # pixel-value grid stride stored for diagnosis next to the full-array hash

# (name, height, width, seed): odd sizes, both orientations, square, at and below the edge,
# above it, and sizes whose short side hits the processor's round-up-to-even rule.
FRAME_CASES = [
    ("17x9", 9, 17, 1),
    ("9x17", 17, 9, 2),
    ("64x40", 40, 64, 3),
    ("96x96", 96, 96, 4),
    ("640x360", 360, 640, 5),
    ("641x360", 360, 641, 6),
    ("1000x1000", 1000, 1000, 7),
    ("384x384", 384, 384, 8),
    ("512x512", 512, 512, 9),
    ("120x200", 200, 120, 10),
]
# (name, frames, native fps, height, width, seed, max_frames, instruction)
VIDEO_CASES = [
    ("short-64x40", 30, 10.0, 40, 64, 21, 12, "Internalize this video for later captioning."),
    ("ntsc-17x9", 120, 30000 / 1001, 9, 17, 22, 12, "Internalize this video for later captioning."),
    ("long-skip-96x96", 80, 5.0, 96, 96, 23, 12, "Describe what is happening in this video."),
    ("one-frame-640x360", 1, 25.0, 360, 640, 24, 12, "Internalize this video for later captioning."),
]
# (prompt, target) pairs for the training labels; targets are used verbatim by the template.
LABEL_CASES = [
    ("Describe what is happening in this video.", "A red circle moves left."),
    ("Write a short caption for this clip.", "two squares, then one"),
    ("What colour is the ball?", " blue "),
    ("Summarize this video in one sentence.", ""),
    ("How many objects?", "3\nobjects"),
]


def synthetic_frame(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` frame with gradients, hard edges and noise, from integer arithmetic
    only (PCG64 integers; no transcendental functions), so every platform builds the same bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (xx * 255) // max(width - 1, 1)
    g = (yy * 255) // max(height - 1, 1)
    b = ((xx + 2 * yy) * 7 + seed * 31) % 256
    img = np.stack([r, g, b], axis=-1)
    checker = ((xx // 5 + yy // 3) % 2).astype(bool)
    box = (xx >= width // 4) & (xx < (3 * width) // 4) & (yy >= height // 3) & (yy < (2 * height) // 3)
    img[box & checker] = 255
    img[box & ~checker] = 0
    img = img + rng.integers(-24, 25, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 ``[F, H, W, 3]``: frame i is :func:`synthetic_frame` with seed ``seed * 1000 + i``."""
    return np.stack([synthetic_frame(height, width, seed * 1000 + i) for i in range(frames)])


# The stacked-states case: (frames, fps, height, width, seed, max_frames, longest_edge, instruction).
STATES_CASE = (20, 10.0, 40, 64, 31, 12, 40, "Internalize this video for later captioning.")


def deterministic_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """float32 weights for a model's ``state_dict`` shapes, the same on every platform: each
    tensor comes from its own PCG64 stream (seeded by a hash of its name) as integers in
    [-256, 256] times a power of two, so every value is exact in float32. Matrices get
    ``~1/sqrt(fan_in)`` magnitudes, norm weights ``1 ± 1/8``, biases ``± 1/16``."""
    out = {}
    for name in sorted(shapes):
        shape = tuple(int(d) for d in shapes[name])
        rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        q = rng.integers(-256, 257, size=shape).astype(np.float64) / 256
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            w = q * 2.0 ** -(fan_in.bit_length() // 2)
        elif name.endswith("bias"):
            w = q / 16
        else:
            w = 1 + q / 8
        out[name] = w.astype(np.float32)
    return out


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def grid(pixel_values: np.ndarray) -> np.ndarray:
    """``[3, S, S]`` -> the values on the diagnostic grid."""
    return np.ascontiguousarray(pixel_values[:, GRID // 2::GRID, GRID // 2::GRID])


# --------------------------------------------------------------------------- generation


def _load_f2l_module(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.numpy import save

    # One metadata entry: safetensors writes a metadata map in no fixed order, one key keeps
    # the file byte-identical from run to run.
    data = save(tensors, metadata={"golden": json.dumps(metadata, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {path.relative_to(ROOT)} ({len(data)} bytes)")


def _processor(tower: int):
    """A SmolVLM processor with the checkpoints' settings, set up as the authors set it up."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor

    tokens, size = TOWERS[tower]
    tokenizer = _load_f2l_module("_f2l_tokenizer", "f2l/tokenizer.py").build_tokenizer()
    image_processor = SmolVLMImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": size}, resample=1, do_image_splitting=True,
        max_image_size={"longest_edge": tower}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
        video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": tower}},
    )
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens,
                                 chat_template=_chat_template())
    # prepare_smolvlm_inputs in the authors' train_smolvlm_online.py:
    processor.video_size = {"longest_edge": LONGEST_EDGE}
    processor.image_processor.size = {"longest_edge": LONGEST_EDGE}
    return processor


def _chat_template() -> str:
    # Read the constant out of f2l/tokenizer.py's source without importing f2l (and its deps).
    import ast

    tree = ast.parse((ROOT / "f2l" / "tokenizer.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHAT_TEMPLATE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("f2l/tokenizer.py has no CHAT_TEMPLATE constant")


def _intermediate_size(height: int, width: int) -> list[int]:
    from transformers.models.smolvlm.image_processing_smolvlm import get_resize_output_image_size

    h, w = get_resize_output_image_size(np.zeros((height, width, 3), np.uint8), resolution_max_side=LONGEST_EDGE,
                                        input_data_format="channels_last")
    return [int(h), int(w)]


def make_pixels() -> None:
    tensors, meta = {}, {}
    for tower in TOWERS:
        processor = _processor(tower)
        for name, h, w, seed in FRAME_CASES:
            frame = synthetic_frame(h, w, seed)
            out = processor(text=["<image>"], videos=[[frame]], return_tensors="np")
            pv = out["pixel_values"]
            if pv.shape != (1, 1, 3, tower, tower) or pv.dtype != np.float32:
                raise RuntimeError(f"{name}@{tower}: unexpected pixel_values {pv.shape} {pv.dtype}")
            pv = pv[0, 0]
            key = f"{name}@{tower}"
            tensors[f"{key}.grid"] = grid(pv)
            meta[key] = {"height": h, "width": w, "seed": seed, "tower": tower, "longest_edge": LONGEST_EDGE,
                         "intermediate": _intermediate_size(h, w), "sha256": sha256(pv),
                         "input_sha256": sha256(frame),
                         "pixel_attention_mask_all": bool(out["pixel_attention_mask"].all())}
    _write(OUT_DIR / "pixels.safetensors", tensors, {"cases": meta, "provenance": _provenance()})


def make_videos() -> None:
    import transformers.processing_utils as pu
    from transformers.image_utils import VideoMetadata

    store: dict[str, tuple[np.ndarray, float]] = {}
    sampled: dict[str, list[int]] = {}

    def load_video(fname, num_frames=None, fps=None, backend="pyav", sample_indices_fn=None, **kwargs):
        # What read_video_pyav does after opening the file: metadata, sampling, frames.
        frames, rate = store[fname]
        total = int(frames.shape[0])
        metadata = VideoMetadata(total_num_frames=total, fps=float(rate), duration=float(total / rate),
                                 video_backend=backend)
        indices = sample_indices_fn(metadata=metadata, **kwargs)
        metadata.frames_indices = indices
        sampled[fname] = [int(i) for i in indices]
        return frames[indices], metadata

    original = pu.load_video
    pu.load_video = load_video
    tensors, meta = {}, {}
    try:
        for tower in TOWERS:
            processor = _processor(tower)
            for name, n, rate, h, w, seed, max_frames, text in VIDEO_CASES:
                key = f"{name}@{tower}"
                store[key] = (synthetic_video(n, h, w, seed), rate)
                conv = [[{"role": "user", "content": [{"type": "video", "path": key},
                                                      {"type": "text", "text": text}]}]]
                # The text the processor tokenizes: the template's rendering with each <image>
                # expanded (videos are only loaded, and their blocks replaced, when tokenizing).
                rendered = []
                expand = processor.process_vision

                def capture(text, images, output_kwargs, **kw):
                    out = expand(text, images, output_kwargs, **kw)
                    rendered.extend(out[0])
                    return out

                processor.process_vision = capture
                out = processor.apply_chat_template(conv, add_generation_prompt=False, tokenize=True,
                                                    return_dict=True, return_tensors="np", padding=True,
                                                    max_frames=max_frames, video_load_backend="pyav")
                del processor.process_vision
                rendered = rendered[0]
                pv = out["pixel_values"][0]
                ids = out["input_ids"][0].astype(np.int32)
                if not out["attention_mask"].all():
                    raise RuntimeError(f"{key}: padding in a batch of one")
                frames = store[key][0]
                tensors[f"{key}.input_ids"] = ids
                tensors[f"{key}.grid0"] = grid(pv[0])
                meta[key] = {"frames": n, "fps": rate, "height": h, "width": w, "seed": seed,
                             "max_frames": max_frames, "target_fps": 1.0, "text": text, "tower": tower,
                             "tokens_per_frame": TOWERS[tower][0], "prompt": rendered,
                             "pixel_sha256": [sha256(p) for p in pv], "num_frames": int(pv.shape[0]),
                             "input_sha256": sha256(frames), "indices": sampled[key]}
    finally:
        pu.load_video = original
    _write(OUT_DIR / "videos.safetensors", tensors, {"cases": meta, "provenance": _provenance()})


def make_labels() -> None:
    tok = _load_f2l_module("_f2l_tokenizer", "f2l/tokenizer.py").build_tokenizer()
    tok.chat_template = _chat_template()
    tensors, meta = {}, {}
    for i, (prompt, target) in enumerate(LABEL_CASES):
        # build_labels in the authors' train_smolvlm_stage1.py, verbatim in effect.
        prompt_messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        full_messages = prompt_messages + [{"role": "assistant", "content": [{"type": "text", "text": target}]}]
        prompt_ids = tok.apply_chat_template(prompt_messages, tokenize=True, add_generation_prompt=True,
                                             return_tensors=None)
        full_ids = tok.apply_chat_template(full_messages, tokenize=True, add_generation_prompt=False,
                                           return_tensors=None)
        labels = list(full_ids)
        labels[:len(prompt_ids)] = [-100] * len(prompt_ids)
        key = f"case{i}"
        tensors[f"{key}.input_ids"] = np.asarray(full_ids, dtype=np.int64)
        tensors[f"{key}.labels"] = np.asarray(labels, dtype=np.int64)
        meta[key] = {"prompt": prompt, "target": target, "prompt_len": len(prompt_ids),
                     "full_text": tok.apply_chat_template(full_messages, tokenize=False, add_generation_prompt=False)}
    _write(OUT_DIR / "labels.safetensors", tensors, {"cases": meta, "provenance": _provenance()})


def _tiny_config(tokenizer):
    """f2l's ``tiny`` SmolVLM config, read from ``f2l/presets.py``'s literals (no f2l import)."""
    import ast

    from transformers import SmolVLMConfig

    wanted = {"TINY_TEXT", "TINY_VISION", "TINY_SCALE_FACTOR"}
    found = {}
    for node in ast.parse((ROOT / "f2l" / "presets.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in wanted:
            value = node.value
            if isinstance(value, ast.Call):  # dict(...) literal
                value = ast.Dict(keys=[ast.Constant(k.arg) for k in value.keywords],
                                 values=[k.value for k in value.keywords])
            found[node.targets[0].id] = ast.literal_eval(value)
    if set(found) != wanted:
        raise RuntimeError(f"f2l/presets.py: expected literals {sorted(wanted)}, found {sorted(found)}")
    text = dict(found["TINY_TEXT"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return SmolVLMConfig(text_config=text, vision_config=dict(found["TINY_VISION"]),
                         scale_factor=found["TINY_SCALE_FACTOR"],
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)


def make_states() -> None:
    import torch
    import transformers.processing_utils as pu
    from transformers import SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.image_utils import VideoMetadata

    n, rate, h, w, seed, max_frames, edge, text = STATES_CASE
    tokenizer = _load_f2l_module("_f2l_tokenizer", "f2l/tokenizer.py").build_tokenizer()
    cfg = _tiny_config(tokenizer)
    torch.manual_seed(0)
    vlm = SmolVLMForConditionalGeneration(cfg).eval()
    weights = deterministic_weights({k: tuple(v.shape) for k, v in vlm.state_dict().items()})
    vlm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    tower = int(cfg.vision_config.image_size)
    grid_side = tower // int(cfg.vision_config.patch_size) // int(cfg.scale_factor)
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": 4 * tower}, resample=1, do_image_splitting=True, max_image_size={"longest_edge": tower},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": tower}})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 image_seq_len=grid_side ** 2, chat_template=_chat_template())
    processor.video_size = processor.image_processor.size = {"longest_edge": edge}
    frames = synthetic_video(n, h, w, seed)

    def load_video(fname, num_frames=None, fps=None, backend="pyav", sample_indices_fn=None, **kwargs):
        metadata = VideoMetadata(total_num_frames=n, fps=float(rate), duration=float(n / rate), video_backend=backend)
        indices = sample_indices_fn(metadata=metadata, **kwargs)
        metadata.frames_indices = indices
        return frames[indices], metadata

    original = pu.load_video
    pu.load_video = load_video
    try:
        conv = [[{"role": "user", "content": [{"type": "video", "path": "states"}, {"type": "text", "text": text}]}]]
        inputs = processor.apply_chat_template(conv, add_generation_prompt=False, tokenize=True, return_dict=True,
                                               return_tensors="pt", padding=True, max_frames=max_frames,
                                               video_load_backend="pyav")
    finally:
        pu.load_video = original
    with torch.no_grad():  # extract_l2l_fused_text_features, fp32 here
        out = vlm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                        output_hidden_states=True, output_attentions=False, use_cache=False, return_dict=True)
    states = torch.stack(out.hidden_states[:-1], dim=1)[0]  # [L, T, H]
    tensors = {"states": states.numpy().astype(np.float32), "input_ids": inputs["input_ids"][0].numpy().astype(np.int64)}
    meta = {"case": {"frames": n, "fps": rate, "height": h, "width": w, "seed": seed, "max_frames": max_frames,
                     "longest_edge": edge, "text": text, "tower": tower, "tokens_per_frame": grid_side ** 2,
                     "num_frames": int(inputs["pixel_values"].shape[1]),
                     "weights_sha256": hashlib.sha256(b"".join(weights[k].tobytes() for k in sorted(weights)))
                     .hexdigest(),
                     "attn_implementation": getattr(vlm.config, "_attn_implementation", None)},
            "provenance": _provenance()}
    _write(OUT_DIR / "states.safetensors", tensors, meta)


def _provenance() -> dict:
    import PIL
    import transformers

    return {"transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "generator": "tools/goldens.py"}


def main() -> int:
    import transformers

    if transformers.__version__ != TRANSFORMERS_VERSION:
        print(f"tools/goldens.py: needs transformers=={TRANSFORMERS_VERSION} (the authors' pin), found "
              f"{transformers.__version__}; see the module docstring for the environment", file=sys.stderr)
        return 2
    make_pixels()
    make_videos()
    make_labels()
    make_states()
    return 0


if __name__ == "__main__":
    sys.exit(main())
