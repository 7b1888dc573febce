"""A 2-D convolution whose gradients take XLA:CPU's fastest exact form.

XLA:CPU runs the forward ``lax.conv_general_dilated`` well, but two of its
gradients poorly (per-layer timings in BENCHMARKS.md, "Where the time
goes"):

* the input gradient of a stride-2 conv is a conv over the output map
  dilated with zeros. Space-to-depth (``"s2d"``) writes a stride-2 ``k x k``
  conv (even ``k``) as a stride-1 ``k/2 x k/2`` conv on ``4C`` channels,
  whose input gradient has no dilated zeros: about 2x faster;
* the kernel gradient of a first layer with 1-3 input channels: as one
  matmul of the ``k*k`` input patches with the output gradient
  (``"patches"``) it is about 6x faster. From 32 channels on the patches
  (``k*k`` copies of the input) cost more than XLA's own kernel gradient.

Every form sums the same products, so the gradients agree with ``jax.grad``
of the plain conv to float32 rounding. :func:`conv` is the plain conv in the
forward pass, with these forms in its custom VJP as :func:`plan` picks them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride, stride),
                                  ((pad, pad), (pad, pad)),
                                  dimension_numbers=_DIMENSIONS)


def _tap_slices(x, kernel, stride, pad):
  """The ``k*k`` strided input slices, ``[N, Ho, Wo, C]`` each, tap order."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (xp.shape[1] - kernel) // stride + 1
  out_w = (xp.shape[2] - kernel) // stride + 1
  return [lax.slice(xp, (0, i, j, 0),
                    (xp.shape[0], i + stride * (out_h - 1) + 1,
                     j + stride * (out_w - 1) + 1, xp.shape[3]),
                    (1, stride, stride, 1))
          for i in range(kernel) for j in range(kernel)]


def _patches_kernel_grad(x, w, g, stride, pad):
  """``dL/dW`` as one matmul of the ``[k*k, M, C]`` patches with ``g``.

  ``M = N*Ho*Wo``: a ``[k*k, C, O]`` result contracting over ``M``.
  """
  kernel, _, c_in, c_out = w.shape
  patches = jnp.stack([s.reshape(-1, c_in)
                       for s in _tap_slices(x, kernel, stride, pad)])
  grad = lax.dot_general(patches, g.reshape(-1, c_out),
                         (((1,), (0,)), ((), ())))
  return grad.reshape(kernel, kernel, c_in, c_out)


def _space_to_depth(x):
  """``[N, 2H, 2W, C] -> [N, H, W, 4C]``, channels ordered ``(p, q, c)``."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // 2, w // 2, 4 * c)


def _s2d(x, w, stride, pad):
  """Stride 2, even ``k``: a stride-1 ``k/2`` conv of the space-to-depth map.

  ``y[h, w] = sum_{a,b,p,q} x[2(h+a)+p, 2(w+b)+q] W[2a+p, 2b+q]``.
  """
  del stride  # 2
  kernel, _, c_in, c_out = w.shape
  half = kernel // 2
  height, width = x.shape[1] + 2 * pad, x.shape[2] + 2 * pad
  out_h, out_w = (height - kernel) // 2 + 1, (width - kernel) // 2 + 1
  # An odd padded size gets one more zero row/column, then the extra output
  # row/column is cropped.
  x = jnp.pad(x, ((0, 0), (pad, pad + height % 2), (pad, pad + width % 2),
                  (0, 0)))
  w = w.reshape(half, 2, half, 2, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
  y = _lax(_space_to_depth(x), w.reshape(half, half, 4 * c_in, c_out), 1, 0)
  return y[:, :out_h, :out_w]


def _lax_input_grad(x, w, g, stride, pad):
  return jax.vjp(lambda x_: _lax(x_, w, stride, pad), x)[1](g)[0]


def _s2d_input_grad(x, w, g, stride, pad):
  return jax.vjp(lambda x_: _s2d(x_, w, stride, pad), x)[1](g)[0]


def _lax_kernel_grad(x, w, g, stride, pad):
  return jax.vjp(lambda w_: _lax(x, w_, stride, pad), w)[1](g)[0]


# Patches cost k*k copies of the input: a win up to the 3 channels of an RGB
# first layer, a loss from 32 channels on (BENCHMARKS.md).
MAX_PATCH_CHANNELS = 4


INPUT_GRADS = {"lax": _lax_input_grad, "s2d": _s2d_input_grad}
KERNEL_GRADS = {"lax": _lax_kernel_grad, "patches": _patches_kernel_grad}


def plan(kernel_shape, stride: int) -> tuple[str, str]:
  """``(input gradient, kernel gradient)`` forms for a layer.

  Args:
    kernel_shape: ``[k, k, C, O]``.
    stride: the conv's stride.

  Returns:
    A key of :data:`INPUT_GRADS` and one of :data:`KERNEL_GRADS`.
  """
  kernel, _, c_in, _ = kernel_shape
  s2d = stride == 2 and kernel % 2 == 0
  return ("s2d" if s2d else "lax",
          "patches" if c_in <= MAX_PATCH_CHANNELS else "lax")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, stride, pad, forms):
  del forms  # the gradients' forms
  return _lax(x, w, stride, pad)


def _conv_fwd(x, w, stride, pad, forms):
  return _conv(x, w, stride, pad, forms), (x, w)


def _conv_bwd(stride, pad, forms, residuals, g):
  x, w = residuals
  return (INPUT_GRADS[forms[0]](x, w, g, stride, pad),
          KERNEL_GRADS[forms[1]](x, w, g, stride, pad))


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, stride: int, pad: int, forms=None):
  """``lax.conv_general_dilated`` (NHWC, HWIO, symmetric zero padding).

  Args:
    x: ``[N, H, W, C]``.
    w: ``[k, k, C, O]``.
    stride: the stride in both spatial dimensions.
    pad: zero padding on every side.
    forms: ``(input gradient, kernel gradient)`` names; default
      :func:`plan`'s.

  Returns:
    ``[N, Ho, Wo, O]``.
  """
  forms = plan(w.shape, stride) if forms is None else tuple(forms)
  return _conv(x, w, int(stride), int(pad), forms)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated``, through :func:`conv` where it applies.

  The drop-in for ``nnx.Conv(conv_general_dilated=...)``: an NHWC/HWIO conv
  with equal strides, equal symmetric padding, no dilation and one feature
  group goes through :func:`conv`; anything else to ``lax`` unchanged.
  """
  plain = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)
           if lhs.ndim == 4 else None)
  pads = set() if isinstance(padding, str) else {p for p in padding}
  if (plain is not None and dimension_numbers == plain
      and len(set(window_strides)) == 1 and len(pads) == 1
      and len(set(next(iter(pads)))) == 1
      and set(lhs_dilation or (1,)) == {1} == set(rhs_dilation or (1,))
      and feature_group_count == 1 and precision is None
      and all(v is None for v in kwargs.values())):
    return conv(lhs, rhs, window_strides[0], next(iter(pads))[0])
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
