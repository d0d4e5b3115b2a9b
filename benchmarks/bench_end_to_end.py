"""End-to-end efficiency of Frames2LoRA against video-in-context, on the real SmolVLM2
architectures with random weights (these costs do not depend on trained weights).

Three ways to ask a question about a video that the model has already seen once:

* **in context** -- the frames' visual tokens are in the prompt (prefill = vision tower +
  text model over every visual token + the question);
* **KV reuse** -- the video's KV cache was kept from an earlier prefill; a new question
  prefills only its own tokens against that cache (bytes kept per video: the KV cache);
* **adapter** -- the video was internalized once (encode + hypernetwork) into a LoRA
  adapter; a question prefills only its own tokens through the frozen model carrying the
  adapter (bytes kept per video: the adapter; zero visual tokens).

Measured per (model, frames, resolution): TTFT of each path, one-off internalization time,
the amortised cost per question against the number of questions per video, answer-time
input tokens, bytes kept per video, and peak GPU memory. Plus batched decode throughput
with distinct adapters vs none, and a training step of the 500M architecture with our
kernels vs the reference backends.

Resolutions above the model's frame size follow SmolVLM's image splitting: a frame of
side ``res`` becomes ``ceil(res / S)^2`` sub-images of side ``S`` plus one global image,
each ``tokens_per_frame`` tokens; both the in-context and the internalization paths see
the same images.

    python benchmarks/bench_end_to_end.py                     # GPU: 500M and 2.2B sweeps
    python benchmarks/bench_end_to_end.py --quick             # tiny preset on CPU, seconds
    f2l bench [--quick]                                       # the same

Writes ``benchmarks/results/end_to_end[_quick].json|csv`` under the current directory
(or ``--out DIR``), never into the installed source tree, and PNG plots (TTFT vs frames,
speed-up vs frames, amortised cost vs questions).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from _common import bench_env, plot_lines, sync, time_fn, write_results  # noqa: E402

QUESTION = "What happens in the video, and what colour is the car that appears first?"
QUESTIONS_PER_VIDEO = (1, 2, 4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------- helpers


def _reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _guard(fn):
    """Run ``fn``; return (result, status) with status 'ok' or 'OOM' (never raises OOM)."""
    try:
        return fn(), "ok"
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        _reset_peak()
        return None, "OOM"


def sub_images(res: int, image_size: int) -> int:
    """Images per frame under SmolVLM's splitting (1 when the frame fits)."""
    if res <= image_size:
        return 1
    n = math.ceil(res / image_size)
    return n * n + 1


