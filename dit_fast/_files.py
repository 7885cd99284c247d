"""Files written whole or not at all: the one atomic writer behind every weights, checkpoint and JSON file.

    atomic_write(path, write)   write(tmp) beside path, fsync, os.replace, fsync of the directory: a reader
                                (or a crash) sees the old file or the new one, never a part; the new file
                                gets the mode open() would give it (0666 & ~umask)
    fsync_dir(path)             a directory's entries (a rename) on disk
    process_umask()             the umask, read without setting it where Linux says it
"""

import contextlib
import os
import tempfile


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """This process's umask. os.umask only sets (and returns the old one): reading it that way leaves the
    process at another umask for a moment, which a file another thread creates then would get."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """write(tmp) beside ``path`` (tmp: a str path), then fsync and os.replace onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600 (safetensors too)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(directory)
