"""Exceptions raised on bad input. Each message says what was wrong and how to fix it."""


class TLDegeneracyError(Exception):
    """Base class of every error the package raises on purpose."""


class MissingHookError(TLDegeneracyError, KeyError):
    """A hook kind that the model's architecture does not have (e.g. resid_mid on parallel blocks)."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(TLDegeneracyError, ValueError):
    """An analysis that does not handle this model's architecture (it says which part and why); a
    report skips its section."""


class DataError(TLDegeneracyError, ValueError):
    """Data that cannot be used: empty, token ids out of range, sequences longer than n_ctx."""


class NumericalError(TLDegeneracyError, FloatingPointError):
    """Non-finite activations, losses or statistics."""


class EstimateFailedError(NumericalError):
    """A measurement that ran and failed because of its settings (every SGLD chain diverged): not an
    analysis that does not apply to the model, so a report marks the section failed, not skipped.
    ``quantity``: what a result would have recorded of the run, where known (the LLC's chains, gamma,
    gamma_source, loss, selection and n_params), so that a table can keep a row for it."""

    def __init__(self, message: str, quantity: dict | None = None):
        super().__init__(message)
        self.quantity = dict(quantity or {})
