"""The ``f2l`` command.

``f2l <command> [options]``; ``f2l <command> --help`` documents each one. Every command
imports its machinery lazily, so ``f2l --help`` is instant and a command whose module is
broken or missing (an optional extra not installed) leaves the others working.

Exit codes: 0 success; 2 user error (bad arguments, missing or invalid files, an adapter
made for another base model) with one line ``f2l <command>: error: ...`` on stderr and no
traceback; 1 an unexpected internal error (traceback shown), or ``f2l infer`` finished with
rows whose video could not be read (marked in the output); 130 interrupted.
``F2L_DEBUG=1`` shows the traceback of user errors too.

Length: the command table, the argument/handler pair of each of its eleven commands (which
the table finds by name in this module) and the option helpers they share; every handler
is a thin adapter from parsed arguments to a library call that it imports lazily, so the
machinery itself lives in the modules below.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from dataclasses import dataclass

__all__ = ["main", "CommandError"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A user error: reported as one line and exit code 2."""


class _ParserExit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the usage block too)."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def exit(self, status: int = 0, message: str | None = None):  # noqa: D102
        if message:
            (sys.stderr if status else sys.stdout).write(message)
        raise _ParserExit(status)


@dataclass(frozen=True)
class _Command:
    name: str
    summary: str
    passthrough: bool = False  # the command parses its own arguments

    @property
    def _stem(self) -> str:
        return "_" + self.name.replace("-", "_")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        globals()[self._stem + "_args"](parser)

    def run(self, args) -> int | None:
        return globals()[self._stem + "_run"](args)


# Each command is a pair ``_<name>_args(parser)`` / ``_<name>_run(args)`` below; both
# import what they need inside, so this table costs nothing to build.
_COMMANDS = [
    _Command("demo", "train a tiny Frames2LoRA end to end and report accuracy and speed"),
    _Command("internalize", "turn videos into LoRA adapters (one .safetensors file per video)"),
    _Command("ask", "answer questions with an adapter (zero visual tokens)"),
    _Command("compose", "concatenate adapters of video segments in rank space"),
    _Command("export-peft", "write an adapter as a PEFT LoRA directory (PEFT, vLLM)"),
    _Command("convert", "convert an official Frames2LoRA checkpoint (.pt) to an f2l hypernetwork"),
    _Command("infer", "answer every row of a JSONL manifest (batched, resumable)"),
    _Command("train", "train a hypernetwork on JSONL manifests"),
    _Command("teacher", "fill a manifest's target_text by greedy generation with the video in context"),
    _Command("eval", "compare two systems' answers: EM/F1, paired bootstrap CI, equivalence, non-inferiority"),
    _Command("bench", "run the end-to-end benchmark (benchmarks/bench_end_to_end.py)", passthrough=True),
]
_BY_NAME = {c.name: c for c in _COMMANDS}


def _top_help() -> str:
    w = max(len(c.name) for c in _COMMANDS)
    lines = ["usage: f2l <command> [options]", "",
             "Frames2LoRA: videos to LoRA adapters for SmolVLM2; answer with zero visual tokens.", "",
             "commands:"]
    lines += [f"  {c.name:<{w}}  {c.summary}" for c in _COMMANDS]
    lines += ["", "options:", "  -h, --help     show this message", "  --version      show the version", "",
              "'f2l <command> --help' documents a command."]
    return "\n".join(lines) + "\n"


def _version() -> str:
    try:
        from f2l_kernels import __version__
    except Exception:  # pragma: no cover - the package is broken beyond the CLI's reach
        return "unknown"
    return __version__


def _is_user_error(e: BaseException) -> bool:
    # Library functions validate their inputs and raise ValueError/TypeError naming the
    # argument; files are the user's. Anything else is a bug and keeps its traceback.
    return isinstance(e, (CommandError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError, FileExistsError))


