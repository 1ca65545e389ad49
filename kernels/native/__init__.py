"""Hand-written LLVM code for the tuned CPU kernels, and the check that decides whether it runs.

Every ``numba.extending.intrinsic`` of the project lives in this package: ``intrinsics`` (bit
casts, prefetch hints, libc ``pread``) and ``simd`` (explicit float64 vectors and the vectorised
loss heads). Such code depends on the LLVM that llvmlite ships and on what the CPU offers, so
the tuned kernels are used only on combinations that were tested (``supported``); anywhere else
the CPU backend runs ``lepton_hpc.kernels.reference``, plain ``@njit`` code.

What the CPU offers means what the generated code may use: the host's features, or, when
Numba is told to compile for another CPU (``NUMBA_CPU_NAME`` with ``NUMBA_CPU_FEATURES``, as for
a cache built on one node for others), that CPU's features as LLVM knows them (``probe``). The
AVX-512 register tiles are chosen only where that code has 512-bit registers, the AVX2 paths
where it has avx2 and fma; a CPU name LLVM does not know gets the reference kernels.
"""

from __future__ import annotations

import functools
import platform
import re
import sys
from importlib import metadata

# [low, high) release ranges the tuned kernels were tested with (keep in step with setup.cfg).
TESTED = {"numba": ((0, 68), (0, 69)), "llvmlite": ((0, 50), (0, 51))}
# x86-64 features the tuned code is written for (the vector loops assume AVX2 and FMA).
REQUIRED_FEATURES = ("avx2", "fma")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '0.61.2' or '0.62.0rc1'."""
    numbers = []
    for piece in version.split(".")[:2]:
        match = re.match(r"\d+", piece)
        if match is None:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


# The features the kernels choose on: avx2 and fma for the tuned passes, avx512f for the
# register tiles (avx for completeness of the named-CPU report).
PROBED_FEATURES = ("avx", "avx2", "fma", "avx512f")

# Tiny LLVM functions whose machine code shows whether a target machine uses a feature: 512-bit
# registers (zmm) for avx512f, 256-bit integer adds for avx2, three-operand FMAs for fma, 256-bit
# float adds for avx. min-legal-vector-width lets CPUs that prefer 256-bit vectors (the
# skylake-avx512 family) still show their 512-bit registers.
_PROBE_IR = """
define void @probe_avx512f(<8 x double>* %p) "min-legal-vector-width"="512" {
  %a = load <8 x double>, <8 x double>* %p
  %b = fadd <8 x double> %a, %a
  store <8 x double> %b, <8 x double>* %p
  ret void
}
define void @probe_avx2(<8 x i32>* %p) {
  %a = load <8 x i32>, <8 x i32>* %p
  %b = add <8 x i32> %a, %a
  store <8 x i32> %b, <8 x i32>* %p
  ret void
}
define void @probe_avx(<4 x double>* %p) {
  %a = load <4 x double>, <4 x double>* %p
  %b = fadd <4 x double> %a, %a
  store <4 x double> %b, <4 x double>* %p
  ret void
}
declare <4 x double> @llvm.fma.v4f64(<4 x double>, <4 x double>, <4 x double>)
define void @probe_fma(<4 x double>* %p) {
  %a = load <4 x double>, <4 x double>* %p
  %b = call <4 x double> @llvm.fma.v4f64(<4 x double> %a, <4 x double> %a, <4 x double> %a)
  store <4 x double> %b, <4 x double>* %p
  ret void
}
"""
_PROBE_PATTERNS = {
    "avx512f": re.compile(r"%?zmm\d"),
    "avx2": re.compile(r"\bvpaddd\s+%?ymm"),
    "avx": re.compile(r"\bvaddpd\s+%?ymm"),
    "fma": re.compile(r"\bvfmadd(132|213|231)pd\b"),
}
_UNKNOWN_CPU = "is not a recognized processor"


def numba_target() -> tuple[str | None, str | None]:
    """(CPU name, feature string) Numba's JIT asks LLVM for; None, None when it targets this host.

    Numba's JIT target machine takes ``NUMBA_CPU_NAME`` (else the host's name) and
    ``NUMBA_CPU_FEATURES`` (else the host's full feature list). The feature string is applied
    over the CPU's own features, so with ``NUMBA_CPU_NAME`` alone the code still uses every
    feature of the host (AVX-512 included): only with ``NUMBA_CPU_FEATURES`` set (``""`` for the
    CPU's own features) is it code for the named CPU.
    """
    from numba import config
    from numba.core import codegen

    name = config.CPU_NAME if config.CPU_NAME not in (None, "host") else None
    features = config.CPU_FEATURES
    if name is None and features is None:
        return None, None
    if features is None:
        features = codegen.get_host_cpu_features()
    if name is None:
        import llvmlite.binding as llvm

        name = llvm.get_host_cpu_name()
    return name, features


def _parse_features(flat: str) -> dict[str, bool]:
    """{'avx2': True, 'avx512f': False, ...} from an LLVM feature string '+avx2,-avx512f,...'."""
    found = {}
    for item in (piece.strip() for piece in flat.split(",")):
        if len(item) > 1 and item[0] in "+-":
            found[item[1:]] = item[0] == "+"
    return found


@functools.cache
def probe(cpu: str, features: str) -> tuple[bool, dict[str, bool]]:
    """(whether LLVM knows ``cpu``, the PROBED_FEATURES its code uses) for a target machine made
    as Numba makes its own (that CPU name, that feature string over its own features).

    LLVM keeps no public list of a CPU's features, so this asks its code generator: the machine
    code of one tiny function per feature shows whether LLVM uses it. An unknown name is not
    compiled (LLVM would fall back to a generic 32-bit subtarget and abort on 64-bit code); it
    is reported as unknown, with no features. LLVM's message about the name (on the C stderr)
    is captured while the target machine is made.
    """
    import os
    import tempfile

    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple()
    # +64bit: a 32-bit CPU name on a 64-bit triple makes LLVM abort rather than generate code.
    flat = ",".join(f for f in (features, "+64bit") if f)
    sys.stderr.flush()  # nothing of Python's own pending output lands in the capture
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            machine = target.create_target_machine(cpu=cpu, features=flat, opt=0)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        message = captured.read().decode(errors="replace")
    if _UNKNOWN_CPU in message:
        return False, {}
    asm = machine.emit_assembly(llvm.parse_assembly(_PROBE_IR))
    bodies = {}
    for name in PROBED_FEATURES:
        body = asm.split(f"probe_{name}:", 1)[1]
        bodies[name] = body.split(".Lfunc_end", 1)[0]
    return True, {f: bool(_PROBE_PATTERNS[f].search(bodies[f])) for f in PROBED_FEATURES}


def target_features() -> dict[str, bool]:
    """The x86-64 features of the code Numba generates, as LLVM names them.

    For this host: every feature it reports (as Numba passes them, ``NUMBA_ENABLE_AVX``
    included). For a named CPU or an explicit feature string: the PROBED_FEATURES of the code
    LLVM generates for that target; empty for a CPU name LLVM does not know.
    """
    name, features = numba_target()
    if name is None:
        from numba.core import codegen

        return _parse_features(codegen.get_host_cpu_features())
    return probe(name, features)[1]


def has_avx512() -> bool:
    """Whether the generated code may use AVX-512 (32 registers of 8 float64), on any target."""
    return bool(target_features().get("avx512f", False))


def host_cpu() -> str:
    """LLVM's name of the CPU this process runs on ("znver3", "skylake-avx512", ...), whatever
    CPU Numba's code is generated for: how that code runs depends on this one."""
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_name()


def _described(name: str) -> str:
    """The named target as the user set it: 'NUMBA_CPU_NAME=haswell, NUMBA_CPU_FEATURES=""'."""
    from numba import config

    parts = [f"NUMBA_CPU_NAME={name}" if config.CPU_NAME not in (None, "host") else name]
    if config.CPU_FEATURES is not None:
        parts.append(f'NUMBA_CPU_FEATURES="{config.CPU_FEATURES}"')
    return ", ".join(parts)


@functools.cache
def _check() -> tuple[bool, str]:
    for package, (low, high) in TESTED.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return False, f"{package} is not installed as a distribution"
        if not low <= _release(version) < high:
            tested = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
            return False, f"{package} {version} is outside the tested range {tested}"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return False, f"CPU architecture {machine} is not one the tuned kernels were tested on"
    name, flat = numba_target()
    where = "this CPU" if name is None else _described(name)
    if name is not None and not probe(name, flat)[0]:
        why = f"{where} is not a CPU LLVM knows: the generic kernels run"
        print(f"lepton: warning: {why}", file=sys.stderr, flush=True)
        return False, why
    features = target_features()
    missing = [f for f in REQUIRED_FEATURES if not features.get(f, False)]
    if missing:
        return False, f"code for {where} has no {', '.join(missing)}"
    from numba import __version__ as numba_version

    simd = "AVX-512" if has_avx512() else "AVX2"
    found = f"numba {numba_version}, llvmlite {metadata.version('llvmlite')}, {simd}"
    if name is None:
        return True, found
    found = f"{found} (code for {where})"
    beyond = _beyond_named_cpu(name)
    if beyond:
        note = (
            f"NUMBA_CPU_NAME={name} without NUMBA_CPU_FEATURES: Numba keeps this host's features, "
            f"so the code uses {', '.join(beyond)}, which {name} lacks "
            f'(NUMBA_CPU_FEATURES="" gives {name}\'s own)'
        )
        print(f"lepton: warning: {note}", file=sys.stderr, flush=True)
        found = f"{found}; {note}"
    return True, found


def _beyond_named_cpu(name: str) -> list[str]:
    """PROBED_FEATURES the code uses that the named CPU itself lacks (only possible when
    NUMBA_CPU_FEATURES is unset and Numba passes the host's features over the name)."""
    from numba import config

    if config.CPU_NAME in (None, "host") or config.CPU_FEATURES is not None:
        return []
    used, own = target_features(), probe(name, "")[1]
    return [f for f in PROBED_FEATURES if used.get(f, False) and not own.get(f, False)]


def supported() -> tuple[bool, str]:
    """(True, what was found) when the tuned kernels may run here; else (False, why not)."""
    return _check()
