"""MEND's hypernetwork g and the plumbing around it: gradient factors of edited Linears and a differentiable
low-rank edit (Mitchell et al., ICLR 2022, §3.1-3.2; see `odedit.methods.mend` for the method).

    net = Hypernet({"layers.1.mlp.up_proj": (d_in, d_out), ...}, rank, n_hidden, edit_lr)
    capture = FactorCapture(modules); ...forward, backward...; factors = capture.factors()
    transformed = net.transform(factors)              # name -> (u~, delta~)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

HYPERNET_FORMAT = "odedit.mend.hypernet/1"


class MENDError(ValueError):
    """A hypernetwork that does not fit the edited model, or an edit without a trained hypernetwork."""


# ---------------------------------------------------------------------------------------------- hypernetwork


class LowRankBlock(nn.Module):
    """z <- z + U relu(s_m * (V z + b) + o_m): a residual low-rank block with per-mode scale and shift.

    U is zero at initialisation, so the block is the identity (MEND §3.2).
    """

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.ones(n_modes, rank))
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        h = torch.relu(self.scale[mode] * self.down(z) + self.shift[mode])
        return z + self.up(h)


class FactorNet(nn.Module):
    """g for all edited matrices of one shape: normalise (u, delta), transform, split (MEND §3.2).

    Running statistics are sums in float64 (count, sum, sum of squares), so increments from several Ray Train
    workers add up exactly; mean and std are derived from them (std 1 and mean 0 before any statistic).
    """

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.blocks = nn.ModuleList([LowRankBlock(dim, min(rank, dim), n_modes) for _ in range(n_hidden)])
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))

    @staticmethod
    def increments(u: torch.Tensor, d: torch.Tensor) -> list[torch.Tensor]:
        z = torch.cat([u, d], -1).detach().double()
        return [torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device), z.sum(0), z.pow(2).sum(0)]

    def add_statistics(self, incs: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for buf, inc in zip((self.count, self.sum, self.sumsq), incs):
                buf.add_(inc.to(buf.device))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if float(self.count) < 1:
            return torch.zeros_like(self.sum), torch.ones_like(self.sum)
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.pow(2)).clamp_min(0.0)
        return mean, var.sqrt().clamp_min(1e-7) if float(self.count) >= 2 else torch.ones_like(var)

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.moments()
        z = (torch.cat([u, d], -1).double() - mean) / std
        z = z.to(self.blocks[0].down.weight.dtype)
        for block in self.blocks:
            z = block(z, mode)
        return z[:, : self.d_in], z[:, self.d_in :]


def _shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class Hypernet(nn.Module):
    """One `FactorNet` per weight shape, a mode per edited matrix, and the learned steps alpha.

    Args:
        shapes: edited module name -> (d_in, d_out).
        rank, n_hidden: block sizes.
        edit_lr: initial alpha of every matrix.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, n_hidden: int, edit_lr: float) -> None:
        super().__init__()
        self.shapes = dict(sorted(shapes.items()))
        groups: dict[str, list[str]] = {}
        for name, (d_in, d_out) in self.shapes.items():
            groups.setdefault(_shape_key(d_in, d_out), []).append(name)
        self.route = {name: (key, members.index(name)) for key, members in groups.items() for name in members}
        self.nets = nn.ModuleDict(
            {key: FactorNet(*map(int, key.split("x")), len(members), rank, n_hidden) for key, members in groups.items()}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))
        self.index = {name: i for i, name in enumerate(self.shapes)}
        self.rank, self.n_hidden = rank, n_hidden

    def transform(
        self,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        update_stats: bool = False,
        reduce_sum: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(u, delta) per module -> (u~, delta~). With `update_stats`, the running statistics first take this
        batch's increments (summed over workers by `reduce_sum`, which adds tensors in place)."""
        if update_stats:
            incs: dict[str, list[torch.Tensor]] = {}
            for name, (u, d) in factors.items():
                key = self.route[name][0]
                new = FactorNet.increments(u, d)
                incs[key] = new if key not in incs else [a + b for a, b in zip(incs[key], new)]
            for key in self.nets:  # every worker reduces every group, present in its batch or not
                net = self.nets[key]
                incs.setdefault(
                    key, [torch.zeros_like(net.count), torch.zeros_like(net.sum), torch.zeros_like(net.sumsq)]
                )
            flat = [t for key in sorted(incs) for t in incs[key]]
            if reduce_sum is not None:
                reduce_sum(flat)
            for i, key in enumerate(sorted(incs)):
                self.nets[key].add_statistics(flat[3 * i : 3 * i + 3])
        out = {}
        for name, (u, d) in factors.items():
            key, mode = self.route[name]
            out[name] = self.nets[key](u, d, mode)
        return out

    def step_size(self, name: str) -> torch.Tensor:
        return self.edit_lrs[self.index[name]]

    def metadata(self) -> dict[str, str]:
        return {
            "format": HYPERNET_FORMAT,
            "modules": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "rank": str(self.rank),
            "n_hidden": str(self.n_hidden),
        }


# ---------------------------------------------------------------------------------------------- factor capture


class FactorCapture:
    """Forward hooks that record each edited module's input u and, once a backward pass reaches it, the
    gradient delta of its output; `factors()` keeps the calls whose delta arrived, non-zero rows only."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.calls: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in modules}
        self.outputs: list[torch.Tensor] = []  # what a backward pass differentiates to reach every delta
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            rec = {"u": inputs[0].detach()}
            self.calls[name].append(rec)
            self.outputs.append(output)
            output.register_hook(lambda g, rec=rec: rec.__setitem__("d", g.detach()))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name, calls in self.calls.items():
            us, ds = [], []
            for rec in calls:
                if "d" not in rec:
                    continue
                u = rec["u"].reshape(-1, rec["u"].shape[-1])
                d = rec["d"].reshape(-1, rec["d"].shape[-1])
                keep = (u != 0).any(-1) & (d != 0).any(-1)
                us.append(u[keep])
                ds.append(d[keep])
            if not us:
                raise MENDError(f"no gradient reached {name}: is it used by the forward pass of the IN samples?")
            out[name] = (torch.cat(us).float(), torch.cat(ds).float())
        return out


@contextlib.contextmanager
def low_rank_edit(
    modules: Mapping[str, nn.Module], deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Run the modules as if W <- W - alpha * d~^T u~, differentiably: out - alpha * (x u~^T) d~ (cheap for
    few positions, and the base weights stay untouched)."""

    def hook_for(name: str):
        alpha, u_t, d_t = deltas[name]

        def hook(module, inputs, output):
            x = inputs[0]
            return output - alpha.to(output.dtype) * ((x @ u_t.to(x.dtype).T) @ d_t.to(x.dtype))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in deltas]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
