"""etcd-rdzv's errors as torchrun's agent gets them: each also a torch rendezvous error.

The rest of the package raises the torch-free classes of `etcd_rdzv.errors`; what torch calls
(the handler, the store) passes its errors through `for_torch`, so torch's agent, and code
written against torch's backends, can catch them by torch's classes. Each class here
subclasses its `etcd_rdzv.errors` class as well: code that catches ours catches these too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributed.elastic.rendezvous import api as torch_rdzv

from etcd_rdzv import errors


class ConfigurationError(errors.ConfigurationError, torch_rdzv.RendezvousError):
    __doc__ = errors.ConfigurationError.__doc__


class EtcdUnavailableError(errors.EtcdUnavailableError, torch_rdzv.RendezvousConnectionError):
    __doc__ = errors.EtcdUnavailableError.__doc__


class EtcdRejectedError(errors.EtcdRejectedError, torch_rdzv.RendezvousConnectionError):
    __doc__ = errors.EtcdRejectedError.__doc__


class RendezvousTimeoutError(errors.RendezvousTimeoutError, torch_rdzv.RendezvousTimeoutError):
    __doc__ = errors.RendezvousTimeoutError.__doc__


class RendezvousClosedError(errors.RendezvousClosedError, torch_rdzv.RendezvousClosedError):
    __doc__ = errors.RendezvousClosedError.__doc__


class CorruptStateError(errors.CorruptStateError, torch_rdzv.RendezvousStateError):
    __doc__ = errors.CorruptStateError.__doc__


_FOR_TORCH: dict[type[errors.EtcdRdzvError], type[errors.EtcdRdzvError]] = {
    errors.ConfigurationError: ConfigurationError,
    errors.EtcdUnavailableError: EtcdUnavailableError,
    errors.EtcdRejectedError: EtcdRejectedError,
    errors.RendezvousTimeoutError: RendezvousTimeoutError,
    errors.RendezvousClosedError: RendezvousClosedError,
    errors.CorruptStateError: CorruptStateError,
}


def for_torch(error: errors.EtcdRdzvError) -> errors.EtcdRdzvError:
    """`error` as an instance of its torch-compatible class: same message, same attributes."""
    torch_class = _FOR_TORCH.get(type(error))
    if torch_class is None:
        return error  # already one of ours above, or a class torch needs no twin for
    twin = torch_class.__new__(torch_class, *error.args)
    twin.args = error.args
    twin.__dict__.update(error.__dict__)
    return twin


@contextmanager
def raised_for_torch() -> Iterator[None]:
    """Re-raise etcd-rdzv's errors as their torch-compatible twins, with their traceback."""
    try:
        yield
    except errors.EtcdRdzvError as error:
        twin = for_torch(error)
        if twin is error:
            raise
        raise twin.with_traceback(error.__traceback__) from error.__cause__
