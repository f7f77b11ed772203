"""Which of two bucket shapes, gradient accumulation or an eager forward broke `cuda_graphs` (H200, call 21: run as
`source benchmarks/gpu_env.sh; python3 benchmarks/cuda_graphs_probe.py`; results/cuda_graphs_probe_h200_call21.txt).
prealloc=True is what `graph_step_begin` now does."""
import sys, traceback
import torch
from longcat_ray.config import LoraConfig, ModelConfig
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.model.transformer import add_lora, load_transformer, place_base, speed_up_training
from longcat_ray.tiny import make_tiny

tiny = make_tiny(__import__("pathlib").Path("/tmp/cgtiny"), pairs=2, seed=0)

def run(schedule, graphs, eager, prealloc):
    torch._dynamo.reset()
    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.bfloat16, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    place_base(transformer, "no_change", torch.device("cuda"))
    speed_up_training(transformer, "sdpa", compile=True, cuda_graphs=graphs)
    g = torch.Generator().manual_seed(0)
    data = {w: [torch.randn(s, generator=g).cuda().bfloat16() for s in ((1, 16, 16, w), (1, 16, 16, w), (1, 20, 64))] for w in (16, 24)}
    losses = []
    for step, widths in enumerate(schedule):
        for micro, w in enumerate(widths):
            if prealloc:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss = flow_matching_loss(transformer, *data[w], torch.Generator().manual_seed(2 * step + micro))
            (loss / len(widths)).backward()
            losses.append(loss.item())
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
                p.grad = None
        if eager and step == 1:
            with torch.no_grad(), torch.compiler.set_stance("force_eager" if graphs else "default"):
                losses.append(flow_matching_loss(transformer, *data[16], torch.Generator().manual_seed(99)).item())
    return losses, [p.detach().float().cpu() for p in params]

variants = {
    "one_shape": ([[16]] * 4, False),
    "one_shape_eager": ([[16]] * 4, True),
    "accum_one_shape": ([[16, 16]] * 4, False),
    "two_shapes_no_accum": ([[16], [24], [16], [24], [16]], False),
    "two_shapes_accum": ([[16, 24]] * 4, False),
    "two_shapes_accum_eager": ([[16, 24]] * 4, True),
}
for name, (schedule, eager) in variants.items():
    for prealloc in (False, True):
        ref = run(schedule, False, eager, prealloc)
        try:
            got = run(schedule, True, eager, prealloc)
            dl = max(abs(a - b) / abs(b) for a, b in zip(got[0], ref[0]))
            dw = max(float((a - b).abs().max()) for a, b in zip(got[1], ref[1]))
            print(f"RESULT {name} prealloc={prealloc}: ok, max rel loss diff {dl:.2e}, max lora diff {dw:.2e}", flush=True)
        except Exception as e:
            print(f"RESULT {name} prealloc={prealloc}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=-6)
