"""One table from bench/gpu_check.sh's files: each issue target, the figure measured, met or not.

    python bench/gpu_summary.py OUT_DIR        # reads results.jsonl, steps.jsonl, trainer_metrics.jsonl, env.json

Also writes OUT_DIR/summary.json. A target whose step did not run (or was cut short before its
figure) says so: no figure, no claim.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def find(records: list[dict], tag: str, event: str, name: str | None = None) -> dict | None:
    hits = [r for r in records if r.get("tag") == tag and r.get("event") == event
            and (name is None or r.get("name") == name)]
    return hits[-1] if hits else None


def trainer_rate(metrics: list[dict]) -> float | None:
    """Median samples_per_s over the log intervals after the first (which holds the compile)."""
    rates = [m["samples_per_s"] for m in metrics if "samples_per_s" in m][1:]
    return statistics.median(rates) if rates else None


def at_most(figure, bound):
    """figure <= bound; None (no claim either way) when the bound was not measured."""
    return None if bound is None else (figure if figure is not None else 1e9) <= bound


def rows(out: Path) -> list[dict]:
    r = read_jsonl(out / "results.jsonl")
    base, fast = find(r, "speed_b32", "bench", "diffusers-default"), find(r, "speed_b32", "bench", "colodiffusion")
    recipe = find(r, "recipe_b32", "bench", "colodiffusion")  # EXTRA calls: the recipe alone, this call's reference
    fast = fast or recipe
    ratio = find(r, "speed_b32", "ratio")
    # the warm first step: the loss match's fast path, second process on speed_b32's compile cache
    warm = find(r, "loss_match", "loss_match")
    mem = [x for x in r if x.get("tag") == "memory" and x.get("event") == "bench"]
    mem1 = next((x for x in mem if x["batch"] == 1), None)
    mem8 = next((x for x in mem if x["batch"] == 8), None)
    loss = warm
    sdpa = next((x for x in r if x.get("event") == "sdpa_recommendation"), None)
    rate = trainer_rate(read_jsonl(out / "trainer_metrics.jsonl"))
    g = lambda d, k: d.get(k) if d else None  # noqa: E731  (a missing record or key: no figure)

    def row(what, figure, target, ok):
        status = "not measured" if figure is None else ("info" if ok is None else "met" if ok else "MISSED")
        return {"check": what, "figure": figure, "target": target, "status": status}

    out_rows = [
        row(
            f"baseline img/s, batch {g(base, 'batch')} (diffusers-default, same work)",
            g(base, "img_per_s"),
            "reference",
            None,
        ),
        row(
            f"fast img/s, batch {g(fast, 'batch')} (configs/sd15_gpu.yaml, {g(fast, 'tag')})",
            g(fast, "img_per_s"),
            ">= 150 (aim 180)",
            (g(fast, "img_per_s") or 0) >= 150,
        ),
        row("ratio fast / baseline, same process", g(ratio, "ratio"), ">= 1.6", (g(ratio, "ratio") or 0) >= 1.6),
        row("fast MFU", g(fast, "mfu"), "aim 0.45", (g(fast, "mfu") or 0) >= 0.45),
        row(
            "fast peak GiB (timed) vs baseline",
            g(fast, "peak_memory_gib"),
            f"<= {g(base, 'peak_memory_gib')}",
            at_most(g(fast, "peak_memory_gib"), g(base, "peak_memory_gib")),
        ),
        row(
            "fast peak GiB incl. warm-up vs baseline's",
            g(fast, "peak_memory_incl_warmup_gib"),
            f"<= {g(base, 'peak_memory_incl_warmup_gib')}",
            at_most(g(fast, "peak_memory_incl_warmup_gib"), g(base, "peak_memory_incl_warmup_gib")),
        ),
        row(
            f"cold first step s ({(g(fast, 'compile_cache') or {}).get('state')})",
            g(fast, "first_step_s"),
            "<= 150",
            (g(fast, "first_step_s") or 1e9) <= 150 and (g(fast, "compile_cache") or {}).get("state") == "cold",
        ),
        row(
            f"warm first step s, loss_match's ({(g(warm, 'compile_cache') or {}).get('state')})",
            g(warm, "first_step_s"),
            "<= 45",
            (g(warm, "first_step_s") or 1e9) <= 45 and (g(warm, "compile_cache") or {}).get("state") == "warm",
        ),
        row(
            "host syncs per step (fast)",
            g(fast, "host_syncs_per_step"),
            "<= 1",
            (g(fast, "host_syncs_per_step") or 0) <= 1,
        ),
        row(
            "memory recipe batch 1: peak GiB incl. warm-up",
            g(mem1, "peak_memory_incl_warmup_gib"),
            "<= 6",
            (g(mem1, "peak_memory_incl_warmup_gib") or 1e9) <= 6,
        ),
        row("memory recipe batch 1: img/s", g(mem1, "img_per_s"), "> 0.71", (g(mem1, "img_per_s") or 0) > 0.71),
        row(
            "memory recipe batch 8: img/s (peak GiB)",
            g(mem8, "img_per_s"),
            f"({g(mem8, 'peak_memory_incl_warmup_gib')} GiB)",
            None,
        ),
        row(
            "trainer samples/s after warm-up / bench img/s (same recipe)",
            round(rate / fast["img_per_s"], 3) if rate and fast else None,
            ">= 0.95",
            rate and fast and rate / fast["img_per_s"] >= 0.95,
        ),
        row(
            f"loss match, {g(loss, 'steps')} steps, batch {g(loss, 'batch')} (max / mean rel. diff)",
            f"{loss['max_rel_diff']} / {loss['mean_rel_diff']}" if loss else None,
            "ok",
            bool(loss and loss["ok"]),
        ),
        row(
            "SDPA kernel per head dim (to try: EXTRA=2 LEVERS=sdpa SDPA=...)",
            g(sdpa, "sdpa_by_head_dim"),
            str(g(sdpa, "attention_ms_per_step_fwd_bwd")),
            None,
        ),
    ]
    for o in (x for x in r if x.get("event") == "offload_step"):
        out_rows.append(row(f"offload step alone, {o['inner']} AdamW, {o['chunks']} chunks: s", o["step_s"],
                            f"{o['params_per_s']:.3g} params/s", None))
    for lever in dict.fromkeys(x["tag"] for x in r if str(x.get("tag", "")).startswith("lever_")):
        f = find(r, lever, "bench", "colodiffusion")
        vs = round(f["img_per_s"] / recipe["img_per_s"], 3) if f and recipe else None
        out_rows.append(
            row(
                f"{lever} batch {g(f, 'batch')}: img/s (x recipe_b32; first step s; peak GiB)",
                g(f, "img_per_s"),
                f"{vs}x; {g(f, 'first_step_s')} s; {g(f, 'peak_memory_gib')}",
                None,
            )
        )
    return out_rows


def step_cell(s: dict) -> str:
    if "skipped" in s:
        return f"{s['step']}=skipped ({s['skipped']})"
    if "error" in s:
        return f"{s['step']}={s.get('rc')} ({s['error']})"
    return f"{s['step']}={s.get('rc')}/{s.get('wall_s', '-')}s"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_out")
    env = read_jsonl(out / "env.json")
    table = rows(out)
    steps = read_jsonl(out / "steps.jsonl")
    (out / "summary.json").write_text(
        json.dumps({"env": env[0] if env else None, "steps": steps, "rows": table}, indent=1)
    )
    print(f"env: {json.dumps(env[0]) if env else 'missing'}")
    if env and not env[0].get("gpu"):
        print("no GPU: a rehearsal (tiny preset on a CPU); 'met' and 'MISSED' compare its figures with GPU targets and "
              "mean nothing")
    print("steps: " + ", ".join(step_cell(s) for s in steps))
    width = max(len(t["check"]) for t in table)
    print(f"{'check':<{width}} | {'figure':>14} | {'target':<22} | status")
    for t in table:
        print(f"{t['check']:<{width}} | {str(t['figure']):>14} | {t['target']:<22} | {t['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