def _one_line(e: BaseException) -> str:
    msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror or e}: {e.filename!r}"
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    msg = " ".join(msg.split())  # one line, whatever the exception carried
    return msg or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``f2l`` with ``argv`` (default ``sys.argv[1:]``).

    Returns 0 on success; raises ``SystemExit`` with the exit code otherwise (2 for user
    errors, after one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(_top_help())
        raise SystemExit(EXIT_USAGE)
    head = argv[0]
    if head in ("-h", "--help", "help") and len(argv) == 1:
        sys.stdout.write(_top_help())
        return EXIT_OK
    if head == "help" and len(argv) > 1:  # `f2l help ask` == `f2l ask --help`
        argv = [argv[1], "--help"]
        head = argv[0]
    if head == "--version":
        sys.stdout.write(f"f2l {_version()}\n")
        return EXIT_OK
    cmd = _BY_NAME.get(head)
    if cmd is None:
        sys.stderr.write(f"f2l: error: unknown command {head!r} (choose from {', '.join(_BY_NAME)}; "
                         "see 'f2l --help')\n")
        raise SystemExit(EXIT_USAGE)
    prog = f"f2l {cmd.name}"
    debug = os.environ.get("F2L_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    with warnings.catch_warnings():
        if not debug:  # library warnings as one line each, like the errors
            warnings.showwarning = lambda message, category, *a, **k: sys.stderr.write(
                f"{prog}: warning: {' '.join(str(message).split())}\n")
        return _dispatch(cmd, argv[1:], prog, debug)


def _dispatch(cmd: _Command, argv: list[str], prog: str, debug: bool) -> int:
    try:
        if cmd.passthrough:
            try:
                code = cmd.run(argv)
            except SystemExit as e:  # its own parser's --help (0) or usage error (2)
                if e.code in (0, None):
                    return EXIT_OK
                raise
        else:
            parser = _Parser(prog=prog, description=cmd.summary[0].upper() + cmd.summary[1:] + ".")
            cmd.add_arguments(parser)
            args = parser.parse_args(argv)
            code = cmd.run(args)
        if code:
            raise SystemExit(int(code))
        return EXIT_OK
    except _ParserExit as e:
        if e.code:
            raise SystemExit(e.code) from None
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ImportError as e:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: error: this command cannot run: {_one_line(e)}\n")
        raise SystemExit(EXIT_INTERNAL) from None
    except Exception as e:  # noqa: BLE001 - the CLI is the outermost layer
        if not _is_user_error(e):
            raise
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: error: {_one_line(e)}\n")
        raise SystemExit(EXIT_USAGE) from None


# --------------------------------------------------------------------------- shared options

_DTYPES = ("float32", "bfloat16", "float16")


def _add_model_options(p: argparse.ArgumentParser, *, hypernet: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--base", default=None,
                   help="base model: preset (tiny, smolvlm2-256m, smolvlm2-500m, smolvlm2-2.2b) or SmolVLM2 "
                        "checkpoint directory (default: the one recorded with the hypernetwork or adapter)")
    if hypernet:
        g.add_argument("--hypernet", default=None,
                       help="f2l hypernetwork directory or official .pt checkpoint (default: an untrained one)")
        g.add_argument("--preset", default=None, choices=("frames2lora", "tiny"),
                       help="architecture of an untrained or official hypernetwork (default: frames2lora)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=_DTYPES, help="model dtype (default: float32)")


def _dtype(name):
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _need_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise CommandError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise CommandError(f"{what} {path!r} is a directory; expected a file")
    return path


def _out_dir(path: str, what: str = "-o/--output") -> str:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{what} {path!r} exists and is not a directory")
    return path


def _recorded_base(hypernet: str | None) -> tuple[str | None, str]:
    """``(base, hint)``: the base recorded next to a saved hypernetwork (f2l_config.json),
    and for the error message when there is none, what an official checkpoint names."""
    if not hypernet:
        return None, ""
    if os.path.isdir(hypernet):
        p = os.path.join(hypernet, "f2l_config.json")
        if os.path.isfile(p):
            import json

            try:
                with open(p) as f:
                    base = json.load(f).get("base")
            except (OSError, ValueError):
                return None, ""
            if isinstance(base, str) and base and base != "unknown":
                return base, ""
        return None, ""
    if os.path.isfile(hypernet):
        from f2l.convert import read_official

        # never guess a preset here: presets have random weights, the checkpoint needs the real base
        name = read_official(hypernet).base_model_name_or_path
        return None, f" (the checkpoint was trained on {name}: pass its local directory)" if name else ""
    return None, ""


def _build_model(args, *, need_hypernet: bool = True, target_modules=None):
    """Frames2LoRA from --base/--hypernet/--preset (a small placeholder hypernetwork when
    the command never runs one)."""
    from f2l.model import Frames2LoRA

    _check_device(args)
    hyper = getattr(args, "hypernet", None) if need_hypernet else None
    if hyper is not None and not os.path.exists(hyper):
        raise CommandError(f"--hypernet {hyper!r} does not exist")
    base, hint = (args.base, "") if args.base else _recorded_base(hyper)
    if base is None:
        raise CommandError("pass --base (a preset name or a SmolVLM2 checkpoint directory); nothing records "
                           "which base model to use" + hint)
    if not need_hypernet:
        from f2l.config import HypernetConfig
        from f2l.hypernet import Frames2LoRAHypernet
        from f2l.presets import load_base

        b = load_base(base, device=args.device, dtype=_dtype(args.dtype))
        hc = HypernetConfig.tiny(b, target_modules=tuple(target_modules) if target_modules else None)
        return Frames2LoRA.from_pretrained(b, hypernet=Frames2LoRAHypernet(hc), device=args.device,
                                           dtype=_dtype(args.dtype))
    if hyper is None:
        warnings.warn("no --hypernet given: using an untrained hypernetwork (its adapters carry no information)",
                      stacklevel=2)
    return Frames2LoRA.from_pretrained(base, hypernet=hyper, preset=getattr(args, "preset", None),
                                       device=args.device, dtype=_dtype(args.dtype))


def _check_device(args) -> None:
    if getattr(args, "device", None) is not None:
        from f2l.checks import check_device

        check_device(args.device, what="--device")


def _locked(path: str):
    """The exclusive lock of one output (f2l.files.OutputLock: a second writer gets a clear error)."""
    from f2l.files import OutputLock

    return OutputLock(path)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _finite(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


# --------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    from f2l.demo import add_demo_arguments

    add_demo_arguments(p)


def _demo_run(args) -> int:
    from f2l.demo import run_demo

    run_demo(args.out_dir, quick=args.quick, seed=args.seed, device=args.device, base=args.base)
    return EXIT_OK


# --------------------------------------------------------------------------- eval


def _eval_args(p: argparse.ArgumentParser) -> None:
    from f2l.eval import add_eval_arguments

    add_eval_arguments(p)


def _eval_run(args) -> int:
    from f2l.eval import run_eval_cli

    return run_eval_cli(args)


# --------------------------------------------------------------------------- internalize


def _internalize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (or directories of frames)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for the adapters (DIR/<video name>.safetensors)")
    p.add_argument("--instruction", default=None, help="internalization instruction (default: the model's)")
    p.add_argument("--batch-size", type=_positive, default=8, help="videos per hypernetwork batch (default: 8)")
    p.add_argument("--long", action="store_true",
                   help="long videos: cut into segments of --segment-frames, one composed adapter per video")
    p.add_argument("--segment-frames", type=_positive, default=None, help="frames per segment with --long")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only this worker's share of the videos: 'i/n' or 'rank' (RANK/WORLD_SIZE of torchrun); "
                        "n workers with the same arguments cover every video once")
    _add_model_options(p)


def _adapter_names(videos: list[str]) -> list[str]:
    """<stem>.safetensors per video; repeated stems get the video's index appended."""
    stems = [os.path.splitext(os.path.basename(os.path.normpath(v)))[0] or "video" for v in videos]
    out = []
    for i, s in enumerate(stems):
        out.append(f"{s}.safetensors" if stems.count(s) == 1 else f"{s}-{i}.safetensors")
    return out


def _internalize_run(args) -> int:
    from f2l.shard import parse_shard, select

    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise CommandError(f"--{e}") from None
    for v in args.videos:
        if not os.path.exists(v):
            raise CommandError(f"video {v!r} does not exist")
    out = _out_dir(args.output)
    # names come from the whole list, so every shard names a video as an unsharded run would
    pairs = select(list(zip(args.videos, _adapter_names(list(args.videos)))),
                   [os.path.normpath(v) for v in args.videos], shard)
    videos, names = [v for v, _ in pairs], [n for _, n in pairs]
    if not videos:
        print(f"shard {args.shard}: no videos of this shard")
        return EXIT_OK
    model = _build_model(args)
    if args.long:
        adapters = [model.internalize_long(v, args.instruction, segment_frames=args.segment_frames)
                    for v in videos]
    else:
        adapters = model.internalize(videos, args.instruction, batch_size=args.batch_size)
    for v, ad in zip(videos, adapters):  # nothing is written when any adapter is unusable
        try:
            ad.check_finite()
        except ValueError as e:
            raise CommandError(f"the adapter of {v!r} is unusable ({e}); is the hypernetwork damaged?") from None
    os.makedirs(out, exist_ok=True)
    for name, ad in zip(names, adapters):
        path = os.path.join(out, name)
        ad.save(path)
        print(f"{path}  (rank {ad.rank}, {ad.num_frames} frames)")
    return EXIT_OK


# --------------------------------------------------------------------------- ask


def _ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="adapter file written by 'f2l internalize' or 'f2l compose'")
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="questions about the video (one batch)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="answer length limit (default: 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="debugging: load an adapter even if it holds NaN/Inf (default: refuse it)")
    _add_model_options(p, hypernet=False)


def _ask_run(args) -> int:
    from f2l.adapter import VideoAdapter

    _need_file(args.adapter, "adapter")
    ad = VideoAdapter.load(args.adapter, allow_nonfinite=args.allow_nonfinite)  # the header says which base
    if args.base is None:
        args.base = ad.metadata.get("base") if isinstance(ad.metadata.get("base"), str) else None
    model = _build_model(args, need_hypernet=False, target_modules=ad.target_modules)
    ad.check_base(model.base.fingerprint, what="--base", base_name=model.base.name)
    ad = ad.to(model.device, model.base.dtype)
    answers = model.answer([ad] * len(args.questions), list(args.questions), max_new_tokens=args.max_new_tokens)
    if args.json:
        import json

        for q, a in zip(args.questions, answers):
            print(json.dumps({"question": q, "answer": a}, ensure_ascii=False))
    else:
        for q, a in zip(args.questions, answers):
            print(a if len(args.questions) == 1 else f"Q: {q}\nA: {a}")
    return EXIT_OK


# --------------------------------------------------------------------------- compose


def _compose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapters of consecutive segments, in order")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="composed adapter (.safetensors)")
    p.add_argument("--weights", nargs="+", type=_finite, default=None, metavar="W",
                   help="one weight per adapter (multiplies its delta; default: 1 each)")
    p.add_argument("--no-share-bias", action="store_true",
                   help="concatenate every part's bias-LoRA ranks too (default: kept once)")
    p.add_argument("--bias-scaler", type=_finite, default=None, metavar="S",
                   help="multiply the bias-LoRA ranks' A and B by S (their delta by S^2), as the authors' "
                        "combine_lora bias_scaler; default 1")


def _compose_run(args) -> int:
    from f2l.adapter import VideoAdapter

    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise CommandError(f"--weights: expected {len(args.adapters)} values (one per adapter), "
                           f"got {len(args.weights)}")
    if os.path.isdir(args.output):
        raise CommandError(f"-o/--output {args.output!r} is a directory; expected a file path")
    parts = [VideoAdapter.load(_need_file(a, "adapter")) for a in args.adapters]
    out = VideoAdapter.compose(parts, weights=args.weights, share_bias=not args.no_share_bias,
                               bias_scaler=args.bias_scaler)
    out.save(args.output)
    print(f"{args.output}  (rank {out.rank} = segments {out.segments} + bias {out.bias_rank})")
    return EXIT_OK


# --------------------------------------------------------------------------- export-peft


def _export_peft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="adapter file (.safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="PEFT LoRA directory to write")
    p.add_argument("--base", default=None,
                   help="base model (preset or checkpoint dir): checks the adapter was made for it and that "
                        "every exported module name exists in it")
    p.add_argument("--base-model-name-or-path", default=None,
                   help="base_model_name_or_path recorded in adapter_config.json (default: the base's hub id)")
    p.add_argument("--layers-path", default=None,
                   help="dotted path of the decoder layer list (default: model.text_model.layers, SmolVLM2)")


def _export_peft_run(args) -> int:
    from f2l.export import export_peft

    _need_file(args.adapter, "adapter")
    _out_dir(args.output)
    with _locked(args.output):
        info = export_peft(args.adapter, args.output, base=args.base,
                           base_model_name_or_path=args.base_model_name_or_path, layers_path=args.layers_path)
    vllm = info["vllm"]["max_lora_rank"]
    print(f"{info['out_dir']}  (PEFT LoRA: {info['modules']} modules, r={info['rank']}, "
          f"lora_alpha={info['lora_alpha']:g}; vLLM: --enable-lora --max-lora-rank {vllm})")
    return EXIT_OK


# --------------------------------------------------------------------------- convert


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="official checkpoint, e.g. frames2lora-smolvlm2-500m-best-ce.pt")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="f2l hypernetwork directory to write")
    p.add_argument("--base", default=None,
                   help="base model to record (default: the preset matching the checkpoint's base model)")
    p.add_argument("--head-dim", type=_positive, default=128,
                   help="perceiver head size (default: 128, the official value; heads follow from it)")


