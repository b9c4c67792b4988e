"""A cpu-x86 bundle run by its standalone runner in a clean virtual environment, against what the run recorded.

    python bench/deploy.py runs/cifar10-cpu-latency --data /tmp/cifar10/test [--venv /tmp/bundle-venv]

Makes the bundle (``compress deploy RUN_DIR --target cpu-x86``), creates a virtual environment holding only the
bundle's ``requirements.txt`` (its runtime, numpy and Pillow; checked to have no torch), and runs
``runner.py bench`` there twice: top-1 on the images of ``--data`` (the run's evaluation split: CIFAR-10's test
folder) and latency at batch 1 and 8, beside the top-1 and latency the run recorded for the same candidate. The
two starts show OpenVINO's model cache: the second reads the compiled model instead of compiling it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compress.deploy.bundle import deploy  # noqa: E402
from bench.common import write_result  # noqa: E402


def _clean_venv(path: Path, requirements: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    if has_torch:
        sys.exit(f"{path} has torch installed; give a fresh --venv")
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10/test"))
    parser.add_argument("--venv", type=Path, help="a virtual environment to (re)use; default: a new one")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/deploy_cpu_x86.json"))
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data} is not there: mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10-jpeg.tar.gz "
                 "-C /tmp/cifar10")
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    bundle = deploy(args.run_dir, "cpu-x86", work / "bundle", log=print)
    manifest = json.loads((bundle / "manifest.json").read_text())
    python = _clean_venv(args.venv or work / "venv", bundle / "requirements.txt")
    packages = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
    starts = []
    for attempt in (1, 2):
        out = work / f"device-{attempt}"
        subprocess.run([str(python), str(bundle / "runner.py"), "bench", "--data", str(args.data), "--batch", "1",
                        "8", "--seconds", str(args.seconds), "--out", str(out)], check=True, cwd=work)
        starts.append([json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()])
    recorded = {r["batch_size"]: r for r in manifest["latency_measured"]}
    rows = []
    for device in starts[1]:
        here = recorded.get(device["batch_size"], {})
        rows.append({"batch_size": device["batch_size"], "bundle_p50_ms": round(device["latency_ms_p50"], 3),
                     "run_p50_ms": here.get("latency_ms_p50") and round(here["latency_ms_p50"], 3),
                     "ratio_bundle_over_run": here.get("latency_ms_p50") and
                     round(device["latency_ms_p50"] / here["latency_ms_p50"], 3),
                     "bundle_p90_ms": round(device["latency_ms_p90"], 3)})
    result = {
        "benchmark": "cpu-x86 bundle, standalone runner in a clean venv, against the run's records",
        "selected": manifest["selected"], "bundle_top1": starts[1][0]["top1"], "run_top1": manifest["selected"]["top1"],
        "eval_images": starts[1][0]["eval_samples"], "startup_s": [s[0]["env"]["startup_s"] for s in starts],
        "venv_packages": packages, "rows": rows,
    }
    write_result(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
