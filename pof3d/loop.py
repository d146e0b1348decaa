"""The training step in plain PyTorch: phases on their intervals, optimisers, EMA, counters.

Knows nothing of Ray. When ``torch.distributed`` is initialised (Ray Train sets up the process group)
the trainer is data parallel: parameters and buffers are broadcast from rank 0 at construction and
gradients are averaged over workers (one flattened all-reduce per phase, as EG3D does) before each
optimiser step. ``train_step`` gets this worker's part of the global batch: its micro-batches
(:mod:`pof3d.batch_split`), each run forward and backward on its own with its loss weighted by its share
of the global batch, and each seeded by its place in the global batch, so that the step is the same
whatever the number of workers.
"""

from __future__ import annotations

import copy
import logging
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pof3d.batch_split import MicroBatch, micro_batches, micro_size
from pof3d.checkpoint import rng_state, set_rng_state
from pof3d.compile_cache import use_compile_cache
from pof3d.config import Config
from pof3d.discriminator import Discriminator
from pof3d.ema import training_ema_beta, update_ema
from pof3d.errors import TrainingError
from pof3d.generator import Generator
from pof3d.loss import PAST_POLE, Phase, PoF3DLoss, schedule

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): every random draw of training goes through these."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lazy_adam(
    groups: list[dict], beta1: float, beta2: float, eps: float, reg_interval: int
) -> torch.optim.Adam:
    """Adam with EG3D's lazy-regularisation correction.

    A regulariser applied every ``k`` steps adds one optimiser step per ``k`` main steps; scaling the
    learning rates and the betas by ``mb_ratio = k / (k + 1)`` keeps the optimiser's per-image behaviour
    as if both ran every step.
    """
    mb_ratio = reg_interval / (reg_interval + 1) if reg_interval > 0 else 1.0
    scaled = [dict(g, lr=g["lr"] * mb_ratio) for g in groups]
    return torch.optim.Adam(scaled, betas=(beta1**mb_ratio, beta2**mb_ratio), eps=eps)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Builds G, D, G_ema and their optimisers; ``train_step(real)`` runs one training iteration.

    The phases come from :func:`pof3d.loss.schedule`, in EG3D's order: ``G_main`` every step,
    ``G_density`` every ``loss.density_reg_interval`` steps, ``D_main`` every step, ``D_r1`` every
    ``loss.r1_interval`` steps. A regulariser whose weight is zero has no phase and no optimiser
    correction.
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.cfg, self.device, self.seed = cfg, torch.device(device), seed
        self.rank, self.world_size = _world()
        if self.device.type == "cpu":
            # Subnormal floats (from near-zero activations and Adam moments) run many times slower on
            # CPUs; flushing them to zero changes no result that matters and speeds D up about 4x at tiny.
            torch.set_flush_denormal(True)
        elif self.device.type == "cuda":
            # Every phase has fixed shapes, so cuDNN's one-off search for the fastest convolution
            # algorithms pays back within a few steps (EG3D trains with it on too).
            torch.backends.cudnn.benchmark = True
        seed_everything(seed)
        self.G = Generator(cfg.model).to(self.device).train()
        self.D = Discriminator(cfg.model).to(self.device).train()
        if self.world_size > 1:
            self._broadcast(self.G)
            self._broadcast(self.D)
            seed_everything(seed + self.rank)  # each worker draws its own latents and noise
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.loss = PoF3DLoss(self.G, self.D, cfg)
        self.phases = [phase for phase in schedule(cfg) if phase.active]
        self.networks: dict[str, nn.Module] = {"G": self.G, "D": self.D}
        self.opt_G, self.opt_D = self._build_optimisers()
        self.optimisers: dict[str, torch.optim.Optimizer] = {"G": self.opt_G, "D": self.opt_D}
        self.images_seen = 0
        self.step = 0
        # Sized for the most workers the run may have, so that an elastic run's micro-batches (and so its
        # trajectory) stay the same when its worker group grows or shrinks.
        self.micro_size = micro_size(cfg.train.batch, cfg.train.batch_gpu, cfg.train.worker_range()[1])
        self.micro: list[MicroBatch] = []  # this worker's micro-batches at the next step
        self.share = 0  # the images it reads for the next step (an uneven deal turns with the step)
        self._deal()
        if cfg.train.compile:
            self._compile()

    def _deal(self) -> None:
        batch = self.cfg.train.batch
        self.micro = micro_batches(batch, self.micro_size, self.world_size, self.rank, self.step)
        self.share = sum(m.size for m in self.micro)

    def _compile(self) -> None:
        """Compile the generator's convolution stacks in place (state-dict keys are unchanged).

        The tri-plane backbone and the super-resolution are compiled: at ``anchor`` on 2 CPU threads the
        backbone's forward + backward drops from 1.78 s to 1.27 s after a one-off compile of about 90 s
        per autograd mode. The compiled graphs are kept in pof3d's cache folder (pof3d/compile_cache.py):
        a restart or resume on the same node loads them. D stays eager: R1 needs a double backward,
        which compiled graphs do not support, and the renderer's sorting and sampling gain little.
        """
        folder = use_compile_cache()
        logger.info(
            "compiling the generator's backbone and super-resolution at the first step (minutes on a CPU "
            "the first time; graphs compiled before are loaded from %s)",
            folder,
        )
        self.G.backbone.compile()
        self.G.superres.compile()

    def _lazy_interval(self, network: str) -> int:
        """Interval of the network's lazy regulariser phase, 0 when it has none (no correction)."""
        return next((p.interval for p in self.phases if p.network == network and p.lazy), 0)

    def _build_optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        o = self.cfg.optim
        opt_G = lazy_adam(
            [
                {"params": self.G.main_parameters(), "lr": o.g_lr},
                {"params": self.G.pose_parameters(), "lr": o.pose_lr},
            ],
            o.beta1,
            o.beta2,
            o.eps,
            self._lazy_interval("G"),
        )
        opt_D = lazy_adam(
            [{"params": list(self.D.parameters()), "lr": o.d_lr}],
            o.beta1,
            o.beta2,
            o.eps,
            self._lazy_interval("D"),
        )
        return opt_G, opt_D

    # ------------------------------------------------------------------------------------------

    def train_step(self, real: torch.Tensor) -> dict[str, float]:
        """One iteration on this worker's share of the global batch, ``[share, 3, H, W]`` in [-1, 1]
        (its micro-batches in order); returns figures."""
        if real.shape[0] != self.share:
            raise ValueError(
                f"train_step got {real.shape[0]} images; worker {self.rank} of {self.world_size} takes "
                f"{self.share} of the global batch of {self.cfg.train.batch}"
            )
        start = time.perf_counter()
        real = real.to(self.device, torch.float32, non_blocking=True)
        figures: dict[str, torch.Tensor] = {}
        for phase in self.phases:
            if self.step % phase.interval == 0:
                figures.update(self.run_phase(phase, real))
        batch = self.cfg.train.batch
        self._average_buffers(self.G)
        update_ema(self.G_ema, self.G, training_ema_beta(self.cfg, batch, self.images_seen))
        self.images_seen += batch
        self.step += 1
        self._deal()
        out = dict(zip(figures, torch.stack(list(figures.values())).tolist(), strict=True)) if figures else {}
        elapsed = time.perf_counter() - start
        out["blur_sigma"] = self.loss.blur_sigma(self.images_seen - batch)
        out["time/step_s"] = elapsed  # the tick's step throughput is perf/step_images_per_sec
        return out

    def run_phase(self, phase: Phase, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """One phase's forward and backward per micro-batch, gradient averaging and optimiser step
        (counters untouched); ``real`` is this worker's share, figures are its micro-batches' mean."""
        opt = self.optimisers[phase.network]
        opt.zero_grad(set_to_none=True)
        figures = self._accumulate(phase, real)
        self._check_finite(phase.name, figures)
        network = self.networks[phase.network]
        if PAST_POLE in figures and self._any_worker(bool(figures[PAST_POLE] > 0)):
            # The official code's camera is NaN for such a pose and its loop zeroes NaN gradients after the
            # all-reduce: the whole update is lost on every worker, but the optimiser still steps.
            for p in network.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            figures[f"dropped/{phase.name}"] = torch.ones(())
        elif PAST_POLE in figures:
            figures[f"dropped/{phase.name}"] = torch.zeros(())
        self._average_gradients(network)
        opt.step()
        return figures

    def _accumulate(self, phase: Phase, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backpropagate each micro-batch's loss times its share of the global batch (times the worker
        count, which the gradient average divides out again): the sum is the global batch's mean loss.

        Every random draw of a micro-batch (latents, noise, ray jitter, regulariser points) comes from a
        seed of (run seed, step, phase, the micro-batch's offset in the global batch), so the same
        micro-batch draws the same numbers on whichever worker it lands.
        """
        total = float(self.cfg.train.batch)
        sums: dict[str, torch.Tensor] = {}
        start = 0
        for micro in self.micro:
            torch.manual_seed(self._micro_seed(phase, micro.offset))
            weight = micro.size * self.world_size / total
            part = self.loss.accumulate_gradients(
                phase,
                real[start : start + micro.size],
                gain=float(phase.interval) * weight,
                images_seen=self.images_seen,
            )
            start += micro.size
            for name, value in part.items():
                sums[name] = sums.get(name, 0.0) + value * (micro.size / self.share)
        return sums

    def _micro_seed(self, phase: Phase, offset: int) -> int:
        phase_index = next(i for i, p in enumerate(self.phases) if p.name == phase.name)
        words = [self.seed % 2**32, self.step % 2**32, phase_index, offset]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)

    def _any_worker(self, flag: bool) -> bool:
        """True when ``flag`` is set on any worker (an all-reduce of the flags when data parallel)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def check_finite_parameters(self) -> None:
        """Raise :class:`TrainingError` when a network holds a non-finite value.

        A non-finite update shows in the losses only when a later phase reads the network, which may be
        after a snapshot fell due; run before every checkpoint, this keeps such values out of them."""
        for name in ("G", "D", "G_ema"):
            params = list(getattr(self, name).parameters())
            finite = torch.stack([torch.isfinite(p).all() for p in params])
            if bool(finite.all()):
                continue
            bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
            raise TrainingError(
                f"non-finite parameters in {name} after step {self.step} (images seen {self.images_seen}): "
                f"{bad} values; not saved as a checkpoint; expected finite values; lower the learning rates "
                "or check the data"
            )

    def _check_finite(self, phase: str, figures: dict[str, torch.Tensor]) -> None:
        if not figures:
            return
        values = torch.stack([v.float() for v in figures.values()])
        if bool(torch.isfinite(values).all()):
            return
        bad = {k: float(v) for k, v in figures.items() if not torch.isfinite(v)}
        raise TrainingError(
            f"non-finite loss in phase {phase} at step {self.step} (images seen {self.images_seen}): {bad}; "
            "expected finite values; lower the learning rates or check the data"
        )

    # ------------------------------------------------------------------------------------------
    # Data parallel

    @staticmethod
    def _broadcast(module: nn.Module) -> None:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)

    def _average_gradients(self, module: nn.Module) -> None:
        """Average gradients over workers with one flattened all-reduce (missing grads count as 0)."""
        if self.world_size == 1:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def _average_buffers(self, module: nn.Module) -> None:
        """Average running statistics (``w_avg``) so that every worker keeps the same generator."""
        if self.world_size == 1:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.flatten() for b in buffers])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    # ------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict:
        """Networks, optimisers, counters and RNG states (tensors and plain containers only)."""
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "images_seen": int(self.images_seen),
            "step": int(self.step),
            "seed": int(self.seed),  # the micro-batches' draws derive from it (_micro_seed)
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; with several workers each re-derives its own random stream."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.images_seen = int(state["images_seen"])
        self.step = int(state["step"])
        self._deal()
        self.seed = int(state.get("seed", self.seed))  # checkpoints before micro-batch seeding lack it
        set_rng_state(state["rng"])
        if self.world_size > 1:
            seed_everything(self.seed + self.rank + 1_000_003 * self.step)
