"""Run a command under the system-call part of a systemd unit's sandbox, without systemd.

Usage: ``python sandbox.py UNIT_FILE... -- COMMAND ARGS...``

Reads ``SystemCallFilter=``, ``SystemCallErrorNumber=``, ``RestrictAddressFamilies=`` and
``MemoryDenyWriteExecute=`` from the unit files (later files win, as drop-ins do), then applies them with libseccomp
the way systemd 252 does, sets no_new_privs and execs the command. These are the settings that can break a Python
process in ways no static check sees (a forbidden system call deep in a library, a JIT or libffi trampoline
mapping memory writable and executable); the file-system settings are plain mount options and are not emulated.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_NO_NEW_PRIVS = 38
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_GE = 5
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
FAMILIES_CHECKED = 64  # every AF_* value below this is filtered one by one, the rest as a range


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


@dataclass
class UnitSandbox:
    """The system-call settings of a unit, merged over its files like systemd merges drop-ins."""

    allow: set[str] = field(default_factory=set)
    deny: set[str] = field(default_factory=set)
    error_number: int | None = None
    families: set[int] | None = None
    deny_write_execute: bool = False

    @classmethod
    def from_files(cls, paths: list[Path]) -> UnitSandbox:
        sandbox = cls()
        for path in paths:
            for line in path.read_text().splitlines():
                key, _, value = line.strip().partition("=")
                sandbox.apply(key, value.strip())
        return sandbox

    def apply(self, key: str, value: str) -> None:
        if key == "SystemCallFilter":
            (self.deny if value.startswith("~") else self.allow).update(value.lstrip("~").split())
        elif key == "SystemCallErrorNumber":
            self.error_number = getattr(errno, value)
        elif key == "RestrictAddressFamilies":
            self.families = {int(getattr(socket, name)) for name in value.split()}
        elif key == "MemoryDenyWriteExecute":
            self.deny_write_execute = value in {"yes", "true", "1", "on"}


def syscall_groups() -> dict[str, list[str]]:
    """``@group -> members`` as this machine's systemd defines them (``systemd-analyze syscall-filter``)."""
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    listing = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: set[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name.startswith("@"):
            pending.extend(groups[name])
        else:
            calls.add(name)
    return calls


class Seccomp:
    """One libseccomp filter: a default action and rules; loading it adds it to this process's filters."""

    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    def __init__(self, default_action: int) -> None:
        self.ctx = self.lib.seccomp_init(default_action)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def rule(self, action: int, name: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        args = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*condition) for condition in conditions])
        result = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(conditions), args)
        if result != 0:
            raise OSError(-result, f"seccomp rule for {name} {conditions}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        if result != 0:
            raise OSError(-result, "seccomp_load")


def apply(sandbox: UnitSandbox) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if sandbox.families is not None:
        filter_families = Seccomp(SCMP_ACT_ALLOW)
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        for family in sorted(set(range(FAMILIES_CHECKED)) - sandbox.families):
            filter_families.rule(refuse, "socket", (0, SCMP_CMP_EQ, family, 0))
        filter_families.rule(refuse, "socket", (0, SCMP_CMP_GE, FAMILIES_CHECKED, 0))
        filter_families.load()
    if sandbox.deny_write_execute:
        filter_memory = Seccomp(SCMP_ACT_ALLOW)
        refuse = scmp_act_errno(errno.EPERM)
        write_execute = PROT_WRITE | PROT_EXEC
        filter_memory.rule(refuse, "mmap", (2, SCMP_CMP_MASKED_EQ, write_execute, write_execute))
        filter_memory.rule(refuse, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        filter_memory.rule(refuse, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        filter_memory.rule(refuse, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filter_memory.load()

    if sandbox.allow:  # last: it forbids seccomp() itself
        calls = syscall_groups()
        allowed = expand(sandbox.allow, calls) - expand(sandbox.deny, calls)
        default = scmp_act_errno(sandbox.error_number) if sandbox.error_number is not None else 0x80000000
        filter_calls = Seccomp(default)
        for name in sorted(allowed | {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}):
            filter_calls.rule(SCMP_ACT_ALLOW, name)
        filter_calls.load()


def main(argv: list[str]) -> None:
    separator = argv.index("--")
    units, command = [Path(path) for path in argv[:separator]], argv[separator + 1 :]
    apply(UnitSandbox.from_files(units))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
