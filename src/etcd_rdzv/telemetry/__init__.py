"""Telemetry behind one seam: the rendezvous reports to an `Observer`, never to a backend."""

from etcd_rdzv.telemetry.observer import NOOP_OBSERVER, Observer, Phase, PhaseScope

__all__ = ["NOOP_OBSERVER", "Observer", "Phase", "PhaseScope"]
