"""The rendezvous benchmark (`make bench`): see rendezvous_latency.py."""