def _convert_run(args) -> int:
    from f2l.convert import convert_checkpoint, infer_config, read_official

    _need_file(args.checkpoint, "checkpoint")
    _out_dir(args.output)
    cfg = infer_config(read_official(args.checkpoint), head_dim=args.head_dim)
    info = convert_checkpoint(args.checkpoint, args.output, cfg, base=args.base)
    print(f"{info['out_dir']}  ({info['parameters']:,} parameters; {info['num_layers']} layers, rank {info['rank']} "
          f"+ bias {info['bias_rank']}, modules {sorted(info['target_modules'])}; base {info['base']})")
    return EXIT_OK


# --------------------------------------------------------------------------- infer


def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="JSONL manifest (id, video_path, prompt, ...)")
    p.add_argument("--output", required=True, help="predictions JSONL (input rows + prediction); resumed if present")
    p.add_argument("--data-root", default=None, help="root of relative video paths (default: the manifest's dir)")
    p.add_argument("--confine-to-data-root", action="store_true",
                   help="refuse rows whose video resolves outside the data root ('..', absolute paths, symlinks)")
    p.add_argument("--split", default=None, help="only rows of this split (default: all)")
    p.add_argument("--batch-size", type=_positive, default=8, help="rows per batch (default: 8)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="answer length limit (default: 32)")
    p.add_argument("--limit", type=_positive, default=None, help="process at most this many new rows")
    p.add_argument("--instruction", default=None, help="internalization instruction (default: the model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only this worker's rows: 'i/n' or 'rank' (RANK/WORLD_SIZE of torchrun); writes "
                        "OUTPUT's stem + .shard-I-of-N.jsonl, resumable on its own")
    p.add_argument("--merge", type=_positive, default=None, metavar="N",
                   help="join the N shard files of --output into --output (manifest order, one row per id) "
                        "and exit")
    _add_model_options(p)


def _infer_merge(args) -> int:
    from f2l.shard import merge_predictions

    with _locked(args.output):
        try:
            r = merge_predictions(args.manifest, args.output, args.merge, data_root=args.data_root, split=args.split)
        except FileNotFoundError as e:
            raise CommandError(str(e)) from None
    print(f"{r['output']}: {r['rows']} rows from {args.merge} shards"
          + (f", {len(r['missing'])} ids not answered yet (first: {r['missing'][0]!r})" if r["missing"] else ""))
    return EXIT_OK if not r["missing"] else EXIT_INTERNAL


def _infer_run(args) -> int:
    from f2l.infer import run_inference
    from f2l.shard import parse_shard, shard_path

    _need_file(args.manifest, "--manifest")
    if os.path.isdir(args.output):
        raise CommandError(f"--output {args.output!r} is a directory; expected a .jsonl file path")
    if args.merge is not None:
        if args.shard is not None:
            raise CommandError("--merge joins finished shards; do not pass --shard with it")
        return _infer_merge(args)
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise CommandError(f"--{e}") from None
    args.output = shard_path(args.output, shard)
    with _locked(args.output):
        if args.confine_to_data_root:  # check the manifest before loading any model
            from f2l.data.manifest import read_manifest

            read_manifest(args.manifest, data_root=args.data_root, split=args.split, confine=True)
        model = _build_model(args)
        label = os.path.basename(os.path.normpath(args.hypernet)) if args.hypernet else None
        r = run_inference(model, args.manifest, args.output, data_root=args.data_root, split=args.split,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                          instruction=args.instruction, checkpoint=label, progress=not args.no_progress,
                          confine=args.confine_to_data_root, shard=shard)
    print(f"{r['output']}: {r['written']} new predictions, {r['skipped']} already done, {r['errors']} errors "
          f"({r['total']} rows)")
    return EXIT_OK if not r["errors"] else EXIT_INTERNAL


# --------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    from f2l.train import add_train_arguments

    add_train_arguments(p)


def _train_run(args) -> int:
    from f2l.train import config_from_args, train

    summary = train(config_from_args(args))
    if isinstance(summary, dict):
        keys = [k for k in ("steps", "final_loss", "out_dir", "hypernet_dir") if k in summary]
        if keys:
            print("  ".join(f"{k}={summary[k]}" for k in keys))
    return EXIT_OK


# --------------------------------------------------------------------------- teacher


def _teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="JSONL manifest whose target_text to fill")
    p.add_argument("--model", required=True, metavar="PRESET_OR_DIR",
                   help="teacher VLM: preset or SmolVLM2 checkpoint dir (the official targets: SmolVLM2-2.2B)")
    p.add_argument("--output", required=True, help="manifest to write (may equal --manifest)")
    p.add_argument("--data-root", default=None, help="root of relative video paths (default: the manifest's dir)")
    p.add_argument("--split", default=None, help="only rows of this split (default: all)")
    p.add_argument("--batch-size", type=_positive, default=4, help="videos per generation batch (default: 4)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="target length limit (default: 64)")
    p.add_argument("--overwrite", action="store_true", help="regenerate rows that already have a target")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="model dtype (default: float32)")


