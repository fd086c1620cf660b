"""Benchmark `rlhf prepare-data` on a synthetic dump grown from the beer sample (not a timed test).

    .venv/bin/python bench/bench_prepare_data.py [--size-mb 1000] [--keep DIR]

Builds a Posts.xml of about --size-mb MB by repeating the beer sample's rows with fresh ids (each copy
shifts Id, ParentId and AcceptedAnswerId by a constant, so every copy is a distinct set of questions
whose answers point to their own questions), runs the stage in this process, and prints:
  - throughput in MB/s of Posts.xml, per wall second and per CPU second (the stage uses one core),
  - RSS while Posts.xml is read (at 25/50/75/100% of its bytes, found from the parser's file offset in
    /proc/self/fdinfo) and during the pairing/writing pass, and the peak RSS of the process.
Linux only (/proc). Goal: >= 20 MB/s per core, RSS flat and < 400 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_pipeline.data.config import PrepareDataConfig  # noqa: E402
from rlhf_pipeline.data.prepare import run_prepare_data  # noqa: E402

ID_ATTRS = re.compile(rb' (Id|ParentId|AcceptedAnswerId)="(\d+)"')
ID_STRIDE = 10_000  # above the sample's largest Id (6663), so copies never collide


def sample_path() -> Path:
    shared = Path(os.environ.get("RLHF_SHARED_DIR") or REPO.parent / "shared")
    return shared / "data" / "stackexchange" / "beer.stackexchange.com" / "Posts.xml"


def synthesize(sample: Path, target: Path, size_mb: float) -> int:
    raw = sample.read_bytes()
    rows = raw[raw.index(b"<row") : raw.rindex(b"</posts>")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        f.write(b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  ')
        copy = 0
        while f.tell() < size_mb * 1e6:
            offset = copy * ID_STRIDE
            f.write(ID_ATTRS.sub(lambda m, offset=offset: b' %s="%d"' % (m.group(1), int(m.group(2)) + offset), rows))
            copy += 1
        f.write(b"</posts>\n")
    return copy


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_offset(path: Path) -> int | None:
    """The offset the parser has reached in `path`, from /proc/self/fdinfo (None when it is not open)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
        except OSError:
            continue
    return None


class RssSampler(threading.Thread):
    def __init__(self, xml_path: Path, interval: float = 0.1):
        super().__init__(daemon=True)
        self.xml_path, self.interval = xml_path, interval
        self.samples: list[tuple[float, int | None, float]] = []  # (time, offset in Posts.xml, RSS MB)
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - start, read_offset(self.xml_path), rss_mb()))
            self.stop.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1000, help="size of the synthetic Posts.xml (MB)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-prepare-data-"))
    try:
        xml_path = (work / "bench.stackexchange.com" / "Posts.xml").resolve()
        t0 = time.perf_counter()
        copies = synthesize(sample_path(), xml_path, args.size_mb)
        size = xml_path.stat().st_size
        print(
            f"synthesized {size / 1e6:.0f} MB ({copies} copies of the beer sample) in {time.perf_counter() - t0:.0f}s"
        )

        sampler = RssSampler(xml_path)
        rss_before = rss_mb()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sampler.start()
        stats = run_prepare_data(PrepareDataConfig(input=str(xml_path), output=str(work / "out"), tmp_dir=str(work)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        sampler.stop.set()
        sampler.join()

        mb = size / 1e6
        print(f"pairs {stats['pairs_total']:,} from {stats['questions']:,} questions / {stats['answers']:,} answers")
        print(f"time: {wall:.1f}s wall, {cpu:.1f}s CPU (this process; the stage is single-threaded)")
        print(f"throughput: {mb / wall:.1f} MB/s wall, {mb / cpu:.1f} MB/s per CPU-second of the stage")
        print(f"RSS before the stage: {rss_before:.0f} MB")
        reading = [(o, r) for _, o, r in sampler.samples if o is not None]
        for q in (0.25, 0.5, 0.75, 1.0):
            upto = [r for o, r in reading if o <= q * size]
            if upto:
                print(f"  RSS with {q:>4.0%} of Posts.xml read: {upto[-1]:.0f} MB (max so far {max(upto):.0f} MB)")
        end_of_reading = max((t for t, o, _ in sampler.samples if o is not None), default=0.0)
        pairing = [r for t, o, r in sampler.samples if o is None and t > end_of_reading]
        if pairing:
            print(f"  RSS during pairing/writing: min {min(pairing):.0f} MB, max {max(pairing):.0f} MB")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of the process: {peak:.0f} MB")
        print(
            json.dumps(
                {
                    "size_mb": round(mb, 1),
                    "wall_s": round(wall, 1),
                    "cpu_s": round(cpu, 1),
                    "mb_per_s_wall": round(mb / wall, 1),
                    "mb_per_s_cpu": round(mb / cpu, 1),
                    "peak_rss_mb": round(peak),
                    "pairs": stats["pairs_total"],
                }
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
