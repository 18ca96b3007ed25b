"""The Markdown summary of `bench/engines.py`'s JSON lines (standard library only: engines_gpu.sh runs it
after every step, so a run cut short still leaves an up-to-date table).

    python bench/engines_summary.py results.jsonl [--steps-file steps.jsonl] [--md summary.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

SEED_CLAIM_GB = 5.6
"""The seed's headline: fine-tune Stable Diffusion on one consumer GPU in about 5.6 GB (Colossal-AI's blog)."""


def read_lines(path: Optional[Path]) -> list[dict]:
    if path is None or not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill: skip it, keep the rest
            continue
    return rows


def speed_table(speed: list[dict]) -> list[str]:
    batches = sorted({r["batch"] for r in speed})
    base = {r["batch"]: r["img_per_s"] for r in speed if r["engine"] == "diffusers-default" and "img_per_s" in r}
    works = {json.dumps(r["work"], sort_keys=True) for r in speed if "work" in r}
    work = f" Work per step besides forward/backward/AdamW, every row: {works.pop()}." if len(works) == 1 else (
        f" Rows do different work: {sorted(works)}." if works else "")
    out = ["img/s (x diffusers-default at that batch) / peak GiB over the timed steps "
           f"(* = measured while Colossal-AI's kernels compiled in the background).{work}", "",
           "| engine | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for engine in dict.fromkeys(r["engine"] for r in speed):
        cells = []
        for b in batches:
            r = next((x for x in speed if x["engine"] == engine and x["batch"] == b), None)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("error: " + r["error"][:70].replace("|", "/"))
            else:
                ratio = f" ({r['img_per_s'] / base[b]:.2f}x)" if base.get(b) else ""
                star = "*" if r.get("note") else ""
                cells.append(f"{r['img_per_s']:.1f}{ratio} / {r['peak_memory_gib']:.2f}{star}")
        out.append(f"| {engine} | " + " | ".join(cells) + " |")
    return out


def claim_line(speed: list[dict]) -> list[str]:
    ok = [r for r in speed if "peak_memory_gib" in r and r.get("memory_kind") == "cuda_max_memory_allocated"]
    if not ok:
        return []
    b = min(r["batch"] for r in ok)
    best = min((r for r in ok if r["batch"] == b), key=lambda r: r["peak_memory_gib"])
    gb = best["peak_memory_gib"] * 2**30 / 1e9
    verdict = "within" if gb <= SEED_CLAIM_GB else "above"
    return ["", f"Seed's claim (SD fine-tune in about {SEED_CLAIM_GB} GB): the least peak at batch {b} is {gb:.2f} GB "
            f"({best['engine']}), {verdict} it. UNet training only, as with a latent cache (the frozen text encoder "
            "and VAE stay off the GPU); the CUDA context (~0.5 GB) is not in max_memory_allocated."]


def summary(results: Path, steps_file: Optional[Path] = None) -> str:
    rows = read_lines(results)
    env = next((r for r in rows if r.get("event") == "env"), {})
    out = [f"# Engines on {env.get('gpu') or 'cpu'} (torch {env.get('torch', '?')}, colossalai "
           f"{env.get('colossalai', '?')}, deepspeed {env.get('deepspeed', '?')})", ""]
    speed = [r for r in rows if r.get("event") == "speed"]
    if speed:
        out += speed_table(speed) + claim_line(speed) + [""]
    for r in rows:
        if r.get("event") == "loss_match":
            detail = (f"max rel {r['max_rel_diff']}, mean {r['mean_rel_diff']}, bound {r['rtol']} (mean "
                      f"{r['rtol'] / 5})"
                      if "max_rel_diff" in r else r.get("error", ""))
            out.append(f"- loss match {r['engine']} vs single, {r['steps']} steps at batch {r['batch']}: "
                       f"ok={r['ok']} ({detail})")
        elif r.get("event") in ("kernels", "check_run", "fixture"):
            rest = {k: v for k, v in r.items() if k not in ("event", "device", "torch", "precision", "preset")}
            out.append(f"- {r['event']}: {json.dumps(rest)}")
    steps = read_lines(steps_file)
    if steps:
        out += ["", "| step | exit code | wall s | limit s |", "|---|---|---|---|"]
        for s in steps:
            code = s["rc"] if "rc" in s else f"skipped ({s.get('skipped', '')})"
            out.append(f"| {s['step']} | {code} | {s.get('wall_s', '')} | {s.get('limit_s', '')} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--steps-file")
    p.add_argument("--md", help="write the table here (atomically) instead of stdout")
    args = p.parse_args(argv)
    text = summary(Path(args.results), Path(args.steps_file) if args.steps_file else None)
    if args.md:
        tmp = Path(args.md + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.md)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
