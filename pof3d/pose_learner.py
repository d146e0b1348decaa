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


def straight_through_clamp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient in the backward pass.

    A hard clamp zeroes the gradient of every pose that leaves its range, so no loss can pull it back;
    passing the gradient straight through keeps the pose learner trainable at the boundary.
    """
    # x - x.detach() is exactly zero, so the forward value is the exact clamp even for huge x.
    return x.clamp(low, high).detach() + (x - x.detach())


class PoseLearner(nn.Module):
    """w ``[B, w_dim]`` -> pose ``[B, 2]`` = (yaw h, pitch v) in radians, EG3D convention.

    FC(w_dim -> hidden, leaky ReLU) -> FC(hidden -> 2), output shifted by the centre pose. With ``clamp``
    (cars) h is kept in [0, 2 pi] and the pitch in [0, pi], by a hard clamp as in the official code unless
    ``straight_through`` is set.

    The pitch is in the model's pitch coordinate (``model.pitch_output``, see
    :data:`pof3d.camera.PITCH_COORDINATES`), kept inside (1e-5, pi - 1e-5) either way:

    - ``"eg3d"`` (default, the official code): EG3D's v. The camera's polar angle is
      phi = arccos(1 - 2 v / pi), so the camera moves at 2 / (pi sin phi) per unit of v, without bound
      toward the poles: latents mapped near a pole send the shared pose weights gradients many times
      larger than anyone else's.
    - ``"polar"``: the polar angle phi itself; the camera moves at unit rate everywhere. Whether this
      changes what is learned is measured in docs/fidelity.md ("Pitch at the poles").

    The whole model works in this coordinate (renderer, D's pose head and pseudo labels, the pose
    losses), as the official code's does in its own; both agree at the centre (phi = v = pi/2), and
    :func:`pof3d.camera.to_eg3d` converts for data and metrics.

    The layers are plain equalised-learning-rate layers (lr multiplier 1): the pose learner's learning
    rate is its own optimiser parameter group (``optim.pose_lr``, 2.5e-5 in the paper, which equals the
    official code's G rate 0.0025 times its pose multiplier 0.01). Both layers start with the standard
    initialisation (effective weights N(0, 1/fan_in), zero bias), as the official code's: on the mapping
    network's w the initial poses spread about 45 degrees per axis around a random centre.
    ``init_scale`` multiplies the output layer's initial weights (0.1 starts within a few degrees).
    """

    def __init__(
        self,
        w_dim: int,
        hidden: int = 512,
        yaw_center: float = math.pi / 2,
        pitch_center: float = math.pi / 2,
        clamp: bool = False,
        init_scale: float = 1.0,
        straight_through: bool = False,
    ) -> None:
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self.yaw_center, self.pitch_center, self.clamp = float(yaw_center), float(pitch_center), clamp
        self.straight_through = straight_through
        self.hidden = FullyConnected(w_dim, hidden, activation="lrelu")
        self.out = FullyConnected(hidden, 2)
        with torch.no_grad():
            self.out.weight.mul_(init_scale)

    def past_pole(self, w: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the pitch before any clamp lies at or beyond a pole (outside (0, pi)).

        In the official code (faces, no clamp) such a latent's camera is NaN, and the training loop's
        ``nan_to_num`` then zeroes the whole update of the phase that rendered it; see
        ``loss.skip_past_pole``.
        """
        pitch = self.out(self.hidden(w))[:, 1] + self.pitch_center
        return (pitch <= 0) | (pitch >= math.pi)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.out(self.hidden(w))
        h = x[:, 0] + self.yaw_center
        pitch = x[:, 1] + self.pitch_center
        if self.clamp:
            clamp = straight_through_clamp if self.straight_through else torch.clamp
            h = clamp(h, 0.0, 2 * math.pi)
            pitch = clamp(pitch, 0.0, math.pi)
        pitch = straight_through_clamp(pitch, V_EPS, math.pi - V_EPS)
        return torch.stack((h, pitch), dim=1)
