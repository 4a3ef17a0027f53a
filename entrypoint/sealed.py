"""Run a program that reads a repository's files sealed off: `python -I sealed.py [seal] -- program ...`.

A checkpoint is hostile data. The tools that read it (llama.cpp's converters and tools, and the worker
that renders its chat template) run behind this launcher, which seals its own process and then becomes
the program (exec) or runs it (a Python script or module), so that the seal covers the program's first
instruction and everything it starts:

- limits kept by the kernel: memory (RLIMIT_DATA, what the process allocates; the files it maps do not
  count), CPU seconds (RLIMIT_CPU) when asked, and no core files;
- no network and no prying: a seccomp filter makes socket(), io_uring and ptrace fail, whatever a library
  or the program tries (the Docker socket, the Hub and the runner's services are all behind a socket);
- writes only beneath the folders given (--writable) and /dev, where the kernel offers Landlock (so not
  into the runner's file commands, the checkout or the action's own files);
- for Python programs, an audit hook that ends the process before any code from outside the Python
  installation and the program's own folders is compiled or run (transformers' dynamic modules, a
  repository's *.py), and before any host name is resolved or any connection made, and writes what was
  attempted into the report file.

The report file (--report) gets one JSON object when the seal or a limit stopped the program, or when a
Python program raised: {"kind": "code" | "network" | "memory" | "exception", "detail": ...}. The caller
(process.py) turns it into a typed error; the environment is the caller's allow-list.

Standard library only, and nothing imported from the action: this file runs under `python -I` (no
PYTHON* variables, no user site, no current directory on sys.path).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import resource
import runpy
import struct
import sys
import traceback

# seccomp: the architecture check and the syscalls refused (x86_64 and aarch64 numbers).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_REFUSED_SYSCALLS = {
    # socket, io_uring_setup, ptrace, process_vm_readv, process_vm_writev
    "x86_64": (41, 425, 101, 310, 311),
    "aarch64": (198, 425, 117, 270, 271),
}
_X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: another numbering of the same syscalls, refused whole
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_EACCES = 13
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
# Classic BPF opcodes: load a word of seccomp_data, compare with a constant, return.
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06

# Landlock (Linux 5.13 and later, unprivileged): the filesystem rights this seal takes away except beneath
# the folders a tool may write to. Reading stays open (a tool reads the checkpoint, libraries, /proc/self).
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # every architecture
_LANDLOCK_VERSION_FLAG, _LANDLOCK_RULE_PATH_BENEATH = 1, 1
_WRITE_RIGHTS_BY_ABI = {
    1: 0b1_1111_1111_0010,  # write, remove (dir, file), make (char, dir, reg, sock, fifo, block, sym)
    2: 1 << 13,  # refer (link or rename across folders)
    3: 1 << 14,  # truncate
}

EXIT_STOPPED = 113  # the seal or a limit stopped the program (the report says which)

_NETWORK_EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                   "socket.sendto", "socket.sendmsg", "socket.bind"}


def seccomp_program(machine: str) -> bytes:
    """The filter as a classic BPF program: refuse (EACCES) the syscalls above and every syscall of another
    architecture or ABI than the machine's own; allow the rest."""
    refused = _REFUSED_SYSCALLS[machine]
    deny = _RET, 0, 0, _SECCOMP_RET_ERRNO | _EACCES
    allow = _RET, 0, 0, _SECCOMP_RET_ALLOW
    n = len(refused)
    program = [
        (_LD_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, _AUDIT_ARCH[machine]),  # our architecture: skip the deny below
        deny,
        (_LD_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE, n + 1, 0, _X32_SYSCALL_BIT),  # to the deny after the list
        *[(_JEQ, n - i, 0, nr) for i, nr in enumerate(refused)],  # each to that same deny
        allow,
        deny,
    ]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def _install_seccomp() -> None:
    machine = platform.machine()
    if machine not in _REFUSED_SYSCALLS:
        raise OSError(f"no seccomp filter for the {machine} architecture")
    program = seccomp_program(machine)
    filters = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    word = ctypes.c_ulong  # prctl's arguments are unsigned longs
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, word(1), word(0), word(0), word(0)) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, word(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), word(0), word(0)) != 0:
        raise OSError(ctypes.get_errno(), "could not install the seccomp filter")


