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
    ``chains``, ``gamma``, ``gamma_source``: how many chains ran (and diverged), at which localization
    γ and how it was set, where known."""

    def __init__(self, message: str, chains: int | None = None, gamma: float | None = None,
                 gamma_source: str | None = None):
        super().__init__(message)
        self.chains, self.gamma, self.gamma_source = chains, gamma, gamma_source
