"""The pose learner: a small MLP that turns a latent w into a camera pose (h, v).

Replacing a fixed pose prior by this learned map is what makes the generator pose-free: the pose
distribution is whatever the pose learner maps the latent distribution to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pof3d.camera import V_EPS
from pof3d.layers import FullyConnected

PITCH_OUTPUTS = ("polar", "eg3d")
# The polar angle stays this far from the poles (0.29 degrees): far enough that EG3D's v computed from
# it (about 2e-5 here) is above the camera's own limit V_EPS and round-trips through arccos in float32.
POLAR_EPS = 5e-3


def straight_through_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient in the backward pass.

    A hard clamp would zero the gradient of every pose that leaves its range, so no loss could pull it
    back; passing the gradient straight through keeps the pose learner trainable at the boundary.
    """
    # x - x.detach() is exactly zero, so the forward value is the exact clamp even for huge x.
    return x.clamp(low, high).detach() + (x - x.detach())


def pitch_from_polar(phi: torch.Tensor) -> torch.Tensor:
    """EG3D's pitch v for a camera at polar angle phi: v = pi/2 (1 - cos phi), written as
    pi sin^2(phi/2), which keeps its precision near the pole where 1 - cos phi cancels."""
    return math.pi * torch.sin(phi / 2).square()


class PoseLearner(nn.Module):
    """w ``[B, w_dim]`` -> pose ``[B, 2]`` = (yaw h, pitch v) in radians, EG3D convention.

    FC(w_dim -> hidden, leaky ReLU) -> FC(hidden -> 2), output shifted by the centre pose; with
    ``clamp`` (cars) h is kept in [0, 2 pi] and v in [0, pi].

    What the second output means is ``pitch_output``:

    - ``"eg3d"`` (the reference): the output *is* EG3D's v, kept inside (1e-5, pi - 1e-5). The camera's
      polar angle is phi = arccos(1 - 2 v / pi), whose derivative dphi/dv = 1 / sin(phi) grows without
      bound toward the poles. Latents mapped near a pole therefore send gradients to the shared pose
      weights that are many times larger than anyone else's, and a pose that passes the pole keeps being
      pushed while its render stays at the pole: measured, the learned pitch collapses onto the pole
      (docs/fidelity.md, "pitch at the poles").
    - ``"polar"`` (default): the output is the polar angle phi itself, kept inside
      (POLAR_EPS, pi - POLAR_EPS), and v = pi/2 (1 - cos phi) is derived from it. The camera moves at a
      bounded rate in the output everywhere, so no latent dominates the pose learner's update. Both
      conventions agree at the centre (phi = v = pi/2) and everything downstream (renderer, D's pose
      head, metrics) still sees EG3D's v.

    The layers are plain equalised-learning-rate layers (lr multiplier 1): the pose learner's learning
    rate is its own optimiser parameter group (``optim.pose_lr``, 2.5e-5 in the paper, which equals the
    reference's G rate 0.0025 times its pose multiplier 0.01). The output layer starts with weights
    scaled by ``init_scale`` so that the initial poses spread only a few degrees around the centre.
    """

    def __init__(
        self,
        w_dim: int,
        hidden: int = 512,
        yaw_center: float = math.pi / 2,
        pitch_center: float = math.pi / 2,
        clamp: bool = False,
        init_scale: float = 0.1,
        pitch_output: str = "polar",
    ) -> None:
        super().__init__()
        if pitch_output not in PITCH_OUTPUTS:
            raise ValueError(f"pitch_output={pitch_output!r}: expected one of {', '.join(PITCH_OUTPUTS)}")
        self.yaw_center, self.pitch_center, self.clamp = float(yaw_center), float(pitch_center), clamp
        self.pitch_output = pitch_output
        self.hidden = FullyConnected(w_dim, hidden, activation="lrelu")
        self.out = FullyConnected(hidden, 2)
        with torch.no_grad():
            self.out.weight.mul_(init_scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.out(self.hidden(w))
        h = x[:, 0] + self.yaw_center
        pitch = x[:, 1] + self.pitch_center
        if self.clamp:
            h = straight_through_clamp(h, 0.0, 2 * math.pi)
        if self.pitch_output == "polar":
            # phi in (eps, pi - eps) gives v in (0, pi): the cars' clamp of v holds by construction.
            v = pitch_from_polar(straight_through_clamp(pitch, POLAR_EPS, math.pi - POLAR_EPS))
        else:
            v = straight_through_clamp(pitch, 0.0, math.pi) if self.clamp else pitch
            v = straight_through_clamp(v, V_EPS, math.pi - V_EPS)
        return torch.stack((h, v), dim=1)
