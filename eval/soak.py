"""Bounded soak of ``vllm serve --kv-cache-dtype tq*`` on 127.0.0.1 (issue 9).

Starts the server, then runs rounds of concurrent streaming completions with random
prompt and output lengths, client-side cancellations mid-stream and requests longer
than the context; checks that every request got a complete answer or a proper 4xx,
that nothing answered 5xx, that the server stays healthy, that its memory (RSS of the
process tree) stays flat across rounds, and that a fixed greedy probe gives identical
output before and after the soak and after a server restart. Prints and writes the figures (JSON).

    python eval/soak.py                                   # tq3.5, 3 rounds × 96 requests
    python eval/soak.py --dtype tq4 --rounds 5 --concurrency 64 --time-limit 900

Exit status 0 only when every check passed. Not part of the test run (minutes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tq_vllm.tools.models import fetch_model
from tq_vllm.tools.serve import HOST, Server

PROBE = "The capital of France is"
WORDS = ("the of and a to in is was for on that with as by at from his it an were are "
         "which this be or her had not but have they one all their been has more when "
         "who will there would what so if out up into no about time can only other new").split()


def _stream(port: int, prompt: str, max_tokens: int, cancel_after: int | None,
            timeout: float) -> dict:
    """One streaming completion. Returns status, outcome, chunks and seconds."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.8, "stream": True})
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            r.read()
            return dict(status=r.status, outcome="http_error", chunks=0, s=time.monotonic() - t0)
        chunks, finished = 0, False
        for raw in r:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                return dict(status=200, outcome="stream_error", chunks=chunks,
                            s=time.monotonic() - t0, error=str(msg["error"])[:200])
            chunks += 1
            if msg["choices"][0].get("finish_reason"):
                finished = True
            if cancel_after is not None and chunks >= cancel_after:
                return dict(status=200, outcome="cancelled", chunks=chunks, s=time.monotonic() - t0)
        return dict(status=200, outcome="complete" if finished else "truncated", chunks=chunks,
                    s=time.monotonic() - t0)
    except (OSError, http.client.HTTPException) as e:
        return dict(status=0, outcome="connection_error", chunks=0, s=time.monotonic() - t0,
                    error=repr(e)[:200])
    finally:
        conn.close()  # a cancelled stream: the server sees the client go away


def _request_plan(rng: random.Random, n: int, max_model_len: int) -> list[dict]:
    plan = []
    for i in range(n):
        kind = rng.choices(["normal", "cancel", "too_long"], weights=[0.75, 0.15, 0.10])[0]
        words = rng.randint(4, 200) if kind != "too_long" else max_model_len + 200
        plan.append(dict(prompt=" ".join(rng.choice(WORDS) for _ in range(words)),
                         max_tokens=rng.randint(1, 48), kind=kind,
                         cancel_after=rng.randint(1, 4) if kind == "cancel" else None))
    return plan


def _rss_tree(pid: int) -> int:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _check_round(results: list[dict], plan: list[dict]) -> list[str]:
    """Problems in one round: what each request kind must end in."""
    bad = []
    for r, p in zip(results, plan):
        if r["status"] >= 500 or r["outcome"] in ("connection_error", "stream_error", "truncated"):
            bad.append(f"{p['kind']}: {r}")
        elif p["kind"] == "too_long" and not 400 <= r["status"] < 500:
            bad.append(f"too_long prompt answered {r['status']} ({r['outcome']})")
        elif p["kind"] == "normal" and r["outcome"] != "complete":
            bad.append(f"normal request ended {r['outcome']} ({r['status']})")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="tq3.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=96, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--time-limit", type=float, default=1200.0, help="seconds for all rounds")
    ap.add_argument("--rss-growth-limit", type=float, default=0.10,
                    help="allowed RSS growth from the end of round 1 to the last round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval/results/soak.json")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    report: dict = dict(dtype=args.dtype, rounds=[], problems=[])
    t_start = time.monotonic()
    with Server(str(fetch_model(args.model)), kv_cache_dtype=args.dtype,
                max_model_len=args.max_model_len,
                extra_args=["--max-num-seqs", str(args.concurrency)]) as srv:
        probe_before = srv.complete(PROBE, max_tokens=24)
        for rnd in range(args.rounds):
            if time.monotonic() - t_start > args.time_limit:
                report["problems"].append(f"time limit reached before round {rnd + 1}")
                break
            plan = _request_plan(rng, args.requests, args.max_model_len)
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                futures = [pool.submit(_stream, srv.port, p["prompt"], p["max_tokens"],
                                       p["cancel_after"], 300.0) for p in plan]
                results = [f.result() for f in futures]
            wall = time.monotonic() - t0
            healthy = _healthy(srv)
            lat = sorted(r["s"] for r, p in zip(results, plan) if r["outcome"] == "complete")
            row = dict(round=rnd + 1, requests=len(plan), wall_s=round(wall, 1),
                       complete=sum(r["outcome"] == "complete" for r in results),
                       cancelled=sum(r["outcome"] == "cancelled" for r in results),
                       http_4xx=sum(400 <= r["status"] < 500 for r in results),
                       http_5xx=sum(r["status"] >= 500 for r in results),
                       p50_s=round(statistics.median(lat), 2) if lat else None,
                       p99_s=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
                       rss_mib=round(_rss_tree(srv.proc.pid) / 2**20, 1), healthy=healthy)
            report["rounds"].append(row)
            problems = _check_round(results, plan)
            if not healthy:
                problems.append("server unhealthy after the round")
            report["problems"] += [f"round {rnd + 1}: {p}" for p in problems]
            print(json.dumps(row), flush=True)
        probe_after = srv.complete(PROBE, max_tokens=24)
    report["probe_identical"] = probe_before == probe_after
    if not report["probe_identical"]:
        report["problems"].append(f"probe changed: {probe_before!r} -> {probe_after!r}")
    # restart: a fresh server process (new rotations, sketches, codebooks drawn from the
    # same seeds) must give the same greedy probe
    with Server(str(fetch_model(args.model)), kv_cache_dtype=args.dtype,
                max_model_len=args.max_model_len) as srv:
        probe_restarted = srv.complete(PROBE, max_tokens=24)
    report["probe_identical_after_restart"] = probe_restarted == probe_before
    if not report["probe_identical_after_restart"]:
        report["problems"].append(f"probe after restart: {probe_before!r} -> {probe_restarted!r}")
    rounds = report["rounds"]
    if len(rounds) >= 2:
        growth = rounds[-1]["rss_mib"] / rounds[0]["rss_mib"] - 1
        report["rss_growth_after_round_1"] = round(growth, 4)
        if growth > args.rss_growth_limit:
            report["problems"].append(f"RSS grew {growth:.1%} after round 1 "
                                      f"(limit {args.rss_growth_limit:.0%})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    return 0 if not report["problems"] else 1


def _healthy(srv: Server) -> bool:
    conn = http.client.HTTPConnection(HOST, srv.port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
