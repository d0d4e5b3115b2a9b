"""``F2LConfig``: everything besides weights that a Frames2LoRA checkpoint needs --
which base it was trained on, the hypernetwork's architecture, how frames are sampled,
and the internalization instruction -- plus the atomic file helpers the model layer uses.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_INSTRUCTION = "Internalize this video for later captioning."
DEFAULT_LONGEST_EDGE = 384  # frames' intermediate longest edge, the authors' setting (f2l.video uses it)
CONFIG_VERSION = 1


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only there)
    os.umask(old)
    return old


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _temp_prefix(name: str) -> str:
    # The writer's pid is part of the name, so a later run can tell a dead writer's leftovers
    # (removed) from a live writer's work in progress (left alone).
    return f".{name}.{os.getpid()}."


def clean_stale_temps(parent, name: str) -> list[str]:
    """Remove ``.{name}.<pid>.*.tmp`` files/dirs in ``parent`` whose writer process is gone
    (what a killed atomic write leaves behind). Returns the removed paths."""
    import shutil

    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    head = f".{name}."
    for e in entries:
        if not (e.startswith(head) and e.endswith(".tmp")):
            continue
        pid = e[len(head):].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        p = os.path.join(parent, e)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory + ``os.replace``,
    so a reader never sees a half-written file. The file gets the mode an ordinary
    ``open(path, "w")`` would (0666 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` save through a temp file + ``os.replace``."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def atomic_dir(final, write) -> None:
    """Build a directory under a temporary name beside ``final`` (``write(tmp_dir)``), then
    move it into place; an existing ``final`` is replaced only once the new one is complete.
    If ``write`` raises, nothing at ``final`` changes and the temporary directory is removed."""
    import shutil

    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.dirname(final), os.path.basename(final)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temps(parent, name)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        write(tmp)
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".tmp", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_finite(name: str, t) -> None:
    """ValueError naming ``name`` when tensor ``t`` holds NaN or Inf."""
    import torch

    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: holds {bad} non-finite value(s) (NaN/Inf) of {t.numel()}; expected finite "
                         f"numbers")


def check_device(device, *, what: str = "device"):
    """``torch.device(device)``, with a ValueError naming ``what`` for a name torch does not
    know or a CUDA device this machine does not have (instead of torch's RuntimeError later)."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"{what}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") \
                from None
    else:
        raise TypeError(f"{what}: expected a str or torch.device, got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{what}: {str(device)!r} requested but {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{what}: {str(device)!r} requested but MPS is not available")
    return dev


class OutputBusyError(FileExistsError):
    """Another live process holds the lock of an output."""


class OutputLock:
    """An exclusive lock on one output (a file or a directory), held by one process.

    The lock is the file ``<output>.lock`` beside the output, holding the owner's pid and
    host as JSON, and an ``fcntl.flock`` on it -- so a lock whose owner died (kill -9) is
    free again at once and the next writer takes it over. A second writer gets
    :class:`OutputBusyError` naming the owner's pid. Use as a context manager.
    """

    def __init__(self, output):
        self.output = os.path.abspath(os.fspath(output))
        self.path = self.output + ".lock"
        self._fd = None

    def acquire(self) -> "OutputLock":
        import fcntl
        import socket

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"output {self.output!r} is in use by process {owner} (lock file {self.path!r}); "
                    f"wait for it to finish, or choose another output") from None
            try:  # the file we locked must still be the one at the path (a releaser may have unlinked it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise OutputBusyError(f"output {self.output!r}: could not take the lock file {self.path!r}")

    @staticmethod
    def _owner(fd) -> str:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            pid = data.get("pid")
            host = data.get("host")
            return f"{pid} on {host}" if host else str(pid)
        except (OSError, ValueError, AttributeError):
            return "unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiting writer re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class F2LConfig:
    """Top-level configuration of a :class:`f2l.Frames2LoRA`.

    base: preset name or checkpoint directory of the frozen VLM.
    hypernet: ``HypernetConfig`` of the hypernetwork (None until a model is built).
    target_modules: decoder-layer linears that receive the predicted LoRA.
    max_frames / fps: frame sampling (SmolVLM2's rule: ``min(round(fps·duration), max_frames)``).
    longest_edge: the SmolVLM processor's intermediate resize of every frame (PIL Lanczos to
      this longest edge, aspect kept, before the tower's square); the authors' 384 for every
      model size (``processor.video_size = {"longest_edge": 384}``), capped at the tower's square.
      Recorded in every adapter's metadata. See ``docs/preprocessing.md``.
    instruction: the text after the frames in the encoding prompt.
    base_fingerprint: :func:`f2l.presets.fingerprint` of the base the hypernet was trained on.
    chunk_videos / chunk_frames: memory bounds of the frozen encoding pass.
    """

    base: str = "tiny"
    hypernet: Any = None
    target_modules: tuple[str, ...] = ("down_proj",)
    max_frames: int = 12
    fps: float = 1.0
    longest_edge: int = DEFAULT_LONGEST_EDGE
    instruction: str = DEFAULT_INSTRUCTION
    base_fingerprint: str = ""
    chunk_videos: int | None = None
    chunk_frames: int = 64
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise TypeError(f"base: expected a non-empty str, got {self.base!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules: expected a non-empty tuple of module names, got {self.target_modules!r}")
        if isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int) or self.max_frames < 1:
            raise ValueError(f"max_frames: expected an int >= 1, got {self.max_frames!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"fps: expected a number > 0, got {self.fps!r}")
        self.fps = float(self.fps)
        if isinstance(self.longest_edge, bool) or not isinstance(self.longest_edge, int) or self.longest_edge < 1:
            raise ValueError(f"longest_edge: expected an int >= 1 (the frames' intermediate longest edge), "
                             f"got {self.longest_edge!r}")
        if not isinstance(self.instruction, str):
            raise TypeError(f"instruction: expected a str, got {type(self.instruction).__name__}")
        if self.chunk_videos is not None and (not isinstance(self.chunk_videos, int) or self.chunk_videos < 1):
            raise ValueError(f"chunk_videos: expected None or an int >= 1, got {self.chunk_videos!r}")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames: expected an int >= 1, got {self.chunk_frames!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        hn = self.hypernet
        out["hypernet"] = hn.to_dict() if hasattr(hn, "to_dict") else hn
        out["version"] = CONFIG_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "F2LConfig":
        if not isinstance(data, dict):
            raise TypeError(f"data: expected a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"data: config version {version} is not supported (expected {CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown F2LConfig keys {unknown}; expected a subset of {sorted(known)}")
        hn = data.get("hypernet")
        if isinstance(hn, dict):
            from f2l.hypernet import HypernetConfig

            data["hypernet"] = HypernetConfig.from_dict(hn)
        if "target_modules" in data:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path) -> "F2LConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no F2L config at {str(path)!r}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"path: {str(path)!r} is not valid JSON ({e})") from None
        return cls.from_dict(data)
