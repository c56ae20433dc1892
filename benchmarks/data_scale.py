"""Data memory and start-up time against corpus size: is a run's memory flat, and is a second run quick?

For each size it writes a corpus of N pairs under a temporary folder by repeating Multi30k's training split (read by
path, never copied into the repository) with every pair numbered (``"<k> <sentence>"`` on both sides, so all pairs
differ and the number of distinct words grows with N), then runs ``transformer-ln train`` for 3 updates of a tiny
model twice on it:

- cold: empty ``data.cache_dir``: tokenizer training, encoding, then training;
- warm: a new run directory, the same ``data.cache_dir``: the prepared data is reused.

and reports peak RSS (``wait4``'s ``ru_maxrss``: the largest of the run and the processes it started, tokenizer
training and encoding workers; file-backed pages included), the peak anonymous and file-backed RSS of the main
process (sampled from /proc every 50 ms), the time from the command's start to its first logged update, its CPU
seconds (user + system, workers included: a figure that does not depend on how busy the machine is), the 1-minute
load average when it ended, the cold preprocessing throughput (pairs / seconds of tokenizer training plus encoding,
from the manifest), and the prepared size on disk.
Everything it writes is deleted at the end (``--keep`` keeps it).

    python benchmarks/data_scale.py --sizes 500000,1000000,2000000,4500000 --json data_scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
TINY = ["model.d_model=64", "model.n_heads=4", "model.d_ff=128", "model.n_enc_layers=2", "model.n_dec_layers=2",
        "model.share_embeddings=true", "model.max_positions=256", "data.vocab_size=8000", "train.max_tokens=4096",
        "train.max_updates=3", "train.log_every=1", "train.bleu_at_end=false", "train.valid_every=0",
        "optim.warmup_updates=10"]


def write_corpus(src: Path, tgt: Path, out: Path, n: int) -> tuple[Path, Path]:
    """``n`` numbered pairs: Multi30k's lines repeated, pair k (0-based, over all copies) prefixed with ``k``."""
    lines_src = src.read_text(encoding="utf-8").splitlines()
    lines_tgt = tgt.read_text(encoding="utf-8").splitlines()
    assert len(lines_src) == len(lines_tgt), (src, tgt)
    paths = out / "train.de", out / "train.en"
    with open(paths[0], "w", encoding="utf-8") as fs, open(paths[1], "w", encoding="utf-8") as ft:
        for start in range(0, n, len(lines_src)):
            m = min(len(lines_src), n - start)
            fs.write("".join(f"{start + i} {lines_src[i]}\n" for i in range(m)))
            ft.write("".join(f"{start + i} {lines_tgt[i]}\n" for i in range(m)))
    return paths


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def measure(cmd: list[str], run_dir: Path, env: dict) -> dict:
    """Run ``cmd``; peak RSS of it and its children, peak anon/file RSS of the main process, time to update 1."""
    t0 = time.time()
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    first_update = None
    peak = {"RssAnon": 0, "RssFile": 0}
    metrics = run_dir / "metrics.jsonl"
    while True:  # wait4, not Popen.poll: its rusage is this run's (and its reaped workers')
        for k, v in _status_kib(proc.pid).items():
            peak[k] = max(peak[k], v)
        if first_update is None and metrics.is_file() and '"kind": "train"' in metrics.read_text():
            first_update = time.time() - t0
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    log.close()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log.name}:\n"
                           + Path(log.name).read_text()[-3000:])
    if first_update is None and metrics.is_file() and '"kind": "train"' in metrics.read_text():
        first_update = wall
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_anon_mib": round(peak["RssAnon"] / 1024, 1),
            "peak_file_mib": round(peak["RssFile"] / 1024, 1),
            "first_update_s": round(first_update, 1) if first_update else None, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "loadavg_1min": float(open("/proc/loadavg").read().split()[0])}


def du_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="500000,1000000,2000000,4500000", help="corpus sizes in pairs, comma-separated")
    p.add_argument("--multi30k", type=Path, default=MULTI30K, help="folder with train/val .de/.en (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="where the corpora go (default: a new folder in /tmp)")
    p.add_argument("--num-proc", type=int, default=2, help="data.num_proc for the encoding (default 2)")
    p.add_argument("--tokenizer-sample", type=int, default=1_000_000,
                   help="data.tokenizer_sample: pairs the BPE is trained on (default 1000000; 0: all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora and runs")
    args = p.parse_args()
    m = args.multi30k
    for name in ("train.de", "train.en", "val.de", "val.en"):
        if not (m / name).is_file():
            sys.exit(f"error: {m / name} does not exist; point --multi30k at the Multi30k folder")
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="data_scale_", dir=args.workdir))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    results = []
    try:
        for n in sizes:
            d = work / f"n{n}"
            d.mkdir()
            t = time.time()
            src, tgt = write_corpus(m / "train.de", m / "train.en", d, n)
            gen_s = time.time() - t
            data = [f"data.source=files", f"data.train_src={src}", f"data.train_tgt={tgt}",
                    f"data.valid_src={m / 'val.de'}", f"data.valid_tgt={m / 'val.en'}", f"data.cache_dir={d / 'cache'}",
                    f"data.num_proc={args.num_proc}"]
            if args.tokenizer_sample:
                data.append(f"data.tokenizer_sample={args.tokenizer_sample}")
            row = {"pairs": n, "corpus_mib": round((src.stat().st_size + tgt.stat().st_size) / 2**20, 1),
                   "generate_s": round(gen_s, 1)}
            for kind in ("cold", "warm"):
                run_dir = d / f"run_{kind}"
                cmd = [sys.executable, "-m", "transformer_ln.cli", "train", "--cpu", *TINY, *data,
                       f"train.out_dir={run_dir}"]
                row[kind] = measure(cmd, run_dir, env)
                print(f"{n} pairs, {kind}: {row[kind]}", flush=True)
            entry = next((d / "cache").glob("prepared-*"))
            manifest = json.loads((entry / "manifest.json").read_text())
            row["prepared_mib"] = du_mib(entry)
            row["prepare_s"] = manifest["seconds"]["total"]
            row["tokenizer_s"] = manifest["seconds"]["tokenizer"]
            row["tokenizer_pairs"] = manifest["tokenizer_pairs"]
            row["pairs_per_s"] = round(n / manifest["seconds"]["total"])
            row["encoded_rows"] = manifest["splits"]["train"]["rows"]
            results.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| pairs | peak RSS cold (MiB) | peak RSS warm (MiB) | warm anon / file (MiB) | first update cold (s) "
          "| first update warm (s) | preprocessing (pairs/s) | prepared on disk (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c, w = r["cold"], r["warm"]
        print(f"| {r['pairs']:,} | {c['peak_rss_mib']:.0f} | {w['peak_rss_mib']:.0f} | {w['peak_anon_mib']:.0f} / "
              f"{w['peak_file_mib']:.0f} | {c['first_update_s']} | {w['first_update_s']} | {r['pairs_per_s']:,} | "
              f"{r['prepared_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
