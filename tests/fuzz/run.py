"""Run one fuzz target for a bounded time.

    .venv/bin/python tests/fuzz/run.py TARGET [--seconds N] [--engine atheris|random]
                                              [--work DIR] [--max-len BYTES]

``atheris`` (coverage-guided libFuzzer, the default where it is installed: x86_64 wheels
only) instruments edgeseal's modules and the stdlib/numpy parsers they call; ``random`` is
a plain mutational fuzzer in pure Python for machines without atheris. Both start from
``corpus/TARGET`` plus ``regressions/TARGET``, keep what they learn in ``--work``
(never in the checked-in corpus), and write a crashing input to ``--work/crash-*``.

Exit status 0: no finding. Anything else: a finding, printed with the input's path; keep it
as a regression case with ``cp <crash> tests/fuzz/regressions/TARGET/<what-it-shows>``.
The last line printed is a JSON summary (engine, executions, seconds, coverage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Address-space cap: an input that makes a parser allocate more than this is a finding
#: (MemoryError), not a machine brought down.
MEMORY_LIMIT = 6 * 1024**3
#: One input may take this long (seconds) before it counts as a hang.
TIMEOUT = 10

INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1]
INTERESTING += [2**32, 2**63 - 1, 2**64 - 1, 64, 16 * 1024**2, 8 * 1024**3]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"null", b"-1", b"1e999", b"\\u0000"]
TOKENS += [b"Content-Length: ", b"\r\n", b"/v1/models/clf/infer", b"Transfer-Encoding: chunked"]


def _mutate(rng: random.Random, data: bytes, pool: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:  # an interesting integer, big-endian, 1-8 bytes
            n = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) % (1 << (8 * n))
            buf[pos : pos + n] = value.to_bytes(n, "big")
        elif op == 3:  # cut a range
            buf[pos : pos + rng.randint(1, 64)] = b""
        elif op == 4:  # duplicate a range
            piece = buf[pos : pos + rng.randint(1, 64)]
            buf[pos:pos] = piece
        elif op == 5:  # insert a token
            buf[pos:pos] = rng.choice(TOKENS)
        elif pool:  # splice with another input
            other = rng.choice(pool)
            at = rng.randrange(len(other) + 1)
            buf = buf[:pos] + other[at:]
    return bytes(buf[:max_len])


def run_random(target: str, seeds: list[bytes], seconds: float, work: Path, max_len: int) -> dict:
    from fuzz.targets import KNOWN_FINDINGS, run_one

    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    pool = list(seeds) or [b""]
    for s in pool:
        run_one(target, s)
    execs, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        data = _mutate(rng, rng.choice(pool), pool, max_len)
        t0 = time.monotonic()
        try:
            run_one(target, data)
        except KNOWN_FINDINGS.get(target, ()):
            pass
        except BaseException:
            crash = work / f"crash-{execs}"
            crash.write_bytes(data)
            traceback.print_exc()
            print(f"finding: {crash}")
            raise SystemExit(1) from None
        if time.monotonic() - t0 > TIMEOUT:
            crash = work / f"timeout-{execs}"
            crash.write_bytes(data)
            print(f"finding (slow input, {time.monotonic() - t0:.1f} s): {crash}")
            raise SystemExit(1)
        execs += 1
    return {"engine": "random", "executions": execs, "seconds": round(time.monotonic() - start, 1)}


def run_atheris(target: str, seconds: float, work: Path, max_len: int) -> None:
    import atheris  # type: ignore[import-not-found]

    with atheris.instrument_imports(
        include=["edgeseal", "json", "base64", "http", "email", "numpy"]
    ):
        from fuzz import targets

        targets.world()
        if target.startswith("api"):
            from edgeseal.agent import api  # noqa: F401

            if target == "api_request":
                targets._api_world()
    fn = targets.TARGETS[target]

    from edgeseal.core.errors import EdgesealError

    tolerated = (EdgesealError, *targets.KNOWN_FINDINGS.get(target, ()))

    def one(data: bytes) -> None:
        with contextlib.suppress(*tolerated):
            fn(data)

    corpus = work / "corpus"
    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={int(seconds)}",
        f"-timeout={TIMEOUT}",
        f"-max_len={max_len}",
        "-rss_limit_mb=4096",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, one)
    atheris.Fuzz()


def summarize_libfuzzer(log: str, seconds: float) -> dict:
    """Figures from libFuzzer's output: executions, coverage (edges), features, corpus."""
    out: dict = {"engine": "atheris", "seconds": seconds}
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    if m:
        out["executions"] = int(m.group(1))
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if cov:
        out["coverage_edges"], out["features"], out["corpus"] = map(int, cov[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument(
        "--seconds", type=float, default=float(os.environ.get("EDGESEAL_FUZZ_SECONDS", "30"))
    )
    ap.add_argument("--engine", choices=("atheris", "random", "auto"), default="auto")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    work = opts.work or Path(tempfile.mkdtemp(prefix=f"edgeseal-fuzz-{opts.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    if opts.atheris_child:  # before anything imports edgeseal, so atheris instruments it
        run_atheris(opts.target, opts.seconds, work, opts.max_len)
        return
    from fuzz.targets import TARGETS, corpus_files

    if opts.target not in TARGETS:
        raise SystemExit(f"unknown target {opts.target!r}; known: {', '.join(TARGETS)}")
    engine = opts.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    seeds = [p.read_bytes() for p in corpus_files(opts.target)]
    if engine == "random":
        summary = run_random(opts.target, seeds, opts.seconds, work, opts.max_len)
        print(json.dumps({"target": opts.target, **summary}))
        return
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for p in corpus_files(opts.target):
        shutil.copy(p, corpus / f"{p.parent.name}-{p.name}")
    # libFuzzer exits the process on a finding; run it as a child to read its figures.
    import subprocess

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, opts.target, "--atheris-child", "--work", str(work),
         "--seconds", str(opts.seconds), "--max-len", str(opts.max_len)],
        capture_output=True, text=True, check=False, timeout=opts.seconds + 300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    (work / "libfuzzer.log").write_text(log)
    summary = summarize_libfuzzer(log, round(time.monotonic() - start, 1))
    if proc.returncode != 0:
        print(log[-6000:])
        crashes = sorted(
            str(p)
            for p in work.glob("*-*")
            if p.is_file() and p.name.split("-")[0] in {"crash", "timeout", "oom", "leak", "slow"}
        )
        print(f"finding: {' '.join(crashes) or 'see ' + str(work / 'libfuzzer.log')}")
        print(json.dumps({"target": opts.target, **summary, "finding": True}))
        raise SystemExit(1)
    print(json.dumps({"target": opts.target, **summary, "work": str(work)}))


if __name__ == "__main__":
    main()