def _teacher_run(args) -> int:
    from f2l.teacher import load_teacher, run_teacher

    _need_file(args.manifest, "--manifest")
    if os.path.isdir(args.output):
        raise CommandError(f"--output {args.output!r} is a directory; expected a .jsonl file path")
    _check_device(args)
    with _locked(args.output):
        teacher = load_teacher(args.model, device=args.device, dtype=_dtype(args.dtype))
        r = run_teacher(teacher, args.manifest, args.output, data_root=args.data_root, split=args.split,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"{r['output']}: {r['filled']} targets generated, {r['resumed']} resumed, {r['kept']} kept "
          f"({r['total']} rows)")
    return EXIT_OK


# --------------------------------------------------------------------------- bench


def _bench_script() -> str:
    env = os.environ.get("F2L_BENCH_SCRIPT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "benchmarks", "bench_end_to_end.py")


def _bench_args(p: argparse.ArgumentParser) -> None:  # pragma: no cover - bench parses its own arguments
    raise AssertionError("bench forwards its arguments")


def _bench_run(argv: list[str]) -> int:
    import importlib.util

    path = _bench_script()
    if not os.path.isfile(path):
        raise CommandError(f"the end-to-end benchmark {path!r} is not here (it ships with a source checkout of "
                           "f2l, not with the wheel)")
    spec = importlib.util.spec_from_file_location("f2l_bench_end_to_end", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise CommandError(f"{path!r} has no main(argv)")
    # its argparse errors get the same one-line form as every other command's
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _Parser.error
    try:
        mod.main(argv)
    finally:
        argparse.ArgumentParser.error = saved
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except SystemExit as e:
        sys.exit(e.code)
