"""Output paths: every file a command writes, resolved and checked before any work, and written
atomically.

One :class:`Plan` per command. It knows every file the input reads (a model and each of its
external-data files, a report or feeds file given as input) and every file the command may write
(the model, its data file, the data files of an unchanged copy, ``--report``, ``--junit``,
``--json``, ``bench --output``, ``--plot``). :meth:`Plan.check` runs before any work and refuses
(:class:`NormoptError`, exit 2, one line, nothing written):

* an output that is a file the input reads (compared by identity: ``samefile`` where the file
  exists, the resolved real path where it does not), and two outputs that are the same file;
* an output that exists and is not a regular file: a folder, a device (``/dev/null``), a FIFO or
  a socket. normopt never writes through one and never replaces one;
* an output whose folder is missing, is not a folder, or cannot be written (probed by creating
  and removing a temporary file there, so permissions, read-only mounts and /sys all count);
* a file normopt would write *on its own account* (the output's ``<out>.data``, the data files of
  an unchanged copy) that exists and is not the data of the model now at ``-o``: it may be someone
  else's file. Files the user names (``-o``, ``--report``, ...) are replaced: re-running a command
  with the same output is normal use.

A symlink given as an output is followed: its final target is written, atomically, beside the
target (the link stays a link). Every write goes to a temporary file in the folder of its final
place and is renamed over it only when complete (:func:`write_bytes`, :func:`write_with`), after
checking once more that the place is still not an input and not a special file.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field

from .errors import NormoptError


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _same(a: str, b: str) -> bool:
    """a and b name the same file: the same real path, or (both existing) the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@dataclass
class Target:
    """A file a command will write. ``final`` is the place really written: the given path with
    every symlink resolved. ``owner`` is set for files normopt names itself (a model's data
    file): the model path whose existing file may own it."""

    option: str
    given: str
    final: str = ""
    owner: str | None = None
    required: bool = True  # False: written only on one of the command's paths (checked all the same)
    mkdirs: bool = False  # its folder may be created (an unchanged copy's data file in a subfolder)
    source: str | None = None  # the file it copies, where it is a copy

    def __post_init__(self):
        self.final = os.path.realpath(self.given)

    @property
    def shown(self) -> str:
        return f"{self.option} {self.given}" if self.option else self.given


@dataclass
class Plan:
    reads: list = field(default_factory=list)  # (label, path)
    writes: list = field(default_factory=list)  # Target

    def read(self, path: str, label: str | None = None) -> None:
        if path:
            self.reads.append((label or path, os.path.abspath(path)))

    def read_model(self, model_path: str, skeleton=None) -> None:
        """The model file and every external-data file its skeleton references."""
        from . import weights as W

        self.read(model_path, f"the input model {model_path}")
        if skeleton is None:
            return
        me = os.path.abspath(model_path)
        for t in W.iter_tensors(skeleton):
            ref = W.external_ref(t)
            if ref is not None and ref[0] != me:
                self.read(ref[0], f"the external-data file {os.path.relpath(ref[0], os.path.dirname(me))} of {model_path}")

    def write(self, path: str | None, option: str, owner: str | None = None, required: bool = True,
              **kw) -> Target | None:
        if not path:
            return None
        t = Target(option, path, owner=owner, required=required, **kw)
        self.writes.append(t)
        return t

    def check(self) -> "Plan":
        """Refuse (NormoptError) any output that is an input, a special file, a duplicate, in an
        unwritable or missing folder, or a file normopt would write that belongs to another."""
        for i, t in enumerate(self.writes):
            _check_place(t)
            for label, r in self.reads:
                if _same(t.final, r) or _same(t.given, r):
                    raise NormoptError(f"{t.shown}: is {label}, which this command reads; "
                                       "normopt never writes over its input")
            for u in self.writes[:i]:
                if _same(t.final, u.final):
                    raise NormoptError(f"{t.shown}: is the same file as {u.shown}; give each output its own path")
            if t.owner is not None and os.path.lexists(t.given):
                _check_owned(t)
        return self


