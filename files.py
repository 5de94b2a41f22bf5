"""Writes that a kill at any moment cannot leave half done: a file replaced atomically
(atomic_write), a folder swapped in one step (replace_dir)."""
import ctypes
import fcntl
import os
import shutil
from pathlib import Path


def atomic_write(path, content: bytes | str | None = None, *, write=None):
    """Write a file so that a reader (or a kill at any moment) sees the old file or the new
    one, never a mix: a temporary file beside it, fsynced, renamed over it, the folder fsynced.
    Give the content, or `write(tmp_path)` that writes the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(b"" if content is None else content.encode() if isinstance(content, str) else content)
        mode = tmp.stat().st_mode & 0o777   # what a plain open() gives under the umask (0644 under 022)
        if write is not None:
            write(tmp)
        with open(tmp, "rb+") as f:
            # A writer may put its own file there: safetensors' save_file writes a private (0600)
            # temporary file and renames it over tmp. Every file we write gets the umask's mode.
            if os.fstat(f.fileno()).st_mode & 0o777 != mode:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_private(path, content: str):
    """atomic_write for a secret: the file is its owner's alone (0600) from the moment it exists,
    never readable by others in between."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)   # O_CREAT's mode passes the umask; an old tmp keeps its own
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path):
    """Put folder `new` at `target` in one step (Linux renameat2 RENAME_EXCHANGE: the old
    folder and the new swap atomically), then delete the old one. Elsewhere, or when the
    file system refuses, the old folder is renamed aside first: a kill between the two
    renames leaves it beside, as .<name>.old-<pid>, not lost."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        fsync_dir(target.parent)
        return
    exchanged = False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        exchanged = libc.renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(target), RENAME_EXCHANGE) == 0
    except (OSError, AttributeError):
        pass
    if exchanged:
        old = new                           # the old folder now sits where the new one was
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
    fsync_dir(target.parent)
    remove(old)                             # a link at target (the user's) goes, never what it points to


def remove(path: Path):
    """Delete a file, a folder tree, or a link: the link itself, never what it points to (a
    link in out_dir may lead out of it); nothing when missing."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)                 # removes the links inside, follows none


class InUse(OSError):
    """Another process holds the folder (lock_dir); the message names it."""


class DirLock:
    """An exclusive OS lock (flock) on a folder itself, no file written, while this object is open;
    released by close(), by leaving its `with` block, when nothing refers to it any more (a run that
    stopped on an error before it began: the caller may start it again), or when the process ends."""
    fd = None

    def __init__(self, folder: Path):
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InUse(f"{folder} is in use by another run (pid {lock_holder(folder) or 'unknown'}); wait for it "
                        f"to end, or use another out_dir") from None
        self.fd = fd

    def close(self):
        if self.fd is not None:
            os.close(self.fd)   # releases the flock
            self.fd = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def lock_holder(folder: Path) -> int | None:
    """The pid holding a flock on `folder`, from Linux's /proc/locks (None elsewhere, or if it just ended)."""
    st = os.stat(folder)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for fields in (line.split() for line in lines):   # "1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4])
    return None


def lock_dir(folder) -> DirLock:
    """Hold `folder` (made if missing) for one run: a second run on it gets InUse and touches nothing else."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return DirLock(folder)
