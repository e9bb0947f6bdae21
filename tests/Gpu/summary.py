#!/usr/bin/env python3
"""Collects the results of tests/Gpu/run.sh into DIR/summary.json and DIR/summary.md: every step's status and time,
the environment, the symbol check, the GPU tests (from xunit's XML report), Mfu's results, PyTorch's times for the
same models and the TorchSharp/PyTorch step-time ratio. Standard library only.

    python3 tests/Gpu/summary.py DIR
"""
import json
import os
import sys
import xml.etree.ElementTree as ET


def read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None


def load_json(path):
    text = read(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return {"error": f"{os.path.basename(path)} is not valid JSON: {e}"}


def steps(out):
    rows = []
    for line in (read(os.path.join(out, "steps.tsv")) or "").splitlines():
        name, rc, seconds, limit, reason = (line.split("\t") + [""] * 5)[:5]
        status = "skipped" if rc == "skipped" else "passed" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed (exit {rc})"
        rows.append(dict(step=name, status=status, seconds=float(seconds or 0), limit_seconds=int(limit or 0), reason=reason))
    return rows


def tests(out):
    path = os.path.join(out, "gpu-tests.xml")
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"gpu-tests.xml does not parse: {e}"}
    result = dict(total=0, passed=0, failed=0, skipped=0, failures=[], skips=[])
    for t in root.iter("test"):
        result["total"] += 1
        outcome = t.get("result", "")
        if outcome == "Pass":
            result["passed"] += 1
        elif outcome == "Skip":
            result["skipped"] += 1
            result["skips"].append(dict(test=t.get("name"), reason=(t.findtext("reason") or "").strip()))
        else:
            result["failed"] += 1
            result["failures"].append(dict(test=t.get("name"), message=(t.findtext("failure/message") or "").strip()[:2000]))
    return result


def environment(out):
    env = {}
    for line in (read(os.path.join(out, "environment.txt")) or "").splitlines():
        key, _, value = line.partition("\t")
        if value:
            env[key] = value
        elif line.strip():
            env.setdefault("devices", []).append(line.strip())
    return env


def ratios(mfu, pytorch):
    """TorchSharp's step time over PyTorch's, per block, for the same preset, batch, dtype and mode."""
    if not isinstance(mfu, list) or not isinstance(pytorch, list):
        return []
    rows = []
    for m in mfu:
        for p in pytorch:
            if p.get("block") == m.get("Block") and p.get("batch") == m.get("Batch") and p.get("preset") == m.get("Preset"):
                flops = m["AchievedTflops"] * m["StepSeconds"]            # model TFLOP per step (the library's count)
                rows.append(dict(block=m["Block"], torchsharp_step_ms=m["StepSeconds"] * 1e3, pytorch_step_ms=p["step_seconds"] * 1e3,
                                 torchsharp_over_pytorch=m["StepSeconds"] / p["step_seconds"],
                                 torchsharp_tflops=m["AchievedTflops"], pytorch_tflops=flops / p["step_seconds"],
                                 torchsharp_gemm_tflops=m["PeakTflops"], pytorch_gemm_tflops=p.get("gemm_tflops")))
    return rows


def main(out):
    mfu = load_json(os.path.join(out, "mfu.json"))
    pytorch = load_json(os.path.join(out, "pytorch.json"))
    summary = dict(environment=environment(out), steps=steps(out), symbols=read(os.path.join(out, "symbols.txt")),
                   gpu_tests=tests(out), mfu=mfu, pytorch=pytorch, ratios=ratios(mfu, pytorch))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    md = ["# ViT22B GPU run", ""]
    md += [f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in summary["environment"].items()]
    md += ["", "| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['limit_seconds']} | {s['reason']} |" for s in summary["steps"]]
    if summary["symbols"]:
        md += ["", "## Symbol check", "", "```", summary["symbols"].strip(), "```"]
    t = summary["gpu_tests"]
    if t and "error" not in t:
        md += ["", "## GPU tests", "", f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped of {t['total']}."]
        md += [f"- FAILED {x['test']}: {x['message']}" for x in t["failures"]]
        md += [f"- skipped {x['test']}: {x['reason']}" for x in t["skips"]]
    elif t:
        md += ["", "## GPU tests", "", t["error"]]
    if isinstance(mfu, list):
        md += ["", "## Mfu (TorchSharp)", "", "| block | step ms | achieved TFLOP/s | best same-run GEMM TFLOP/s | MFU |", "|---|---|---|---|---|"]
        md += [f"| {m['Block']} | {m['StepSeconds'] * 1e3:.2f} | {m['AchievedTflops']:.4g} | {m['PeakTflops']:.4g} | "
               + ("n/a: achieved exceeds the GEMM peak" if m["Mfu"] is None else f"{m['Mfu']:.1%}") + " |" for m in mfu]
    if summary["ratios"]:
        md += ["", "## TorchSharp vs PyTorch (same models, same run)", "",
               "| block | TorchSharp ms | PyTorch ms | TorchSharp / PyTorch | TorchSharp TFLOP/s | PyTorch TFLOP/s |", "|---|---|---|---|---|---|"]
        md += [f"| {r['block']} | {r['torchsharp_step_ms']:.2f} | {r['pytorch_step_ms']:.2f} | {r['torchsharp_over_pytorch']:.2f} | "
               f"{r['torchsharp_tflops']:.4g} | {r['pytorch_tflops']:.4g} |" for r in summary["ratios"]]
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summary.py DIR")
    sys.exit(main(sys.argv[1]))