def _confine_writes(writable: list[str]) -> bool:
    """Let the process (and what it starts) write only beneath `writable` and /dev (its null device), where
    the kernel offers Landlock; False where it does not (an older kernel, or a container that refuses the
    syscalls): then nothing changes."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_VERSION_FLAG))
    if abi < 1:
        return False
    rights = sum(bits for version, bits in _WRITE_RIGHTS_BY_ABI.items() if version <= abi)
    handled = struct.pack("Q", rights)  # landlock_ruleset_attr's first field; the others stay unhandled
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, handled, ctypes.c_size_t(len(handled)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        for folder in [*writable, "/dev"]:
            fd = os.open(folder, os.O_PATH | os.O_CLOEXEC)
            try:
                beneath = struct.pack("=Qi", rights, fd)  # landlock_path_beneath_attr (packed)
                if libc.syscall(_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                                beneath, ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"could not let the tool write beneath {folder}")
            finally:
                os.close(fd)
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "could not confine the tool's writes")
    finally:
        os.close(ruleset)
    return True


def _set_limits(memory: int | None, cpu: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    if cpu is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


class _Reporter:
    def __init__(self, path: str | None):
        self.path = path

    def stop(self, kind: str, detail: str) -> None:
        """Record why the program is stopped, and end the process at once (no handler of the program's can
        catch it, and nothing more of it runs)."""
        self.write(kind, detail)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_STOPPED)

    def write(self, kind: str, detail: str) -> None:
        if self.path:
            with open(self.path, "w", encoding="utf-8") as report:
                json.dump({"kind": kind, "detail": detail}, report)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _audit_hook(reporter: _Reporter, roots: tuple[str, ...]):
    def hook(event: str, args: tuple) -> None:
        if event in ("exec", "compile"):
            filename = getattr(args[0], "co_filename", None) if event == "exec" else args[1]
            if isinstance(filename, bytes):
                filename = os.fsdecode(filename)
            # "<string>", "<frozen ...>": code a library made from its own text, not a file
            if isinstance(filename, str) and filename and not filename.startswith("<") and \
                    not _under(filename, roots):
                reporter.stop("code", f"code from {filename}")
        elif event == "import" and str(args[0]).split(".")[0] == "transformers_modules":
            reporter.stop("code", f"transformers' dynamic module {args[0]} (trust_remote_code)")
        elif event == "ctypes.dlopen" and args[0] and not _under(os.fsdecode(args[0]), roots) and "/" in str(args[0]):
            reporter.stop("code", f"the native library {args[0]}")
        elif event in _NETWORK_EVENTS:
            # connect, bind, sendto, sendmsg: (socket, address, ...); the lookups: (host, ...)
            target = args[1] if event in ("socket.connect", "socket.bind", "socket.sendto") else args[0]
            reporter.stop("network", f"{event} to {target!r}")
    return hook


def _code_roots(extra: list[str]) -> tuple[str, ...]:
    """Where the Python installation's code lives (the standard library and site-packages: sys.path as
    `python -I` starts), plus the program's own folders."""
    return tuple(dict.fromkeys(os.path.realpath(p) for p in [*sys.path, *extra] if p and os.path.isdir(p)))


def _run_python(reporter: _Reporter, run, roots: tuple[str, ...]) -> None:
    sys.addaudithook(_audit_hook(reporter, roots))
    try:
        run()
    except SystemExit:
        raise
    except MemoryError:
        reporter.stop("memory", "the program ran out of the memory it may use")
    except BaseException as exc:
        # torch reports a refused allocation as a RuntimeError carrying the C library's text for ENOMEM:
        # across the C boundary, that text is all there is to tell it by.
        if os.strerror(errno.ENOMEM) in str(exc):
            reporter.stop("memory", f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
        reporter.write("exception", f"{type(exc).__name__}: {exc}"[:2000] + where)
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sealed.py")
    parser.add_argument("--report", help="where to write why the program was stopped")
    parser.add_argument("--memory", type=int, help="RLIMIT_DATA, bytes")
    parser.add_argument("--cpu", type=int, help="RLIMIT_CPU, seconds")
    parser.add_argument("--code-root", action="append", default=[], help="another folder Python code may come from")
    parser.add_argument("--writable", action="append", default=[], help="a folder the program may write beneath")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--python-script", action="store_true", help="the program is a Python script: run it here")
    how.add_argument("--python-module", action="store_true", help="the program is a module: run it here")
    how.add_argument("--exec", action="store_true", help="exec the program")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program given")
    reporter = _Reporter(args.report)
    _set_limits(args.memory, args.cpu)
    _install_seccomp()  # first: it sets no_new_privs, which Landlock needs too
    _confine_writes(args.writable)
    if args.exec:
        os.execv(program[0], program)
    if args.python_script:
        script = os.path.abspath(program[0])
        sys.argv = [script, *program[1:]]
        sys.path.insert(0, os.path.dirname(script))  # as `python script.py` would
        roots = _code_roots([os.path.dirname(script), *args.code_root])
        _run_python(reporter, lambda: runpy.run_path(script, run_name="__main__"), roots)
    else:
        sys.argv = [program[0], *program[1:]]
        sys.path[:0] = args.code_root
        roots = _code_roots(args.code_root)
        _run_python(reporter, lambda: runpy.run_module(program[0], run_name="__main__", alter_sys=True), roots)


if __name__ == "__main__":
    main(sys.argv[1:])
