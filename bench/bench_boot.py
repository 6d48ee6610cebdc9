"""Issue 3 benchmark: build time, ramdisk size and QEMU boot milestones, bootlink's slim
ramdisk side by side with a stiefelsystem-style full one, in one run.

  slim  the product: mmdebstrap --variant=essential, no recommends, pruned, bytecode kept
  full  stiefelsystem-style: --variant=minbase with recommends (+ kexec-tools, systemd),
        nothing pruned, Python bytecode dropped (as upstream's recipe does)

Both are built from scratch (fresh root and layer caches; only the kernel download is
shared), packed the same way (newc cpio, zstd at the same level: this isolates what is
in them), and booted N times each as the client of the end-to-end scenario (a laptop
`bootlink server` in a namespace, QEMU -accel tcg, three NICs), to the target's marker.
Milestones are seconds after QEMU started; medians of N boots. Needs root.

    python bench/bench_boot.py [--boots 3] [--zstd-level 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bootlink.ramdisk import build, e2e, target
from bootlink.ramdisk.kernel import fetch_kernel

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BOOTLINK_CACHE", REPO / "cache"))
ROWS = (
    "kernel", "/init", "modules loaded", "python up", "probing", "server found",
    "downloaded", "kexec", "second kernel", "target root attached", "target marker",
)  # fmt: skip


def build_fresh(
    variant: str, level: int, tmp: Path, source: Path | None
) -> tuple[build.BuildResult, float]:
    cache = tmp / f"cache-{variant}"
    cache.mkdir()
    (CACHE / "kernel").mkdir(parents=True, exist_ok=True)
    (cache / "kernel").symlink_to(CACHE / "kernel")  # downloading is not building
    t0 = time.monotonic()
    res = build.build(
        build.BuildOptions(
            output=tmp / f"out-{variant}", cache=cache, zstd_level=level, variant=variant,
            use_cache=False, source_root=source,
        )
    )  # fmt: skip
    return res, time.monotonic() - t0


def boot_n(art: e2e.Artifacts, n: int, tmp: Path, memory: int) -> list[e2e.Result]:
    results = []
    for i in range(n):
        res = e2e.run_client_scenario(art, tmp / f"boot{i}", memory=memory)
        status = "ok" if res.ok else "FAILED: " + res.detail.strip().splitlines()[0]
        print(f"  boot {i + 1}/{n}: {status} ({res.milestones.get('target marker', '-')} s)",
              file=sys.stderr)  # fmt: skip
        results.append(res)
    return results


def medians(results: list[e2e.Result]) -> dict[str, float]:
    out = {}
    for row in ROWS:
        vals = [r.milestones[row] for r in results if r.ok and row in r.milestones]
        if vals:
            out[row] = round(statistics.median(vals), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--zstd-level", type=int, default=build.DEFAULT_ZSTD_LEVEL)
    ap.add_argument("--memory", type=int, default=1536, help="guest MiB (same for both)")
    ap.add_argument("--variants", default="slim,full")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--source", type=Path, help="bootlink checkout to put in the ramdisks")
    args = ap.parse_args()
    kernel = fetch_kernel(CACHE)
    disk = target.build_target_disk(CACHE)
    initrd = target.build_target_initrd(CACHE, kernel, build.host_apt_sources())
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as d:
        tmp = Path(d)
        for variant in args.variants.split(","):
            print(f"[bench] building {variant} from scratch ...", file=sys.stderr)
            res, seconds = build_fresh(variant, args.zstd_level, tmp, args.source)
            art = e2e.Artifacts(CACHE, res.ramdisk, res.vmlinuz, kernel, disk, initrd,
                                res.manifest)  # fmt: skip
            print(f"[bench] booting {variant} {args.boots}x ...", file=sys.stderr)
            boots = boot_n(art, args.boots, tmp / variant, args.memory)
            report[variant] = {
                "build_seconds": round(seconds, 1),
                "size_bytes": res.manifest["files"]["ramdisk.cpio.zst"]["size"],
                "unpacked_bytes": res.manifest["uncompressed_bytes"],
                "packages": len(res.manifest["packages"]),
                "boots_ok": sum(r.ok for r in boots),
                "boots": args.boots,
                "milestones": medians(boots),
            }
    names = list(report)
    print(f"\n{'':24}" + "".join(f"{n:>14}" for n in names)
          + ("   ratio" if len(names) == 2 else ""))  # fmt: skip

    def row(label: str, values: list[float | None], fmt: str) -> None:
        cells = "".join(f"{format(v, fmt) if v is not None else '-':>14}" for v in values)
        ratio = ""
        if len(values) == 2 and values[0] and values[1]:
            ratio = f"   {values[0] / values[1]:.2f}"
        print(f"{label:24}{cells}{ratio}")

    row("build time (s)", [report[n]["build_seconds"] for n in names], ".1f")
    row("ramdisk size (MB)", [report[n]["size_bytes"] / 1e6 for n in names], ".1f")
    row("unpacked (MB)", [report[n]["unpacked_bytes"] / 1e6 for n in names], ".0f")
    row("packages", [report[n]["packages"] for n in names], "d")
    row("boots ok", [report[n]["boots_ok"] for n in names], "d")
    for r in ROWS:
        row(f"{r} (s)", [report[n]["milestones"].get(r) for n in names], ".2f")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(v["boots_ok"] == v["boots"] for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
