"""On-device image augmentation with explicit keys (docs/training.md#data).

Pure, jit-able functions of a ``jax.random.key``: the training step folds the
step number into its key, so a resumed run augments exactly as an
uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images_uint8) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]."""
  return jnp.asarray(images_uint8, jnp.float32) / 255.0


def augment(key, images: jax.Array, *, hflip: bool, rotation_degrees: float,
            translate: float) -> jax.Array:
  """Random flip and affine transform, one draw per example.

  As torchvision's ``RandomHorizontalFlip()`` then ``RandomAffine(degrees,
  translate=(t, t))`` with nearest sampling and fill 0: the angle is uniform
  in ``[-deg, deg]`` (positive is counter-clockwise) about the image centre,
  and the shift is uniform in ``[-t*W, t*W] x [-t*H, t*H]`` pixels, rounded
  to whole pixels as torchvision does.

  Args:
    key: a ``jax.random.key``.
    images: float32 [B, H, W, C].
    hflip, rotation_degrees, translate: static; all off is the identity.

  Returns:
    float32 [B, H, W, C]; outside the source image is 0.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got {images.shape}.")
  if rotation_degrees < 0 or not 0 <= translate <= 1:
    raise ValueError(f"Need rotation_degrees >= 0 and translate in [0, 1], "
                     f"got {rotation_degrees} and {translate}.")
  if not hflip and rotation_degrees == 0 and translate == 0:
    return jnp.asarray(images)
  b, h, w, c = images.shape
  k_flip, k_angle, k_shift = jax.random.split(key, 3)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,)) & hflip
  angle = jnp.deg2rad(jax.random.uniform(
      k_angle, (b,), minval=-rotation_degrees, maxval=rotation_degrees))
  max_shift = jnp.array([translate * w, translate * h])
  shift = jnp.round(jax.random.uniform(k_shift, (b, 2), minval=-1,
                                       maxval=1) * max_shift)
  # Inverse map: for each output pixel, the source pixel it samples, with
  # coordinates relative to the centre ((W-1)/2, (H-1)/2) of pixel centres.
  cx, cy = (w - 1) / 2, (h - 1) / 2
  ys, xs = jnp.meshgrid(jnp.arange(h) - cy, jnp.arange(w) - cx, indexing="ij")
  xs = xs[None] - shift[:, 0, None, None]
  ys = ys[None] - shift[:, 1, None, None]
  cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
  # Rows point down, so a counter-clockwise turn has this inverse.
  src_x = jnp.round(cos * xs - sin * ys + cx).astype(jnp.int32)
  src_y = jnp.round(sin * xs + cos * ys + cy).astype(jnp.int32)
  # The flip comes first in the forward pipeline, so last in the inverse.
  src_x = jnp.where(flip[:, None, None], w - 1 - src_x, src_x)
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  flat = jnp.clip(src_y, 0, h - 1) * w + jnp.clip(src_x, 0, w - 1)
  out = jnp.take_along_axis(images.reshape(b, h * w, c),
                            flat.reshape(b, h * w, 1), axis=1)
  return jnp.where(inside.reshape(b, h * w, 1), out, 0).reshape(b, h, w, c)
