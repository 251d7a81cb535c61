"""Run a command where sched_setaffinity() fails with EPERM, as under a system call filter
that refuses it (the shipped unit's `SystemCallFilter=~@resources` without its exception):

    python tests/no_affinity.py COMMAND [ARGS...]

The filter (libseccomp) is inherited by the command and all its children.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000


def libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(name) if name else None


def refuse_sched_setaffinity() -> None:
    lib = libseccomp()
    if lib is None:
        raise SystemExit("libseccomp is not installed")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    context = ctypes.c_void_p(lib.seccomp_init(ctypes.c_uint32(SCMP_ACT_ALLOW)))
    number = lib.seccomp_syscall_resolve_name(b"sched_setaffinity")
    action = ctypes.c_uint32(SCMP_ACT_ERRNO | errno.EPERM)
    if lib.seccomp_rule_add(context, action, ctypes.c_int(number), ctypes.c_uint(0)) != 0:
        raise SystemExit("seccomp_rule_add failed")
    if lib.seccomp_load(context) != 0:
        raise SystemExit("seccomp_load failed")


if __name__ == "__main__":
    refuse_sched_setaffinity()
    os.execvp(sys.argv[1], sys.argv[1:])
