"""The one exception type the command line turns into a one-line message (exit code 2, no traceback), and the
input checks shared by several commands."""
import os


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
