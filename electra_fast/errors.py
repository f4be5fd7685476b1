"""The one exception type the command line turns into a one-line message (exit code 2, no traceback), and the
input checks shared by several commands."""
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, directories are not guarded
    fcntl = None

LOCK_FILE = ".electra-fast.lock"


class InputError(ValueError):
    """Bad user input (a path, a file's contents, an option): the message says what is wrong and what to do."""


def ensure_writable(directory: str, option: str) -> None:
    """Create `directory` if needed and prove a file can be written there, before any long work starts."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to {option} {directory!r} ({e.strerror}): choose a writable directory") \
            from None


def lock_directory(directory: str, option: str, user: str):
    """Claim `directory` (created if needed) for this process: an exclusive `flock` on `directory/.electra-fast.lock`.

    Returns the open lock file; the lock lasts until it is closed or the process ends, a crash or SIGKILL included
    (the OS drops it), so no stale lock ever needs cleaning up. `user` names the work in the lock file ("pretrain"),
    for the message another process gets: an `InputError` at once, never a wait.
    """
    ensure_writable(directory, option)
    f = open(os.path.join(directory, LOCK_FILE), "a+", encoding="utf-8")
    if fcntl is None:  # pragma: no cover
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise InputError(f"{option} {directory!r} is in use by {holder}: wait for it to finish, or choose another "
                         f"{option}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{user} (pid {os.getpid()})")
    f.flush()
    return f
