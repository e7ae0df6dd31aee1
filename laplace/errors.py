"""The library's exception classes.

Every error the library raises names the argument, the value and what is accepted. Where
laplace-torch raises another built-in class for the same mistake, ours derives from both, so
``except`` clauses written for either library keep working:

- :class:`HyperparameterTypeError` (``TypeError`` and ``ValueError``): a prior precision,
  prior mean, noise, temperature or subnetwork size that is neither a number nor a tensor.
- :class:`UnknownNameError` (``KeyError`` and ``ValueError``): a module or parameter name the
  model does not have (``last_layer_name``, subnetwork parameter and module names).
- :class:`MissingKeyError` (``KeyError`` and ``ValueError``): a dict-like batch without
  ``dict_key_x`` or ``dict_key_y``.
- :class:`InputMismatchError` (``RuntimeError`` and ``ValueError``): floating data of another
  dtype than the model's, or predictive inputs whose per-sample shape differs from the
  training inputs' where the model cannot take them.
- :class:`UnknownOptionError` (``TypeError`` and ``ValueError``): a keyword option (in
  ``asdl_fisher_kwargs``, say) that a backend's ``full``/``diag``/``kron`` does not take, or
  that an active-learning criterion (:func:`laplace.active.select`) does not take; also a
  metric name that ``optimize_prior_precision(loss=...)`` does not know.
- :class:`UnsupportedLayerError` (``NotImplementedError`` and ``ValueError``): a trainable
  parameter in a layer that the curvlinops K-FAC has no block for (an embedding, or a batch
  normalisation that normalises with the batch's statistics).

``KeyError`` normally shows its message quoted (``str(KeyError("a b"))`` is ``"'a b'"``); the
two key errors here show it as written.
"""

from __future__ import annotations

__all__ = [
    "HyperparameterTypeError",
    "InputMismatchError",
    "MissingKeyError",
    "UnknownNameError",
    "UnknownOptionError",
    "UnsupportedLayerError",
]


class _PlainKeyError(KeyError):
    """A ``KeyError`` whose ``str`` is its message, not the message's ``repr``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter that is neither a number nor a tensor (laplace-torch: ``ValueError``)."""


class UnknownNameError(_PlainKeyError, ValueError):
    """A module or parameter name the model does not have (laplace-torch: ``KeyError``)."""


class MissingKeyError(_PlainKeyError, ValueError):
    """A dict-like batch without the key the library reads (laplace-torch: ``KeyError``)."""


class InputMismatchError(RuntimeError, ValueError):
    """Data whose dtype or feature size does not fit the model (PyTorch: ``RuntimeError``)."""


class UnknownOptionError(TypeError, ValueError):
    """A keyword option a backend's structure method does not accept (laplace-torch: the
    ``TypeError`` of the curvature library it forwards the keyword to), or an unknown metric
    name given as a grid-search ``loss``."""


class UnsupportedLayerError(NotImplementedError, ValueError):
    """A trainable parameter in a layer that a structure has no block for (laplace-torch:
    the ``NotImplementedError`` of ``curvlinops.KFACLinearOperator``)."""