def _check_place(t: Target) -> None:
    if t.given.endswith(("/", os.sep)):
        raise NormoptError(f"{t.shown}: names a folder, not a file")
    try:
        st = os.stat(t.final)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise NormoptError(f"{t.shown}: cannot use this path ({exc.strerror})") from None
    if st is not None:
        what = _kind(st.st_mode)
        if what is not None:
            raise NormoptError(f"{t.shown}: is {what}; normopt writes regular files only and never "
                               "replaces or writes through a special file")
    folder = os.path.dirname(t.final)
    while t.mkdirs and not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)  # the nearest folder that exists is the one written in
    if not os.path.isdir(folder):
        raise NormoptError(f"{t.shown}: the folder {folder} does not exist"
                           if not os.path.exists(folder) else f"{t.shown}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".normopt-probe-", dir=folder)
    except OSError as exc:
        raise NormoptError(f"{t.shown}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _check_owned(t: Target) -> None:
    """A data file normopt names itself may be replaced only when the model now at its owner's
    path references it (it is that earlier output's data)."""
    from . import weights as W

    owner = t.owner
    try:
        refs = [W.external_ref(x) for x in W.iter_tensors(W.read_skeleton(os.path.realpath(owner)))] \
            if os.path.isfile(owner) else []
    except Exception:
        refs = []
    if any(r is not None and _same(r[0], t.final) for r in refs):
        return
    raise NormoptError(f"{t.shown}: exists and is not the data of the model at {owner} "
                       "(it may be another model's); remove it or choose another output path")


def _recheck(t: Target, plan: Plan | None) -> None:
    """Just before the rename: the place is still no special file and no input."""
    try:
        st = os.stat(t.final)
        what = _kind(st.st_mode)
        if what is not None:
            raise NormoptError(f"{t.shown}: became {what} while normopt ran; nothing was written there")
    except FileNotFoundError:
        pass
    for label, r in (plan.reads if plan else ()):
        if _same(t.final, r):
            raise NormoptError(f"{t.shown}: is {label}, which this command reads; nothing was written there")


def _mode_for(final: str) -> int:
    try:
        return stat.S_IMODE(os.stat(final).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def target_of(path_or_target, option: str = "") -> Target:
    """A Target for a path not planned by a caller (checked now), or the Target itself."""
    if isinstance(path_or_target, Target):
        return path_or_target
    plan = Plan()
    t = plan.write(path_or_target, option)
    plan.check()
    return t


def write_with(target, writer, plan: Plan | None = None, suffix: str = "") -> str:
    """writer(temporary path) writes the file; it is renamed over the target's final place.
    `suffix` keeps an extension a writer looks at (matplotlib's savefig)."""
    t = target_of(target)
    folder = os.path.dirname(t.final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".normopt-", suffix=suffix or ".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise NormoptError(f"{t.shown}: cannot write in {folder} ({exc.strerror or exc})") from None
    try:
        try:
            writer(tmp)
            os.chmod(tmp, _mode_for(t.final))
        except OSError as exc:
            raise NormoptError(f"{t.shown}: cannot write it ({exc.strerror or exc})") from None
        _recheck(t, plan)
        os.replace(tmp, t.final)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return t.final


def write_bytes(target, data: bytes | str, plan: Plan | None = None) -> str:
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    return write_with(target, writer, plan)


def replace_into(src: str, target: Target, plan: Plan | None = None) -> str:
    """Move a complete staged file over the target (a copy beside it first when the two are on
    different file systems), after the last checks."""
    _recheck(target, plan)
    try:
        os.replace(src, target.final)
    except OSError as exc:
        import errno
        import shutil

        if exc.errno != errno.EXDEV:
            raise NormoptError(f"{target.shown}: cannot write it ({exc.strerror or exc})") from None
        write_with(target, lambda tmp: shutil.copyfile(src, tmp), plan)
    return target.final


def check_folder(folder: str, option: str, names=()) -> None:
    """A folder a command writes its files into (made when missing): it is a folder, or can be
    made in one that can be written; the files it will write there (`names`) are regular files
    or absent."""
    shown = f"{option} {folder}"
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NormoptError(f"{shown}: exists and is not a folder")
    if os.path.isdir(folder):
        plan = Plan()
        for n in names:
            plan.write(os.path.join(folder, n), f"{option} {folder}: the file")
        plan.check()
        return
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    Plan(writes=[Target("", os.path.join(parent, ".normopt-folder-probe"))]).check()