class Bench:
    """One model (a preset with random weights) and the three question paths."""

    def __init__(self, preset: str, hypernet_preset: str, device: torch.device, dtype: torch.dtype, *, reps: int):
        from f2l import Frames2LoRA

        self.model = Frames2LoRA.from_pretrained(preset, preset=hypernet_preset, device=device, dtype=dtype)
        self.model.hypernet.eval()
        self.base = self.model.base
        self.device, self.dtype, self.reps = device, dtype, reps
        tc = self.base.model.config.text_config
        self.max_context = int(getattr(tc, "max_position_embeddings", 1 << 30))
        self.kv_bytes_per_token = (2 * self.base.num_layers * int(tc.num_key_value_heads)
                                   * (int(tc.hidden_size) // int(tc.num_attention_heads)) * dtype.itemsize)
        tok = self.base.tokenizer
        from f2l.prompt import question_prompt

        q = tok(question_prompt(QUESTION), add_special_tokens=False)["input_ids"]
        self.question_ids = torch.tensor([q], device=device)

    def time(self, fn) -> float:
        return time_fn(fn, warmup=2, rep=self.reps)

    # -- inputs
    def video(self, images: int, seed: int = 0):
        from f2l.video import Video

        g = torch.Generator().manual_seed(seed)
        s = self.base.image_size
        px = torch.randn(images, 3, s, s, generator=g).clamp_(-1, 1)
        return Video(pixel_values=px, timestamps=[float(i) for i in range(images)], duration=float(images))

    # -- the three paths
    def prefill(self, *, ids=None, embeds=None, cache=None, pos0: int = 0):
        tm = self.base.text_model
        T = (ids if ids is not None else embeds).shape[1]
        pos = torch.arange(pos0, pos0 + T, device=self.device)[None]
        out = tm(input_ids=ids, inputs_embeds=embeds, position_ids=pos, past_key_values=cache,
                 use_cache=cache is not None)
        return self.base.lm_head(out.last_hidden_state[:, -1]).argmax(-1)

    def in_context(self, video):
        from f2l.encode import multimodal_embeds, prompt_ids

        ids = prompt_ids(self.base, video, QUESTION)
        return ids.numel(), lambda: self.prefill(embeds=multimodal_embeds(self.base, ids, video)[None])

    def kv_reuse(self, video):
        """Prefill the video once into a cache; the timed call prefills the question only."""
        from f2l.encode import multimodal_embeds, prompt_ids
        from f2l.generate import _make_cache

        ids = prompt_ids(self.base, video, "")
        cache = _make_cache(self.base.model.config.text_config)
        t_video = self.time(lambda: self.prefill(embeds=multimodal_embeds(self.base, ids, video)[None]))
        self.prefill(embeds=multimodal_embeds(self.base, ids, video)[None], cache=cache)
        n0 = ids.numel()

        def ask():
            r = self.prefill(ids=self.question_ids, cache=cache, pos0=n0)
            _truncate_cache(cache, n0)
            return r

        return t_video, ask

    def internalize(self, video):
        def run():
            enc = self.model.encode([video])
            return self.model.adapter_tensors(enc)

        return run

    def with_adapter(self, tensors):
        patch = self.model.patch

        def ask():
            with patch.use(tensors.lora_a, tensors.lora_b, [0], scale=tensors.scale):
                return self.prefill(ids=self.question_ids)

        return ask

    def no_adapter(self):
        return lambda: self.prefill(ids=self.question_ids)


def _truncate_cache(cache, n: int) -> None:
    """Drop every cached position from ``n`` on (``crop``'s meaning differs across versions)."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]


# ----------------------------------------------------------------------------- sweeps


@torch.no_grad()
def sweep_questions(b: Bench, frames: int, res: int) -> dict:
    n_sub = sub_images(res, b.base.image_size)
    images = frames * n_sub
    video = b.video(images)
    row = {"model": b.base.name, "frames": frames, "resolution": res, "images": images,
           "visual_tokens": images * b.base.tokens_per_frame,
           "question_tokens": int(b.question_ids.shape[1])}
    n_ctx, run_ic = b.in_context(video)
    row["in_context_input_tokens"] = n_ctx
    row["adapter_input_tokens"] = int(b.question_ids.shape[1])
    row["kv_bytes_per_video"] = n_ctx * b.kv_bytes_per_token

    if n_ctx > b.max_context:
        row["in_context_status"] = f"exceeds context ({n_ctx} > {b.max_context})"
        row["kv_status"] = row["in_context_status"]
    else:
        _reset_peak()
        ms, status = _guard(lambda: b.time(run_ic))
        row.update(ttft_in_context_ms=ms, in_context_status=status, in_context_peak_gib=_peak_gib())
        _reset_peak()
        res_kv, status = _guard(lambda: b.kv_reuse(video))
        if res_kv is not None:
            t_video, ask = res_kv
            ms_kv, status = _guard(lambda: b.time(ask))
            row.update(video_prefill_ms=t_video, ttft_kv_reuse_ms=ms_kv)
        row.update(kv_status=status, kv_peak_gib=_peak_gib())

    _reset_peak()
    run_int = b.internalize(video)
    ms_int, status = _guard(lambda: b.time(run_int))
    row.update(internalize_ms=ms_int, internalize_status=status, internalize_peak_gib=_peak_gib())
    if status == "ok":
        tensors = run_int()
        row["adapter_bytes_per_video"] = sum(
            t[:, 0].numel() * b.dtype.itemsize for d in (tensors.lora_a, tensors.lora_b) for t in d.values())
        _reset_peak()
        row["ttft_adapter_ms"] = b.time(b.with_adapter(tensors))
        row["adapter_peak_gib"] = _peak_gib()
        row["ttft_no_adapter_ms"] = b.time(b.no_adapter())
        row["adapter_overhead"] = row["ttft_adapter_ms"] / row["ttft_no_adapter_ms"] - 1.0
        del tensors
    if row.get("ttft_in_context_ms") and row.get("ttft_adapter_ms"):
        row["speedup_vs_in_context"] = row["ttft_in_context_ms"] / row["ttft_adapter_ms"]
    if row.get("ttft_kv_reuse_ms") and row.get("ttft_adapter_ms"):
        row["speedup_vs_kv_reuse"] = row["ttft_kv_reuse_ms"] / row["ttft_adapter_ms"]
    if row.get("adapter_bytes_per_video"):
        row["bytes_ratio_kv_over_adapter"] = row["kv_bytes_per_video"] / row["adapter_bytes_per_video"]
    row["visual_token_reduction"] = row["in_context_input_tokens"] / row["adapter_input_tokens"]
    return row


def amortised_rows(row: dict) -> list[dict]:
    """Cost per question when a video gets ``q`` questions (one-off work spread over q)."""
    out = []
    for q in QUESTIONS_PER_VIDEO:
        base = {"model": row["model"], "frames": row["frames"], "resolution": row["resolution"], "questions": q}
        if row.get("internalize_ms") is not None and row.get("ttft_adapter_ms") is not None:
            out.append({**base, "path": "adapter", "ms_per_question": (row["internalize_ms"] + q * row["ttft_adapter_ms"]) / q})
        if row.get("ttft_in_context_ms") is not None:
            out.append({**base, "path": "in context", "ms_per_question": row["ttft_in_context_ms"]})
        if row.get("video_prefill_ms") is not None and row.get("ttft_kv_reuse_ms") is not None:
            out.append({**base, "path": "KV reuse", "ms_per_question": (row["video_prefill_ms"] + q * row["ttft_kv_reuse_ms"]) / q})
    return out


@torch.no_grad()
def decode_throughput(b: Bench, concurrency: int, steps: int) -> dict:
    """Tokens/s of KV-cached decode for ``concurrency`` questions, each with its own adapter."""
    from f2l.adapter import VideoAdapter
    from f2l.generate import _make_cache
    from f2l.layers import AdapterPool

    base = b.base
    shapes = base.module_shapes(tuple(b.model.hypernet.config.target_modules))
    r = int(b.model.hypernet.config.rank)
    L = base.num_layers
    pool = AdapterPool(L, shapes, r, concurrency, device=b.device, dtype=b.dtype)
    g = torch.Generator().manual_seed(0)
    for i in range(concurrency):
        a = {m: (torch.randn(L, r, di, generator=g) * di ** -0.5).to(b.dtype) for m, (di, do) in shapes.items()}
        bb = {m: (torch.randn(L, do, r, generator=g) * 0.01).to(b.dtype) for m, (di, do) in shapes.items()}
        pool.add(i, VideoAdapter(lora_a=a, lora_b=bb, scale=1.0, base_fingerprint=base.fingerprint, num_frames=1,
                                 source="bench", metadata={}, segments=[r]))
    ids = b.question_ids.expand(concurrency, -1).contiguous()
    T0 = ids.shape[1]

    def run(with_adapters: bool):
        ctx = b.model.patch.use_pool(pool, list(range(concurrency))) if with_adapters else contextlib.nullcontext()
        with ctx:
            cache = _make_cache(base.model.config.text_config)
            tm = base.text_model
            pos = torch.arange(T0, device=b.device)[None].expand(concurrency, -1)
            tok = base.lm_head(tm(input_ids=ids, position_ids=pos, past_key_values=cache,
                                  use_cache=True).last_hidden_state[:, -1]).argmax(-1)
            sync()
            t0 = time.perf_counter()
            for s in range(steps):
                p = torch.full((concurrency, 1), T0 + s, device=b.device)
                tok = base.lm_head(tm(input_ids=tok[:, None], position_ids=p, past_key_values=cache,
                                      use_cache=True).last_hidden_state[:, -1]).argmax(-1)
            sync()
            return time.perf_counter() - t0

    run(True)  # warm-up (compiles kernels)
    row = {"model": base.name, "concurrency": concurrency, "decode_steps": steps}
    for name, flag in (("adapters", True), ("no_adapter", False)):
        secs = min(run(flag) for _ in range(2))
        row[f"tokens_per_s_{name}"] = concurrency * steps / secs
    row["throughput_ratio"] = row["tokens_per_s_adapters"] / row["tokens_per_s_no_adapter"]
    return row


def training_step(b: Bench, frames: int, batch: int, backend: str, steps: int) -> dict:
    """Step time and peak memory of one hypernetwork training step (encode under no-grad,
    hypernetwork forward, the frozen model with the predicted LoRA on question + answer,
    backward, AdamW) with every op on ``backend``."""
    m = b.model
    m.hypernet.train()
    opt = torch.optim.AdamW([p for p in m.hypernet.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    videos = [b.video(frames, seed=i) for i in range(batch)]
    ids, mask, labels = m.question_ids([QUESTION] * batch, ["a red car drives past a tree on the left"] * batch)
    old = os.environ.get("F2L_BACKEND")
    os.environ["F2L_BACKEND"] = backend
    try:
        with torch.no_grad():
            enc = m.encode(videos)

        def step():
            opt.zero_grad(set_to_none=True)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if b.device.type == "cuda" else contextlib.nullcontext()
            with autocast:
                tensors = m.adapter_tensors(enc)
                logits = m.lm_forward(ids, mask, tensors)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.hypernet.parameters(), 1.0)
            opt.step()
            return loss

        step()
        _reset_peak()
        ms = time_fn(step, warmup=1, rep=steps)
        row = {"model": b.base.name, "frames": frames, "batch": batch, "backend": backend, "step_ms": ms,
               "peak_gib": _peak_gib()}
    finally:
        if old is None:
            os.environ.pop("F2L_BACKEND", None)
        else:
            os.environ["F2L_BACKEND"] = old
        m.hypernet.eval()
    return row


# ----------------------------------------------------------------------------- report


def _fmt(v, spec=".1f"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def table(rows: list[dict]) -> str:
    head = ("| model | frames | px | visual tokens | TTFT in context (ms) | TTFT KV reuse (ms) | TTFT adapter (ms) "
            "| speed-up | internalize (ms) | KV bytes / adapter bytes |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        ic = _fmt(r.get("ttft_in_context_ms")) if r.get("in_context_status", "ok") == "ok" else r["in_context_status"]
        kv = _fmt(r.get("ttft_kv_reuse_ms"), ".2f") if r.get("kv_status", "ok") == "ok" else r["kv_status"]
        lines.append(f"| {r['model']} | {r['frames']} | {r['resolution']} | {r['visual_tokens']} | {ic} | {kv} | "
                     f"{_fmt(r.get('ttft_adapter_ms'), '.2f')} | {_fmt(r.get('speedup_vs_in_context'))}× | "
                     f"{_fmt(r.get('internalize_ms'))} | {_fmt(r.get('bytes_ratio_kv_over_adapter'))} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="f2l bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset on CPU in seconds (the same code paths)")
    p.add_argument("--models", nargs="+", default=None, help="presets (default: smolvlm2-500m smolvlm2-2.2b)")
    p.add_argument("--frames", nargs="+", type=int, default=None, help="frame counts (default 8 16 64 256 1024)")
    p.add_argument("--resolutions", nargs="+", type=int, default=None,
                   help="frame sides for the resolution sweep at --res-frames frames (default: up to 1024 px)")
    p.add_argument("--res-frames", type=int, default=16, help="frames of the resolution sweep")
    p.add_argument("--concurrency", nargs="+", type=int, default=None, help="decode batch sizes (default 1 16 64 256)")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--train-frames", type=int, default=12)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["questions", "resolution", "serving", "training"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--out", default=None, help="results directory (default ./benchmarks/results under the "
                                              "current directory)")
    p.add_argument("--name", default=None, help="results file stem (default end_to_end or end_to_end_quick)")
    return p.parse_args(argv)


def results_dir(out: str | None) -> str:
    """Where results go: ``--out``, else ``benchmarks/results`` under the current directory
    (the source tree's own folder only when run from the checkout's root)."""
    return os.path.abspath(out if out else os.path.join("benchmarks", "results"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("f2l bench: no CUDA GPU here; running the --quick configuration (tiny preset on CPU)", file=sys.stderr)
        args.quick = True
    if args.quick:
        models = args.models or ["tiny"]
        frames = args.frames or [2, 4]
        resolutions = args.resolutions or [None, "x2"]
        concurrency = args.concurrency or [1, 4]
        steps = args.decode_steps or 4
        reps = args.reps or 3
        args.train_frames, args.train_batch = min(args.train_frames, 2), min(args.train_batch, 2)
        hyper = "tiny"
        name = args.name or "end_to_end_quick"
    else:
        models = args.models or ["smolvlm2-500m", "smolvlm2-2.2b"]
        frames = args.frames or [8, 16, 64, 256, 1024]
        resolutions = args.resolutions or [384, 512, 768, 1024]
        concurrency = args.concurrency or [1, 16, 64, 256]
        steps = args.decode_steps or 32
        reps = args.reps or 20
        hyper = "frames2lora"
        name = args.name or "end_to_end"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    out_dir = results_dir(args.out)
    from tqdm.auto import tqdm

    rows, amortised, serving, training = [], [], [], []
    for preset in models:
        b = Bench(preset, hyper, device, dtype, reps=reps)
        S = b.base.image_size
        jobs = []
        if "questions" not in args.skip:
            jobs += [(f, S) for f in frames]
        if "resolution" not in args.skip:
            res = [2 * S if r == "x2" else (S if r is None else int(r)) for r in resolutions]
            jobs += [(args.res_frames if not args.quick else frames[0], r) for r in res if r != S or "questions" in args.skip]
        for f, r in tqdm(jobs, desc=f"{preset}: questions", leave=False):
            row = sweep_questions(b, f, r)
            row["sweep"] = "resolution" if r != S else "frames"
            rows.append(row)
            amortised += amortised_rows(row)
        if "serving" not in args.skip:
            for c in tqdm(concurrency, desc=f"{preset}: decode", leave=False):
                got, status = _guard(lambda b=b, c=c: decode_throughput(b, c, steps))
                serving.append(got or {"model": b.base.name, "concurrency": c, "status": status})
        if "training" not in args.skip and (args.quick or preset == "smolvlm2-500m"):
            for backend in ("reference", "auto"):
                got, status = _guard(lambda b=b, backend=backend: training_step(b, args.train_frames, args.train_batch, backend,
                                                           reps if args.quick else 10))
                training.append(got or {"model": b.base.name, "backend": backend, "status": status})
        del b
        _reset_peak()
    for t in training:
        ref = next((x for x in training if x.get("model") == t.get("model") and x.get("backend") == "reference"), None)
        if ref and ref.get("step_ms") and t.get("step_ms"):
            t["speedup_vs_reference"] = ref["step_ms"] / t["step_ms"]

    env = bench_env()
    all_rows = ([{"kind": "question", **r} for r in rows] + [{"kind": "amortised", **r} for r in amortised]
                + [{"kind": "serving", **r} for r in serving] + [{"kind": "training", **r} for r in training])
    jpath, cpath = write_results(name, all_rows, env, out_dir=out_dir)
    frows = [r for r in rows if r["sweep"] == "frames"]
    plots = []
    if frows:
        series = []
        for r in frows:
            for key, label in (("ttft_in_context_ms", "in context"), ("ttft_kv_reuse_ms", "KV reuse"),
                               ("ttft_adapter_ms", "adapter")):
                if r.get(key) is not None:
                    series.append({"frames": r["frames"], "ms": r[key], "path": f"{r['model']}: {label}"})
        plots.append(plot_lines(os.path.join(out_dir, f"{name}_ttft_vs_frames.png"), series, x="frames", y="ms",
                                series="path", title=f"Query TTFT vs frames ({env['device']})", logx=True, logy=True,
                                ylabel="time to first token (ms)"))
        plots.append(plot_lines(os.path.join(out_dir, f"{name}_speedup_vs_frames.png"),
                                [r for r in frows if r.get("speedup_vs_in_context")], x="frames",
                                y="speedup_vs_in_context", series="model", logx=True, logy=True,
                                title="TTFT speed-up of the adapter over video in context",
                                ylabel="speed-up (×)"))
    if amortised:
        f_mid = sorted({r["frames"] for r in frows})[len({r["frames"] for r in frows}) // 2] if frows else None
        pick = [dict(r, path=f"{r['model']}: {r['path']}") for r in amortised if r["frames"] == f_mid
                and r["resolution"] == next(x["resolution"] for x in frows if x["frames"] == f_mid)]
        plots.append(plot_lines(os.path.join(out_dir, f"{name}_amortised.png"), pick, x="questions",
                                y="ms_per_question", series="path", logx=True, logy=True,
                                title=f"Cost per question vs questions per video ({f_mid} frames)",
                                ylabel="ms per question (one-off work amortised)"))
    print(table(rows))
    if serving:
        print("\n| model | concurrent questions | tokens/s with distinct adapters | tokens/s no adapter | ratio |")
        print("|---|---|---|---|---|")
        for s in serving:
            print(f"| {s['model']} | {s['concurrency']} | {_fmt(s.get('tokens_per_s_adapters'))} | "
                  f"{_fmt(s.get('tokens_per_s_no_adapter'))} | {_fmt(s.get('throughput_ratio'), '.2f')} |")
    if training:
        print("\n| model | frames | batch | backend | step (ms) | peak (GiB) | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for t in training:
            print(f"| {t['model']} | {t.get('frames', '-')} | {t.get('batch', '-')} | {t['backend']} | "
                  f"{_fmt(t.get('step_ms'))} | {_fmt(t.get('peak_gib'), '.2f')} | {_fmt(t.get('speedup_vs_reference'), '.2f')} |")
    print(f"\nwrote {jpath}, {cpath}" + "".join(f", {p}" for p in plots))
    return {"json": jpath, "csv": cpath, "plots": plots, "rows": all_rows, "env": env}


if __name__ == "__main__":
    main()
