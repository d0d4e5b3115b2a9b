"""Files that are never seen half-written, and outputs with one writer.

``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_save_safetensors`` write beside the
target and ``os.replace`` it into place; ``atomic_dir`` does the same for a whole directory.
A killed writer's temporaries are named after its pid and removed by the next write
(``clean_stale_temps``). ``OutputLock`` gives one process at a time an output file or
directory. The guarantees are written down in ``docs/guarantees.md``.

The bottom of the package: it imports nothing from ``f2l``, and every layer above writes
through it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_save_safetensors", "atomic_dir", "clean_stale_temps",
           "OutputLock", "OutputBusyError"]


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
