"""The cpu-arm bundle on an aarch64 Debian system under QEMU: verify, classify, and top-1 against x86.

    sudo python bench/arm_emulated.py --run runs/demo [--root /var/tmp/arm64-bookworm] [--out bench/results/...]

``--run`` is a finished run directory (``compress run --demo --out runs/demo`` makes one in about two minutes).
The script, which needs root (debootstrap, chroot) and Debian's ``debootstrap``, ``qemu-user-static`` and
``binfmt-support``:

1. packs the run's choice for ``cpu-arm`` (``compress deploy --target cpu-arm``);
2. builds an arm64 Debian bookworm root file system once (``debootstrap --arch=arm64 --foreign``, then its second
   stage inside a chroot, every arm64 binary run by ``qemu-aarch64`` through binfmt_misc);
3. creates a virtual environment there and installs the bundle's ``requirements.txt`` from PyPI's aarch64 wheels;
4. runs the bundle's own runner there: ``verify``, ``classify`` on one image, and ``bench --data`` on an
   ImageFolder of the digits (all 1,797 of scikit-learn's, 8x8 grey, or ``--per-class N`` of each) for each of
   the bundle's runtimes, and the same ``bench --data`` on x86;
5. compares each runtime's top-1 on the two machines and writes ``bench/results/arm_emulated.json``.

Latency under emulation says nothing about an Arm CPU, so none is reported; the runner's latency records from the
chroot are kept only as proof that it ran. Takes about 10 minutes the first time on 2 cores (most of it
debootstrap's second stage under emulation), a few minutes once the root file system exists. /proc and /sys are
mounted inside as the runtimes need them (``mount``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402

MIRROR = "http://deb.debian.org/debian"
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def sh(*cmd: str | Path, timeout: int = 3600, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, timeout=timeout, **kw)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(str(c) for c in cmd)}\n{(done.stderr or done.stdout)[-2000:]}")
    return done


def check_host() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: debootstrap and chroot need it")
    for tool in ("debootstrap", "qemu-aarch64-static", "update-binfmts"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install -y debootstrap qemu-user-static binfmt-support")
    if not (BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT)
    if not (BINFMT / "qemu-aarch64").exists():
        sh("update-binfmts", "--enable", "qemu-aarch64")


def build_root(root: Path) -> None:
    """An arm64 bookworm with Python 3.11 and venv, made once (the marker says it finished)."""
    marker = root / ".compress-arm64-ready"
    if marker.exists():
        return
    if root.exists():
        shutil.rmtree(root)
    sh("debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
       "bookworm", root, MIRROR)
    shutil.copy("/usr/bin/qemu-aarch64-static", root / "usr/bin/")
    sh("chroot", root, "/debootstrap/debootstrap", "--second-stage")
    marker.write_text("ok\n")


HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # the host's trust store, which a TLS proxy's CA may be in


def mount(root: Path, name: str) -> list[Path]:
    """Mount the host's /proc or /sys at ``root/name`` (the mount points to undo after; none when already there).

    Under user emulation both describe the x86 host, and the runtimes' CPU discovery differs in what it needs.
    OpenVINO's CPU plugin needs both: without /proc it never finished creating its Core (30 minutes of CPU on the
    demo's 8x8 model), with /proc and no /sys its hwloc found no CPU topology and it crashed compiling; with both
    it compiles in 4 s. ONNX Runtime's cpuinfo crashed on the host's x86 /sys, and it needs neither. So they are
    mounted only while OpenVINO runs. A real Arm system has its own of both."""
    point = root / name
    if os.path.ismount(point):
        return []
    point.mkdir(exist_ok=True)
    sh("mount", *(("-t", "proc", "proc") if name == "proc" else ("--rbind", "/sys")), point)
    return [point]


def kernel_files(root: Path, runtime: str) -> list[Path]:
    """What ``runtime`` needs mounted under emulation (``mount``): /proc and /sys for OpenVINO, nothing else."""
    return mount(root, "proc") + mount(root, "sys") if runtime == "openvino" else []


def unmount(points: list[Path]) -> None:
    for point in reversed(points):
        subprocess.run(["umount", "--recursive", "--lazy", str(point)], check=False)


def chroot(root: Path, *cmd: str, timeout: int = 3600) -> subprocess.CompletedProcess:  # noqa: D103
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "PIP_CERT": "/etc/ssl/certs/host-ca.crt",
           **{k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}}
    return sh("chroot", root, *cmd, timeout=timeout, env=env)


def digits_folder(out: Path, per_class: int | None = None) -> Path:
    """Scikit-learn's digits as an ImageFolder of 8x8 grey PNGs (the demo model's classes): all 1,797, or the
    first ``per_class`` of each class."""
    import numpy as np
    from PIL import Image

    from calibration.datasets import digits_source

    source = digits_source()
    seen: dict[int, int] = {}
    for i, label in enumerate(source.labels):
        seen[int(label)] = seen.get(int(label), 0) + 1
        if per_class is not None and seen[int(label)] > per_class:
            continue
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(source.load(i))).save(folder / f"{i:04d}.png")
    return out


def top1(records: Path) -> tuple[float, int]:
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    scored = [r for r in rows if r.get("top1") is not None]
    return scored[-1]["top1"], scored[-1].get("eval_samples") or 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run directory")
    ap.add_argument("--root", type=Path, default=Path("/var/tmp/arm64-bookworm"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/arm-emulated"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "arm_emulated.json")
    ap.add_argument("--runtimes", nargs="+", help="the bundle's runtimes to score under emulation (default: all; "
                    "OpenVINO's CPU plugin takes over 10 minutes for the demo's 1,797 images under QEMU)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per runtime's scoring under emulation")
    ap.add_argument("--candidate", help="pack this candidate of the run (compress deploy --candidate), e.g. nncf-ov")
    ap.add_argument("--runtime", help="pack for this runtime (compress deploy --runtime)")
    ap.add_argument("--per-class", type=int, help="score the first N digits of each class on both machines instead "
                    "of all 1,797 (emulation is slow: OpenVINO took 1-5 minutes for 500, ONNX "
                    "Runtime over 20 for 1,797)")
    args = ap.parse_args()
    check_host()
    start = time.perf_counter()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    bundle = args.work / "bundle-cpu-arm"
    choice = [*(["--candidate", args.candidate] if args.candidate else []),
              *(["--runtime", args.runtime] if args.runtime else [])]
    sh(sys.executable, "-m", "compress.cli", "deploy", args.run, "--target", "cpu-arm", "--out", bundle, *choice,
       cwd=REPO)
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = digits_folder(args.work / "digits", args.per_class)
    runtimes = args.runtimes or [m["runtime"] for m in manifest["models"]]
    x86 = {}  # the same bundle, the same images, each runtime on this machine
    for runtime in runtimes:
        done = sh(sys.executable, bundle / "runner.py", "bench", "--runtime", runtime, "--data", data, "--batch", "1",
                  "--iterations", "5", "--out", args.work / f"x86-{runtime}")
        x86[runtime] = top1(Path(done.stdout.strip().rsplit("records: ", 1)[-1]))

    t = time.perf_counter()
    build_root(args.root)
    root_s = time.perf_counter() - t
    result = run_inside(args, bundle, manifest, data, runtimes, x86, root_s, start)
    print(json.dumps({k: v for k, v in result.items() if k not in ("bundle_models", "pip_output_tail")}, indent=1))
    write_result(result, args.out)


def run_inside(args, bundle: Path, manifest: dict, data: Path, runtimes: list[str], x86: dict, root_s: float,
               start: float) -> dict:
    """Install the bundle's requirements in the aarch64 root and run its runner there; the result to write."""
    shutil.copy("/etc/resolv.conf", args.root / "etc/resolv.conf")
    shutil.copy(HOST_CA, args.root / "etc/ssl/certs/host-ca.crt")  # pip inside trusts what the host trusts
    inside = args.root / "work"
    if inside.exists():
        shutil.rmtree(inside)
    shutil.copytree(bundle, inside / "bundle")
    shutil.copytree(data, inside / "digits")
    arch = chroot(args.root, "uname", "-m").stdout.strip()
    python = chroot(args.root, "python3", "--version").stdout.strip()
    t = time.perf_counter()
    if not (args.root / "opt/venv/bin/python").exists():
        chroot(args.root, "python3", "-m", "venv", "/opt/venv")
    install = chroot(args.root, "/opt/venv/bin/pip", "install", "--quiet", "-r", "/work/bundle/requirements.txt")
    install_s = time.perf_counter() - t
    versions = chroot(args.root, "/opt/venv/bin/pip", "list", "--format=json").stdout
    runner = ["/opt/venv/bin/python", "/work/bundle/runner.py"]
    verified = chroot(args.root, *runner, "verify").stdout.strip()
    first = sorted((inside / "digits" / "3").iterdir())[0].name
    mounted = kernel_files(args.root, manifest["models"][0]["runtime"])  # classify runs the bundle's first runtime
    try:
        classified = chroot(args.root, *runner, "classify", f"/work/digits/3/{first}").stdout.strip()
    finally:
        unmount(mounted)
    per_runtime = {}
    for runtime in runtimes:
        t = time.perf_counter()
        mounted = kernel_files(args.root, runtime)
        try:
            # one thread: with two, ONNX Runtime's worker threads kept both cores busy under emulation
            done = chroot(args.root, *runner, "bench", "--runtime", runtime, "--data", "/work/digits", "--batch", "1",
                          "--iterations", "3", "--threads", "1", "--out", f"/work/arm-{runtime}",
                          timeout=args.timeout)
        except subprocess.TimeoutExpired:
            per_runtime[runtime] = {"timed_out_s": args.timeout}
            continue
        finally:
            unmount(mounted)
        inside_path = done.stdout.strip().rsplit("records: ", 1)[-1]  # where the runner wrote, inside the chroot
        arm_top1, n = top1(args.root / inside_path.lstrip("/"))
        per_runtime[runtime] = {"top1": arm_top1, "images": n, "seconds": round(time.perf_counter() - t)}
    for runtime, v in per_runtime.items():
        if "top1" in v:  # how many images the two machines classified differently, net
            v["x86_top1"] = x86[runtime][0]
            v["net_images_vs_x86"] = round((v["top1"] - x86[runtime][0]) * x86[runtime][1])
    return {
        "benchmark": "arm_emulated", "bundle": str(bundle), "bundle_models": manifest["models"],
        "arm": {"uname_m": arch, "python": python, "per_runtime": per_runtime,
                "packages": {p["name"]: p["version"] for p in json.loads(versions)}},
        "x86": {runtime: {"top1": t1, "images": n} for runtime, (t1, n) in x86.items()},
        "same_top1": {k: abs(v["top1"] - v["x86_top1"]) < 1e-12 for k, v in per_runtime.items() if "top1" in v},
        "verify": verified, "classify": classified, "pip_output_tail": install.stdout[-500:],
        "seconds": {"root_file_system": round(root_s), "pip_install": round(install_s),
                    "total": round(time.perf_counter() - start)},
        "per_class": args.per_class,
    }


if __name__ == "__main__":
    main()
