"""A run directory's two rules: one writer at a time, and "finished" is one file.

    RUN/run.lock        flock()ed by the one `medalign-distill run` writing RUN (its pid inside)
    RUN/finished.json   written last and atomically, after adapter/ and alignment/: without
                        it the run is unfinished, whatever else the folder holds
    RUN/tiny-student/   (student "tiny") built in a temp folder and renamed into place
    RUN/student.json    how the run showed the student its inputs (template, image geometry,
                        quantize), written by training and read back by everything that loads it

Two runs writing one folder mix their checkpoints, configs and metrics; a run killed
between its final adapter and its alignment transform looks finished to anyone who
only checks that adapter/ exists. So training takes the lock before it writes
anything, and everything that uses a trained run (eval, pictures) asks
`require_finished` first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

LOCK = "run.lock"
FINISHED = "finished.json"
STUDENT_RECORD = "student.json"
# flock() on file systems mounted without lock support (Lustre without -o flock, some NFS)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


@contextmanager
def run_lock(out: Path):
    """Hold RUN/run.lock (exclusive, non-blocking) for the whole block, or refuse with
    one line naming the holder's pid. The kernel drops the lock when the holder dies,
    however it dies, so a killed run never blocks the next one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirError(f"another `medalign-distill run` is writing {out} (pid {holder}, lock {path}); wait "
                              f"for it to finish or stop it (then --resume continues it), or choose another --out"
                              ) from None
        except OSError as e:
            if e.errno in _NO_LOCKS:
                raise RunDirError(f"the file system holding {out} does not support file locks (flock: {e.strerror}), "
                                  f"which keep two runs from writing one folder; put --out on a file system with "
                                  f"locking (Lustre: -o flock; NFS: with a lock manager) or a local disk") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def mark_finished(out: Path, info: dict) -> None:
    """Write RUN/finished.json last: a temp file renamed over it, so it exists whole or not at all."""
    tmp = Path(out) / (FINISHED + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, Path(out) / FINISHED)


def unmark_finished(out: Path) -> None:
    """A run about to write its folder again (--resume) is not finished until it says so anew."""
    (Path(out) / FINISHED).unlink(missing_ok=True)
    (Path(out) / (FINISHED + ".tmp")).unlink(missing_ok=True)


def require_finished(run: Path, doing: str) -> dict:
    """RUN/finished.json's content, or RunDirError naming what is missing and how to
    finish the run. `doing`: what needs the finished run ("eval", "pictures", ...)."""
    run = Path(run)
    marker = run / FINISHED
    if marker.is_file():
        try:
            return json.loads(marker.read_text())
        except ValueError:  # written whole by a rename: only ever damaged from outside
            raise RunDirError(f"{marker} is not valid JSON; delete it and finish the run with --resume") from None
    if not (run / "config.json").is_file():
        raise RunDirError(f"{run} is not a run directory (no config.json); pass the --out of a `medalign-distill run`")
    try:
        alpha = float(json.loads((run / "config.json").read_text()).get("alpha", 1.0))
    except (ValueError, TypeError, AttributeError):
        alpha = 1.0
    final = ["adapter"] + (["alignment"] if alpha > 0 else [])  # no transform without L_vis
    absent = [f"{name}/" for name in final if not (run / name).is_dir()]
    done = sorted((run / "checkpoints").glob("step-???????"))
    progress = f"its last checkpoint is {done[-1].name}" if done else "it has no checkpoint yet"
    raise RunDirError(f"run {run} has not finished ({marker.name} is missing: it is written last, after "
                      f"{' and '.join(f'{n}/' for n in final)}{'; missing too: ' + ', '.join(absent) if absent else ''}"
                      f"; {progress}): finish it by rerunning the `medalign-distill run` command that started it with "
                      f"--resume, then {doing}")


def ensure_tiny_student(path: Path, seed: int = 0) -> Path:
    """`path` holding the tiny random student, built once. It is built in a temp folder
    and renamed into place, so a build that died (disk full, killed) leaves only a
    `<name>.tmp-<pid>` folder, removed by a later call, never a half-written student."""
    from .student import make_tiny_student

    path = Path(path)
    if path.is_dir():
        return path
    for old in path.parent.glob(f"{path.name}.tmp-*"):
        if not _alive(old.name.rsplit("-", 1)[-1]):
            shutil.rmtree(old, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_tiny_student(tmp, seed=seed)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.is_dir():  # another process renamed its copy in first: the same student (same seed)
            return path
        raise
    return path


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_line(e: OSError) -> str:
    """An OSError as one line: the file, the error, and for a full disk what to do
    (rather than Python's "[Errno 28] ..." and a chained traceback)."""
    where = f"{e.filename}: " if e.filename else ""
    hint = "; free space or move the run to a larger disk" if e.errno in DISK_FULL else ""
    return f"{where}{e.strerror or e}{hint}"


__all__ = ["DISK_FULL", "FINISHED", "LOCK", "RunDirError", "ensure_tiny_student", "mark_finished", "os_error_line",
           "require_finished", "run_lock", "unmark_finished"]
