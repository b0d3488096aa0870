"""Memory benchmark: peak memory and time of one multi-task backward per engine.

For each model (a ResNet-18-size CNN with BatchNorm, an MLP) and T, one step is forward +
losses + the backward of an engine: ``sum(losses).backward()`` (unitary scalarization, the
baseline), ``fm.mtl_backward`` with MGDA and engine "loop", "vmap" and "stream", torchjd's autojac
(``mtl_backward`` + ``jac_to_grad``) and autogram (``Engine.compute_gramian`` then a weighted
backward) when installed. Reported per row: the peak memory of the step beyond the baseline's
peak ("extra"), that extra as a fraction of the loop engine's, and the step time.

Peak memory comes from allocator events: on a GPU ``torch.cuda.max_memory_allocated``; on the
CPU the allocation events of ``torch.profiler`` (``profile_memory=True``), whose running total
of allocated bytes is read at every allocation (not RSS). Each engine starts from the same state
(parameters allocated, ``.grad`` None, fastmtl's engine cache empty, so that the loop engine's
(T, N) buffer is allocated inside the measured step, as on a first step); times are steady-state
(interleaved medians, buffers kept).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import fastmtl as fm
from fastmtl.bench.cases import Row
from fastmtl.bench.timing import interleaved_ms


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet18() -> nn.Module:
    """ResNet-18 for 32 x 32 inputs (a 3 x 3 stem, 4 stages of 2 basic blocks, 64-512
    channels, 11.2M parameters), ending in the pooled 512 features."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def mlp(width: int, depth: int, inputs: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The peak of allocated bytes while ``fn()`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1]))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    # the allocator's running total carries over from earlier profiled windows: start from
    # the total just before the first event
    first = events[0][1]
    base = first.total_allocated - first.alloc_size
    return max(0, max(e.total_allocated for _, e in events) - base)


def _steps(encoder: nn.Module, heads: nn.ModuleList, x: torch.Tensor, y: torch.Tensor
           ) -> dict[str, Callable[[], object]]:
    """One step per engine: forward, losses, backward."""
    shared = list(encoder.parameters())
    agg = fm.aggregators.MGDA()

    def losses() -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = encoder(x)
        return z, [nn.functional.mse_loss(h(z).squeeze(1), y[:, i]) for i, h in
                   enumerate(heads)]

    steps: dict[str, Callable[[], object]] = {
        "sum(losses).backward()": lambda: sum(losses()[1]).backward()}
    for engine in ("loop", "vmap", "stream"):
        steps[f"fastmtl {engine}"] = (
            lambda engine=engine: fm.mtl_backward(losses()[1], shared, agg, engine=engine))
    try:
        import torchjd.aggregation as tjd_agg
        from torchjd.autojac import jac_to_grad, mtl_backward

        def autojac() -> None:
            z, ls = losses()
            mtl_backward(ls, features=z)
            jac_to_grad(shared, tjd_agg.MGDA())

        steps["torchjd autojac"] = autojac
    except ImportError:
        pass
    try:
        from torchjd.aggregation import MGDAWeighting
        from torchjd.autogram import Engine

        # autogram hooks every forward of the modules it is given: its own copy of the encoder
        own = copy.deepcopy(encoder)
        engine = Engine(own, batch_dim=None)
        weighting = MGDAWeighting()

        def autogram() -> None:
            z = own(x)
            vector = torch.stack([nn.functional.mse_loss(h(z).squeeze(1), y[:, i])
                                  for i, h in enumerate(heads)])
            gramian = engine.compute_gramian(vector)
            vector.backward(weighting(gramian))

        steps["torchjd autogram"] = autogram
    except (ImportError, TypeError, ValueError) as exc:
        print(f"[memory] torchjd autogram not run: {type(exc).__name__}: {exc}"[:300])
    return steps


def memory_cases(device: str, model: str = "mlp", tasks: tuple[int, ...] = (2, 10, 40), *,
                 batch: int | None = None, width: int = 1024, depth: int = 4,
                 rounds: int = 3) -> list[Row]:
    """Rows {op: "memory", case, impl, peak MB, extra MB, of loop, ms} for one model and
    each T."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for T in tasks:
        torch.manual_seed(0)
        if model == "resnet18":
            encoder, features, batch_ = resnet18(), 512, batch or 16
            x = torch.randn(batch_, 3, 32, 32, generator=gen)
            case = f"ResNet-18 (11.2M) batch {batch_} 32x32 T={T}"
        else:
            encoder, features, batch_ = mlp(width, depth), width, batch or 64
            x = torch.randn(batch_, 64, generator=gen)
            n = sum(p.numel() for p in encoder.parameters()) / 1e6
            case = f"MLP {depth}x{width} ({n:.1f}M) batch {batch_} T={T}"
        heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(T))
        encoder, heads, x = encoder.to(dev), heads.to(dev), x.to(dev)
        y = torch.randn(batch_, T, generator=gen).to(dev)
        steps = _steps(encoder, heads, x, y)
        params = [*encoder.parameters(), *heads.parameters()]

        def fresh(fn: Callable[[], object], params: list = params) -> Callable[[], object]:
            def run() -> None:
                for p in params:
                    p.grad = None
                fn()
            return run

        peaks: dict[str, float | None] = {}
        for name, fn in steps.items():
            try:
                fresh(fn)()                               # warm-up (lazy state, kernels)
                for p in params:
                    p.grad = None
                fm.engine.cache.clear()                   # the buffers of a first step
                peaks[name] = peak_bytes(fn, dev) / 2**20
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                peaks[name] = None
                print(f"[memory] {case} {name}: {type(exc).__name__}: {exc}"[:300])
        ran = {k: fresh(f) for k, f in steps.items() if peaks[k] is not None}
        times = interleaved_ms(ran, dev, rounds=rounds)
        base = peaks["sum(losses).backward()"]
        loop_extra = peaks["fastmtl loop"] - base
        for name in steps:
            if peaks[name] is None:
                continue
            extra = peaks[name] - base
            rows.append({"op": "memory", "case": case, "impl": name,
                         "peak MB": peaks[name], "extra MB": extra,
                         "of loop": extra / loop_extra if loop_extra > 0 else None,
                         "ms": times[name]})
    return rows
