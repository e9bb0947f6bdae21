#!/usr/bin/env python3
"""Times the models of `samples/Mfu --block both` in PyTorch, in the same run as the TorchSharp measurement
(tests/Gpu/run.sh), so the GPU summary can state a TorchSharp/PyTorch time ratio on the same machine.

The models are timm's VisionTransformer with the preset's shape: timm's `Block` for the sequential model and timm's
`ParallelScalingBlock` (attention and MLP off one norm, fused in-projection) for the parallel one. They have the
library's model FLOPs; timm's parallel block keeps two out-projections where the library can fuse them (the same
FLOPs, one GEMM fewer). Like the Mfu sample: the two models are timed interleaved in rounds (a GEMM of the dtype
before each), every step ends with a device synchronization, and medians are reported.

    python3 benchmarks/pytorch/blocks.py --preset B/16 --batch-size 64 --dtype bfloat16 --device cuda --json out.json
"""
import argparse
import json
import statistics
import sys
import time

# The presets of the timm convention (class token, 1000 classes, QKV bias), as in ViTConfig.Parse.
PRESETS = {
    "Ti/16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "S/16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "B/16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "L/16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="B/16", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", default="forward-backward", choices=["inference", "forward-backward"])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the same-run square GEMM whose best timing is reported (MfuMeter also times two other shapes)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()

    import torch
    from timm.models.vision_transformer import Block, ParallelScalingBlock, VisionTransformer

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    images = torch.randn(a.batch_size, 3, 224, 224, device=device, dtype=dtype)
    labels = torch.arange(a.batch_size, device=device) % 1000
    models = {}
    for name, block in (("sequential", Block), ("parallel", ParallelScalingBlock)):
        m = VisionTransformer(img_size=224, num_classes=1000, mlp_ratio=4.0, qkv_bias=True, block_fn=block, **PRESETS[a.preset])
        models[name] = m.to(device=device, dtype=dtype).train(a.mode != "inference")

    def step(model):
        if a.mode == "inference":
            with torch.inference_mode():
                model(images)
        else:
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()

    n = a.gemm_size
    ga = torch.randn(n, n, device=device, dtype=dtype)
    gb = torch.randn(n, n, device=device, dtype=dtype)

    def timed(f):
        sync()
        t = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t

    for _ in range(a.warmup):
        for m in models.values():
            step(m)
        timed(lambda: ga @ gb)
    times = {name: [] for name in models}
    gemm = []
    for _ in range(a.samples):
        for name, m in models.items():
            gemm.append(timed(lambda: ga @ gb))
            times[name].append(timed(lambda: step(m)))
    gemm_tflops = 2 * n ** 3 / min(gemm) / 1e12   # the best GEMM of the run, as MfuMeter takes its peak
    result = [dict(library="pytorch", torch=torch.__version__, preset=a.preset, block=name, mode=a.mode, dtype=a.dtype,
                   device=str(device), batch=a.batch_size, step_seconds=statistics.median(t), samples=a.samples,
                   gemm_size=n, gemm_tflops=gemm_tflops) for name, t in times.items()]
    for r in result:
        print(f"{r['block']:>10}: {r['step_seconds'] * 1e3:8.2f} ms per step (median of {a.samples}); "
              f"{n}³ GEMM {gemm_tflops:.1f} TFLOP/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
