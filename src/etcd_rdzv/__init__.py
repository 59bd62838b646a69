"""etcd-rdzv: an observable etcd rendezvous backend for torchrun."""

__version__ = "0.1.0"
